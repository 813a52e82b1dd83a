"""Build every tiny test model BEFORE the tests run, outside any single test's timeout.

`make test` runs `python -m tests.prebuild` first (its own progress lines), and pytest's session
start (tests/conftest.py) calls `ensure_built()` too, so a plain `pytest` is just as safe. A build
that takes minutes on a busy machine then costs time, never a test: the fixtures that ask for a
model path find it in the cache and return at once.

TO ADD A TINY MODEL: write a `*_path(cache_root=None) -> Path` function that builds through
`tests.tiny_models.cached_build`, and add a `Builder` line to BUILDERS below naming it and the
source files its build depends on. Fixtures keep calling the path function as before.

Builds run as child processes (`python -m tests.prebuild --target module:function`), as many at a time as
there are cores, longest first. When all are built, a stamp in the cache (keyed by the builders'
sources and library versions, and checked against the built directories) makes the next call a
few milliseconds, without importing torch.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Callable

REPO_ROOT = Path(__file__).resolve().parents[1]
MARKER = "TINY_MODEL_COMPLETE.json"  # tests.tiny_models.MARKER (not imported: that pulls in torch)


@dataclass(frozen=True)
class Builder:
    name: str  # shown in the progress lines and accepted by --build
    target: str  # "module:function", called as function(cache_root) -> Path in a child process
    inputs: tuple[str, ...]  # repo-relative files (globs) whose content decides the build


_BASE = ("tests/tiny_*.py", "tests/prebuild.py")  # every tiny-model source: a change re-checks all
# Longest build first: with two cores the chat model (the slowest) runs beside all the others.
BUILDERS: list[Builder] = [
    Builder("chat", "tests.tiny_models:chat_model_path", _BASE),
    Builder("bajie", "tests.tiny_models:bajie_model_path", _BASE),
    Builder("agent", "tests.tiny_agent_model:agent_model_path",
            _BASE + ("tests/tiny_agent_model.py", "models/agent.py", "models/agent_tools.py")),
    Builder("vision", "tests.tiny_vlm:vision_model_path", _BASE + ("tests/tiny_vlm.py",)),
    Builder("xcomposer2", "tests.tiny_xcomposer2:xcomposer2_model_path",
            _BASE + ("tests/tiny_vlm.py", "tests/tiny_xcomposer2.py", "tests/tiny_xcomposer2_code/*.py")),
    Builder("markup", "tests.tiny_markup_model:markup_model_path", _BASE + ("tests/tiny_markup_model.py",)),
]


def cache_root() -> Path:
    return Path(os.environ.get("TINY_MODEL_CACHE") or REPO_ROOT / ".cache" / "tiny-models")


def _stamp_path(root: Path, builders: list[Builder]) -> Path:
    h = hashlib.sha256()
    for b in builders:
        h.update(f"{b.name}={b.target}\n".encode())
        for pattern in b.inputs:
            for path in sorted(glob.glob(str(REPO_ROOT / pattern))):
                h.update(Path(path).read_bytes())
    for dist in ("torch", "transformers", "tokenizers"):
        h.update(metadata.version(dist).encode())
    return root / f".prebuilt-{h.hexdigest()[:16]}.json"


def _stamp_valid(stamp: Path) -> bool:
    try:
        paths = json.loads(stamp.read_text())
    except (OSError, ValueError):
        return False
    return all((Path(p) / MARKER).is_file() for p in paths.values())


def ensure_built(report: Callable[[str], None] = print, builders: list[Builder] | None = None,
                 root: Path | None = None, jobs: int | None = None) -> dict[str, Path]:
    """Build (or find) every model in `builders`; return name -> path. Raises RuntimeError naming
    the builds that failed (with the end of their output)."""
    builders = BUILDERS if builders is None else builders
    root = cache_root() if root is None else root
    root.mkdir(parents=True, exist_ok=True)
    stamp = _stamp_path(root, builders)
    if _stamp_valid(stamp):
        return {k: Path(v) for k, v in json.loads(stamp.read_text()).items()}
    jobs = jobs or max(1, min(len(builders), os.cpu_count() or 1))
    report(f"tiny test models: building or finding {', '.join(b.name for b in builders)} "
           f"in {root} ({jobs} at a time; minutes on a fresh clone)")
    started = time.monotonic()
    paths, failures = {}, []
    with ThreadPoolExecutor(jobs) as pool:  # threads only wait; the builds run in child processes
        futures = {pool.submit(_run_child, b, root): b for b in builders}
        for future in as_completed(futures):
            b = futures[future]
            returncode, out, err, seconds = future.result()
            if returncode == 0 and out.strip():
                paths[b.name] = Path(out.strip().splitlines()[-1])
                report(f"tiny test models: {b.name} ready ({seconds:.0f} s)")
            else:
                tail = "\n".join(err.strip().splitlines()[-15:])
                failures.append(f"{b.name} (exit {returncode}):\n{tail}")
                report(f"tiny test models: {b.name} FAILED (exit {returncode})")
    if failures:
        raise RuntimeError("tiny test model builds failed: " + "\n".join(failures))
    stamp.write_text(json.dumps({k: str(v) for k, v in paths.items()}))
    report(f"tiny test models: all ready in {time.monotonic() - started:.0f} s")
    return paths


def _run_child(b: Builder, root: Path) -> tuple[int, str, str, float]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
    env.setdefault("OMP_NUM_THREADS", "1")  # the tiny builders train on one thread each
    t0 = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "tests.prebuild", "--target", b.target, "--cache-root", str(root)],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True,
    )
    return done.returncode, done.stdout, done.stderr, time.monotonic() - t0


def _build_one(target: str, root: str) -> Path:
    import importlib

    module, function = target.split(":")
    return getattr(importlib.import_module(module), function)(root)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build the tiny test models (cached).")
    parser.add_argument("--build", choices=[b.name for b in BUILDERS], help="build (or find) one model; print its path")
    parser.add_argument("--target", help="the same for a 'module:function' (what the parallel build runs)")
    parser.add_argument("--cache-root", default=None)
    args = parser.parse_args(argv)
    if args.build or args.target:
        target = args.target or next(b.target for b in BUILDERS if b.name == args.build)
        print(_build_one(target, args.cache_root or str(cache_root())))
        return 0
    try:
        ensure_built(lambda line: print(line, flush=True), root=Path(args.cache_root) if args.cache_root else None)
    except RuntimeError as e:
        print(e, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

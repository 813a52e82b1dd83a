"""One memory budget (and process budget) for a whole sandbox run, from the kernel.

Per-process rlimits cannot bound a run: code that forks N children gets N × the limit. The
kernel's memory controller can: each run gets its own control group whose memory limit covers
every process in it (page cache and tmpfs files included), and the kernel's OOM killer acts
inside the group only when the group goes over. Supported:

- cgroup v2 (the unified hierarchy, at /sys/fs/cgroup or /sys/fs/cgroup/unified) when its
  `memory` controller can be enabled for groups we create: `memory.max`, `memory.swap.max`,
  `pids.max`, OOM kills counted in `memory.events`, the peak in `memory.peak`;
- cgroup v1's `memory` hierarchy (and `pids` when mounted): `memory.limit_in_bytes` (and
  `memory.memsw.limit_in_bytes`, so swap does not extend it), `pids.max`, OOM kills counted in
  `memory.oom_control`, the peak in `memory.max_usage_in_bytes`.

Groups are made under the bot's own group in each hierarchy (from /proc/self/cgroup), which
needs write access there (root, or a delegated subtree). `detect()` tries once and says why
not; the sandbox then falls back to per-process limits (see models/sandbox.py).

A process joins a group by writing "0" to its `cgroup.procs` before it execs bubblewrap, so
everything the run starts is inside from the beginning.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import logging
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

CGROUP_ROOT = Path("/sys/fs/cgroup")
_counter = itertools.count(1)


@dataclass
class RunGroup:
    """The control group(s) of one run."""

    version: int  # 1 or 2
    memory: Path
    pids: Path | None  # v1: a separate hierarchy (None when not mounted); v2: the same directory

    @property
    def procs_files(self) -> list[Path]:
        dirs = [self.memory] + ([self.pids] if self.pids is not None and self.pids != self.memory else [])
        return [d / "cgroup.procs" for d in dirs]

    def oom_kills(self) -> int:
        """How many processes the kernel's OOM killer ended in this group."""
        name = "memory.events" if self.version == 2 else "memory.oom_control"
        return _keyed(self.memory / name).get("oom_kill", 0)  # v1: kernel 4.13+

    def peak_bytes(self) -> int | None:
        name = "memory.peak" if self.version == 2 else "memory.max_usage_in_bytes"
        return _read_int(self.memory / name, None)

    def remove(self) -> None:
        """Kill whatever is left in the group(s) and remove them (they must be empty)."""
        for directory in {self.memory, self.pids} - {None}:
            for attempt in range(200):
                try:
                    directory.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError as exc:
                    if exc.errno != errno.EBUSY:
                        log.warning("could not remove %s: %s", directory, exc)
                        break
                    _kill_members(directory)
                    time.sleep(0.01)  # the killed processes are being reaped
            else:
                log.warning("control group %s still has processes; left in place", directory)


@dataclass
class Cgroups:
    """Where run groups are made: the parent directory in each hierarchy."""

    version: int
    memory_parent: Path
    pids_parent: Path | None

    def create(self, memory_bytes: int, max_processes: int) -> RunGroup:
        name = f"internlm-sandbox-{os.getpid()}-{next(_counter)}"
        memory = self.memory_parent / name
        memory.mkdir()
        group = RunGroup(self.version, memory, None)
        try:
            if self.version == 2:
                group.pids = memory
                _write(memory / "memory.max", memory_bytes)
                with contextlib.suppress(FileNotFoundError):
                    _write(memory / "memory.swap.max", 0)
                with contextlib.suppress(FileNotFoundError):
                    _write(memory / "memory.oom.group", 0)  # kill the offender, not the whole run
                _write(memory / "pids.max", max_processes)
            else:
                _write(memory / "memory.limit_in_bytes", memory_bytes)
                with contextlib.suppress(FileNotFoundError, PermissionError, OSError):
                    _write(memory / "memory.memsw.limit_in_bytes", memory_bytes)  # no swap beyond it
                if self.pids_parent is not None:
                    group.pids = self.pids_parent / name
                    group.pids.mkdir()
                    _write(group.pids / "pids.max", max_processes)
        except BaseException:
            group.remove()
            raise
        return group

    def describe(self) -> str:
        return f"cgroup v{self.version} ({self.memory_parent})"


def detect(root: Path = CGROUP_ROOT, proc_cgroup: Path = Path("/proc/self/cgroup")) -> tuple[Cgroups | None, str]:
    """(where to make run groups, or None; a line saying which mechanism or why none)."""
    try:
        mine = _own_groups(proc_cgroup.read_text())
    except OSError as exc:
        return None, f"cannot read {proc_cgroup}: {exc}"
    reasons = []
    for attempt in (_try_v2, _try_v1):
        found, reason = attempt(root, mine)
        if found is not None:
            return found, found.describe()
        reasons.append(reason)
    return None, "; ".join(reasons)


def _own_groups(text: str) -> dict[str, str]:
    """controller (or "" for v2) -> this process's group path."""
    groups = {}
    for line in text.splitlines():
        _, controllers, path = line.split(":", 2)
        for name in controllers.split(",") if controllers else [""]:
            groups[name] = path
    return groups


def _try_v2(root: Path, mine: dict[str, str]) -> tuple[Cgroups | None, str]:
    mount = next((m for m in (root, root / "unified") if (m / "cgroup.controllers").is_file()), None)
    if mount is None or "" not in mine:
        return None, "no cgroup v2 hierarchy"
    parent = mount / mine[""].lstrip("/")
    try:
        if "memory" not in (parent / "cgroup.controllers").read_text().split():
            return None, "cgroup v2 has no memory controller here"
        enabled = (parent / "cgroup.subtree_control").read_text().split()
        wanted = [c for c in ("memory", "pids") if c not in enabled]
        if wanted:  # fails (EBUSY) in a non-root group that has processes of its own
            (parent / "cgroup.subtree_control").write_text(" ".join(f"+{c}" for c in wanted))
        return _verified(Cgroups(2, parent, parent))
    except OSError as exc:
        return None, f"cgroup v2 not usable ({exc.strerror or exc})"


def _try_v1(root: Path, mine: dict[str, str]) -> tuple[Cgroups | None, str]:
    memory_mount = root / "memory"
    if not (memory_mount / "memory.limit_in_bytes").is_file() or "memory" not in mine:
        return None, "no cgroup v1 memory hierarchy"
    pids_parent = None
    if (root / "pids" / "cgroup.procs").is_file() and "pids" in mine:
        pids_parent = root / "pids" / mine["pids"].lstrip("/")
    try:
        return _verified(Cgroups(1, memory_mount / mine["memory"].lstrip("/"), pids_parent))
    except OSError as exc:
        return None, f"cgroup v1 not usable ({exc.strerror or exc})"


def _verified(cgroups: Cgroups) -> tuple[Cgroups, str]:
    """Make and remove one group, so that a read-only or foreign hierarchy is found at start."""
    group = cgroups.create(64 << 20, 4)
    ok = all(f.is_file() and os.access(f, os.W_OK) for f in group.procs_files)
    group.remove()
    if not ok:
        raise PermissionError(errno.EACCES, "cannot move processes into the groups")
    return cgroups, ""


def _write(path: Path, value: int) -> None:
    path.write_text(str(value))


def _read_int(path: Path, default: int | None = 0) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return default


def _keyed(path: Path) -> dict[str, int]:
    out = {}
    with contextlib.suppress(OSError):
        for line in path.read_text().splitlines():
            key, _, value = line.partition(" ")
            with contextlib.suppress(ValueError):
                out[key] = int(value)
    return out


def _kill_members(directory: Path) -> None:
    with contextlib.suppress(OSError):
        for pid in (directory / "cgroup.procs").read_text().split():
            with contextlib.suppress(ProcessLookupError, PermissionError, ValueError):
                os.kill(int(pid), signal.SIGKILL)

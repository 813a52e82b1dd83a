"""Run untrusted Python (the agent's code) in a fresh bubblewrap sandbox, one process per run.

Each run gets: new user, network, pid, ipc, uts and cgroup namespaces (`--unshare-all`: no
network at all); a read-only view of /usr (the system Python and its libraries) and a handful of
/etc files, nothing else of the host (not the project, not DATA_DIR, not /root or /home); a
private, size-capped tmpfs as its working directory (the only writable place); an unprivileged
uid (65534) with no capabilities; an empty environment; rlimits on CPU seconds, address space,
processes and file size; a wall-clock timeout that kills the whole sandbox; and output read
with a byte cap (the process is killed once it has printed more than we keep).

When the bot runs as root, bubblewrap itself is started as uid/gid 65534, so the sandbox is an
unprivileged user outside its namespace too (as root, the "unprivileged" uid inside would map to
uid 0 outside, which owns most files and is exempt from RLIMIT_NPROC).

The rlimits are set by a tiny prelude inside the sandbox, before the user's code is compiled:
set there, RLIMIT_NPROC counts the processes of this sandbox's user namespace only, so two runs
do not share one budget, and the bot's own threads do not count against it.

Memory: one cap (`memory_mb`) holds for the whole run, all its processes together. Where the
kernel's memory controller can be used (models/cgroups.py: cgroup v2, or v1's memory and pids
hierarchies), each run is its own control group with that limit and `max_processes`; going over
gets a process OOM-killed inside the group (reason "memory"). Elsewhere the fallback keeps
per-process address space × processes ≤ the cap (fewer processes, each smaller). Runs at once
are bounded so that runs × cap ≤ `total_memory_mb`; more wait for a slot.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from . import cgroups as cg
from .base import Cancel

log = logging.getLogger(__name__)

NOBODY = 65534
SCRATCH = "/tmp"  # the sandbox's working directory (a private tmpfs)
SCRATCH_MB = 64  # tmpfs size: files written by the code live in memory
FILE_MB = 16  # RLIMIT_FSIZE: the largest file the code may write
READ_CHUNK = 65536
PYTHON_CANDIDATES = ("/usr/bin/python3", "/usr/local/bin/python3")
ETC_FILES = ("ld.so.cache", "ld.so.conf", "ld.so.conf.d", "alternatives", "localtime")
MAX_CODE_CHARS = 100_000
MIN_PROCESS_MB = 128  # without a memory controller: the least address space one process gets
# Joins the run's control group(s) (argv: the groups' cgroup.procs files, "--", the command),
# then becomes the command; so bubblewrap and all it starts are inside from the first instant.
JOIN_CGROUPS = 'while [ "$1" != -- ]; do echo 0 > "$1" || exit 125; shift; done; shift; exec "$@"'

# Runs before the user's code, inside the sandbox: limits first, then the code from stdin.
PRELUDE = r"""
import resource, sys, linecache
cpu, mem, nproc, fsize = map(int, sys.argv[1:5])
resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))
resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
code = sys.stdin.read()
sys.stdin.close()
sys.stdin = open("/dev/null")
sys.argv = ["main.py"]
linecache.cache["main.py"] = (len(code), None, code.splitlines(True), "main.py")
del cpu, mem, nproc, fsize, resource, linecache
try:
    exec(compile(code, "main.py", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
except SystemExit:
    raise
except BaseException as exc:  # show the user's frames only, not this prelude's
    import traceback
    sys.stdout.flush()
    traceback.print_exception(type(exc), exc, exc.__traceback__.tb_next)
    sys.exit(1)
"""


@dataclass(frozen=True)
class SandboxLimits:
    cpu_seconds: int = 10
    wall_seconds: float = 20.0
    memory_mb: int = 512  # for the whole run: all its processes together
    max_processes: int = 32
    max_output_chars: int = 4000
    total_memory_mb: int = 2048  # all runs at once: at most total // memory_mb run concurrently

    @property
    def max_output_bytes(self) -> int:
        return self.max_output_chars * 4  # UTF-8: at most 4 bytes per character

    @property
    def max_concurrent(self) -> int:
        return max(1, self.total_memory_mb // self.memory_mb)

    def per_process(self, whole_run: bool) -> tuple[int, int]:
        """(address-space bytes per process, processes). With a memory controller holding the
        whole run, a process may use all of it; without, their product stays within the cap."""
        if whole_run:
            return self.memory_mb << 20, self.max_processes
        each_mb = min(self.memory_mb, max(self.memory_mb // self.max_processes, MIN_PROCESS_MB))
        return each_mb << 20, max(1, min(self.max_processes, self.memory_mb // each_mb))


@dataclass
class RunResult:
    output: str  # stdout and stderr, interleaved, cut to max_output_chars
    exit_code: int | None  # None when killed by us
    # why it was stopped: "wall", "cpu", "memory", "output", "cancelled", "refused"; None = it exited
    reason: str | None = None
    truncated: bool = False
    bytes_received: int = 0  # what was read from the pipe (bounded by the cap)
    seconds: float = 0.0
    peak_memory_bytes: int | None = None  # the run's peak, all processes (known with a memory controller)

    @property
    def ok(self) -> bool:
        return self.reason is None and self.exit_code == 0

    @property
    def outcome(self) -> str:
        """One word for metrics and logs: ok, error (exited non-zero), timeout, cpu, memory,
        output, cancelled or refused (not run: e.g. the code is too long)."""
        if self.reason is None:
            return "ok" if self.exit_code == 0 else "error"
        return "timeout" if self.reason == "wall" else self.reason

    def for_model(self) -> str:
        """The text the agent's model sees as the environment's answer."""
        text = self.output.rstrip("\n")
        notes = {
            "wall": "[stopped: the wall-clock time limit was reached]",
            "cpu": "[stopped: the CPU time limit was reached]",
            "output": "[stopped: too much output]",
            "cancelled": "[stopped by the user]",
            "memory": "[stopped: the memory limit of the run (all its processes together) was reached]",
            "refused": "",
        }
        if self.truncated and self.reason != "output":
            text += "\n[output truncated]"
        if self.reason and notes[self.reason]:
            text += ("\n" if text else "") + notes[self.reason]
        elif not text:
            text = "[no output; use print() to show results]" if self.exit_code == 0 else f"[exit code {self.exit_code}]"
        return text


class SandboxUnavailable(Exception):
    """Code cannot run safely here (bubblewrap missing or not working); the message says why."""


def strip_code_fences(code: str) -> str:
    """The code inside a ```python ... ``` block, as models write it; plain code unchanged."""
    lines = code.strip("\n").splitlines()
    if lines and lines[0].lstrip().startswith("```"):
        lines = lines[1:]
        if lines and lines[-1].strip().startswith("```"):
            lines = lines[:-1]
    return "\n".join(lines) + "\n"


def find_python() -> str | None:
    return next((p for p in PYTHON_CANDIDATES if os.access(p, os.X_OK)), None)


def _usr_merged(name: str) -> bool:
    return Path("/" + name).is_symlink()


@dataclass
class Sandbox:
    """Runs code; `available` says whether it can, `problem` why not."""

    limits: SandboxLimits = field(default_factory=SandboxLimits)
    bwrap: str | None = field(default_factory=lambda: shutil.which("bwrap"))
    python: str | None = field(default_factory=find_python)
    unsafe_no_bwrap: bool = False  # the admin's explicit opt-in to run code unsandboxed
    max_concurrent: int | None = None  # default: limits.max_concurrent (runs × cap ≤ total)
    use_cgroups: bool = True  # False: per-process limits only (tests of the fallback)
    on_run: Callable[[str, float], None] | None = None  # (outcome, seconds) after each run, for metrics

    def __post_init__(self) -> None:
        self.max_concurrent = self.max_concurrent or self.limits.max_concurrent
        self._slots = asyncio.Semaphore(self.max_concurrent)
        self.problem = self._check()
        self.cgroups, self.memory_mode = self._memory_controller()

    def _memory_controller(self) -> tuple[cg.Cgroups | None, str]:
        """The kernel's memory controller for whole-run limits, or None; and a line saying which."""
        fallback = "per process: {} MB × {} processes".format(
            *(lambda b, n: (b >> 20, n))(*self.limits.per_process(False)))
        if self.bwrap is None or not self.use_cgroups or self.problem is not None:
            return None, fallback
        found, why = _cgroups()
        if found is not None and os.geteuid() == 0 and shutil.which("setpriv") is None:
            found, why = None, "setpriv (util-linux) is missing, so the run could not drop root after joining its group"
        if found is None:
            log.warning("sandbox: no memory controller for whole-run limits (%s); %s", why, fallback)
            return None, fallback
        return found, f"whole run: {self.limits.memory_mb} MB, {self.limits.max_processes} processes ({why})"

    # -- availability ------------------------------------------------------------------
    def _check(self) -> str | None:
        if self.python is None:
            return f"no system Python for the sandbox (looked for {', '.join(PYTHON_CANDIDATES)})"
        if self.bwrap is None:
            if self.unsafe_no_bwrap:
                return None
            return ("bubblewrap (bwrap) is not installed, so the agent will not run code. Install it "
                    "(Debian/Ubuntu: apt-get install bubblewrap; or `make system-deps`), or set "
                    "SANDBOX_UNSAFE_NO_BWRAP=true to run model-written code WITHOUT a sandbox (dangerous).")
        return _probe(self.bwrap, self.python)

    @property
    def available(self) -> bool:
        return self.problem is None

    @property
    def sandboxed(self) -> bool:
        return self.bwrap is not None

    # -- the command line ------------------------------------------------------------------
    def command(self, marker: str = "", whole_run: bool = False) -> list[str]:
        lim = self.limits
        memory, processes = lim.per_process(whole_run)
        python_args = [
            self.python, "-I", "-u", "-c", PRELUDE,
            str(lim.cpu_seconds), str(memory), str(processes), str(FILE_MB << 20),
        ]
        if marker:
            python_args.append(marker)  # lets tests find leftover processes
        if self.bwrap is None:
            return python_args
        args = [
            self.bwrap,
            "--unshare-all", "--unshare-user", "--disable-userns",
            "--die-with-parent", "--new-session", "--cap-drop", "ALL",
            "--ro-bind", "/usr", "/usr",
        ]
        for name in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
            if _usr_merged(name):
                args += ["--symlink", os.readlink("/" + name), "/" + name]
            elif Path("/" + name).is_dir():
                args += ["--ro-bind", "/" + name, "/" + name]
        for name in ETC_FILES:
            if Path("/etc", name).exists():
                args += ["--ro-bind", f"/etc/{name}", f"/etc/{name}"]
        args += [
            "--proc", "/proc", "--dev", "/dev",
            "--size", str(SCRATCH_MB << 20), "--tmpfs", SCRATCH,
            "--remount-ro", "/", "--remount-ro", "/dev",
            "--chdir", SCRATCH,
            "--uid", str(NOBODY), "--gid", str(NOBODY), "--hostname", "sandbox",
            "--clearenv",
            "--setenv", "PATH", "/usr/local/bin:/usr/bin:/bin",
            "--setenv", "HOME", SCRATCH, "--setenv", "TMPDIR", SCRATCH,
            "--setenv", "LANG", "C.UTF-8", "--setenv", "PYTHONIOENCODING", "utf-8",
            "--setenv", "PYTHONDONTWRITEBYTECODE", "1", "--setenv", "MPLBACKEND", "Agg",
            "--",
        ]
        return args + python_args

    # -- running -------------------------------------------------------------------------
    async def run(self, code: str, *, cancel: Cancel | None = None, marker: str = "") -> RunResult:
        """Run `code` and return its output. Raises SandboxUnavailable when it cannot run safely."""
        started = time.perf_counter()
        try:
            result = await self._execute(code, cancel=cancel, marker=marker)
        except SandboxUnavailable:
            self._report("refused", started)
            raise
        self._report(outcome_of(result), started)
        return result

    def _report(self, outcome: str, started: float) -> None:
        if self.on_run is not None:
            self.on_run(outcome, time.perf_counter() - started)

    async def _execute(self, code: str, *, cancel: Cancel | None, marker: str) -> RunResult:
        if self.problem is not None:
            raise SandboxUnavailable(self.problem)
        if len(code) > MAX_CODE_CHARS:
            return RunResult(f"[the code is too long: {len(code)} characters, the limit is {MAX_CODE_CHARS}]", 1,
                             reason="refused")
        async with self._slots:
            if cancel is not None and cancel.is_set:
                return RunResult("", None, reason="cancelled")
            if self.bwrap is None:
                return await self._run_unsafe(code, cancel, marker)
            group = None
            if self.cgroups is not None:
                try:
                    group = self.cgroups.create(self.limits.memory_mb << 20, self.limits.max_processes)
                except OSError as exc:  # e.g. the hierarchy went away: this run gets the fallback
                    log.warning("sandbox: cannot make this run's control group (%s); per-process limits", exc)
            if group is None:
                # bwrap's own environment is visible inside (/proc/1/environ of its init): keep it empty
                extra = dict(self._drop_privileges(), env={"PATH": "/usr/bin:/bin"}, cwd="/")
                return await self._run(self.command(marker), code, cancel, extra)
            return await self._run_in_group(group, code, cancel, marker)

    async def _run_in_group(self, group: cg.RunGroup, code: str, cancel: Cancel | None, marker: str) -> RunResult:
        """The run in its own control group: one memory cap and process cap for all of it."""
        try:
            argv = ["/bin/sh", "-c", JOIN_CGROUPS, "sh", *map(str, group.procs_files), "--"]
            if os.geteuid() == 0:  # join as root, then drop to nobody (see the module docstring)
                argv += [shutil.which("setpriv"), f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "--"]
            result = await self._run(argv + self.command(marker, whole_run=True), code, cancel,
                                     dict(env={"PATH": "/usr/bin:/bin"}, cwd="/"))
            if group.oom_kills() and result.reason != "cancelled":
                result.reason = "memory"
            result.peak_memory_bytes = group.peak_bytes()
            return result
        finally:
            await asyncio.to_thread(group.remove)

    def _drop_privileges(self) -> dict:
        if os.geteuid() == 0:  # see the module docstring
            return dict(user=NOBODY, group=NOBODY, extra_groups=[])
        return {}

    async def _run_unsafe(self, code: str, cancel: Cancel | None, marker: str) -> RunResult:
        import tempfile

        log.warning("running agent code WITHOUT a sandbox (SANDBOX_UNSAFE_NO_BWRAP=true)")
        with tempfile.TemporaryDirectory(prefix="agent-unsafe-") as scratch:
            env = {"PATH": "/usr/bin:/bin", "HOME": scratch, "LANG": "C.UTF-8", "PYTHONIOENCODING": "utf-8"}
            return await self._run(self.command(marker), code, cancel, {"cwd": scratch, "env": env})

    async def _run(self, argv: list[str], code: str, cancel: Cancel | None, extra: dict) -> RunResult:
        started = time.perf_counter()
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            start_new_session=True, close_fds=True, **extra,
        )
        reason: str | None = None
        received = bytearray()
        total = 0
        truncated = False
        cap = self.limits.max_output_bytes

        async def feed_code() -> None:
            try:
                proc.stdin.write(code.encode("utf-8", "replace"))
                await proc.stdin.drain()
                proc.stdin.close()
            except (BrokenPipeError, ConnectionResetError):
                pass

        async def read_output() -> None:
            nonlocal total, truncated, reason
            while True:
                chunk = await proc.stdout.read(READ_CHUNK)
                if not chunk:
                    return
                total += len(chunk)
                room = cap - len(received)
                if room > 0:
                    received.extend(chunk[:room])
                if total > cap and not truncated:  # never buffer more than the cap: stop the producer
                    truncated = True
                    reason = reason or "output"
                    _kill(proc)  # then read on (and drop) what is left in the pipe, up to EOF

        async def watch_cancel() -> None:
            while cancel is not None and not cancel.is_set:
                await asyncio.sleep(0.05)

        async def finish() -> int:
            await read_output()
            return await proc.wait()

        writer = asyncio.create_task(feed_code())
        finished = asyncio.create_task(finish())
        canceller = asyncio.create_task(watch_cancel())
        try:
            done, _ = await asyncio.wait(
                {finished, canceller} if cancel is not None else {finished},
                timeout=self.limits.wall_seconds, return_when=asyncio.FIRST_COMPLETED,
            )
            if finished not in done:
                reason = reason or ("cancelled" if canceller in done else "wall")
                _kill(proc)
            # after a kill every writer of the pipe is gone, so EOF and the exit come promptly
            exit_code = await asyncio.wait_for(asyncio.shield(finished), timeout=10)
        except BaseException:
            _kill(proc)
            raise
        finally:
            for task in (writer, finished, canceller):
                task.cancel()
            if proc.returncode is None:
                _kill(proc)
                try:
                    await asyncio.wait_for(proc.wait(), timeout=5)
                except Exception:
                    log.error("sandbox process %s did not exit after SIGKILL", proc.pid)
        if reason is None and exit_code and _memory_error(received):
            reason = "memory"  # an allocation over the address-space limit
        elif reason is None and exit_code in (-signal.SIGXCPU, 128 + signal.SIGXCPU):
            reason = "cpu"
        elif reason is None and exit_code in (-signal.SIGKILL, 128 + signal.SIGKILL) and _cpu_exhausted(started, self.limits):
            reason = "cpu"  # the hard limit (soft + 1 s) sends SIGKILL
        output = received.decode("utf-8", "replace")
        if len(output) > self.limits.max_output_chars:
            output, truncated = output[: self.limits.max_output_chars], True
        return RunResult(
            output=output,
            exit_code=None if reason in ("wall", "output", "cancelled") else exit_code,
            reason=reason,
            truncated=truncated,
            bytes_received=len(received),
            seconds=time.perf_counter() - started,
        )


def outcome_of(result: RunResult) -> str:
    """The metrics' word for a run: ok, error, timeout (wall or CPU time), memory_cap, output_cap,
    cancelled or refused."""
    words = {"cpu": "timeout", "memory": "memory_cap", "output": "output_cap"}
    return words.get(result.outcome, result.outcome)


def _kill(proc: asyncio.subprocess.Process) -> None:
    """SIGKILL the process group: bwrap (and with it, through --die-with-parent and the pid
    namespace, everything in the sandbox) or, unsandboxed, the code and its children."""
    if proc.returncode is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    except PermissionError:
        proc.kill()


def _memory_error(output: bytes) -> bool:
    """The code ended on an uncaught MemoryError (the last traceback line names it)."""
    lines = output.rstrip().splitlines()
    return bool(lines) and lines[-1].startswith(b"MemoryError")


_detected: list[tuple[cg.Cgroups | None, str]] = []


def _cgroups() -> tuple[cg.Cgroups | None, str]:
    """The memory controller, detected once per process."""
    if not _detected:
        _detected.append(cg.detect())
    return _detected[0]


def _cpu_exhausted(started: float, limits: SandboxLimits) -> bool:
    return time.perf_counter() - started >= limits.cpu_seconds


_probed: dict[tuple[str, str, int], str | None] = {}


def _probe(bwrap: str, python: str) -> str | None:
    """Check once per process that bubblewrap really starts here (user namespaces can be
    disabled by the kernel or by AppArmor); returns the problem, or None."""
    key = (bwrap, python, os.geteuid())
    if key not in _probed:
        sandbox = Sandbox.__new__(Sandbox)
        sandbox.limits, sandbox.bwrap, sandbox.python = SandboxLimits(), bwrap, python
        extra = dict(sandbox._drop_privileges(), env={"PATH": "/usr/bin:/bin"}, cwd="/")
        try:
            done = subprocess.run(
                sandbox.command(), input=b"print('sandbox ok')", capture_output=True, timeout=30, **extra
            )
            out = done.stdout.decode(errors="replace") + done.stderr.decode(errors="replace")
            if done.returncode == 0 and "sandbox ok" in out:
                _probed[key] = None
            else:
                detail = re.sub(r"\s+", " ", out).strip()[:300]
                _probed[key] = (f"bubblewrap does not work here ({bwrap} exited with {done.returncode}: {detail}). "
                                "Unprivileged user namespaces may be disabled (sysctl kernel.unprivileged_userns_clone, "
                                "or AppArmor's restrict_unprivileged_userns).")
        except Exception as exc:
            _probed[key] = f"bubblewrap could not be started: {exc!r}"
    return _probed[key]

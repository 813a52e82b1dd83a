"""DATA_DIR at start-up: usable (writable, not full) and used by this process alone.

Two bot processes on one DATA_DIR would mix their sessions in one database, so the first takes
an exclusive lock (flock on DATA_DIR/bot.lock, released by the kernel when the process dies,
kill -9 included) and a second one stops at once. Every problem is one line naming DATA_DIR and
the cause, never a traceback.
"""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path

LOCK_FILE = "bot.lock"
PROBE_BYTES = 64 * 1024  # room for a few answers; less than this counts as full


class DataDirError(Exception):
    """DATA_DIR cannot be used; the message is one line for the operator."""


def cause(exc: BaseException) -> str:
    """A short cause for an OSError or an sqlite3 error ("No space left on device")."""
    if isinstance(exc, OSError) and exc.errno is not None:
        return os.strerror(exc.errno)
    return str(exc) or type(exc).__name__


class DataDirLock:
    """The held lock; keep it for the life of the process (closing it releases the lock)."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path, self.fd = path, fd

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def claim(data_dir: Path) -> DataDirLock:
    """Create DATA_DIR if needed, lock it and check that it takes writes."""
    where = data_dir.resolve()
    try:
        where.mkdir(parents=True, exist_ok=True)
        fd = os.open(where / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise DataDirError(f"DATA_DIR {where} is not usable: {cause(exc)}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        holder = _read_pid(fd)
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            who = f" (pid {holder})" if holder else ""
            raise DataDirError(
                f"DATA_DIR {where} is in use by another bot process{who}; stop it or give this one its own DATA_DIR"
            ) from None
        raise DataDirError(f"DATA_DIR {where} cannot be locked: {cause(exc)}") from None
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        _probe(where)
    except OSError as exc:
        os.close(fd)
        raise DataDirError(f"DATA_DIR {where} is not usable: {cause(exc)}") from None
    return DataDirLock(where, fd)


def _probe(where: Path) -> None:
    """Write and remove a small file: a full disk fails here, not in the middle of an answer."""
    probe = where / f".probe-{os.getpid()}"
    try:
        with open(probe, "wb") as f:
            f.write(b"\0" * PROBE_BYTES)
            f.flush()
            os.fsync(f.fileno())
    finally:
        try:
            probe.unlink()
        except FileNotFoundError:
            pass


def _read_pid(fd: int) -> str:
    try:
        return os.pread(fd, 32, 0).decode(errors="replace").strip()
    except OSError:
        return ""

"""The pictures conversations are about, kept under DATA_DIR/pictures so that follow-up
questions still have their picture after a restart.

One PNG (the prepared picture, already shrunk) and one JSON (whose session, its token and how it
came in) per session, named by a hash of the session key. The same limits as in memory: the
files together stay under `max_bytes` (oldest dropped first) and a picture unused for
`idle_seconds` (by the file's modification time, which each use renews) is deleted. A disk
that cannot take the picture costs only the picture after a restart (logged at most once a
minute), never the answer.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path

from PIL import Image

from .images import PreparedImage
from .logs import OncePerMinute

log = logging.getLogger(__name__)
disk_alarm = OncePerMinute(log)

TOUCH_EVERY = 60.0  # seconds between renewals of a picture's modification time while in use


class PictureFiles:
    def __init__(self, directory: Path, *, max_bytes: int, idle_seconds: float) -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        self.idle_seconds = idle_seconds
        self._touched: dict[str, float] = {}

    def _paths(self, key: str) -> tuple[Path, Path]:
        name = hashlib.sha256(key.encode()).hexdigest()[:32]
        return self.directory / f"{name}.png", self.directory / f"{name}.json"

    def save(self, key: str, token: str, picture: PreparedImage) -> None:
        image_path, meta_path = self._paths(key)
        meta = {"key": key, "token": token, "format": picture.source_format, "size": list(picture.source_size),
                "bytes": picture.source_bytes, "frames": picture.frames}
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            _write_atomically(image_path, lambda f: picture.image.save(f, "PNG"))
            _write_atomically(meta_path, lambda f: f.write(json.dumps(meta).encode()))
        except OSError as exc:
            self.delete(key)
            disk_alarm("could not keep a picture under %s: %s; it is kept in memory only", self.directory, exc)
            return
        self._sweep()

    def load(self, key: str) -> tuple[str, PreparedImage] | None:
        """(token, picture) kept for this session, or None (never kept, expired, unreadable)."""
        image_path, meta_path = self._paths(key)
        try:
            if time.time() - image_path.stat().st_mtime >= self.idle_seconds:
                self.delete(key)
                return None
            meta = json.loads(meta_path.read_text())
            if meta.get("key") != key:
                return None
            with Image.open(image_path) as opened:
                image = opened.convert("RGB")
        except (OSError, ValueError) as exc:
            if not isinstance(exc, FileNotFoundError):
                log.warning("could not read a kept picture (%s): %s", image_path.name, exc)
            return None
        picture = PreparedImage(image, meta["format"], tuple(meta["size"]), int(meta["bytes"]), int(meta["frames"]))
        self.touch(key)
        return meta["token"], picture

    def touch(self, key: str) -> None:
        """The picture was used: renew its expiry (at most once a minute per session)."""
        now = time.monotonic()
        if now - self._touched.get(key, -TOUCH_EVERY) < TOUCH_EVERY:
            return
        self._touched[key] = now
        for path in self._paths(key):
            try:
                os.utime(path)
            except OSError:
                pass

    def delete(self, key: str) -> None:
        self._touched.pop(key, None)
        for path in self._paths(key):
            try:
                path.unlink()
            except FileNotFoundError:
                pass
            except OSError as exc:
                log.warning("could not delete a kept picture %s: %s", path.name, exc)

    def _sweep(self) -> None:
        """Drop expired pictures, then the oldest until the rest fit in `max_bytes`."""
        try:
            images = sorted(((p.stat().st_mtime, p.stat().st_size, p) for p in self.directory.glob("*.png")), key=lambda x: x[0])
        except OSError:
            return
        total = sum(size for _, size, _ in images)
        now = time.time()
        for mtime, size, path in images:
            if total <= self.max_bytes and now - mtime < self.idle_seconds:
                break
            total -= size
            for stale in (path, path.with_suffix(".json")):
                stale.unlink(missing_ok=True)


def _write_atomically(path: Path, write) -> None:
    temporary = path.with_name(path.name + ".tmp")
    try:
        with open(temporary, "wb") as f:
            write(f)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)

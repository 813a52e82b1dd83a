"""Image intake: from an `ImageAttachment` to a small RGB picture a vision model can take.

Platform-neutral (Pillow only). The order of checks keeps bad files cheap:
1. the declared size, before anything is downloaded;
2. the downloaded size (a platform may not declare one, or lie);
3. the format, from the file's first bytes and Pillow's header parse (no pixels decoded yet);
4. the pixel count from the header: a decompression bomb is refused before decoding;
5. decoding (truncated or corrupt data fails here), JPEGs at a reduced DCT scale (`draft`);
6. EXIF orientation, first frame of an animation, RGB, and a downscale to `side`.
The downloaded bytes and the full-size decode are dropped on return; only the small picture
lives on, in `ImageMemory` (the picture each session is talking about).

What is stored where: the picture lives only in `ImageMemory` (RAM, capped, idle entries
dropped); the history database records the question with an attachment marker
`image:<token> <format> <w>x<h> <size>`. The token ties the conversation in the database to the
picture in memory: once /reset deletes the marked row, or a restart empties the memory, a
follow-up finds no picture and the user is asked for it again.
"""

from __future__ import annotations

import asyncio
import io
import logging
import math
import time
import warnings
from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import Callable, Sequence

from PIL import Image, ImageOps, UnidentifiedImageError

from .messages import ImageAttachment

log = logging.getLogger(__name__)

DEFAULT_SIDE = 980  # long side of the prepared picture when the model does not say: 2x XComposer2's 490
FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF")  # what we decode; Pillow probes only these

_NOT_IMAGE_SIGNATURES = {
    b"%PDF": "PDF",
    b"PK\x03\x04": "ZIP",
    b"\x1f\x8b": "GZIP",
    b"Rar!": "RAR",
    b"7z\xbc\xaf": "7Z",
}


class ImageProblem(Exception):
    """The image cannot be used; `key` names the i18n text for the user, `values` fill it."""

    def __init__(self, key: str, detail: str, **values: object) -> None:
        super().__init__(detail)
        self.key = key
        self.values = values


@dataclass(frozen=True)
class PreparedImage:
    image: Image.Image  # RGB, at most `side` pixels on the long side
    source_format: str  # JPEG, PNG, ...
    source_size: tuple[int, int]  # the original width and height (after EXIF rotation)
    source_bytes: int
    frames: int  # > 1 for an animation (only the first is used)

    @property
    def nbytes(self) -> int:
        return self.image.width * self.image.height * 3

    def describe(self) -> str:
        """One line for logs and the history's attachment column."""
        w, h = self.source_size
        text = f"{self.source_format.lower()} {w}x{h} {self.source_bytes / 1024:.0f}KiB"
        return text + (f" first of {self.frames} frames" if self.frames > 1 else "")


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f}".rstrip("0").rstrip(".")


async def prepare_image(
    attachment: ImageAttachment, *, max_bytes: int, max_pixels: int, side: int = DEFAULT_SIDE
) -> PreparedImage:
    """Download, check and decode an attachment (decoding on a worker thread). Raises
    `ImageProblem` for anything the user should be told about."""
    if attachment.mime_type.lower() == "application/pdf" or attachment.filename.lower().endswith(".pdf"):
        raise ImageProblem("image_pdf", f"declared as a PDF ({attachment.filename!r}, {attachment.mime_type!r})")
    if attachment.size is not None and attachment.size > max_bytes:
        raise ImageProblem(
            "image_too_big", f"declared size {attachment.size} > {max_bytes}",
            size=_mib(attachment.size), limit=_mib(max_bytes),
        )
    try:
        data = await attachment.fetch()
    except Exception as exc:
        raise ImageProblem("image_download_failed", f"download failed: {exc!r}") from exc
    if len(data) > max_bytes:
        raise ImageProblem("image_too_big", f"downloaded {len(data)} > {max_bytes}", size=_mib(len(data)), limit=_mib(max_bytes))
    return await asyncio.to_thread(decode_image, data, max_pixels=max_pixels, side=side)


def decode_image(data: bytes, *, max_pixels: int, side: int = DEFAULT_SIDE) -> PreparedImage:
    """Bytes → PreparedImage (blocking; see `prepare_image`)."""
    for signature, kind in _NOT_IMAGE_SIGNATURES.items():
        if data.startswith(signature):
            key = "image_pdf" if kind == "PDF" else "image_not_image"
            raise ImageProblem(key, f"a {kind} file, not an image")
    if not data:
        raise ImageProblem("image_not_image", "empty file")
    with warnings.catch_warnings():
        # Pillow's own bomb check warns (and errors at 2x its limit); ours is the setting below.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            im = Image.open(io.BytesIO(data), formats=FORMATS)
        except Image.DecompressionBombError as exc:
            raise ImageProblem("image_too_many_pixels", str(exc), pixels=_megapixels_of(exc), limit=_mp(max_pixels)) from exc
        except UnidentifiedImageError as exc:
            raise ImageProblem("image_not_image", "not a recognised image format") from exc
        except Exception as exc:  # broken headers raise all sorts (SyntaxError, struct.error, ...)
            raise ImageProblem("image_corrupt", f"header unreadable: {exc!r}") from exc
        with im:
            width, height = im.size
            if width * height > max_pixels:
                raise ImageProblem(
                    "image_too_many_pixels", f"{width}x{height} > {max_pixels} pixels",
                    pixels=_mp(width * height), limit=_mp(max_pixels),
                )
            source_format = im.format or "?"
            frames = int(getattr(im, "n_frames", 1) or 1)
            orientation = _orientation(im)
            try:
                picture = _first_frame_rgb(im, side, orientation)
            except Image.DecompressionBombError as exc:
                raise ImageProblem("image_too_many_pixels", str(exc), pixels=_mp(width * height), limit=_mp(max_pixels)) from exc
            except Exception as exc:  # truncated data, bad Huffman tables, CRC errors, ...
                raise ImageProblem("image_corrupt", f"cannot decode: {exc!r}") from exc
    oriented = (height, width) if orientation in (5, 6, 7, 8) else (width, height)
    return PreparedImage(picture, source_format, oriented, len(data), frames)


def _first_frame_rgb(im: Image.Image, side: int, orientation: int) -> Image.Image:
    if im.format == "JPEG":
        # Decode at 1/2, 1/4 or 1/8 scale (DCT scaling) when that still covers the target box:
        # a 12-megapixel photo then never exists at full size in memory. The box keeps the
        # stored picture's aspect (draft wants both sides covered) and its un-rotated axes.
        w, h = im.size
        scale = min(1.0, side / max(w, h))
        im.draft("RGB", (max(1, math.ceil(w * scale)), max(1, math.ceil(h * scale))))
    im.seek(0)
    im.load()
    frame = _to_rgb(im)  # before resizing: palette images would otherwise resize as NEAREST
    if max(frame.size) > side:
        frame = frame.copy() if frame is im else frame
        frame.thumbnail((side, side), Image.Resampling.BICUBIC, reducing_gap=2.0)
    if orientation in (2, 3, 4, 5, 6, 7, 8):  # after shrinking: rotating the small picture is cheap
        frame = ImageOps.exif_transpose(frame)
    return frame.copy() if frame is im else frame  # never hand out the (closing) file's image


def _to_rgb(im: Image.Image) -> Image.Image:
    """RGB; transparency becomes white, as a chat client shows it on a light background."""
    if im.mode == "RGB":
        return im
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    if im.mode.startswith("I;16") or im.mode in ("I", "F"):
        im = im.point(lambda v: v / 256).convert("L") if im.mode != "F" else im.convert("L")
    return im.convert("RGB")


def _orientation(im: Image.Image) -> int:
    try:
        return int(im.getexif().get(0x0112, 1) or 1)
    except Exception:  # a broken EXIF block is not worth refusing the picture for
        return 1


def _mp(pixels: int) -> str:
    return f"{pixels / 1e6:.0f}"


def _megapixels_of(exc: Exception) -> str:
    """Pillow's bomb error says "Image size (N pixels) exceeds ..."."""
    import re

    m = re.search(r"\((\d+) pixels\)", str(exc))
    return _mp(int(m.group(1))) if m else "?"


# -- the picture a conversation is about --------------------------------------------------------

MARKER = "image:"
MEMORY_BYTES = 256 * 2**20  # decoded pictures kept for follow-ups, all sessions together
MEMORY_IDLE_SECONDS = 6 * 3600  # a picture nobody asked about for this long is dropped


@dataclass
class Picture:
    """A session's picture, carried by the turn into the responder."""

    token: str  # ties it to the history row whose attachment marker names it
    prepared: PreparedImage
    used: float = 0.0

    @property
    def nbytes(self) -> int:
        return self.prepared.nbytes

    def image_for(self, side: int) -> Image.Image:
        """The picture at most `side` pixels on its long side (0: as taken in). Taken in before the
        model was loaded, it was shrunk to DEFAULT_SIDE; the model's own size is applied once
        and kept, so follow-ups do not shrink it again."""
        image = self.prepared.image
        if side and max(image.size) > side:
            image = image.copy()
            image.thumbnail((side, side), Image.Resampling.BICUBIC)
            self.prepared = replace(self.prepared, image=image)
        return image

    def marker(self) -> str:
        return f"{MARKER}{self.token} {self.prepared.describe()}"


def token_of(attachment: str | None) -> str | None:
    if not attachment or not attachment.startswith(MARKER):
        return None
    return attachment[len(MARKER) :].split(" ", 1)[0]


def since_picture(rows: Sequence, attachment: str | None) -> tuple[int, str | None]:
    """Where the conversation about the current picture starts in `rows` (the stored history,
    oldest first, objects with an `attachment`), and the picture's token. A turn that brings its
    own marked attachment starts a new conversation: (len(rows), its token)."""
    if token_of(attachment):
        return len(rows), token_of(attachment)
    anchor = next((i for i in range(len(rows) - 1, -1, -1) if token_of(rows[i].attachment)), None)
    return (len(rows), None) if anchor is None else (anchor, token_of(rows[anchor].attachment))


class ImageMemory:
    """The picture each session is talking about. In RAM only; least recently used pictures
    are dropped beyond `max_bytes`, and any picture idle for `idle_seconds`."""

    def __init__(
        self, max_bytes: int = MEMORY_BYTES, idle_seconds: float = MEMORY_IDLE_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_bytes = max_bytes
        self.idle_seconds = idle_seconds
        self.clock = clock
        self._items: OrderedDict[str, Picture] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    @property
    def nbytes(self) -> int:
        return sum(item.nbytes for item in self._items.values())

    def put(self, key: str, token: str, picture: PreparedImage) -> Picture:
        self.forget(key)
        item = self._items[key] = Picture(token, picture, self.clock())
        self._evict()
        return item

    def get(self, key: str) -> Picture | None:
        self._evict()
        item = self._items.get(key)
        if item is not None:
            item.used = self.clock()
            self._items.move_to_end(key)
        return item

    def forget(self, key: str) -> None:
        self._items.pop(key, None)

    def _evict(self) -> None:
        now = self.clock()
        total = self.nbytes
        while self._items:
            key, oldest = next(iter(self._items.items()))
            if total <= self.max_bytes and now - oldest.used < self.idle_seconds:
                break
            total -= oldest.nbytes
            self.forget(key)

"""Image intake (bot/images.py): every bad file gets its specific problem, good ones come out
small, RGB, upright and first-frame; sizes are checked before downloading."""

from __future__ import annotations

import io
import struct
import zlib
from functools import lru_cache

import pytest
from PIL import Image

from bot.i18n import TEXTS
from bot.images import ImageProblem, decode_image, prepare_image
from bot.messages import ImageAttachment
from bot.vision_feature import TEXTS as VISION_TEXTS

MAX_BYTES = 20 * 2**20
MAX_PIXELS = 50_000_000


def encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buffer = io.BytesIO()
    im.save(buffer, fmt, **kw)
    return buffer.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


@lru_cache(maxsize=1)
def bomb_png(width: int = 20000, height: int = 10000) -> bytes:
    """A real, valid 200-megapixel PNG (1 bit per pixel, all black) of about 25 KB."""
    row = b"\x00" * (1 + (width + 7) // 8)
    packer = zlib.compressobj(9)
    data = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", data) + _chunk(b"IEND", b"")


def animated_gif() -> bytes:
    frames = [Image.new("RGB", (40, 30), color) for color in ((230, 20, 20), (20, 40, 230))]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


def attachment(data: bytes, *, size: int | None = -1, filename: str = "", mime: str = "") -> tuple[ImageAttachment, list]:
    fetched: list[int] = []

    async def fetch() -> bytes:
        fetched.append(1)
        return data

    return ImageAttachment(fetch=fetch, size=len(data) if size == -1 else size, filename=filename, mime_type=mime), fetched


def problem(data: bytes, **kw) -> ImageProblem:
    with pytest.raises(ImageProblem) as info:
        decode_image(data, max_pixels=kw.pop("max_pixels", MAX_PIXELS), **kw)
    return info.value


def test_every_problem_has_texts_in_both_languages():
    for key in ("image_pdf", "image_not_image", "image_too_many_pixels", "image_corrupt", "image_too_big",
                "image_download_failed", "image_needed"):
        assert set(VISION_TEXTS[key]) == {"en", "zh"}
    assert "model_server_down" in TEXTS


def test_a_big_photo_comes_out_small_rgb_and_keeps_its_aspect():
    im = Image.new("RGB", (4000, 3000), (10, 200, 30))
    prepared = decode_image(encode(im, "JPEG", quality=85), max_pixels=MAX_PIXELS, side=490)
    assert prepared.image.mode == "RGB"
    assert prepared.image.size == (490, 368)
    assert prepared.source_size == (4000, 3000) and prepared.source_format == "JPEG" and prepared.frames == 1
    r, g, b = prepared.image.getpixel((245, 184))
    assert g > 180 and r < 40 and b < 60
    assert prepared.describe().startswith("jpeg 4000x3000 ")


def test_exif_orientation_is_applied():
    # Stored landscape, red on the left; orientation 6 means "rotate 90° clockwise to view".
    im = Image.new("RGB", (200, 100), (20, 40, 230))
    im.paste((230, 20, 20), (0, 0, 100, 100))
    exif = Image.Exif()
    exif[0x0112] = 6
    prepared = decode_image(encode(im, "JPEG", exif=exif.tobytes(), quality=95), max_pixels=MAX_PIXELS)
    assert prepared.image.size == (100, 200)  # upright: portrait
    assert prepared.source_size == (100, 200)
    top, bottom = prepared.image.getpixel((50, 20)), prepared.image.getpixel((50, 180))
    assert top[0] > 200 and top[2] < 60  # the left (red) half is now on top
    assert bottom[2] > 200 and bottom[0] < 60


def test_animated_gif_gives_its_first_frame():
    prepared = decode_image(animated_gif(), max_pixels=MAX_PIXELS)
    assert prepared.frames == 2 and prepared.source_format == "GIF"
    r, g, b = prepared.image.getpixel((20, 15))
    assert r > 200 and b < 60
    assert "first of 2 frames" in prepared.describe()


def test_transparency_becomes_white_and_odd_modes_become_rgb():
    rgba = Image.new("RGBA", (10, 10), (0, 0, 0, 0))
    assert decode_image(encode(rgba, "PNG"), max_pixels=MAX_PIXELS).image.getpixel((5, 5)) == (255, 255, 255)
    cmyk = Image.new("CMYK", (10, 10), (0, 255, 255, 0))  # red in CMYK
    out = decode_image(encode(cmyk, "JPEG"), max_pixels=MAX_PIXELS).image
    assert out.mode == "RGB" and out.getpixel((5, 5))[0] > 200
    deep = Image.new("I;16", (10, 10), 65535)
    assert decode_image(encode(deep, "PNG"), max_pixels=MAX_PIXELS).image.getpixel((5, 5)) == (255, 255, 255)


def test_pdf_and_other_files_are_named_as_such():
    assert problem(b"%PDF-1.7\n1 0 obj\n<<>>\nendobj\n").key == "image_pdf"
    assert problem(b"PK\x03\x04 a zip").key == "image_not_image"
    assert problem("这不是图片".encode()).key == "image_not_image"
    assert problem(b"").key == "image_not_image"


def test_a_200_megapixel_png_is_refused_before_decoding():
    p = problem(bomb_png())
    assert p.key == "image_too_many_pixels" and p.values == {"pixels": "200", "limit": "50"}
    small_limit = problem(encode(Image.new("RGB", (400, 300)), "PNG"), max_pixels=100_000)
    assert small_limit.key == "image_too_many_pixels" and small_limit.values["pixels"] == "0"


def test_corrupt_jpegs_are_reported_as_damaged():
    good = encode(Image.new("RGB", (640, 480), (200, 30, 30)), "JPEG")
    assert problem(good[: len(good) // 2]).key == "image_corrupt"
    broken_header = good[:2] + b"\xff\xc0\x00\x11\x08\xff\xff" + bytes(range(200))
    assert problem(broken_header).key in ("image_corrupt", "image_not_image")


async def test_declared_size_is_checked_before_downloading():
    att, fetched = attachment(b"x" * 10, size=50 * 2**20, filename="huge.jpg")
    with pytest.raises(ImageProblem) as info:
        await prepare_image(att, max_bytes=MAX_BYTES, max_pixels=MAX_PIXELS)
    assert info.value.key == "image_too_big" and info.value.values == {"size": "50", "limit": "20"}
    assert fetched == []


async def test_undeclared_size_is_checked_after_downloading():
    att, fetched = attachment(b"\xff\xd8" + b"\x00" * (50 * 2**20), size=None)
    with pytest.raises(ImageProblem) as info:
        await prepare_image(att, max_bytes=MAX_BYTES, max_pixels=MAX_PIXELS)
    assert info.value.key == "image_too_big" and fetched == [1]


async def test_a_declared_pdf_is_not_even_downloaded():
    att, fetched = attachment(b"%PDF-1.4", filename="paper.pdf", mime="application/pdf")
    with pytest.raises(ImageProblem) as info:
        await prepare_image(att, max_bytes=MAX_BYTES, max_pixels=MAX_PIXELS)
    assert info.value.key == "image_pdf" and fetched == []


async def test_a_failed_download_is_a_problem_not_a_crash():
    async def fetch() -> bytes:
        raise ConnectionError("platform file server gone")

    with pytest.raises(ImageProblem) as info:
        await prepare_image(ImageAttachment(fetch=fetch, size=1000), max_bytes=MAX_BYTES, max_pixels=MAX_PIXELS)
    assert info.value.key == "image_download_failed"


async def test_prepare_decodes_off_the_event_loop_and_downscales():
    att, _ = attachment(encode(Image.new("RGB", (1200, 900), (20, 40, 230)), "PNG"))
    prepared = await prepare_image(att, max_bytes=MAX_BYTES, max_pixels=MAX_PIXELS, side=32)
    assert prepared.image.size == (32, 24) and prepared.nbytes == 32 * 24 * 3

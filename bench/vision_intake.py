"""Bench: a 12-megapixel JPEG from bytes to model-ready input (bot/images.py).

Goal: <= 150 ms and a peak memory increase <= 3x the decoded image's size (4000x3000x3 bytes =
36 MB). Each measurement runs in a fresh process, so the peak resident set size it reports
belongs to that one decode (Pillow allocates pixels outside Python's tracemalloc). The naive
pipeline (full decode, then rotate, convert and shrink) is measured the same way, for contrast.

    .venv/bin/python bench/vision_intake.py [--runs 7] [--side 490]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WIDTH, HEIGHT = 4000, 3000

from bot.images import DEFAULT_SIDE  # noqa: E402


def photo_like_jpeg() -> bytes:
    """A 12-megapixel JPEG that compresses like a photo (smooth areas, edges, sensor noise),
    with an EXIF orientation tag so the rotation step is exercised."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:HEIGHT, 0:WIDTH].astype(np.float32)
    r = 128 + 100 * np.sin(x / 310.0) * np.cos(y / 170.0)
    g = 120 + 90 * np.cos((x + y) / 420.0)
    b = 110 + 80 * np.sin(y / 230.0 + x / 900.0)
    pixels = np.stack([r, g, b], axis=-1) + rng.normal(0, 6, (HEIGHT, WIDTH, 3))
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90, exif=exif.tobytes())
    return buffer.getvalue()


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss() -> int:
    """VmHWM: this process's peak resident set (reset by exec, unlike ru_maxrss)."""
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def _child(path: str, mode: str, side: int) -> None:
    """One decode in a fresh process: prints its time and peak memory increase."""
    from PIL import Image, ImageOps

    from bot.images import decode_image

    data = Path(path).read_bytes()
    before = _rss()
    started = time.perf_counter()
    if mode == "intake":
        result = decode_image(data, max_pixels=50_000_000, side=side).image
    else:  # naive: what one writes first
        im = Image.open(io.BytesIO(data))
        im.load()
        result = ImageOps.exif_transpose(im).convert("RGB")
        result.thumbnail((side, side))
    elapsed = time.perf_counter() - started
    peak = _peak_rss()
    print(json.dumps({"seconds": elapsed, "peak_increase": max(0, peak - before), "size": result.size}))


def measure(path: str, mode: str, side: int, runs: int) -> dict:
    results = []
    for _ in range(runs):
        out = subprocess.run([sys.executable, __file__, "--child", path, mode, str(side)],
                             capture_output=True, text=True, check=True, cwd=ROOT)
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return {
        "ms": statistics.median(r["seconds"] for r in results) * 1000,
        "ms_min": min(r["seconds"] for r in results) * 1000,
        "peak_mb": statistics.median(r["peak_increase"] for r in results) / 1e6,
        "size": results[0]["size"],
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--side", type=int, default=490, help="target long side (XComposer2: 490; the intake's default: 980)")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args.child[0], args.child[1], int(args.child[2]))
        return
    data = photo_like_jpeg()
    decoded = WIDTH * HEIGHT * 3
    with tempfile.NamedTemporaryFile(suffix=".jpg") as f:
        f.write(data)
        f.flush()
        print(f"input: {WIDTH}x{HEIGHT} JPEG, {len(data) / 1e6:.1f} MB; decoded size {decoded / 1e6:.0f} MB; "
              f"{args.runs} runs each, medians; {os.cpu_count()} CPUs")
        for side in sorted({args.side, DEFAULT_SIDE}):
            for mode in ("intake", "naive"):
                r = measure(f.name, mode, side, args.runs)
                print(f"  {mode:<6} side {side:>4} → {tuple(r['size'])}: {r['ms']:6.1f} ms (min {r['ms_min']:.1f}), "
                      f"peak +{r['peak_mb']:5.1f} MB = {r['peak_mb'] * 1e6 / decoded:.2f}x decoded")
        print("goal: intake <= 150 ms and <= 3.00x decoded")


if __name__ == "__main__":
    main()

"""Living with a checkpoint's own Python code (`trust_remote_code=True`).

- `missing_imports(path)`: the packages its `.py` files import (as transformers itself reads them)
  that are not installed or fail to import here, said before loading and by `check`;
- `prints_to_log()`: its `print()`s go to the log, not to the console chat;
- `offline_clip_tower(path)`: XComposer2's code builds its vision tower with
  `CLIPVisionModel.from_pretrained('openai/clip-vit-large-patch14-336')`, a second ~1.7 GB
  download whose weights the checkpoint's own then overwrite. While loading, that call builds the
  tower from a config instead, its shape read from the checkpoint's own `vit.` weights;
- `tower_shape(path)`: that shape, read from the weight files' headers (nothing loaded).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import json
import logging
import re
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

log = logging.getLogger(__name__)

TOWER_PREFIX = "vit.vision_tower.vision_model."
CLIP_HEAD_DIM = 64  # every published CLIP ViT (B/16, B/32, L/14, L/14-336) uses 64-wide heads


# -- imports --------------------------------------------------------------------------------------
def required_imports(path: str | Path) -> set[str]:
    """Top-level packages the checkpoint's code imports outside try/except, as transformers'
    `check_imports` reads them before it runs the code."""
    from transformers.dynamic_module_utils import get_imports

    names: set[str] = set()
    for file in sorted(Path(path).glob("*.py")):
        names.update(get_imports(file))
    return names


def import_problem(package: str) -> str | None:
    """None when `package` imports; otherwise why not (a broken install says so)."""
    if importlib.util.find_spec(package) is None:
        return "not installed"
    try:
        importlib.import_module(package)
    except Exception as exc:  # e.g. a CUDA torchvision next to a CPU torch: "operator torchvision::nms does not exist"
        return f"installed but fails to import ({type(exc).__name__}: {str(exc)[:160]})"
    return None


def missing_imports(path: str | Path) -> dict[str, str]:
    """{package: problem} for what the checkpoint's code needs and this environment lacks."""
    problems = {}
    for package in sorted(required_imports(path)):
        problem = import_problem(package)
        if problem:
            problems[package] = problem
    return problems


# -- print() → log --------------------------------------------------------------------------------
class _ThreadRoutedStdout:
    """sys.stdout stand-in: writes from registered threads become log lines, everything else goes
    to the real stdout (the console chat prints from the event loop's thread meanwhile)."""

    def __init__(self, real) -> None:
        self.real = real
        self.threads: dict[int, list[str]] = {}

    def write(self, text: str) -> int:
        pending = self.threads.get(threading.get_ident())
        if pending is None:
            return self.real.write(text)
        pending.append(text)
        if "\n" in text:
            lines = "".join(pending).split("\n")
            pending[:] = [lines.pop()]
            for line in filter(None, (line.strip() for line in lines)):
                log.info("model code says: %s", line)
        return len(text)

    def flush(self) -> None:
        self.real.flush()

    def __getattr__(self, name: str):
        return getattr(self.real, name)


_route_lock = threading.Lock()


@contextlib.contextmanager
def prints_to_log() -> Iterator[None]:
    """Within this block, `print()` on this thread is logged (INFO) instead of written."""
    with _route_lock:
        if not isinstance(sys.stdout, _ThreadRoutedStdout):
            sys.stdout = _ThreadRoutedStdout(sys.stdout)
        router = sys.stdout
        router.threads[threading.get_ident()] = []
    try:
        yield
    finally:
        with _route_lock:
            rest = "".join(router.threads.pop(threading.get_ident(), [])).strip()
            if rest:
                log.info("model code says: %s", rest)


# -- the vision tower -----------------------------------------------------------------------------
@dataclass(frozen=True)
class TowerShape:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    patch_size: int
    positions: int  # position embeddings in the checkpoint (after XComposer2's resize)

    @property
    def grid(self) -> int:
        return round((self.positions - 1) ** 0.5)

    @property
    def image_side(self) -> int:  # the picture size the checkpoint's tower takes
        return self.grid * self.patch_size

    @property
    def image_tokens(self) -> int:  # patch features passed on (the class token is dropped)
        return self.grid**2

    def describe(self) -> str:
        return (f"ViT {self.hidden_size} wide, {self.num_hidden_layers} layers, {self.patch_size}-pixel patches, "
                f"{self.image_side}-pixel pictures = {self.image_tokens} image tokens")


def _weight_shapes(path: Path, prefix: str) -> dict[str, tuple[int, ...]]:
    """Shapes of the tensors named `prefix…`, from safetensors headers or a lazily mapped .bin."""
    files = []
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = path / index_name
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted({path / f for k, f in weight_map.items() if k.startswith(prefix)})
            break
    else:
        files = [f for f in (path / "model.safetensors", path / "pytorch_model.bin") if f.is_file()]
    shapes: dict[str, tuple[int, ...]] = {}
    for file in files:
        if file.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(file, framework="pt") as f:
                for key in f.keys():
                    if key.startswith(prefix):
                        shapes[key] = tuple(f.get_slice(key).get_shape())
        else:
            import torch

            try:  # mapped, not read: only the shapes are needed
                state = torch.load(file, map_location="cpu", mmap=True, weights_only=True)
            except RuntimeError:  # a pre-zipfile .bin cannot be mapped: read it
                state = torch.load(file, map_location="cpu", weights_only=True)
            shapes.update({k: tuple(v.shape) for k, v in state.items() if k.startswith(prefix)})
    return shapes


def tower_shape(path: str | Path) -> TowerShape:
    """The checkpoint's CLIP vision tower, as its `vit.` weights say. ValueError if it has none."""
    shapes = _weight_shapes(Path(path), TOWER_PREFIX)
    if not shapes:
        raise ValueError(f"no {TOWER_PREFIX}* weights in {path}")

    def shape(name: str) -> tuple[int, ...]:
        key = TOWER_PREFIX + name
        if key not in shapes:
            raise ValueError(f"{path}: the vision tower has no {key}")
        return shapes[key]

    layers = {int(m.group(1)) for k in shapes if (m := re.match(re.escape(TOWER_PREFIX) + r"encoder\.layers\.(\d+)\.", k))}
    patch = shape("embeddings.patch_embedding.weight")  # (hidden, 3, patch, patch)
    return TowerShape(
        hidden_size=patch[0],
        intermediate_size=shape("encoder.layers.0.mlp.fc1.weight")[0],
        num_hidden_layers=len(layers),
        patch_size=patch[-1],
        positions=shape("embeddings.position_embedding.weight")[0],
    )


def _named_image_size(name: str) -> int:
    """The input size a CLIP repository id names ('…-patch14-336' → 336; CLIP's default 224)."""
    m = re.search(r"patch\d+-(\d+)$", name)
    return int(m.group(1)) if m else 224


def clip_config_for(name: str, shape: TowerShape):
    """The config of the tower `CLIPVisionModel.from_pretrained(name)` would give the remote
    code: the named CLIP's input size (before XComposer2's code resizes its position embedding),
    every weight shape from the checkpoint."""
    from transformers import CLIPVisionConfig

    if shape.hidden_size % CLIP_HEAD_DIM:
        raise ValueError(f"a vision tower {shape.hidden_size} wide does not split into {CLIP_HEAD_DIM}-wide heads")
    return CLIPVisionConfig(
        hidden_size=shape.hidden_size, intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_hidden_layers, num_attention_heads=shape.hidden_size // CLIP_HEAD_DIM,
        patch_size=shape.patch_size, image_size=_named_image_size(name), hidden_act="quick_gelu",
    )


_tower_lock = threading.Lock()


@contextlib.contextmanager
def offline_clip_tower(path: str | Path) -> Iterator[list[str]]:
    """While loading the checkpoint at `path`, `CLIPVisionModel.from_pretrained(hub id)` builds
    the tower from a config (no download; the checkpoint's weights fill it right after). A local
    directory is still loaded as asked. Yields the names it was asked for."""
    from transformers import CLIPVisionModel

    shape = tower_shape(path)
    asked: list[str] = []
    own = CLIPVisionModel.__dict__.get("from_pretrained")  # normally inherited from PreTrainedModel
    load_for_real = CLIPVisionModel.from_pretrained

    def from_pretrained(cls, name, *args, **kwargs):
        if Path(str(name)).expanduser().is_dir():
            return load_for_real(name, *args, **kwargs)
        asked.append(str(name))
        config = clip_config_for(str(name), shape)
        log.info("vision tower for %s: built from the checkpoint's own weights (%s), not downloaded", name, shape.describe())
        return cls(config)

    with _tower_lock:
        CLIPVisionModel.from_pretrained = classmethod(from_pretrained)
        try:
            yield asked
        finally:
            if own is None:
                del CLIPVisionModel.from_pretrained
            else:
                CLIPVisionModel.from_pretrained = own

"""Where a model's files come from: a local directory, the Hugging Face Hub or ModelScope.

Nothing is downloaded at import time; `resolve(download=False)` only looks (for `check`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from .base import ModelUnavailable

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Resolution:
    path: str | None  # a local directory, when found
    detail: str  # a human sentence for `check` and errors


def _how_to_fix(variable: str, model: str) -> str:
    return (
        f"Download it where the hub is reachable (e.g. `huggingface-cli download {model} --local-dir ./models/x` "
        f"or `modelscope download --model {model} --local_dir ./models/x`), copy it here and set {variable}=/path/to/dir."
    )


def resolve(model: str, *, hub: str = "huggingface", variable: str = "CHAT_MODEL", download: bool = True) -> Resolution:
    """Return a local directory for `model`, downloading into the hub's cache when allowed."""
    local = Path(model).expanduser()
    if local.is_dir():
        if not (local / "config.json").exists():
            raise ModelUnavailable(f"{variable}={model} is a directory without config.json; is it a model checkpoint?")
        return Resolution(str(local), f"local directory {local}")
    if model.startswith((".", "/", "~")):
        raise ModelUnavailable(f"{variable}={model}: no such directory. " + _how_to_fix(variable, "<hub id>"))
    if hub == "modelscope":
        return _resolve_modelscope(model, variable, download)
    return _resolve_huggingface(model, variable, download)


def _resolve_huggingface(model: str, variable: str, download: bool) -> Resolution:
    from huggingface_hub import snapshot_download

    try:
        path = snapshot_download(model, local_files_only=True)
        return Resolution(path, f"Hugging Face cache ({path})")
    except Exception:
        if not download:
            return Resolution(None, "not downloaded yet; it will be fetched from Hugging Face (huggingface.co) on first use")
    try:
        log.info("downloading %s from Hugging Face", model)
        path = snapshot_download(model)
        return Resolution(path, f"downloaded from Hugging Face to {path}")
    except Exception as exc:
        raise ModelUnavailable(
            f"{variable}={model} could not be downloaded from Hugging Face ({type(exc).__name__}). " + _how_to_fix(variable, model)
        ) from None


def _resolve_modelscope(model: str, variable: str, download: bool) -> Resolution:
    try:
        from modelscope import snapshot_download
    except ImportError:
        raise ModelUnavailable(
            f"{variable}={model} is set to come from ModelScope, but the modelscope package is not installed: "
            "run `make run` (or pip install -e .), or set a local directory."
        ) from None
    try:
        path = snapshot_download(model, local_files_only=True)
        if path and (Path(path) / "config.json").is_file():
            return Resolution(path, f"ModelScope cache ({path})")
    except Exception:
        pass
    if not download:
        return Resolution(None, "not downloaded yet; it will be fetched from ModelScope (modelscope.cn) on first use")
    try:
        log.info("downloading %s from ModelScope", model)
        path = snapshot_download(model)
        return Resolution(path, f"downloaded from ModelScope to {path}")
    except Exception as exc:
        raise ModelUnavailable(
            f"{variable}={model} could not be downloaded from ModelScope ({type(exc).__name__}). " + _how_to_fix(variable, model)
        ) from None

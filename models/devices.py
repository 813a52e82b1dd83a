"""Device and dtype choice, and a one-line memory description for load logs."""

from __future__ import annotations

import torch

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def pick_device(setting: str = "auto") -> str:
    if setting == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return setting


def pick_dtype(setting: str, device: str) -> torch.dtype:
    """bf16 on GPU (fp16 where bf16 is unsupported), fp32 on CPU, unless set explicitly."""
    if setting != "auto":
        return _DTYPES[setting]
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def describe_memory(model: torch.nn.Module, device: str) -> str:
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    text = f"{weights / 2**20:.0f} MiB of weights"
    if device.startswith("cuda"):
        text += f", {torch.cuda.memory_allocated(device) / 2**20:.0f} MiB allocated on {device}"
    return text


def backend_place(backend: object) -> str:
    """Where a backend runs: its torch device, or the URL of its model server."""
    return str(getattr(backend, "device", None) or getattr(backend, "base_url", None) or "")


def backend_memory(backend: object) -> int | None:
    """Bytes of weights of an in-process model (plus what the process holds on its GPU); None
    for a model server, whose memory is its own."""
    model = getattr(backend, "model", None)
    if not isinstance(model, torch.nn.Module):
        return getattr(backend, "memory_bytes", None)  # as reported by its generation process
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    total += sum(b.numel() * b.element_size() for b in model.buffers())
    device = str(getattr(backend, "device", ""))
    if device.startswith("cuda"):
        total = max(total, torch.cuda.memory_allocated(device))
    return total

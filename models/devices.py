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

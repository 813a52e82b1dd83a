"""The running batch's key/value cache, handled only through the model's public
`past_key_values`: whatever the model returns (a legacy tuple of (key, value) per layer, as
InternLM2's older remote code does, or a `Cache` object such as `DynamicCache`, as its newer
code and transformers' own models do) is kept as plain per-layer tensors shaped
(batch, heads, sequence, head_dim) and handed back in the same form.

Rows are left-padded to a common length and right-aligned, so a row's entries are always the
last `length` positions; the attention mask marks the padding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

Layers = list[tuple[torch.Tensor, torch.Tensor]]


class UnsupportedCache(RuntimeError):
    pass


def unwrap(past) -> tuple[Layers, type | None]:
    """(per-layer (key, value), the Cache class to rebuild, or None for legacy tuples)."""
    if past is None:
        raise UnsupportedCache("the model returned no past_key_values (use_cache=True was ignored)")
    if hasattr(past, "to_legacy_cache"):
        return [(k, v) for k, v in past.to_legacy_cache()], type(past)
    return [(layer[0], layer[1]) for layer in past], None


def wrap(layers: Layers, cache_cls: type | None):
    legacy = tuple((k, v) for k, v in layers)
    if cache_cls is None:
        return legacy
    return cache_cls.from_legacy_cache(legacy)


def check_layout(layers: Layers, batch: int, length: int) -> None:
    """Refuse caches that do not put the batch first and the sequence third."""
    for k, v in layers:
        if k.dim() != 4 or k.shape[0] != batch or k.shape[2] != length or v.shape[0] != batch or v.shape[2] != length:
            raise UnsupportedCache(
                f"unexpected key/value cache layout {tuple(k.shape)} for batch {batch}, length {length}; "
                "continuous batching needs (batch, heads, sequence, head_dim)"
            )


def pad_left(layers: Layers, n: int) -> Layers:
    if n <= 0:
        return layers
    return [(F.pad(k, (0, 0, n, 0)), F.pad(v, (0, 0, n, 0))) for k, v in layers]


def concat_rows(a: Layers, b: Layers) -> Layers:
    return [(torch.cat([ka, kb]), torch.cat([va, vb])) for (ka, va), (kb, vb) in zip(a, b)]


def select_rows(layers: Layers, index: torch.Tensor) -> Layers:
    return [(k.index_select(0, index), v.index_select(0, index)) for k, v in layers]


def trim_left(layers: Layers, n: int) -> Layers:
    if n <= 0:
        return layers
    return [(k[:, :, n:], v[:, :, n:]) for k, v in layers]


def bytes_per_token(layers: Layers, length: int) -> int:
    """Cache bytes one token of one row takes (all layers, keys and values)."""
    total = sum(k.element_size() * k.numel() + v.element_size() * v.numel() for k, v in layers)
    rows = layers[0][0].shape[0] if layers else 1
    return max(1, total // max(1, length * rows))

"""Next-token choice for a batch in which every row keeps its own settings.

Same rules and order as transformers' `generate` (temperature, then top-k, then top-p, then a
multinomial draw; greedy = argmax), applied per row, in float32 like `generate`."""

from __future__ import annotations

import torch


def choose(logits: torch.Tensor, temperature: torch.Tensor | None, top_p: torch.Tensor | None, top_k: int) -> torch.Tensor:
    """`logits` (batch, vocab). `temperature`/`top_p` (batch,) tensors, or None when every row is
    greedy; rows with temperature <= 0 are greedy. Returns (batch,) token ids."""
    logits = logits.float()
    greedy = logits.argmax(dim=-1)
    if temperature is None:
        return greedy
    sampling = temperature > 0
    scores = logits / torch.where(sampling, temperature, torch.ones_like(temperature)).unsqueeze(1)
    if 0 < top_k < scores.shape[-1]:
        kth = torch.topk(scores, top_k, dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p is not None:
        sorted_scores, order = torch.sort(scores, descending=False, dim=-1)
        cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        remove = cumulative <= (1 - top_p).unsqueeze(1)
        remove[:, -1] = False  # keep at least the most likely token
        scores = scores.masked_fill(remove.scatter(1, order, remove), float("-inf"))
    drawn = torch.multinomial(scores.softmax(dim=-1), num_samples=1).squeeze(1)
    return torch.where(sampling, drawn, greedy)

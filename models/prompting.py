"""Fitting a conversation into a model's context window."""

from __future__ import annotations

from typing import Callable

from .base import ChatMessage


def trim_history(
    count_tokens: Callable[[list[ChatMessage]], int],
    budget: int,
    system: list[ChatMessage],
    history: list[ChatMessage],
    current: list[ChatMessage],
) -> list[ChatMessage]:
    """`system + history + current`, dropping the oldest history exchanges (from one user
    message to the next, never half of one) until it fits `budget` tokens.

    Binary search over where the kept history starts: O(log n) tokenizations."""
    starts = [i for i, m in enumerate(history) if m.role == "user"] + [len(history)]
    if starts[0] != 0:
        starts.insert(0, 0)

    def fits(start: int) -> bool:
        return count_tokens(system + history[start:] + current) <= budget

    lo, hi = 0, len(starts) - 1
    if fits(starts[lo]):
        return system + history + current
    while lo + 1 < hi:
        mid = (lo + hi) // 2
        if fits(starts[mid]):
            hi = mid
        else:
            lo = mid
    return system + history[starts[hi] :] + current

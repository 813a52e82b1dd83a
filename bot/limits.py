"""Per-user rate limits and input checks."""

from __future__ import annotations

import time
import unicodedata
from dataclasses import dataclass
from typing import Callable


class TokenBucket:
    """`capacity` messages at once, refilled at `per_minute`; one bucket per key."""

    def __init__(self, capacity: int, per_minute: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.capacity = capacity
        self.rate = per_minute / 60.0
        self.clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, last time)

    def take(self, key: str) -> float:
        """Take one token. Returns 0 when allowed, else the seconds until one is available."""
        now = self.clock()
        tokens, last = self._buckets.get(key, (float(self.capacity), now))
        tokens = min(float(self.capacity), tokens + (now - last) * self.rate)
        if tokens >= 1.0:
            self._buckets[key] = (tokens - 1.0, now)
            return 0.0
        self._buckets[key] = (tokens, now)
        return (1.0 - tokens) / self.rate


@dataclass(frozen=True)
class InputProblem:
    key: str  # i18n key
    values: dict


_ALLOWED_CONTROLS = {"\n", "\t"}


def clean_text(text: str, max_chars: int) -> tuple[str, InputProblem | None]:
    """Normalise user text; return it with the first problem found, if any."""
    if "\x00" in text or _control_share(text) > 0.1:
        return "", InputProblem("binary_input", {})
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = "".join(ch for ch in text if ch in _ALLOWED_CONTROLS or unicodedata.category(ch) != "Cc").strip()
    if not text:
        return "", InputProblem("empty_input", {})
    if len(text) > max_chars:
        return "", InputProblem("too_long", {"length": len(text), "limit": max_chars})
    return text, None


def _control_share(text: str) -> float:
    if not text:
        return 0.0
    sample = text[:4096]
    bad = sum(1 for ch in sample if ch not in _ALLOWED_CONTROLS and ch != "\r" and unicodedata.category(ch) in ("Cc", "Cs", "Co"))
    bad += sample.count("\ufffd")  # undecodable bytes, as platforms and stdin deliver them
    return bad / len(sample)

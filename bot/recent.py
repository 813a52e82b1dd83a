"""The last hour in one-minute buckets: what the status page's charts draw.

Prometheus keeps history for those who run it; this is for the operator who only opens the
page. Memory is bounded: 60 buckets, each with a capped list of samples.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from typing import Callable

MINUTES = 60
MAX_SAMPLES = 2000  # per series per minute; enough for percentiles, bounded under load


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100); None without values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


class _Minute:
    __slots__ = ("counts", "samples", "peaks")

    def __init__(self) -> None:
        self.counts: dict[str, float] = defaultdict(float)
        self.samples: dict[str, list[float]] = defaultdict(list)
        self.peaks: dict[str, float] = {}


class RecentFigures:
    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self._minutes: dict[int, _Minute] = {}
        self._totals: dict[str, float] = {}  # last seen value of each external counter

    def _now(self) -> _Minute:
        minute = int(self.clock() // 60)
        bucket = self._minutes.get(minute)
        if bucket is None:
            bucket = self._minutes[minute] = _Minute()
            for old in [m for m in self._minutes if m <= minute - MINUTES]:
                del self._minutes[old]
        return bucket

    def add(self, name: str, n: float) -> None:
        self._now().counts[name] += n

    def sample(self, name: str, value: float) -> None:
        samples = self._now().samples[name]
        if len(samples) < MAX_SAMPLES:
            samples.append(value)

    def peak(self, name: str, value: float) -> None:
        peaks = self._now().peaks
        peaks[name] = max(value, peaks.get(name, 0.0))

    def counter(self, name: str, total: float) -> None:
        """Count what an ever-growing counter gained since it was last seen (from 0 at start)."""
        gained = total - self._totals.get(name, 0.0)
        self._totals[name] = total
        if gained > 0:
            self.add(name, gained)

    # -- the charts' data ------------------------------------------------------------
    def series(self) -> dict:
        """Per minute of the last hour, oldest first: timestamps and one list per chart line."""
        now = self.clock()
        current = int(now // 60)
        minutes = list(range(current - MINUTES + 1, current + 1))
        names = {n for b in self._minutes.values() for n in (*b.counts, *b.peaks)}
        models = sorted({n.split(":", 1)[1] for n in names if n.startswith(("tokens:", "queue:"))})
        empty = _Minute()
        buckets = [self._minutes.get(m, empty) for m in minutes]
        spans = [60.0] * (MINUTES - 1) + [max(1.0, now - current * 60)]  # the current minute is partial
        first = [b.samples.get("first_text", []) for b in buckets]
        return {
            "minutes": [m * 60 for m in minutes],
            "answers": [b.counts.get("answers", 0) for b in buckets],
            "tokens_per_second": {
                model: [round(b.counts.get(f"tokens:{model}", 0) / span, 2) for b, span in zip(buckets, spans)] for model in models
            },
            "queue": {model: [b.peaks.get(f"queue:{model}", 0) for b in buckets] for model in models},
            "first_text_p50": [_round(percentile(s, 50)) for s in first],
            "first_text_p95": [_round(percentile(s, 95)) for s in first],
            "rate_limited": [b.counts.get("429s", 0) for b in buckets],
        }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)

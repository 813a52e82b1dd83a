"""A ReplySurface wrapper that notes when the answer first became visible and how many edits it
took, for the metrics; it changes nothing of what is shown."""

from __future__ import annotations

import time
from typing import Any

from .messages import Phase, ReplySurface

_ANSWER_PHASES = ("streaming", "sealed", "done")  # not placeholders ("status") or notices


class TimedSurface:
    def __init__(self, inner: ReplySurface) -> None:
        self.inner = inner
        self.limits = inner.limits
        self.started = time.monotonic()
        self.first_text: float | None = None  # seconds from start to the first answer text shown
        self.edits = 0

    def _shown(self, phase: Phase) -> None:
        if self.first_text is None and phase in _ANSWER_PHASES:
            self.first_text = time.monotonic() - self.started

    async def post(self, text: str, *, phase: Phase) -> Any:
        handle = await self.inner.post(text, phase=phase)
        self._shown(phase)
        return handle

    async def edit(self, handle: Any, text: str, *, phase: Phase) -> None:
        await self.inner.edit(handle, text, phase=phase)
        self.edits += 1
        self._shown(phase)

    async def typing(self) -> None:
        await self.inner.typing()

    def __getattr__(self, name: str) -> Any:  # adapter-specific extras (e.g. Discord's close)
        return getattr(self.inner, name)

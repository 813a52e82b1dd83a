"""The one `stream` of the backends whose model generates on a worker thread.

A backend says how to start one generation (`_generation`: a `generate(bridge)` callable and
the prompt's token count); `stream` runs it through `thread_stream.stream_from_thread`
(cancellation, stop strings, stats) and closes it with the caller.
"""

from __future__ import annotations

import threading
from contextlib import aclosing
from typing import Any, AsyncIterator, Callable

from .base import Cancel, ChatMessage, GenerationParams, ModelError, StreamStats
from .thread_stream import stream_from_thread

Generation = tuple[Callable[[dict], object], int]  # (generate(bridge), prompt tokens)


class ThreadedBackend:
    path: str
    tokenizer: Any
    model: Any
    eos_ids: list[int]
    last_worker: threading.Thread | None = None  # tests assert that it stopped

    async def _generation(self, messages: list[ChatMessage], params: GenerationParams) -> Generation:
        """Prepare one answer (off the event loop where it is slow); `generate` must pass its
        `bridge` (streamer, stopping criteria) on to the model."""
        raise NotImplementedError

    async def stream(
        self, messages: list[ChatMessage], *, params: GenerationParams, cancel: Cancel,
        stats: StreamStats | None = None, skip_special_tokens: bool = True,
    ) -> AsyncIterator[str]:
        if self.model is None:
            raise ModelError(f"model {self.path} is not loaded")
        generate, prompt_tokens = await self._generation(messages, params)
        deltas = stream_from_thread(
            generate, tokenizer=self.tokenizer, eos_ids=self.eos_ids, params=params, cancel=cancel, stats=stats,
            prompt_tokens=prompt_tokens, name=self.path, skip_special_tokens=skip_special_tokens,
            on_worker=self._started,
        )
        async with aclosing(deltas):
            async for delta in deltas:
                yield delta

    def _started(self, worker: threading.Thread) -> None:
        self.last_worker = worker

"""Generation on a thread with `generate`, bridged to asyncio: for backends that run one
request at a time through their model's own `generate` or `chat` (the vision role). Text
models use continuous batching instead (models/batching.py, models/transformers_backend.py).

Cancellation is a stopping criterion checked after every token; deltas reach the event loop
through a mailbox with at most one pending wake-up."""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import AsyncIterator, Callable

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from .base import Cancel, GenerationParams, ModelError, StreamStats
from .decoding import IncrementalDecoder
from .generation import first_stop

log = logging.getLogger(__name__)

_END = object()


class _CancelCriterion(StoppingCriteria):
    """Checked after every token: the caller's /stop, or the consumer having gone away."""

    def __init__(self, *flags: Cancel) -> None:
        self.flags = flags

    def __call__(self, input_ids, scores, **kwargs) -> torch.BoolTensor:  # type: ignore[override]
        stop = any(flag.is_set for flag in self.flags)
        return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)


class _Mailbox:
    """Hands deltas from the generating thread to the event loop with at most one pending
    wake-up: when the loop is busy, deltas pile up and are taken together, so the worker
    and the loop do not trade the GIL once per token."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.lock = threading.Lock()
        self.items: list = []
        self.ready = asyncio.Event()

    def put(self, item) -> None:  # worker thread
        with self.lock:
            self.items.append(item)
            wake = len(self.items) == 1
        if wake:
            self.loop.call_soon_threadsafe(self.ready.set)

    async def take(self) -> list:  # event loop
        await self.ready.wait()
        with self.lock:
            items, self.items = self.items, []
            self.ready.clear()
        return items


class _AsyncStreamer:
    """A transformers streamer whose `put` decodes new tokens and posts the text delta."""

    def __init__(self, decoder: IncrementalDecoder, mailbox: _Mailbox) -> None:
        self.decoder = decoder
        self.mailbox = mailbox
        self.prompt_seen = False
        self.tokens = 0

    def put(self, value) -> None:
        if not self.prompt_seen:  # the first call carries the prompt
            self.prompt_seen = True
            return
        ids = value.reshape(-1).tolist()
        self.tokens += len(ids)
        delta = self.decoder.push(ids)
        if delta:
            self.mailbox.put(delta)

    def end(self) -> None:
        pass


async def stream_from_thread(
    generate: Callable[[dict], object],
    *,
    tokenizer,
    eos_ids: list[int],
    params: GenerationParams,
    cancel: Cancel,
    stats: StreamStats | None,
    prompt_tokens: int,
    name: str,
    skip_special_tokens: bool = True,
    on_worker: Callable[[threading.Thread], None] | None = None,
) -> AsyncIterator[str]:
    """Run `generate(bridge)` on a worker thread and yield its text deltas.

    `generate` must pass `bridge` (a `streamer` and `stopping_criteria`) on to the model's
    `generate`; any backend whose generation takes those (plain causal LMs, LLaVA-style VLMs,
    XComposer2's remote `chat`) shares this cancellation and stop-string handling."""
    loop = asyncio.get_running_loop()
    mailbox = _Mailbox(loop)
    decoder = IncrementalDecoder(tokenizer, skip_special_tokens, set(eos_ids))
    streamer = _AsyncStreamer(decoder, mailbox)
    finished = loop.create_future()
    consumer_gone = Cancel()
    bridge = dict(streamer=streamer, stopping_criteria=StoppingCriteriaList([_CancelCriterion(cancel, consumer_gone)]))

    def work() -> None:
        error: BaseException | None = None
        try:
            with torch.inference_mode():
                generate(bridge)
        except BaseException as exc:  # reported to the consumer, never lost in the thread
            error = exc
        if error is None and (rest := decoder.flush()):
            mailbox.put(rest)
        mailbox.put(error if error else _END)
        loop.call_soon_threadsafe(lambda: finished.done() or finished.set_result(None))

    worker = threading.Thread(target=work, name=f"generate:{name}", daemon=True)
    if on_worker is not None:
        on_worker(worker)
    worker.start()
    text = ""
    try:
        done = False
        while not done:
            items = await mailbox.take()
            if isinstance(items[-1], BaseException):
                log.error("generation failed in %s: %r", name, items[-1])
                if len(items) > 1:
                    yield "".join(items[:-1])
                raise ModelError(str(items[-1])) from items[-1]
            done = items[-1] is _END
            delta = "".join(items[:-1] if done else items)
            text += delta
            hit = first_stop(text, params.stop)
            if hit is not None:
                delta = delta[: max(0, len(delta) - (len(text) - hit))]
                done = True
            if delta:
                yield delta
    finally:
        # Runs on normal end, on a stop string, and when the consumer is cancelled:
        # the model is free only once the worker has really returned.
        consumer_gone.set()
        await asyncio.shield(finished)
        if stats is not None:
            stats.prompt_tokens = prompt_tokens
            stats.completion_tokens = streamer.tokens


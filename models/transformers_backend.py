"""In-process generation with transformers: `generate` on a worker thread, deltas bridged to
asyncio, cancellation through a stopping criterion checked after every token."""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
import time
from contextlib import aclosing
from typing import AsyncIterator, Callable

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, StoppingCriteria, StoppingCriteriaList

from .base import Cancel, Capabilities, ChatMessage, GenerationParams, ModelError, StreamStats
from .devices import describe_memory, pick_device, pick_dtype
from .generation import end_of_turn_ids, first_stop, sampling_kwargs

log = logging.getLogger(__name__)

_END = object()
SWITCH_INTERVAL = 0.001  # seconds; CPython's default is 0.005


class _CancelCriterion(StoppingCriteria):
    """Checked after every token: the caller's /stop, or the consumer having gone away."""

    def __init__(self, *flags: Cancel) -> None:
        self.flags = flags

    def __call__(self, input_ids, scores, **kwargs) -> torch.BoolTensor:  # type: ignore[override]
        stop = any(flag.is_set for flag in self.flags)
        return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)


class IncrementalDecoder:
    """Turns token ids into text deltas without re-decoding the whole answer each step and
    without emitting half a UTF-8 character (byte-level tokens can split one)."""

    def __init__(self, tokenizer, skip_special_tokens: bool, skip_ids: set[int]) -> None:
        self.tokenizer = tokenizer
        self.skip_special = skip_special_tokens
        self.skip_ids = skip_ids
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0

    def push(self, token_ids: list[int]) -> str:
        self.ids.extend(t for t in token_ids if t not in self.skip_ids)
        decode = self.tokenizer.decode
        prefix = decode(self.ids[self.prefix_offset : self.read_offset], skip_special_tokens=self.skip_special)
        full = decode(self.ids[self.prefix_offset :], skip_special_tokens=self.skip_special)
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)
            return full[len(prefix) :]
        return ""


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


class TransformersBackend:
    """One loaded checkpoint. Thread-safe for concurrent `stream` calls."""

    capabilities = Capabilities(special_tokens=True, agent=True)

    def __init__(self, path: str, *, device: str = "auto", dtype: str = "auto", max_context_tokens: int = 8192) -> None:
        self.path = path
        self.name = path
        self.device = pick_device(device)
        self.dtype = pick_dtype(dtype, self.device)
        self.max_context_tokens = max_context_tokens
        self.tokenizer = None
        self.model = None
        self.context_window = max_context_tokens
        self.last_worker: threading.Thread | None = None  # tests assert that it stopped

    # -- loading -------------------------------------------------------------------------
    def load(self) -> None:
        # generate() holds the GIL between kernel launches; a short switch interval lets the
        # event loop (streaming edits, other users' commands) in without stalling the worker.
        sys.setswitchinterval(min(sys.getswitchinterval(), SWITCH_INTERVAL))
        started = time.perf_counter()
        self.tokenizer = AutoTokenizer.from_pretrained(self.path, trust_remote_code=True)
        model = AutoModelForCausalLM.from_pretrained(self.path, trust_remote_code=True, torch_dtype=self.dtype)
        self.model = model.to(self.device).eval()
        limit = getattr(model.config, "max_position_embeddings", None) or self.max_context_tokens
        self.context_window = min(self.max_context_tokens, int(limit))
        self.eos_ids = end_of_turn_ids(self.tokenizer, self.model.generation_config)
        log.info(
            "loaded %s on %s (%s) in %.1fs, %s",
            self.path, self.device, str(self.dtype).removeprefix("torch."),
            time.perf_counter() - started, describe_memory(self.model, self.device),
        )

    # -- prompting -----------------------------------------------------------------------
    def encode(self, messages: list[ChatMessage]) -> list[int]:
        return self.tokenizer.apply_chat_template(
            [m.as_dict() for m in messages], add_generation_prompt=True, tokenize=True
        )

    def count_tokens(self, messages: list[ChatMessage]) -> int:
        return len(self.encode(messages))

    # -- generation ----------------------------------------------------------------------
    async def stream(
        self,
        messages: list[ChatMessage],
        *,
        params: GenerationParams,
        cancel: Cancel,
        stats: StreamStats | None = None,
        skip_special_tokens: bool = True,
    ) -> AsyncIterator[str]:
        if self.model is None:
            raise ModelError(f"model {self.path} is not loaded")
        input_ids = torch.tensor([self.encode(messages)], device=self.device)
        kwargs = dict(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            eos_token_id=self.eos_ids,
            pad_token_id=self.eos_ids[0],
            **sampling_kwargs(params),
        )

        def generate(bridge: dict) -> None:
            self.model.generate(**kwargs, **bridge)

        deltas = stream_from_thread(
            generate, tokenizer=self.tokenizer, eos_ids=self.eos_ids, params=params, cancel=cancel, stats=stats,
            prompt_tokens=int(input_ids.shape[1]), name=self.path, skip_special_tokens=skip_special_tokens,
            on_worker=self._started,
        )
        async with aclosing(deltas):
            async for delta in deltas:
                yield delta

    def _started(self, worker: threading.Thread) -> None:
        self.last_worker = worker


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

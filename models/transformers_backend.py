"""In-process text models with transformers, served by continuous batching.

The tokenizer lives here (prompts, token counts, decoding); the model lives with its
`BatchEngine` in a generation process (or thread, see models/generation_host.py). A stream
sends its prompt ids and sampling settings, then reads its token ids as the engine produces
them, one message per decode step for the whole batch, and turns them into text here: its own
stop strings, cancellation (/stop reaches the engine at once through the `Cancel`'s callback),
token budget and special-token policy. Answers of different users decode together.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from types import SimpleNamespace
from typing import AsyncIterator, Callable

import torch
from transformers import AutoTokenizer

from .base import Cancel, Capabilities, ChatMessage, GenerationParams, ModelError, StreamStats
from .batching import ERROR, Job
from .decoding import IncrementalDecoder
from .devices import pick_device, pick_dtype
from .generation import end_of_turn_ids, first_stop
from .generation_host import HOSTS, WorkerSpec
from .thread_stream import stream_from_thread  # noqa: F401  (its old home; models/threaded.py uses it)

log = logging.getLogger(__name__)

DEFAULT_KV_CACHE_MB = 4096


class _Request:
    """One stream's view of its row in the engine: token ids not yet read, and how it ended."""

    def __init__(self, rid: int, host) -> None:
        self.rid = rid
        self.host = host  # the generation process (or thread) that runs it
        self.tokens: list[int] = []
        self.finish: str | None = None
        self.error: str | None = None
        self.cancel_sent = False
        self.ready = asyncio.Event()
        self.finished = asyncio.Event()

    def feed(self, token: int, finish: str | None, error: str | None) -> None:
        if token >= 0:
            self.tokens.append(token)
        if finish is not None and self.finish is None:
            self.finish, self.error = finish, error
            self.finished.set()
        self.ready.set()

    async def take(self) -> tuple[list[int], str | None]:
        await self.ready.wait()
        self.ready.clear()
        tokens, self.tokens = self.tokens, []
        return tokens, self.finish


class EngineMetrics:
    """What the engine reports, for logs and metrics: batch size, decode speed, totals."""

    def __init__(self) -> None:
        self.batch_size = 0
        self.peak_batch_size = 0
        self.steps = 0
        self.tokens = 0
        self.decode_seconds = 0.0
        self.tokens_per_s = 0.0  # moving average of the decode steps' aggregate speed
        self.figures = None  # the ScheduledModel's ModelFigures: batch_size kept current there

    def update(self, events: list, rows: int, seconds: float) -> None:
        tokens = sum(1 for e in events if e[1] >= 0)
        self.tokens += tokens
        self.batch_size = rows
        if self.figures is not None:
            self.figures.batch_size = rows
        if seconds > 0:  # a decode step (prefills report 0)
            self.peak_batch_size = max(self.peak_batch_size, tokens)
            self.steps += 1
            self.decode_seconds += seconds
            speed = tokens / seconds
            self.tokens_per_s = speed if self.steps == 1 else 0.9 * self.tokens_per_s + 0.1 * speed


class TransformersBackend:
    """One loaded checkpoint, shared by any number of concurrent `stream` calls."""

    capabilities = Capabilities(special_tokens=True, agent=True)

    def __init__(
        self, path: str, *, device: str = "auto", dtype: str = "auto", max_context_tokens: int = 8192,
        max_batch: int = 16, kv_cache_mb: int = DEFAULT_KV_CACHE_MB, host: str = "process",
    ) -> None:
        if host not in HOSTS:
            raise ValueError(f"unknown generation host {host!r} (process or thread)")
        self.path = self.name = path
        self.device = pick_device(device)
        self.dtype = pick_dtype(dtype, self.device)
        self.max_context_tokens = max_context_tokens
        self.max_batch = max_batch
        self.kv_cache_mb = kv_cache_mb
        self.host_kind = host
        self.tokenizer = None
        self.context_window = max_context_tokens
        self.kv_budget_tokens: int | None = None
        self.eos_ids: list[int] = []
        self.memory_bytes: int | None = None
        self.metrics = EngineMetrics()
        self._host = None
        self._requests: dict[int, _Request] = {}
        self._calls: dict[int, asyncio.Future] = {}
        self._ids = itertools.count(1)
        self._restart: asyncio.Lock | None = None

    # -- loading -------------------------------------------------------------------------
    def load(self) -> None:
        """Tokenizer here, model in the generation host; blocking (runs off the event loop)."""
        started = time.perf_counter()
        host = self._new_host()
        host.launch()  # the model loads there while the tokenizer loads here
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(self.path, trust_remote_code=True)
        except BaseException:
            host.close()
            raise
        info = host.ready()
        self._host = host
        limit = info["max_positions"] or self.max_context_tokens
        self.context_window = min(self.max_context_tokens, limit)
        self.kv_budget_tokens = max(self.context_window, self.kv_cache_mb * 2**20 // info["kv_bytes_per_token"])
        self.eos_ids = end_of_turn_ids(self.tokenizer, SimpleNamespace(eos_token_id=info["eos_ids"]))
        self.memory_bytes = info["memory_bytes"]  # weights (+ GPU memory) where the model lives
        log.info(
            "loaded %s on %s (%s) in %.1fs, %s; batches up to %d answers in a %s, KV cache budget %d tokens "
            "(%d MiB, %d bytes/token, %s)",
            self.path, self.device, str(self.dtype).removeprefix("torch."), time.perf_counter() - started,
            info["memory"], self.max_batch, self.host_kind, self.kv_budget_tokens, self.kv_cache_mb,
            info["kv_bytes_per_token"], info["cache"],
        )
        if info.get("ignored"):
            log.warning("%s: its generation_config sets %s, which the batching engine does not apply",
                        self.path, ", ".join(f"{k}={v}" for k, v in info["ignored"].items()))

    def _new_host(self):
        spec = WorkerSpec(
            path=self.path, device=self.device, dtype=str(self.dtype).removeprefix("torch."), max_batch=self.max_batch,
            torch_threads=torch.get_num_threads() if self.device == "cpu" else 0,
        )
        host = HOSTS[self.host_kind](spec, self._on_message, lambda reason: self._on_exit(host, reason))
        return host

    def _start_host(self) -> None:
        host = self._new_host()
        host.start()
        self._host = host

    @property
    def model(self):
        """The model object when it runs on a thread of this process (None in a process)."""
        return getattr(self._host, "model", None)

    @property
    def in_flight(self) -> int:
        """Streams whose rows the engine has not yet reported finished."""
        return len(self._requests)

    @property
    def worker_pid(self) -> int | None:
        return getattr(self._host, "pid", None)

    def close(self) -> None:
        if self._host is not None:
            self._host.close()

    # -- prompting -----------------------------------------------------------------------
    def encode(self, messages: list[ChatMessage]) -> list[int]:
        return self.tokenizer.apply_chat_template(
            [m.as_dict() for m in messages], add_generation_prompt=True, tokenize=True
        )

    def count_tokens(self, messages: list[ChatMessage]) -> int:
        return len(self.encode(messages))

    def answer_budget(self, prompt_tokens: int, params: GenerationParams) -> int:
        """New tokens this answer may take: its own limit, within the context window."""
        return min(params.max_new_tokens, self.context_window - prompt_tokens)

    def reserve_tokens(self, messages: list[ChatMessage], params: GenerationParams) -> int:
        """KV cache entries an answer may need at most (for admission under the budget)."""
        prompt = self.count_tokens(messages)
        return prompt + max(0, self.answer_budget(prompt, params))

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
        if self.tokenizer is None:
            raise ModelError(f"model {self.path} is not loaded")
        ids = self.encode(messages)
        budget = self.answer_budget(len(ids), params)
        if budget < 1:
            raise ModelError(f"the prompt ({len(ids)} tokens) fills the {self.context_window}-token context")
        host = await self._running_host()
        rid = next(self._ids)
        request = self._requests[rid] = _Request(rid, host)
        job = Job(rid, ids, budget, temperature=0.0 if params.greedy else params.temperature, top_p=params.top_p,
                  eos=frozenset(self.eos_ids))
        decoder = IncrementalDecoder(self.tokenizer, skip_special_tokens, set(self.eos_ids))
        try:
            host.send(("add", job))
        except (OSError, ValueError) as exc:  # the process died a moment ago
            self._requests.pop(rid, None)
            raise ModelError(f"the generation process of {self.path} stopped: {exc!r}") from exc
        unsubscribe = _on_cancel(cancel, lambda: self._cancel(request))
        produced, text = 0, ""
        try:
            while True:
                tokens, finish = await request.take()
                produced += len(tokens)
                if cancel.is_set:  # /stop: nothing more is shown; the engine drops the row
                    self._cancel(request)
                    if finish is not None:
                        return
                    continue
                if finish == ERROR:
                    log.error("generation failed in %s: %s", self.path, request.error)
                    if delta := decoder.push(tokens):
                        yield delta
                    raise ModelError(request.error or "generation failed")
                delta = decoder.push(tokens) + (decoder.flush() if finish else "")
                text += delta
                hit = first_stop(text, params.stop)
                if hit is not None:
                    delta = delta[: max(0, len(delta) - (len(text) - hit))]
                if delta:
                    yield delta
                if finish is not None or hit is not None:
                    return
        finally:
            unsubscribe()
            if request.finish is None and host is self._host:
                self._cancel(request)  # a stop string, or the consumer went away
                await asyncio.shield(request.finished.wait())
            self._requests.pop(rid, None)
            if stats is not None:
                stats.prompt_tokens = len(ids)
                stats.completion_tokens = produced

    def _cancel(self, request: _Request) -> None:
        """Ask the engine to drop this row (any thread; at most once)."""
        if request.cancel_sent or request.finish is not None:
            return
        request.cancel_sent = True
        host = request.host
        if host is self._host:
            try:
                host.send(("cancel", request.rid))
            except (OSError, ValueError):
                pass  # the process is gone; _on_exit ends the request

    async def _running_host(self):
        """The generation host, started again if it died (e.g. killed for memory)."""
        if self._host is None or not self._host.alive:
            if self._restart is None:
                self._restart = asyncio.Lock()
            async with self._restart:
                if self._host is None or not self._host.alive:
                    log.warning("restarting the generation %s of %s", self.host_kind, self.path)
                    await asyncio.to_thread(self._start_host)
        self._host.attach(asyncio.get_running_loop())
        return self._host

    async def call_in_worker(self, fn: Callable, *args):
        """`fn(model, *args)` where the model lives, between decode steps (fn must be picklable
        for a process host: a module-level function). For tests, benches and diagnostics."""
        host = await self._running_host()
        call_id = next(self._ids)
        future = self._calls[call_id] = asyncio.get_running_loop().create_future()
        host.send(("call", call_id, fn, args))
        return await future

    # -- messages from the engine (on the event loop) -------------------------------------
    def _on_message(self, message: tuple) -> None:
        if message[0] == "events":
            _, events, rows, seconds = message
            self.metrics.update(events, rows, seconds)
            for rid, token, finish, error in events:
                request = self._requests.get(rid)
                if request is not None:
                    request.feed(token, finish, error)
        elif message[0] == "result":
            _, call_id, value, error = message
            future = self._calls.pop(call_id, None)
            if future is not None and not future.done():
                future.set_exception(ModelError(error)) if error else future.set_result(value)

    def _on_exit(self, host, reason: str) -> None:
        """A generation process died: end its answers (model-failed); the next stream restarts it."""
        lost = [r for r in self._requests.values() if r.host is host]
        log.error("%s: %s; %d answers in flight end with an error", self.path, reason, len(lost))
        if host is self._host:
            self.metrics.batch_size = 0
        for request in lost:
            request.feed(-1, ERROR, reason)
        for future in self._calls.values():
            if not future.done():
                future.set_exception(ModelError(reason))
        self._calls.clear()


def _on_cancel(cancel: Cancel, callback: Callable[[], None]) -> Callable[[], None]:
    """Run `callback` as soon as `cancel` is set (any thread); returns the unsubscribe."""
    subscribe = getattr(cancel, "on_set", None)
    return subscribe(callback) if subscribe is not None else (lambda: None)

"""Continuous batching over a causal LM's own forward, through public arguments only
(`input_ids`, `attention_mask`, `position_ids`, `past_key_values`).

A new request is prefilled alone (its first token comes from that prefill) and joins the running
batch for the next decode step; a row that ends (end-of-turn, its token budget, cancelled)
leaves at once and the padding it leaves behind is trimmed. Each row keeps its own sampling
settings. Rows are left-padded with position ids counted per row, so a greedy answer is the one
the request gets alone.

`BatchEngine` is synchronous and owns the model; `serve` drives it from a command channel
(a pipe in the generation process, a queue in a thread), one decode step at a time.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Protocol

import torch

from . import kv_cache
from .sampling import choose

log = logging.getLogger(__name__)

# Finish reasons sent with a row's last event.
STOP, LENGTH, CANCELLED, ERROR = "stop", "length", "cancelled", "error"

Event = tuple  # (request id, token id or -1, finish reason or None, error text or None)


@dataclass
class Job:
    rid: int
    prompt: list[int]
    max_new: int
    temperature: float = 0.0
    top_p: float = 1.0
    eos: frozenset[int] = field(default_factory=frozenset)
    generated: int = 0
    length: int = 0  # this row's entries in the cache
    cancelled: bool = False


class BatchEngine:
    def __init__(self, model, *, device: str, max_batch: int = 16, top_k: int = 50) -> None:
        self.model = model
        self.device = torch.device(device)
        self.max_batch = max_batch
        self.top_k = top_k
        self.pending: deque[Job] = deque()
        self.rows: list[Job] = []
        self.layers: kv_cache.Layers = []
        self.cache_cls: type | None = None
        self.mask: torch.Tensor | None = None  # (batch, width) 1 = real entry, 0 = padding
        self.positions: torch.Tensor | None = None  # (batch,) position of the token fed next
        self.last: torch.Tensor | None = None  # (batch,) the token fed next
        self.width = 0
        self._sampling: tuple | None = None  # per-row temperature/top_p tensors, rebuilt on change
        params = inspect.signature(model.forward).parameters
        self.logits_kw = {"num_logits_to_keep": 1} if "num_logits_to_keep" in params else {}

    @property
    def busy(self) -> bool:
        return bool(self.pending or self.rows)

    def add(self, job: Job) -> None:
        self.pending.append(job)

    def cancel(self, rid: int) -> list[Event]:
        for job in self.pending:
            if job.rid == rid:
                self.pending.remove(job)
                return [(rid, -1, CANCELLED, None)]
        for job in self.rows:
            if job.rid == rid:
                job.cancelled = True  # leaves before the next step
        return []

    # -- prefill -------------------------------------------------------------------------------
    def admit(self) -> Iterator[list[Event]]:
        """Prefill waiting requests (while the batch has room), one at a time, yielding each
        one's first token as soon as it is known."""
        while self.pending and len(self.rows) < self.max_batch:
            job = self.pending.popleft()
            try:
                yield self._prefill(job)
            except Exception as exc:  # this request failed; the batch is untouched
                log.exception("prefill failed")
                yield [(job.rid, -1, ERROR, _describe(exc))]
                _after_failure(self.device)

    def _prefill(self, job: Job) -> list[Event]:
        n = len(job.prompt)
        ids = torch.tensor([job.prompt], device=self.device)
        out = self.model(
            input_ids=ids, attention_mask=torch.ones_like(ids), position_ids=torch.arange(n, device=self.device)[None],
            use_cache=True, return_dict=True, **self.logits_kw,
        )
        layers, cache_cls = kv_cache.unwrap(out.past_key_values)
        kv_cache.check_layout(layers, 1, n)
        temperature = torch.tensor([job.temperature], device=self.device) if job.temperature > 0 else None
        top_p = torch.tensor([job.top_p], device=self.device) if temperature is not None else None
        token = int(choose(out.logits[:, -1, :], temperature, top_p, self.top_k)[0])
        job.generated, job.length = 1, n
        finish = self._finish(job, token)
        if finish is None:
            self._join(job, layers, cache_cls, token)
        return [(job.rid, token, finish, None)]

    def _join(self, job: Job, layers: kv_cache.Layers, cache_cls: type | None, token: int) -> None:
        n = job.length
        mask = torch.ones((1, n), dtype=torch.long, device=self.device)
        width = max(self.width, n)
        layers, mask = kv_cache.pad_left(layers, width - n), _pad_mask(mask, width - n)
        position = torch.tensor([n], device=self.device)
        last = torch.tensor([token], device=self.device)
        if not self.rows:
            self.layers, self.mask, self.positions, self.last = layers, mask, position, last
        else:
            grow = width - self.width
            self.layers = kv_cache.concat_rows(kv_cache.pad_left(self.layers, grow), layers)
            self.mask = torch.cat([_pad_mask(self.mask, grow), mask])
            self.positions = torch.cat([self.positions, position])
            self.last = torch.cat([self.last, last])
        self.cache_cls, self.width = cache_cls, width
        self.rows.append(job)
        self._sampling = None

    # -- decode --------------------------------------------------------------------------------
    def step(self) -> list[Event]:
        """One decode step for every row; returns each row's new token (and how rows ended)."""
        events = self._drop([j for j in self.rows if j.cancelled], CANCELLED)
        if not self.rows:
            return events
        try:
            tokens = self._forward()
        except Exception as exc:  # the whole batch failed (e.g. out of memory): end those answers
            log.exception("decode step failed for a batch of %d", len(self.rows))
            failed = [(j.rid, -1, ERROR, _describe(exc)) for j in self.rows]
            self._reset()
            _after_failure(self.device)
            return events + failed
        done: list[Job] = []
        for job, token in zip(self.rows, tokens):
            job.generated += 1
            job.length += 1
            finish = self._finish(job, token)
            events.append((job.rid, token, finish, None))
            if finish is not None:
                done.append(job)
        self._remove(done)
        return events

    def _forward(self) -> list[int]:
        batch = len(self.rows)
        mask = torch.cat([self.mask, torch.ones((batch, 1), dtype=self.mask.dtype, device=self.device)], dim=1)
        out = self.model(
            input_ids=self.last[:, None], attention_mask=mask, position_ids=self.positions[:, None],
            past_key_values=kv_cache.wrap(self.layers, self.cache_cls), use_cache=True, return_dict=True,
            **self.logits_kw,
        )
        layers, _ = kv_cache.unwrap(out.past_key_values)
        temperature, top_p = self._sampling_tensors()
        tokens = choose(out.logits[:, -1, :], temperature, top_p, self.top_k)
        self.layers, self.mask, self.width = layers, mask, self.width + 1
        self.positions = self.positions + 1
        self.last = tokens
        return tokens.tolist()  # the one sync per step: the tokens go out now

    def _sampling_tensors(self) -> tuple:
        if self._sampling is None:
            if all(j.temperature <= 0 for j in self.rows):
                self._sampling = (None, None)
            else:
                self._sampling = (
                    torch.tensor([j.temperature for j in self.rows], device=self.device),
                    torch.tensor([j.top_p for j in self.rows], device=self.device),
                )
        return self._sampling

    def _finish(self, job: Job, token: int) -> str | None:
        if token in job.eos:
            return STOP
        if job.generated >= job.max_new:
            return LENGTH
        return None

    def _drop(self, jobs: list[Job], reason: str) -> list[Event]:
        self._remove(jobs)
        return [(j.rid, -1, reason, None) for j in jobs]

    def _remove(self, jobs: Iterable[Job]) -> None:
        gone = {id(j) for j in jobs}
        if not gone:
            return
        keep = [i for i, j in enumerate(self.rows) if id(j) not in gone]
        self.rows = [self.rows[i] for i in keep]
        self._sampling = None
        if not self.rows:
            self._reset()
            return
        index = torch.tensor(keep, device=self.device)
        self.layers = kv_cache.select_rows(self.layers, index)
        self.mask = self.mask.index_select(0, index)
        self.positions = self.positions.index_select(0, index)
        self.last = self.last.index_select(0, index)
        unused = self.width - max(j.length for j in self.rows)  # columns that are padding in every row
        if unused > 0:
            self.layers = kv_cache.trim_left(self.layers, unused)
            self.mask = self.mask[:, unused:]
            self.width -= unused

    def _reset(self) -> None:
        self.rows, self.layers, self.mask, self.positions, self.last = [], [], None, None, None
        self.width, self._sampling = 0, None

    @property
    def cache_tokens(self) -> int:
        """Cache entries held, padding included (rows × width)."""
        return len(self.rows) * self.width


def _pad_mask(mask: torch.Tensor, n: int) -> torch.Tensor:
    if n <= 0:
        return mask
    return torch.cat([torch.zeros((mask.shape[0], n), dtype=mask.dtype, device=mask.device), mask], dim=1)


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:500]


def _after_failure(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


# -- the loop ----------------------------------------------------------------------------------
class Channel(Protocol):
    def receive(self, block: bool) -> list[tuple]:
        """Commands waiting (at least one when `block`); [("close",)] when the other side is gone."""

    def send(self, message: tuple) -> None: ...


def serve(engine: BatchEngine, channel: Channel, on_call: Callable[[tuple], tuple] | None = None) -> None:
    """Run commands and decode steps until "close". Commands: ("add", Job), ("cancel", rid),
    ("call", id, fn, args) → fn(model, *args) in this loop; ("close",). Messages out:
    ("events", [Event...], rows left in the batch, decode step seconds) and ("result", id, value, error)."""
    with torch.inference_mode():
        while True:
            for command in channel.receive(block=not engine.busy):
                kind = command[0]
                if kind == "add":
                    engine.add(command[1])
                elif kind == "cancel":
                    events = engine.cancel(command[1])
                    if events:
                        channel.send(("events", events, len(engine.rows), 0.0))
                elif kind == "call":
                    channel.send(_call(engine, command))
                elif kind == "close":
                    return
            for events in engine.admit():
                channel.send(("events", events, len(engine.rows), 0.0))
            if engine.rows:
                started = time.perf_counter()
                events = engine.step()
                channel.send(("events", events, len(engine.rows), time.perf_counter() - started))


def _call(engine: BatchEngine, command: tuple) -> tuple:
    _, call_id, fn, args = command
    try:
        return ("result", call_id, fn(engine.model, *args), None)
    except Exception as exc:
        return ("result", call_id, None, _describe(exc))

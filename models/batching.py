"""Continuous batching over a causal LM's own forward, through public arguments only
(`input_ids`, `attention_mask`, `position_ids`, `past_key_values`).

A new request is prefilled (with others that arrived at the same time; its first token comes
from that prefill) and joins the running batch for the next decode step; a row that ends (end-of-turn, its token budget, cancelled)
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
from dataclasses import dataclass, field, replace
from typing import Callable, Iterable, Iterator, Protocol

import torch

from . import kv_cache
from .sampling import choose

log = logging.getLogger(__name__)

# Finish reasons sent with a row's last event.
STOP, LENGTH, CANCELLED, ERROR = "stop", "length", "cancelled", "error"

Event = tuple  # (request id, token id or -1, finish reason or None, error text or None)
PREFILL_TOKENS = 8192  # padded prompt tokens prefilled in one forward


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
    solo: bool = False  # prefill alone (its group's prefill failed)


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
        """Prefill waiting requests while the batch has room, yielding first tokens as soon as
        they are known. Requests that arrived together are prefilled together (left-padded,
        within PREFILL_TOKENS and at most half padding); if that fails, each alone, so one
        request's failure ends only that request."""
        while self.pending and len(self.rows) < self.max_batch:
            group = self._next_group()
            try:
                yield self._prefill(group)
            except Exception as exc:
                _after_failure(self.device)
                if len(group) > 1:
                    log.warning("prefill of %d requests failed (%s); prefilling them one by one", len(group), _describe(exc))
                    self.pending.extendleft(reversed([replace(j, solo=True) for j in group]))
                    continue
                log.exception("prefill failed")
                yield [(group[0].rid, -1, ERROR, _describe(exc))]

    def _next_group(self) -> list[Job]:
        group = [self.pending.popleft()]
        width = total = len(group[0].prompt)
        room = self.max_batch - len(self.rows)
        while self.pending and len(group) < room and not group[0].solo and not self.pending[0].solo:
            n = len(self.pending[0].prompt)
            padded = max(width, n) * (len(group) + 1)
            if padded > PREFILL_TOKENS or padded > 2 * (total + n):
                break
            group.append(self.pending.popleft())
            width, total = max(width, n), total + n
        return group

    def _prefill(self, group: list[Job]) -> list[Event]:
        width = max(len(j.prompt) for j in group)
        pads = [width - len(j.prompt) for j in group]
        ids = torch.tensor([[j.prompt[0]] * pad + j.prompt for j, pad in zip(group, pads)], device=self.device)
        mask = torch.tensor([[0] * pad + [1] * len(j.prompt) for j, pad in zip(group, pads)], device=self.device)
        positions = torch.tensor([[1] * pad + list(range(len(j.prompt))) for j, pad in zip(group, pads)], device=self.device)
        out = self.model(
            input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, return_dict=True, **self.logits_kw,
        )
        layers, cache_cls = kv_cache.unwrap(out.past_key_values)
        kv_cache.check_layout(layers, len(group), width)
        temperature, top_p = _sampling_tensors(group, self.device)
        tokens = choose(out.logits[:, -1, :], temperature, top_p, self.top_k).tolist()
        events, joining = [], []
        for i, (job, token) in enumerate(zip(group, tokens)):
            job.generated, job.length = 1, len(job.prompt)
            finish = self._finish(job, token)
            events.append((job.rid, token, finish, None))
            if finish is None:
                joining.append(i)
        if joining:
            if len(joining) < len(group):
                index = torch.tensor(joining, device=self.device)
                layers, mask = kv_cache.select_rows(layers, index), mask.index_select(0, index)
            self._join([group[i] for i in joining], layers, mask, cache_cls, [tokens[i] for i in joining])
        return events

    def _join(self, jobs: list[Job], layers: kv_cache.Layers, mask: torch.Tensor, cache_cls: type | None,
              tokens: list[int]) -> None:
        """Add prefilled rows (right-aligned in `layers`, `mask`) to the running batch."""
        n = mask.shape[1]
        width = max(self.width, n)
        layers, mask = kv_cache.pad_left(layers, width - n), _pad_mask(mask, width - n)
        positions = torch.tensor([j.length for j in jobs], device=self.device)
        last = torch.tensor(tokens, device=self.device)
        unused = width - max(j.length for j in jobs + self.rows)  # padding in every row, new ones included
        if not self.rows:
            self.layers, self.mask, self.positions, self.last = layers, mask, positions, last
        else:
            grow = width - self.width
            self.layers = kv_cache.concat_rows(kv_cache.pad_left(self.layers, grow), layers)
            self.mask = torch.cat([_pad_mask(self.mask, grow), mask])
            self.positions = torch.cat([self.positions, positions])
            self.last = torch.cat([self.last, last])
        self.cache_cls, self.width = cache_cls, width
        self.rows.extend(jobs)
        self._sampling = None
        self._trim(unused)

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
            self._sampling = _sampling_tensors(self.rows, self.device)
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
        self._trim(self.width - max(j.length for j in self.rows))

    def _trim(self, unused: int) -> None:
        """Drop leading columns that are padding in every row."""
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


def _sampling_tensors(jobs: list[Job], device: torch.device) -> tuple:
    """Per-row (temperature, top_p) tensors, or (None, None) when every row is greedy."""
    if all(j.temperature <= 0 for j in jobs):
        return None, None
    return (torch.tensor([j.temperature for j in jobs], device=device), torch.tensor([j.top_p for j in jobs], device=device))


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

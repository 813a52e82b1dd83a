"""Where a loaded model's `BatchEngine` runs: in its own process (the default), or on a thread
of this one.

In a process, the generation loop never competes with the event loop for the GIL: the bot
process only sends commands down a pipe and reads one small message per decode step (the new
token ids of every row), from its event loop (`add_reader`, no extra thread). The thread host
runs the same engine and protocol on a thread: no start-up cost (tests, benches that need the
model object), but the GIL is shared.

The process is started with the `spawn` method (a fresh interpreter: no forked CUDA or thread
state), ignores SIGINT (Ctrl-C in the console means /stop, not "kill the model"), and exits when
the bot process goes away (its end of the pipe closes).
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import queue
import signal
import threading
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Callable

import torch

from . import kv_cache
from .batching import BatchEngine, serve
from .devices import backend_memory, describe_memory

log = logging.getLogger(__name__)

PROBE_TOKENS = 8
# Settings a checkpoint's generation_config may carry that the engine does not apply (it applies
# temperature, top-k and top-p per answer): the load log names any that are set.
_NOT_APPLIED = {"repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "typical_p": 1.0, "min_p": None,
                "min_new_tokens": None, "min_length": 0, "bad_words_ids": None, "suppress_tokens": None}


@dataclass(frozen=True)
class WorkerSpec:
    path: str
    device: str
    dtype: str  # torch dtype name: float32, bfloat16, float16
    max_batch: int
    torch_threads: int = 0  # CPU threads for torch in the worker (0: torch's default)


def load_engine(spec: WorkerSpec) -> tuple[BatchEngine, dict]:
    """Load the model and check, with one short forward, that it batches through its public
    arguments; returns the engine and what the bot needs to know about it."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(spec.path, trust_remote_code=True, torch_dtype=getattr(torch, spec.dtype))
    model = model.to(spec.device).eval()
    config = getattr(model, "generation_config", None)
    engine = BatchEngine(model, device=spec.device, max_batch=spec.max_batch, top_k=int(getattr(config, "top_k", 0) or 0))
    with torch.inference_mode():
        ids = torch.arange(1, PROBE_TOKENS + 1, device=spec.device)[None]
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), position_ids=torch.arange(PROBE_TOKENS, device=spec.device)[None],
                    use_cache=True, return_dict=True)
        layers, cache_cls = kv_cache.unwrap(out.past_key_values)
        kv_cache.check_layout(layers, 1, PROBE_TOKENS)
    eos = getattr(config, "eos_token_id", None)
    ignored = {name: getattr(config, name, None) for name, neutral in _NOT_APPLIED.items()
               if getattr(config, name, neutral) not in (neutral, None)}
    info = dict(
        kv_bytes_per_token=kv_cache.bytes_per_token(layers, PROBE_TOKENS),
        max_positions=int(getattr(model.config, "max_position_embeddings", 0) or 0),
        eos_ids=[eos] if isinstance(eos, int) else list(eos or []),
        cache="legacy tuples" if cache_cls is None else cache_cls.__name__,
        memory=describe_memory(model, spec.device),
        memory_bytes=backend_memory(SimpleNamespace(model=model, device=spec.device)),
        ignored=ignored,
    )
    return engine, info


# -- in a process ------------------------------------------------------------------------------
class _PipeChannel:
    def __init__(self, conn) -> None:
        self.conn = conn

    def receive(self, block: bool) -> list[tuple]:
        try:
            if not block and not self.conn.poll():
                return []
            commands = [self.conn.recv()]
            while self.conn.poll():
                commands.append(self.conn.recv())
            return commands
        except (EOFError, OSError):  # the bot process is gone
            return [("close",)]

    def send(self, message: tuple) -> None:
        self.conn.send(message)


def process_main(conn, spec: WorkerSpec) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s generation worker %(levelname)s %(name)s: %(message)s")
    if spec.torch_threads:
        torch.set_num_threads(spec.torch_threads)
    try:
        engine, info = load_engine(spec)
    except Exception as exc:
        conn.send(("failed", f"{type(exc).__name__}: {exc}"))
        return
    conn.send(("ready", info))
    serve(engine, _PipeChannel(conn))


class ProcessHost:
    kind = "process"
    model = None  # lives in the other process

    def __init__(self, spec: WorkerSpec, on_message: Callable[[tuple], None], on_exit: Callable[[str], None]) -> None:
        self.spec, self.on_message, self.on_exit = spec, on_message, on_exit
        self.process = None
        self.conn = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.lock = threading.Lock()  # cancellations may come from other threads (the agent's)
        self.closed = False

    def start(self) -> dict:
        self.launch()
        return self.ready()

    def launch(self) -> None:
        """Start the process; it loads the model meanwhile."""
        context = multiprocessing.get_context("spawn")
        ours, theirs = context.Pipe(duplex=True)
        self.process = context.Process(target=process_main, args=(theirs, self.spec), name="generation", daemon=True)
        self.process.start()
        theirs.close()
        self.conn = ours

    def ready(self) -> dict:
        """Wait until the model is loaded (blocking: call off the event loop)."""
        ours = self.conn
        while not ours.poll(0.5):
            if not self.process.is_alive():
                ours.close()
                raise RuntimeError(f"the generation process exited with code {self.process.exitcode} while loading")
        try:
            kind, payload = ours.recv()
        except EOFError:
            kind, payload = "failed", f"the generation process exited with code {self.process.exitcode} while loading"
        if kind != "ready":
            ours.close()
            self.process.join(10)
            raise RuntimeError(payload)
        return payload

    @property
    def alive(self) -> bool:
        return not self.closed and self.process is not None and self.process.is_alive()

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Read this process's messages on `loop` (the loop that runs the streams)."""
        if self.loop is loop or self.closed:
            return
        self._detach()
        loop.add_reader(self.conn.fileno(), self._readable)
        self.loop = loop

    def _detach(self) -> None:
        if self.loop is not None and not self.loop.is_closed():
            self.loop.remove_reader(self.conn.fileno())
        self.loop = None

    def _readable(self) -> None:
        try:
            while not self.closed and self.conn.poll():
                self.on_message(self.conn.recv())
        except (EOFError, OSError):
            self._lost()

    def _lost(self) -> None:
        self._detach()
        self.closed = True
        self.conn.close()
        self.process.join(1)
        self.on_exit(f"the generation process stopped (exit code {self.process.exitcode})")

    def send(self, message: tuple) -> None:
        with self.lock:
            self.conn.send(message)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._detach()
        try:
            self.send(("close",))
        except (OSError, ValueError):
            pass
        self.process.join(3)
        if self.process.is_alive():  # nothing to save there: it holds no state of its own
            self.process.kill()
            self.process.join(5)
        self.conn.close()

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None


# -- on a thread -------------------------------------------------------------------------------
class _QueueChannel:
    def __init__(self, host: "ThreadHost") -> None:
        self.host = host

    def receive(self, block: bool) -> list[tuple]:
        commands = self.host.queue
        try:
            items = [commands.get(block=block)]
        except queue.Empty:
            return []
        while True:
            try:
                items.append(commands.get_nowait())
            except queue.Empty:
                return items

    def send(self, message: tuple) -> None:
        self.host.deliver(message)


class ThreadHost:
    kind = "thread"

    def __init__(self, spec: WorkerSpec, on_message: Callable[[tuple], None], on_exit: Callable[[str], None]) -> None:
        self.spec, self.on_message, self.on_exit = spec, on_message, on_exit
        self.queue: queue.Queue = queue.Queue()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.thread: threading.Thread | None = None
        self.lock = threading.Lock()
        self.outbox: list[tuple] = []
        self.model = None
        self.closed = False

    def start(self) -> dict:
        self.launch()
        return self.ready()

    def launch(self) -> None:
        pass  # the model loads in ready(), on the caller's thread

    def ready(self) -> dict:
        engine, info = load_engine(self.spec)
        self.model = engine.model
        self.thread = threading.Thread(target=self._run, args=(engine,), name="generation", daemon=True)
        self.thread.start()
        return info

    def _run(self, engine: BatchEngine) -> None:
        reason = "the generation thread stopped"
        try:
            serve(engine, _QueueChannel(self))
        except BaseException as exc:
            log.exception("generation thread failed")
            reason = f"the generation thread failed: {exc!r}"
        if not self.closed:
            self.closed = True
            self.post(self.on_exit, reason)

    def deliver(self, message: tuple) -> None:
        """Queue a message for the loop with at most one pending wake-up: a fast engine does not
        flood the loop with one callback per step; the loop takes what piled up at once."""
        with self.lock:
            self.outbox.append(message)
            wake = len(self.outbox) == 1
        if wake:
            self.post(self._drain, None)

    def _drain(self, _) -> None:
        with self.lock:
            messages, self.outbox = self.outbox, []
        for message in messages:
            self.on_message(message)

    def post(self, fn, message) -> None:
        loop = self.loop
        if loop is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(fn, message)
            except RuntimeError:  # the loop closed meanwhile (a test or bench ended)
                pass

    @property
    def alive(self) -> bool:
        return not self.closed and self.thread is not None and self.thread.is_alive()

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        if self.loop is not loop:
            self.loop = loop
            if self.outbox:  # left by a loop that closed before it took them
                self.post(self._drain, None)

    def send(self, message: tuple) -> None:
        self.queue.put(message)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.queue.put(("close",))
            if self.thread is not None:
                self.thread.join(10)

    pid = None


HOSTS = {"process": ProcessHost, "thread": ThreadHost}

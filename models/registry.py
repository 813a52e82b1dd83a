"""Role → model. Roles that name the same model share one loaded instance and one queue.

In-process models load lazily on first use (a fast start), on a worker thread, once, or at start
with `ModelHub.prepare(preload=True)`. Clients for model servers cost no GPU memory: `prepare`
always sets them up at start, so the first user does not wait for imports.
"""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import aclosing
from dataclasses import dataclass
from typing import AsyncIterator, Callable

from .base import Capabilities, Cancel, ChatBackend, ChatMessage, GenerationParams, ModelUnavailable, StreamStats
from .devices import backend_memory, backend_place
from .figures import ModelFigures
from .scheduler import FairScheduler

log = logging.getLogger(__name__)

WaitCallback = Callable[[str, int], None]
"""Called with ("loading", 0), ("queued", position) and ("running", 0)."""


@dataclass(frozen=True)
class RoleSpec:
    role: str
    model: str
    backend: str = "transformers"  # transformers | openai
    variable: str = "CHAT_MODEL"  # the setting that names it, for error messages
    hub: str = "huggingface"
    base_url: str = ""
    api_key: str = ""
    device: str = "auto"
    dtype: str = "auto"
    max_concurrency: int = 1  # in-process text models: the batch size
    max_context_tokens: int = 8192
    kv_cache_mb: int = 4096  # in-process text models: KV cache budget per loaded model
    generation_host: str = "process"  # in-process text models: process | thread
    timeout: float = 120.0
    max_retries: int = 3

    @property
    def share_key(self) -> tuple:
        if self.backend == "openai":
            return ("openai", self.base_url, self.model)
        return (self.backend, self.model, self.device, self.dtype, self.role == "vision")  # vision loads a VLM class


def build_backend(spec: RoleSpec) -> ChatBackend:
    """Create (not load) the backend for a role; runs on a worker thread."""
    if spec.backend == "openai":
        from .openai_backend import OpenAIBackend

        return OpenAIBackend.from_spec(spec)
    if spec.backend == "transformers":
        from .hub import resolve
        from .transformers_backend import TransformersBackend

        path = resolve(spec.model, hub=spec.hub, variable=spec.variable).path
        if spec.role == "vision":
            from .vision import load_vision_backend

            return load_vision_backend(
                path, model=spec.model, variable=spec.variable, device=spec.device, dtype=spec.dtype,
                max_context_tokens=spec.max_context_tokens,
            )
        backend = TransformersBackend(
            path, device=spec.device, dtype=spec.dtype, max_context_tokens=spec.max_context_tokens,
            max_batch=spec.max_concurrency, kv_cache_mb=spec.kv_cache_mb, host=spec.generation_host,
        )
        backend.load()
        return backend
    raise ModelUnavailable(f"{spec.role.upper()}_BACKEND={spec.backend} is not supported")


class ScheduledModel:
    """A backend behind a fair queue, loaded on first use.

    In-process text models batch up to `max_concurrency` answers within their KV cache budget;
    in-process vision models answer one at a time; servers take `max_concurrency` requests."""

    def __init__(self, spec: RoleSpec, factory: Callable[[RoleSpec], ChatBackend] = build_backend) -> None:
        self.spec = spec
        self.factory = factory
        one_at_a_time = spec.role == "vision" and spec.backend == "transformers"
        self.scheduler = FairScheduler(1 if one_at_a_time else spec.max_concurrency)
        self.backend: ChatBackend | None = None
        self.last_prompt: list[ChatMessage] = []  # for debugging, tests and benches
        self.last_stats = StreamStats()
        self.figures = ModelFigures()  # state, load time, memory, tokens: read by the bot's metrics
        self._load_lock = asyncio.Lock()

    async def ensure_loaded(self) -> ChatBackend:
        if self.backend is None:
            async with self._load_lock:
                if self.backend is None:
                    self.figures.loading()
                    started = time.perf_counter()
                    try:
                        backend = await asyncio.to_thread(self.factory, self.spec)
                        self.scheduler.budget = getattr(backend, "kv_budget_tokens", None)
                        engine = getattr(backend, "metrics", None)
                        if engine is not None:
                            engine.figures = self.figures  # the engine keeps figures.batch_size current
                        self.backend = backend
                    except ModelUnavailable as exc:
                        self.figures.failed(str(exc))
                        raise
                    except Exception as exc:
                        log.exception("loading %s failed", self.spec.model)
                        self.figures.failed(f"{self.spec.variable}={self.spec.model} failed to load: {exc}")
                        raise ModelUnavailable(self.figures.error) from exc
                    self.figures.loaded(time.perf_counter() - started, backend_place(self.backend), backend_memory(self.backend))
        return self.backend

    async def probe(self) -> str | None:
        """None when the model is loaded or could load now; otherwise why not (for readiness).
        Looks only: nothing is downloaded or loaded."""
        if self.figures.state == "failed":
            return self.figures.error
        if self.backend is not None or self.figures.state == "loading":
            return None
        if self.spec.backend == "openai":
            if not self.spec.base_url:
                return f"{self.spec.role.upper()}_BASE_URL is not set"
            from .openai_backend import ping

            return await ping(self.spec.base_url, self.spec.api_key)
        from .hub import resolve

        try:
            await asyncio.to_thread(resolve, self.spec.model, hub=self.spec.hub, variable=self.spec.variable, download=False)
        except ModelUnavailable as exc:
            return str(exc)
        return None

    @property
    def capabilities(self) -> Capabilities | None:
        """What the loaded backend declares; None until it is loaded."""
        return self.backend.capabilities if self.backend is not None else None

    def count_tokens(self, messages: list[ChatMessage]) -> int:
        assert self.backend is not None, "ensure_loaded() first"
        return self.backend.count_tokens(messages)

    async def stream(
        self,
        messages: list[ChatMessage] | Callable[[ChatBackend], list[ChatMessage]],
        *,
        params: GenerationParams,
        cancel: Cancel,
        tenant: str,
        on_wait: WaitCallback | None = None,
        stats: StreamStats | None = None,
        special_tokens: bool = False,
    ) -> AsyncIterator[str]:
        """Wait for the model (loading, then queueing), then stream. `messages` may be a
        function of the loaded backend, so the prompt can be trimmed with its tokenizer.
        `special_tokens`: keep the model's special tokens in the text where the backend can."""
        notify = on_wait or (lambda kind, n: None)
        if self.backend is None:
            notify("loading", 0)
        backend = await self.ensure_loaded()
        prompt = messages(backend) if callable(messages) else messages
        if not backend.capabilities.images and any(m.image is not None for m in prompt):
            raise ModelUnavailable(f"{self.spec.variable}={self.spec.model} does not take pictures")
        reserve = getattr(backend, "reserve_tokens", None)
        cost = reserve(prompt, params) if reserve is not None else 0
        async with self.scheduler.slot(tenant, lambda n: notify("queued", n) if n else notify("running", 0), cost=cost):
            if cancel.is_set:
                return
            stats = stats if stats is not None else StreamStats()
            self.last_prompt, self.last_stats = prompt, stats
            options = {"skip_special_tokens": False} if special_tokens and backend.capabilities.special_tokens else {}
            started = time.perf_counter()
            try:
                async with aclosing(backend.stream(prompt, params=params, cancel=cancel, stats=stats, **options)) as deltas:
                    async for delta in deltas:
                        yield delta
            finally:
                self.figures.stream_done(stats.completion_tokens, time.perf_counter() - started)


    def metrics(self) -> dict[str, float]:
        """For logs and monitoring: answers waiting and running, and the engine's figures
        (batch size, decode tokens/s, tokens generated) for in-process text models."""
        values: dict[str, float] = {"queued": self.scheduler.waiting, "running": self.scheduler.active}
        engine = getattr(self.backend, "metrics", None)
        if engine is not None:
            values.update(batch_size=engine.batch_size, tokens_per_s=engine.tokens_per_s, tokens_total=engine.tokens)
        if self.scheduler.budget is not None:
            values.update(kv_budget_tokens=self.scheduler.budget, kv_reserved_tokens=self.scheduler.reserved)
        return values

    def close(self) -> None:
        """Stop the model's generation process (if any)."""
        close = getattr(self.backend, "close", None)
        if close is not None:
            close()


class ModelHub:
    """The roles of one bot process."""

    def __init__(self, specs: dict[str, RoleSpec], factory: Callable[[RoleSpec], ChatBackend] = build_backend) -> None:
        self.specs = specs
        self._shared: dict[tuple, ScheduledModel] = {}
        self._by_role: dict[str, ScheduledModel] = {}
        for role, spec in specs.items():
            model = self._shared.get(spec.share_key)
            if model is None:
                model = self._shared[spec.share_key] = ScheduledModel(spec, factory)
            self._by_role[role] = model

    def get(self, role: str) -> ScheduledModel:
        try:
            return self._by_role[role]
        except KeyError:
            raise ModelUnavailable(f"no model is configured for the {role} role") from None

    async def prepare(self, *, preload: bool = False) -> None:
        """At start: set up model-server clients, and load in-process models too if `preload`.
        A model that fails here is logged and tried again on first use."""
        for model in self._shared.values():
            if model.backend is not None or (model.spec.backend != "openai" and not preload):
                continue
            try:
                await model.ensure_loaded()
            except ModelUnavailable as exc:
                log.warning("%s is not ready (%s); will retry on first use", model.spec.variable, exc)
            if model.backend is not None and hasattr(model.backend, "prepare"):
                model.backend.prepare()

    @property
    def models(self) -> list[ScheduledModel]:
        """Each shared model once."""
        return list(self._shared.values())

    def roles_of(self, model: ScheduledModel) -> list[str]:
        return [role for role, m in self._by_role.items() if m is model]

    @property
    def loaded(self) -> list[ScheduledModel]:
        return [m for m in self._shared.values() if m.backend is not None]

    def close(self) -> None:
        for model in self.loaded:
            model.close()

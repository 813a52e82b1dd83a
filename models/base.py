"""The one small interface every model backend implements.

A backend turns a list of chat messages into an async stream of text deltas. Cancellation is
real: setting the `Cancel` stops the underlying generation (a stopping criterion on the worker
thread, or closing the HTTP stream), not just the consumer.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, replace
from typing import AsyncIterator, Callable, Protocol


@dataclass(frozen=True)
class ChatMessage:
    role: str  # system | user | assistant | environment
    content: str
    image: object | None = None  # a PIL.Image for the vision role; never persisted

    def as_dict(self) -> dict[str, str]:
        return {"role": self.role, "content": self.content}


@dataclass(frozen=True)
class GenerationParams:
    max_new_tokens: int = 1024
    temperature: float = 0.8
    top_p: float = 0.8
    stop: tuple[str, ...] = ()  # extra stop strings (the backend always stops on end-of-turn)

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0

    def with_(self, **changes: object) -> "GenerationParams":
        return replace(self, **changes)


class Cancel:
    """A thread-safe cancellation flag shared by the caller and the generation; callbacks
    registered with `on_set` run once, on the thread that sets it (so /stop reaches a
    generation engine at once instead of at its next check)."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self._lock = threading.Lock()
        self._callbacks: list[Callable[[], None]] = []

    def set(self) -> None:
        with self._lock:
            if self._event.is_set():
                return
            self._event.set()
            callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            callback()

    @property
    def is_set(self) -> bool:
        return self._event.is_set()

    def on_set(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Call `callback` when set (now, if already set). Returns a function that unsubscribes."""
        with self._lock:
            if not self._event.is_set():
                self._callbacks.append(callback)
                return lambda: self._discard(callback)
        callback()
        return lambda: None

    def _discard(self, callback: Callable[[], None]) -> None:
        with self._lock:
            if callback in self._callbacks:
                self._callbacks.remove(callback)


class ModelError(Exception):
    """Generation failed; `user_message_key` names the i18n text to show the user."""

    user_message_key = "model_failed"


class ModelUnavailable(ModelError):
    """The model cannot be loaded or reached (missing checkpoint, server down)."""

    user_message_key = "model_unavailable"


@dataclass
class StreamStats:
    """Filled in by a backend while streaming; read by benches and logs."""

    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass(frozen=True)
class Capabilities:
    """What a backend can do, declared by the backend itself (callers never probe for it)."""

    images: bool = False  # takes a picture in `ChatMessage.image`
    image_side: int = 0  # the side, in pixels, it resizes pictures to (0: no preference)
    image_tokens: int = 0  # prompt tokens one picture takes
    # InternLM2's own markup travels through it: special tokens (<|action_start|>...) come back
    # as text when asked, and tool roles ("system name=<|interpreter|>") go into the prompt as is.
    special_tokens: bool = False
    agent: bool = False  # can run the Lagent agent


class ChatBackend(Protocol):
    """A loaded (or reachable) model."""

    name: str
    context_window: int
    capabilities: Capabilities

    def count_tokens(self, messages: list[ChatMessage]) -> int:
        """Prompt tokens these messages take, including the template's tokens."""

    def stream(
        self,
        messages: list[ChatMessage],
        *,
        params: GenerationParams,
        cancel: Cancel,
        stats: StreamStats | None = None,
        skip_special_tokens: bool = True,
    ) -> AsyncIterator[str]:
        """Yield text deltas until the model ends its turn, `params` stops it, or `cancel`.
        `skip_special_tokens=False` only where `capabilities.special_tokens`."""

"""Responders turn one user turn into a stream of display text.

The plain chat responder (InternLM, Bajie) sends the persona's system prompt, the history that
fits the model's context and the question to the persona's model. The agent and the image
conversation plug in their own responders with the same shape (declared in bot/features.py).
A turn carries everything its responder needs: responders never read the store.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import AsyncIterator, Protocol

from models.base import Cancel, ChatBackend, ChatMessage, StreamStats
from models.prompting import trim_history
from models.registry import ModelHub, WaitCallback

from .images import Picture
from .messages import Incoming
from .personas import Persona


@dataclass
class Turn:
    msg: Incoming
    session_key: str
    tenant: str  # whose turn it is, for fair queueing
    persona: Persona
    history: list[ChatMessage]  # what the user and the persona said before, oldest first (for a
    # persona that talks about a picture: since the picture came)
    text: str  # the question, cleaned
    lang: str
    cancel: Cancel
    on_wait: WaitCallback
    picture: Picture | None = None  # the picture the turn is about (image personas), taken in once
    stats: StreamStats = field(default_factory=StreamStats)
    stored_answer: str | None = None  # set by a responder to store something else than it showed


class Responder(Protocol):
    def respond(self, turn: Turn) -> AsyncIterator[str]: ...


def fit_to_context(
    backend: ChatBackend, system: list[ChatMessage], history: list[ChatMessage], question: list[ChatMessage], reserve: int
) -> list[ChatMessage]:
    """The prompt, with the oldest history dropped until it plus `reserve` answer tokens fit."""
    return trim_history(backend.count_tokens, backend.context_window - reserve, system, history, question)


class ChatResponder:
    """A persona that is a chat model with a system prompt."""

    def __init__(self, hub: ModelHub) -> None:
        self.hub = hub

    def respond(self, turn: Turn) -> AsyncIterator[str]:
        persona = turn.persona
        system = [ChatMessage("system", persona.system_prompt)] if persona.system_prompt else []
        question = [ChatMessage("user", turn.text)]

        def prompt(backend: ChatBackend) -> list[ChatMessage]:
            return fit_to_context(backend, system, turn.history, question, persona.params.max_new_tokens)

        return self.hub.get(persona.role).stream(
            prompt, params=persona.params, cancel=turn.cancel, tenant=turn.tenant, on_wait=turn.on_wait, stats=turn.stats
        )


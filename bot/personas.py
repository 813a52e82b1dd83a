"""Personas: who answers. Each names a model role, a system prompt and generation parameters."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from models.base import GenerationParams

from .config import Settings

INTERNLM_SYSTEM_PROMPT = (
    "You are an AI assistant whose name is InternLM (书生·浦语).\n"
    "- InternLM (书生·浦语) is a conversational language model that is developed by Shanghai AI Laboratory "
    "(上海人工智能实验室). It is designed to be helpful, honest, and harmless.\n"
    "- InternLM (书生·浦语) can understand and communicate fluently in the language chosen by the user such as "
    "English and 中文."
)

BAJIE_SYSTEM_PROMPT = (
    "你是猪八戒，猪八戒说话幽默风趣，说话方式通常表现为直率、幽默，有时带有一点自嘲和调侃。"
    "你的话语中常常透露出对食物的喜爱和对安逸生活的向往，同时也显示出他机智和有时的懒惰特点。"
    "尽量保持回答的自然回答，当然你也可以适当穿插一些文言文，另外，书生·浦语是你的好朋友，是你的AI助手。"
)


@dataclass(frozen=True)
class Persona:
    """A persona at run time: a declared feature (bot/features.py) with the settings applied."""

    name: str  # stored in the database; stable
    command: str  # the command that selects it
    role: str  # the model role it talks to
    system_prompt: str | None
    params: GenerationParams
    argument: str = "prompt"  # "image" for a persona that talks about a picture

    @property
    def title_key(self) -> str:
        return f"persona_{self.name}"

    @property
    def greeting_key(self) -> str:
        return f"greeting_{self.name}"


def params_from(settings: Settings) -> GenerationParams:
    """The generation parameters every persona uses (one place that reads them from settings)."""
    return GenerationParams(max_new_tokens=settings.max_new_tokens, temperature=settings.temperature, top_p=settings.top_p)


def build_personas(settings: Settings, features: Iterable) -> dict[str, Persona]:
    """One persona per declared feature that selects one."""
    params = params_from(settings)
    return {
        f.persona: Persona(f.persona, f.command, f.role, f.system_prompt(settings), params, f.argument)
        for f in features
        if f.persona
    }

"""Every command of the bot, declared once.

A `Feature` is one command: what the user types, what argument it takes (a prompt, an image or
nothing), where it sits in the menus, its texts, and, for a persona, the model role it talks
to, its system prompt, how it answers, its rate bucket and its allowlist. The router, /help,
Telegram's command menu, Discord's command tree, the access checks and the rate limits all read
these declarations; nothing else lists commands.

Adding a persona that is a chat model with its own system prompt is one entry in `FEATURES`
with its texts (`cmd_<command>`, `persona_<name>`, `greeting_<name>`, in English and Chinese);
it can use an existing model role or a new one (then add `<ROLE>_MODEL` etc. to config.py).
A persona that answers differently names a `responder` factory (see the agent and the image
conversation below, whose code lives in agent_feature.py and vision_feature.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Literal, Mapping, Sequence

from .config import Settings
from .i18n import register, t
from .personas import BAJIE_SYSTEM_PROMPT, INTERNLM_SYSTEM_PROMPT
from .vision_feature import TEXTS as VISION_TEXTS
from .vision_feature import XCOMPOSER_SYSTEM_PROMPT, VisionResponder

if TYPE_CHECKING:
    from .app import App
    from .responders import Responder

Argument = Literal["prompt", "image", "none"]
Texts = Mapping[str, Mapping[str, str]]

# Rate buckets a feature can name: the Settings fields of (bucket size, refill per minute).
RATE_BUCKETS = {
    "messages": ("rate_limit_messages", "rate_limit_per_minute"),
    "agent": ("agent_rate_limit_messages", "agent_rate_limit_per_minute"),
}


@dataclass(frozen=True)
class Feature:
    command: str  # what the user types, without "/"; also the Discord command's name
    menu: int  # position in /help and both platforms' command menus
    texts: Texts = field(default_factory=dict)  # its i18n texts, registered when an App is built
    argument: Argument = "none"
    persona: str | None = None  # the persona it selects (stored in the history); None: a control command
    role: str | None = None  # the model role the persona talks to
    system_prompt: Callable[[Settings], str | None] = lambda settings: None
    responder: Callable[["App"], "Responder"] | None = None  # None: the plain chat responder
    help: Callable[[Any, str], str] | None = None  # (its responder, language) → an extra /help section
    bucket: str = "messages"  # a key of RATE_BUCKETS
    allowlist: str | None = None  # the Settings field of user ids allowed to use it; empty: everyone
    hidden_on: frozenset[str] = frozenset()  # platforms whose command menu leaves it out

    @property
    def description_key(self) -> str:
        return f"cmd_{self.command}"

    @property
    def refusal_key(self) -> str:
        """Said to a user not on the feature's allowlist."""
        key = f"{self.persona}_not_allowed"
        return key if key in self.texts else "not_allowed"


def _agent_responder(app: "App") -> "Responder":
    from .agent_feature import AgentResponder  # lagent is imported only when an App is built

    return AgentResponder(app)


def _agent_help(responder: Any, lang: str) -> str:
    from .agent_feature import help_section

    return help_section(responder.settings, responder.sandbox, lang)


def _vision_help(responder: Any, lang: str) -> str:
    return t("help_image", lang)


def _both(en: str, zh: str) -> dict[str, str]:
    return {"en": en, "zh": zh}


FEATURES: tuple[Feature, ...] = (
    Feature("start", 1, {"cmd_start": _both("What this bot can do", "机器人能做什么")}, hidden_on=frozenset({"discord"})),
    Feature("help", 2, {"cmd_help": _both("List the commands", "列出所有命令")}),
    Feature(
        "chat", 3, {
            "cmd_chat": _both("Talk to InternLM2-Chat", "与书生·浦语对话"),
            "persona_internlm": _both("InternLM", "书生·浦语"),
            "greeting_internlm": _both("Now talking to InternLM. Ask me anything.", "现在由书生·浦语为你服务，请随便问。"),
        },
        argument="prompt", persona="internlm", role="chat",
        system_prompt=lambda s: s.chat_system_prompt or INTERNLM_SYSTEM_PROMPT,
    ),
    Feature(
        "bajie", 4, {
            "cmd_bajie": _both("Talk to Bajie (猪八戒)", "与猪八戒对话"),
            "persona_bajie": _both("Bajie (猪八戒)", "猪八戒"),
            "greeting_bajie": _both("Bajie here! 俺老猪来也。", "俺老猪来也！有什么吃的……啊不，有什么要问的？"),
        },
        argument="prompt", persona="bajie", role="bajie",
        system_prompt=lambda s: s.bajie_system_prompt or BAJIE_SYSTEM_PROMPT,
    ),
    Feature(
        "agent", 5, {
            "cmd_agent": _both("Ask the agent (it can run Python)", "让智能体解决问题（可运行 Python）"),
            "persona_agent": _both("Agent", "智能体"),
            "greeting_agent": _both(
                "Now talking to the agent: it can write and run Python to answer.", "现在由智能体为你服务：它会编写并运行 Python 来解答。"
            ),
            "agent_not_allowed": _both(
                "Sorry, the agent is only available to some users of this bot.", "抱歉，智能体只对本机器人的部分用户开放。"
            ),
        },
        argument="prompt", persona="agent", role="agent", responder=_agent_responder, help=_agent_help,
        bucket="agent", allowlist="agent_allowed_users",
    ),
    Feature(
        "image", 6, {
            "cmd_image": _both("Ask about an image", "就图片提问"),
            "persona_vision": _both("Image chat", "看图对话"),
            "greeting_vision": _both("Send a photo with a question.", "请发送图片并附上问题。"),
            **VISION_TEXTS,
        },
        argument="image", persona="vision", role="vision", system_prompt=lambda s: XCOMPOSER_SYSTEM_PROMPT,
        responder=lambda app: VisionResponder(app.hub), help=_vision_help,
    ),
    Feature("reset", 7, {"cmd_reset": _both("Forget this persona's conversation", "清除当前角色的对话历史")}),
    Feature("stop", 8, {"cmd_stop": _both("Stop the current answer", "停止当前回答")}),
    Feature("persona", 9, {"cmd_persona": _both("Show who is answering", "查看当前角色")}),
)

DEFAULT_PERSONA = "internlm"


class Catalogue:
    """The declared features, looked up by command and persona, in menu order."""

    def __init__(self, features: Sequence[Feature]) -> None:
        self.features = sorted(features, key=lambda f: f.menu)
        self.by_command = {f.command: f for f in self.features}
        self.by_persona = {f.persona: f for f in self.features if f.persona}
        if len(self.by_command) != len(self.features) or DEFAULT_PERSONA not in self.by_persona:
            raise ValueError("features need distinct commands and the default persona")
        for f in self.features:
            if f.bucket not in RATE_BUCKETS:
                raise ValueError(f"/{f.command}: unknown rate bucket {f.bucket!r}")
            needed = [f.description_key] + ([f"persona_{f.persona}", f"greeting_{f.persona}"] if f.persona else [])
            if missing := [key for key in needed if key not in f.texts]:
                raise ValueError(f"/{f.command} lacks its texts {missing}")

    def menu(self, platform: str | None = None) -> list[Feature]:
        return [f for f in self.features if platform not in f.hidden_on]

    def taking_images(self) -> Feature | None:
        return next((f for f in self.features if f.argument == "image"), None)

    def texts(self) -> dict[str, Mapping[str, str]]:
        return {key: value for f in self.features for key, value in f.texts.items()}


register(Catalogue(FEATURES).texts())  # the built-in commands' texts exist as soon as they are declared

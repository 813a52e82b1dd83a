"""The core: access → command router → limits → session → responder → ReplyStream.

Adapters call `App.handle(incoming, surface)` for every user action. The same code serves the
console, Telegram and Discord.
"""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Awaitable, Callable

from models.base import Cancel, ChatMessage, ModelError
from models.registry import ModelHub, RoleSpec

from .access import AccessPolicy
from .config import ROLES, Settings
from .i18n import TEXTS, lang_of, t
from .limits import TokenBucket, clean_text
from .messages import Incoming, ReplySurface
from .personas import DEFAULT_PERSONA, Persona, build_personas
from .responders import ChatResponder, Responder, Turn
from .store import VISIBLE, HistoryStore
from .streaming import ReplyStream

log = logging.getLogger(__name__)

SAVE_EVERY = 2.0  # seconds between writes of a growing answer to the database
REFUSAL_EVERY = 60.0  # at most one refusal per minute per unknown user


@dataclass
class Session:
    key: str
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # FIFO: one generation at a time
    cancel: Cancel | None = None


CommandHandler = Callable[["App", Incoming, ReplySurface, str, str], Awaitable[None]]

# Commands in menu order; each has an i18n description key "cmd_<name>".
MENU = ["start", "help", "chat", "bajie", "agent", "image", "reset", "stop", "persona"]


def role_specs(settings: Settings) -> dict[str, RoleSpec]:
    specs = {}
    for role in ROLES:
        specs[role] = RoleSpec(
            role=role,
            model=settings.model_for(role),
            backend=settings.backend_for(role),
            variable=f"{role.upper()}_MODEL",
            hub=settings.hub_for(role),
            base_url=getattr(settings, f"{role}_base_url"),
            api_key=getattr(settings, f"{role}_api_key").get_secret_value(),
            device=settings.device,
            dtype=settings.dtype,
            max_concurrency=(
                settings.openai_max_concurrent if settings.backend_for(role) == "openai" else settings.max_concurrent_generations
            ),
            max_context_tokens=settings.max_context_tokens,
            kv_cache_mb=settings.kv_cache_mb,
            generation_host=settings.generation_host,
            timeout=settings.openai_timeout,
            max_retries=settings.openai_max_retries,
        )
    return specs


class App:
    def __init__(
        self,
        settings: Settings,
        *,
        hub: ModelHub | None = None,
        store: HistoryStore | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.clock = clock
        self.hub = hub or ModelHub(role_specs(settings))
        self.store = store or HistoryStore(settings.db_path)
        if self.store.recovered:
            log.warning("marked %d answers cut by a previous crash as interrupted", self.store.recovered)
        self.access = AccessPolicy(settings)
        self.rate = TokenBucket(settings.rate_limit_messages, settings.rate_limit_per_minute, clock)
        self.agent_rate = TokenBucket(settings.agent_rate_limit_messages, settings.agent_rate_limit_per_minute, clock)
        self.personas: dict[str, Persona] = build_personas(settings)
        self.responders: dict[str, Responder] = {name: ChatResponder(self.hub) for name in self.personas}
        self.sessions: dict[str, Session] = {}
        self.help_sections: list[Callable[[str], str]] = []  # features add lines to /help
        self.image_handler: Callable[[App, Incoming, ReplySurface, str, str], Awaitable[None]] | None = None
        self._refused: dict[str, float] = {}
        self._tasks: set[asyncio.Task] = set()

    # -- extension points for features (agent, images) ------------------------------
    def add_persona(self, persona: Persona, responder: Responder) -> None:
        self.personas[persona.name] = persona
        self.responders[persona.name] = responder

    def persona_for_command(self, command: str) -> Persona | None:
        return next((p for p in self.personas.values() if p.command == command), None)

    # -- identity --------------------------------------------------------------------
    def session_key(self, msg: Incoming) -> str:
        user = "*" if msg.is_group and self.settings.group_sessions == "shared" else msg.user_id
        key = f"{msg.platform}:{msg.chat_id}:{user}"
        return f"{key}:{msg.thread_id}" if msg.thread_id else key

    def session(self, key: str) -> Session:
        if key not in self.sessions:
            self.sessions[key] = Session(key)
        return self.sessions[key]

    def current_persona(self, key: str) -> Persona:
        name = self.store.persona(key, DEFAULT_PERSONA)
        return self.personas.get(name) or self.personas[DEFAULT_PERSONA]

    def commands(self) -> list[tuple[str, str]]:
        """(command, description key) for platform menus."""
        return [(name, f"cmd_{name}") for name in MENU]

    # -- the entry point ---------------------------------------------------------------
    async def handle(self, msg: Incoming, surface: ReplySurface) -> None:
        lang = lang_of(msg.language)
        try:
            if not self.access.allows(msg):
                await self._refuse(msg, surface, lang)
                return
            command, args = self._parse(msg)
            if msg.image is not None:
                await self._image(msg, surface, args, lang)
            elif command is None:
                await self.ask(msg, surface, self.current_persona(self.session_key(msg)), args, lang)
            else:
                await self._command(msg, surface, command, args, lang)
        except Exception:
            log.exception("handling a %s message failed", msg.platform)
            await self._notice(surface, t("internal_error", lang))

    def _parse(self, msg: Incoming) -> tuple[str | None, str]:
        if msg.command is not None:
            return msg.command.lower(), msg.text
        text = msg.text.lstrip()
        if not text.startswith("/") or text.startswith("//"):
            return None, msg.text
        head, _, rest = text[1:].partition(" ")
        if "\n" in head:
            head, _, more = head.partition("\n")
            rest = more + (" " + rest if rest else "")
        return head.split("@", 1)[0].lower(), rest.strip()

    async def _refuse(self, msg: Incoming, surface: ReplySurface, lang: str) -> None:
        who = f"{msg.platform}:{msg.user_id}"
        log.info("refused %s (chat %s): not on the allowlist", who, msg.chat_id)
        last = self._refused.get(who)
        if last is None or self.clock() - last >= REFUSAL_EVERY:
            self._refused[who] = self.clock()
            await self._notice(surface, t("not_allowed", lang))

    async def _refuse_persona(self, msg: Incoming, surface: ReplySurface, persona: Persona, lang: str) -> None:
        log.info("refused %s:%s for the %s persona", msg.platform, msg.user_id, persona.name)
        key = f"{persona.role}_not_allowed"  # a feature may say it its own way
        await self._notice(surface, t(key if key in TEXTS else "not_allowed", lang))

    async def _notice(self, surface: ReplySurface, text: str) -> None:
        try:
            await surface.post(text, phase="notice")
        except Exception:
            log.exception("could not send a notice")

    # -- commands ------------------------------------------------------------------------
    async def _command(self, msg: Incoming, surface: ReplySurface, command: str, args: str, lang: str) -> None:
        key = self.session_key(msg)
        if command in ("start", "help"):
            await self._notice(surface, self.help_text(key, lang, greeting=command == "start"))
        elif command == "persona":
            await self._notice(surface, t("persona_current", lang, persona=t(self.current_persona(key).title_key, lang)))
        elif command == "reset":
            persona = self.current_persona(key)
            self.store.reset(key, persona.name)
            await self._notice(surface, t("reset_done", lang, persona=t(persona.title_key, lang)))
        elif command == "stop":
            stopped = self.stop(key)
            await self._notice(surface, t("stop_done" if stopped else "stop_nothing", lang))
        elif command == "image":
            await self._image(msg, surface, args, lang)
        elif (persona := self.persona_for_command(command)) is not None:
            if not self.access.allows_role(msg, persona.role):
                await self._refuse_persona(msg, surface, persona, lang)
                return
            self.store.set_persona(key, persona.name)
            if args.strip():
                await self.ask(msg, surface, persona, args, lang)
            else:
                await self._notice(surface, t(persona.greeting_key, lang))
        elif command == "agent":
            await self._notice(surface, t("not_available", lang, feature=t("feature_agent", lang)))
        else:
            log.info("unknown command /%s from %s:%s", command[:32], msg.platform, msg.user_id)
            await self._notice(surface, t("unknown_command", lang, command=command[:32]))

    def help_text(self, key: str, lang: str, *, greeting: bool = False) -> str:
        lines = [f"/{name} — {t(desc, lang)}" for name, desc in self.commands()]
        commands = t("help_header", lang) + "\n" + "\n".join(lines)
        for section in self.help_sections:
            commands += "\n\n" + section(lang)
        persona = t(self.current_persona(key).title_key, lang)
        if greeting:
            return t("start", lang, commands=commands, persona=persona)
        return commands + "\n\n" + t("help_footer", lang) + "\n" + t("persona_current", lang, persona=persona)

    async def _image(self, msg: Incoming, surface: ReplySurface, args: str, lang: str) -> None:
        if self.image_handler is None:
            await self._notice(surface, t("not_available", lang, feature=t("feature_image", lang)))
        else:
            await self.image_handler(self, msg, surface, args, lang)

    def stop(self, key: str) -> bool:
        """Cancel the answer in flight for this session (not the ones queued behind it)."""
        session = self.sessions.get(key)
        if session and session.cancel and not session.cancel.is_set:
            session.cancel.set()
            return True
        return False

    async def regenerate(self, msg: Incoming, surface: ReplySurface) -> None:
        """Ask the last question of the current persona again, replacing its answer."""
        lang = lang_of(msg.language)
        if not self.access.allows(msg):
            await self._refuse(msg, surface, lang)
            return
        key = self.session_key(msg)
        persona = self.current_persona(key)
        async with self.session(key).lock:
            last = next((m for m in reversed(self.store.history(key, persona.name)) if m.role == "user"), None)
            if last is not None:
                self.store.delete_from(key, persona.name, last.id)
        if last is None:
            await self._notice(surface, t("regenerate_nothing", lang))
        else:
            await self.ask(msg, surface, persona, last.content, lang, attachment=last.attachment)

    # -- asking a persona ----------------------------------------------------------------
    async def ask(
        self, msg: Incoming, surface: ReplySurface, persona: Persona, text: str, lang: str,
        *, attachment: str | None = None, image: object = None,
    ) -> None:
        if not self.access.allows_role(msg, persona.role):  # also plain messages in a shared group session
            await self._refuse_persona(msg, surface, persona, lang)
            return
        text, problem = clean_text(text, self.settings.max_input_chars)
        if problem is not None:
            log.info("rejected input from %s:%s: %s", msg.platform, msg.user_id, problem.key)
            await self._notice(surface, t(problem.key, lang, **problem.values))
            return
        tenant = f"{msg.platform}:{msg.user_id}"
        bucket = self.agent_rate if persona.role == "agent" else self.rate
        wait = bucket.take(tenant)
        if wait:
            log.info("rate-limited %s for %.0fs", tenant, wait)
            await self._notice(surface, t("rate_limited", lang, seconds=max(1, round(wait))))
            return
        key = self.session_key(msg)
        session = self.session(key)
        stream = ReplyStream(surface).start()
        if session.lock.locked():
            stream.set_status(t("queued_session", lang))
        try:
            async with session.lock:
                await self._answer(msg, session, persona, text, lang, stream, attachment, image, tenant)
        finally:  # also on cancellation (shutdown): close the reply cleanly
            await asyncio.shield(stream.finish(empty_text=t("stopped_mark", lang)))

    async def _answer(
        self, msg: Incoming, session: Session, persona: Persona, text: str, lang: str,
        stream: ReplyStream, attachment: str | None, image: object, tenant: str,
    ) -> None:
        key = session.key
        history = [
            ChatMessage(m.role, m.content)
            for m in self.store.history(key, persona.name)
            if m.status in VISIBLE and m.content
        ]
        self.store.add(key, persona.name, "user", text, attachment=attachment)
        answer_id = self.store.add(key, persona.name, "assistant", "", status="streaming")
        cancel = session.cancel = Cancel()

        def on_wait(kind: str, n: int) -> None:
            if kind == "queued":
                stream.set_status(t("queued_model", lang, n=n))
            elif kind == "loading":
                stream.set_status(t("loading_model", lang))
            elif stream.status:  # replace a queue notice; otherwise show nothing until text
                stream.set_status(t("thinking", lang))

        turn = Turn(msg, key, tenant, persona, history, text, lang, cancel, on_wait, image=image)
        status, suffix = "ok", ""
        saved_at = self.clock()
        try:
            async with aclosing(self.responders[persona.name].respond(turn)) as deltas:
                async for delta in deltas:
                    stream.feed(delta)
                    if self.clock() - saved_at >= SAVE_EVERY:
                        saved_at = self.clock()
                        self.store.update(answer_id, stream.text)
            if cancel.is_set:
                status, suffix = "stopped", t("stopped_mark", lang)
        except ModelError as exc:
            log.error("%s failed for %s: %s", persona.name, tenant, exc)
            status, suffix = "failed", t(exc.user_message_key, lang)
        except asyncio.CancelledError:  # shutdown: mark what was shown as stopped, then go
            status = "stopped"
            stream.feed(("\n\n" if stream.text else "") + t("stopped_mark", lang))
            raise
        except Exception:
            log.exception("%s failed for %s", persona.name, tenant)
            status, suffix = "failed", t("internal_error", lang)
        finally:
            session.cancel = None
            answer = turn.stored_answer if turn.stored_answer is not None else stream.text
            self.store.update(answer_id, answer, status)
            log.info(
                "answered %s as %s: %s, %d prompt + %d answer tokens",
                tenant, persona.name, status, turn.stats.prompt_tokens, turn.stats.completion_tokens,
            )
        if suffix:
            stream.feed(("\n\n" if stream.text else "") + suffix)
        await stream.finish(empty_text=t("empty_answer", lang))

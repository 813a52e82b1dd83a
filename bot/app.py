"""The core: access → command router → limits → session → responder → ReplyStream.

Adapters call `App.handle(incoming, surface)` for every user action. The same code serves the
console, Telegram and Discord.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
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
from .messages import AnswerTag, Incoming, ReplySurface
from .personas import DEFAULT_PERSONA, Persona, build_personas
from .responders import ChatResponder, Responder, Turn
from . import recovery
from .saving import ExchangeRecord, report
from .store import VISIBLE, HistoryStore, StorageError
from .streaming import ReplyStream

log = logging.getLogger(__name__)

SAVE_EVERY = 2.0  # seconds between writes of a growing answer to the database
REFUSAL_EVERY = 60.0  # at most one refusal per minute per unknown user


@dataclass
class Ticket:
    """One answer asked for in a session, running or waiting for its turn; its Stop button
    names it, so Stop under a queued answer cancels that one, not the one in flight."""

    id: str = field(default_factory=lambda: secrets.token_hex(4))
    cancel: Cancel = field(default_factory=Cancel)
    stopped: asyncio.Event = field(default_factory=asyncio.Event)

    def stop(self) -> bool:
        if self.cancel.is_set:
            return False
        self.cancel.set()
        self.stopped.set()
        return True


@dataclass
class Session:
    key: str
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # FIFO: one generation at a time
    cancel: Cancel | None = None  # of the answer in flight
    tickets: dict[str, Ticket] = field(default_factory=dict)  # answers running or queued


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

    def set_persona(self, key: str, name: str) -> None:
        """Make `name` the session's persona; on a full disk the switch is not kept, the answer goes on."""
        try:
            self.store.set_persona(key, name)
        except StorageError as exc:
            report(exc)

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
        except StorageError as exc:  # a command that writes (/chat, /reset) on a full disk
            report(exc)
            await self._notice(surface, t("storage_failed", lang))
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
            self.set_persona(key, persona.name)
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

    def stop(self, key: str, ticket: str | None = None) -> bool:
        """Cancel one answer of this session: the one whose Stop button names `ticket` (running
        or still queued), or without a ticket the one in flight (not those queued behind it)."""
        session = self.sessions.get(key)
        if session is None:
            return False
        if ticket is not None:
            found = session.tickets.get(ticket)
            return found.stop() if found is not None else False
        running = next((t for t in session.tickets.values() if t.cancel is session.cancel), None)
        return running.stop() if running is not None else False

    @staticmethod
    async def _wait_turn(session: Session, ticket: Ticket) -> bool:
        """Take the session's lock in turn; False (without it) when the answer is stopped first."""
        if not session.lock.locked():
            await session.lock.acquire()  # free: taken at once, before anyone else looks
            return True
        turn = asyncio.ensure_future(session.lock.acquire())
        stopped = asyncio.ensure_future(ticket.stopped.wait())
        try:
            await asyncio.wait({turn, stopped}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:  # shutdown while queued: asyncio.Lock passes the turn on
            stopped.cancel()
            turn.cancel()
            raise
        stopped.cancel()
        if not turn.done():
            turn.cancel()
            try:
                await turn
            except asyncio.CancelledError:
                return False
        if ticket.stopped.is_set():  # stopped just as its turn came
            session.lock.release()
            return False
        return True

    async def regenerate(self, msg: Incoming, surface: ReplySurface, answer_id: int | None = None) -> None:
        """Ask a question again, replacing its answer: the question of `answer_id` (the answer
        whose Regenerate button was pressed) if that is still its persona's latest answer, else
        say that only the latest can be; without `answer_id`, the current persona's last question."""
        lang = lang_of(msg.language)
        if not self.access.allows(msg):
            await self._refuse(msg, surface, lang)
            return
        key = self.session_key(msg)
        persona = self.current_persona(key)
        if answer_id is not None:
            where = self.store.answer_place(answer_id)
            persona = self.personas.get(where[1], persona) if where and where[0] == key else persona
        async with self.session(key).lock:
            rows = self.store.history(key, persona.name)
            last = next((m for m in reversed(rows) if m.role == "user"), None)
            latest = next((m for m in reversed(rows) if m.role == "assistant"), None)
            if answer_id is not None and (latest is None or latest.id != answer_id):
                await self._notice(surface, t("regenerate_only_latest", lang))
                return
            if last is not None:
                try:
                    self.store.delete_from(key, persona.name, last.id)
                except StorageError as exc:
                    report(exc)
                    await self._notice(surface, t("storage_failed", lang))
                    return
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
        ticket = Ticket()
        session.tickets[ticket.id] = ticket
        tag = AnswerTag(stop=ticket.id)
        if (bind := getattr(surface, "bind", None)) is not None:
            bind(tag)
        record = ExchangeRecord(self.store, key, persona.name)
        stream = self._open_stream(msg, surface, record, lang)
        if session.lock.locked():
            stream.set_status(t("queued_session", lang))
        try:
            if await self._wait_turn(session, ticket):
                try:
                    await self._answer(msg, session, persona, text, lang, stream, record, ticket, tag, attachment, image, tenant)
                finally:
                    session.lock.release()
        finally:  # also on cancellation (shutdown) and for a queued answer stopped: close the reply cleanly
            session.tickets.pop(ticket.id, None)
            await asyncio.shield(stream.finish(empty_text=t("stopped_mark", lang)))

    def _open_stream(self, msg: Incoming, surface: ReplySurface, record: ExchangeRecord, lang: str) -> ReplyStream:
        """A ReplyStream whose messages are noted with the answer, to mark them after a crash."""
        stream = ReplyStream(surface)
        where = getattr(surface, "reference", None)  # the console has nothing to mark later

        def placed(handle: object, base: int, prefix: str) -> None:
            message = where(handle) if where is not None else None
            if message is not None:
                record.place(recovery.reference(msg.platform, lang, message, base, prefix))

        stream.on_placed = placed
        return stream.start()

    async def recover(self, platform: str, repair: recovery.Repair, limit: int) -> int:
        """Called by an adapter once it is up: mark its answers cut by the last crash."""
        return await recovery.recover(self.store, platform, repair, limit)

    async def _answer(
        self, msg: Incoming, session: Session, persona: Persona, text: str, lang: str,
        stream: ReplyStream, record: ExchangeRecord, ticket: Ticket, tag: AnswerTag,
        attachment: str | None, image: object, tenant: str,
    ) -> None:
        key = session.key
        history = [
            ChatMessage(m.role, m.content)
            for m in self.store.history(key, persona.name)
            if m.status in VISIBLE and m.content
        ]
        record.begin(text, attachment)
        tag.answer_id = record.answer_id
        cancel = session.cancel = ticket.cancel

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
                        record.update(stream.text)
            if cancel.is_set:
                status, suffix = "stopped", t("stopped_mark", lang)
        except ModelError as exc:
            log.error("%s failed for %s: %s", persona.name, tenant, exc)
            status, suffix = "failed", t(exc.user_message_key, lang)
        except asyncio.CancelledError:  # shutdown: mark what was shown as stopped, then go
            status = "stopped"
            stream.feed(("\n\n" if stream.text.strip() else "") + t("stopped_mark", lang))
            raise
        except Exception:
            log.exception("%s failed for %s", persona.name, tenant)
            status, suffix = "failed", t("internal_error", lang)
        finally:
            session.cancel = None
            answer = turn.stored_answer if turn.stored_answer is not None else stream.text
            record.update(answer, status)
            log.info(
                "answered %s as %s: %s, %d prompt + %d answer tokens",
                tenant, persona.name, status, turn.stats.prompt_tokens, turn.stats.completion_tokens,
            )
        if not record.saved:
            suffix = (suffix + "\n\n" if suffix else "") + t("not_saved", lang)
        if suffix:
            stream.feed(("\n\n" if stream.text.strip() else "") + suffix)
        await stream.finish(empty_text=t("empty_answer", lang))

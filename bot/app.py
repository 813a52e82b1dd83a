"""The core: route → access (once) → limits → session → responder → ReplyStream.

Adapters call `App.handle(incoming, surface)` for every user action. The same code serves the
console, Telegram and Discord. What commands exist is declared in `bot/features.py`; the
router, /help, the menus, access and rate limits read those declarations.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
import uuid
from contextlib import aclosing, contextmanager
from dataclasses import dataclass, field, replace
from typing import Callable, Iterator, Sequence

from models.base import Cancel, ChatMessage, ModelError
from models.registry import ModelHub, RoleSpec

from .access import AccessPolicy
from .config import ROLES, Settings
from .features import DEFAULT_PERSONA, FEATURES, RATE_BUCKETS, Catalogue, Feature
from .health import Health
from .i18n import register, t
from .images import (
    DEFAULT_SIDE, MEMORY_BYTES, MEMORY_IDLE_SECONDS, ImageMemory, ImageProblem, Picture, prepare_image, since_picture,
)
from .limits import TokenBucket, clean_text
from . import recovery
from .log_context import bind
from .messages import AnswerTag, Incoming, ReplyContext, ReplySurface
from .metrics import Metrics, NoMetrics
from .personas import Persona, build_personas
from .picture_files import PictureFiles
from .responders import ChatResponder, Responder, Turn
from .saving import ExchangeRecord, report
from .stopping import UntilStopped
from .store import VISIBLE, HistoryStore, StorageError
from .streaming import ReplyStream
from .timed_surface import TimedSurface

log = logging.getLogger(__name__)

SAVE_EVERY = 2.0  # seconds between writes of a growing answer to the database
REFUSAL_EVERY = 60.0  # at most one refusal per minute per unknown user
STOP_WAIT = 10.0  # seconds stopped answers get to close at shutdown before they are cancelled


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
    stopped: asyncio.Event | None = None  # /stop for the answer in flight, seen at once (bot/stopping.py)
    tickets: dict[str, Ticket] = field(default_factory=dict)  # answers running or queued


@dataclass
class Request:
    """One user action on its way through the core; the session key is derived once, here."""

    msg: Incoming
    surface: ReplySurface
    key: str
    command: str | None
    args: str
    feature: Feature | None  # the feature that serves it (None: an unknown command)

    @property
    def lang(self) -> str:
        return self.msg.lang


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
        features: Sequence[Feature] = FEATURES,
    ) -> None:
        self.features = Catalogue(features)  # first: a wrong declaration stops the start before anything opens
        register(self.features.texts())
        self.settings = settings
        self.clock = clock
        self.hub = hub or ModelHub(role_specs(settings))
        self.store = store or HistoryStore(settings.db_path)
        if self.store.recovered:
            log.warning("marked %d answers cut by a previous crash as interrupted", self.store.recovered)
        # Prometheus metrics and the status page's figures; not kept when there is no server
        self.metrics = Metrics(self.hub) if settings.metrics_port is not None else NoMetrics()
        self.health = Health()  # adapters report their connection state here
        self.access = AccessPolicy(settings)
        self.buckets = {
            name: TokenBucket(getattr(settings, size), getattr(settings, refill), clock)
            for name, (size, refill) in RATE_BUCKETS.items()
        }
        self.personas: dict[str, Persona] = build_personas(settings, self.features.features)
        self.responders: dict[str, Responder] = {
            f.persona: f.responder(self) if f.responder else ChatResponder(self.hub)
            for f in self.features.features if f.persona
        }
        # the picture each session is talking about, also kept under DATA_DIR across restarts
        self.images = ImageMemory(files=PictureFiles(settings.data_dir / "pictures", max_bytes=MEMORY_BYTES, idle_seconds=MEMORY_IDLE_SECONDS))
        self.sessions: dict[str, Session] = {}
        self._refused: dict[str, float] = {}
        self._inflight: dict[asyncio.Task, tuple[str, str]] = {}  # answers being handled → (platform, session key)

    async def prepare(self) -> None:
        """At start, before serving: model-server clients, and in-process models with
        PRELOAD_MODELS=1, so the first user's answer does not wait for imports and set-up."""
        await self.hub.prepare(preload=self.settings.preload_models)

    # -- identity --------------------------------------------------------------------
    def session_key(self, msg: Incoming) -> str:
        """The one derivation of a conversation's key: platform + chat + user (+ thread)."""
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

    def menu(self, platform: str | None = None) -> list[Feature]:
        """The commands for a platform's command menu, in order."""
        return self.features.menu(platform)

    def _context(self, req: Request, persona: Persona) -> None:
        """Tell the surface what it may show besides the text (it never asks the App)."""
        req.surface.context = ReplyContext(req.lang, t(persona.title_key, req.lang), persona.name)

    # -- the entry points ----------------------------------------------------------------
    async def handle(self, msg: Incoming, surface: ReplySurface) -> None:
        key = self.session_key(msg)
        bind(platform=msg.platform, session=key, persona=None)
        with self._tracked(msg.platform, key):
            try:
                req = self._route(msg, surface, key)
                self._context(req, self.current_persona(req.key))
                if await self._admitted(req):
                    await self._dispatch(req)
            except StorageError as exc:  # a command that writes (/reset) on a full or read-only disk
                report(exc)
                await self._notice(surface, t("storage_failed", msg.lang))
            except Exception:
                log.exception("handling a %s message failed", msg.platform)
                await self._notice(surface, t("internal_error", msg.lang))

    async def regenerate(self, msg: Incoming, surface: ReplySurface, answer_id: int | None = None) -> None:
        """Ask a question again, replacing its answer: the question of `answer_id` (the answer
        whose Regenerate button was pressed) if that is still its persona's latest answer, else
        say that only the latest can be; without `answer_id`, the current persona's last question."""
        key = self.session_key(msg)
        bind(platform=msg.platform, session=key, persona=None)
        with self._tracked(msg.platform, key):
            persona = self.current_persona(key)
            where = self.store.answer_place(answer_id) if answer_id is not None else None
            if where is not None and where[0] == key:
                persona = self.personas.get(where[1], persona)
            req = Request(msg, surface, key, None, "", self.features.by_persona.get(persona.name))
            self._context(req, persona)
            if not await self._admitted(req):
                return
            async with self.session(key).lock:
                rows = self.store.history(key, persona.name)
                last = next((m for m in reversed(rows) if m.role == "user"), None)
                latest = next((m for m in reversed(rows) if m.role == "assistant"), None)
                if answer_id is not None and (latest is None or latest.id != answer_id):
                    await self._notice(surface, t("regenerate_only_latest", req.lang))
                    return
                if last is not None and not self._forget_from(key, persona, last.id):
                    await self._notice(surface, t("storage_failed", req.lang))
                    return
            if last is None:
                await self._notice(surface, t("regenerate_nothing", req.lang))
            else:
                await self.ask(req, persona, last.content, attachment=last.attachment)

    def _forget_from(self, key: str, persona: Persona, message_id: int) -> bool:
        try:
            self.store.delete_from(key, persona.name, message_id)
            return True
        except StorageError as exc:
            report(exc)
            return False

    def _route(self, msg: Incoming, surface: ReplySurface, key: str) -> Request:
        command, args = self._parse(msg)
        if msg.image is not None:
            feature = self.features.taking_images()
        elif command is None:
            feature = self.features.by_persona.get(self.current_persona(key).name)
        else:
            feature = self.features.by_command.get(command)
        return Request(msg, surface, key, command, args, feature)

    @staticmethod
    def _parse(msg: Incoming) -> tuple[str | None, str]:
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

    # -- access: checked once per request, for the feature that serves it ---------------
    async def _admitted(self, req: Request) -> bool:
        msg = req.msg
        if not self.access.allows(msg):
            who = f"{msg.platform}:{msg.user_id}"
            log.info("refused %s (chat %s): not on the allowlist", who, msg.chat_id)
            self.metrics.request(msg.platform, "none", "refused", who)
            last = self._refused.get(who)
            if last is None or self.clock() - last >= REFUSAL_EVERY:
                self._refused[who] = self.clock()
                await self._notice(req.surface, t("not_allowed", req.lang))
            return False
        if req.feature is not None and not self.access.allows_feature(msg, req.feature):
            log.info("refused %s:%s for /%s", msg.platform, msg.user_id, req.feature.command)
            self.metrics.request(msg.platform, req.feature.persona or "none", "refused", f"{msg.platform}:{msg.user_id}")
            if msg.image is not None:
                self.metrics.image("refused")
            await self._notice(req.surface, t(req.feature.refusal_key, req.lang))
            return False
        return True

    async def _notice(self, surface: ReplySurface, text: str) -> None:
        try:
            await surface.post(text, phase="notice")
        except Exception:
            log.exception("could not send a notice")

    # -- commands ------------------------------------------------------------------------
    async def _dispatch(self, req: Request) -> None:
        feature, lang = req.feature, req.lang
        if feature is None and req.msg.image is not None:
            await self._notice(req.surface, t("not_available", lang, feature=t("feature_image", lang)))
        elif feature is None:
            log.info("unknown command /%s from %s:%s", (req.command or "")[:32], req.msg.platform, req.msg.user_id)
            await self._notice(req.surface, t("unknown_command", lang, command=(req.command or "")[:32]))
        elif feature.persona is None:
            await self._control(req, feature.command)
        elif feature.argument == "image" and (req.msg.image is not None or req.command is not None):
            await self._image(req, self.personas[feature.persona])
        elif req.command is None and feature.argument == "image" and self.images.get(req.key) is None:
            await self._picture_forgotten(req)
        elif req.command is None:
            await self.ask(req, self.personas[feature.persona], req.args)
        else:
            persona = self.personas[feature.persona]
            self.set_persona(req.key, persona.name)
            self._context(req, persona)
            if req.args.strip():
                await self.ask(req, persona, req.args)
            else:
                await self._notice(req.surface, t(persona.greeting_key, lang))

    async def _picture_forgotten(self, req: Request) -> None:
        """A follow-up about a picture that is gone (expired, /reset): say so once, and let the
        chat model answer (the session switches to it, so the next message goes there directly)."""
        chat = self.personas[DEFAULT_PERSONA]
        feature = self.features.by_persona.get(chat.name)
        _, token = since_picture(self.store.history(req.key, self.current_persona(req.key).name), None)
        if token is None or (feature is not None and not self.access.allows_feature(req.msg, feature)):
            await self._notice(req.surface, t("image_needed", req.lang))
            return
        log.info("%s: the picture is gone; answering with %s", req.key, chat.name)
        self.set_persona(req.key, chat.name)
        await self._notice(req.surface, t("picture_forgotten", req.lang, persona=t(chat.title_key, req.lang)))
        req = replace(req, feature=feature)
        self._context(req, chat)
        await self.ask(req, chat, req.args)

    async def _control(self, req: Request, command: str) -> None:
        """The commands that select no persona (declared in bot/features.py without one)."""
        lang, key = req.lang, req.key
        if command in ("start", "help"):
            text = self.help_text(key, lang, greeting=command == "start")
        elif command == "persona":
            text = t("persona_current", lang, persona=t(self.current_persona(key).title_key, lang))
        elif command == "reset":
            persona = self.current_persona(key)
            self.store.reset(key, persona.name)
            if persona.argument == "image":
                self.images.forget(key)  # the picture goes with its conversation
            text = t("reset_done", lang, persona=t(persona.title_key, lang))
        elif command == "stop":
            text = t("stop_done" if self.stop(key) else "stop_nothing", lang)
        else:
            raise ValueError(f"/{command} is declared without a persona but the core does not implement it")
        await self._notice(req.surface, text)

    def help_text(self, key: str, lang: str, *, greeting: bool = False) -> str:
        lines = [f"/{f.command} — {t(f.description_key, lang)}" for f in self.menu()]
        commands = t("help_header", lang) + "\n" + "\n".join(lines)
        for feature in self.menu():
            if feature.help is not None:
                commands += "\n\n" + feature.help(self.responders.get(feature.persona or ""), lang)
        persona = t(self.current_persona(key).title_key, lang)
        if greeting:
            return t("start", lang, commands=commands, persona=persona)
        return commands + "\n\n" + t("help_footer", lang) + "\n" + t("persona_current", lang, persona=persona)

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

    def stop_for(self, msg: Incoming, ticket: str | None = None) -> bool:
        """/stop on behalf of the author of `msg` (a Stop button, Ctrl-C): adapters never build keys.
        `ticket`: what the pressed Stop button names (that answer, even while it waits its turn)."""
        return self.stop(self.session_key(msg), ticket)

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

    # -- pictures ------------------------------------------------------------------------
    async def _image(self, req: Request, persona: Persona) -> None:
        """A message with a picture, or the picture persona's command: take the picture in once
        (checked, shrunk, remembered for the session) and ask about it."""
        lang, key = req.lang, req.key
        if req.msg.image is None:  # the command without a picture: switch, and ask if a picture is there
            if self.current_persona(key).name != persona.name:
                self.images.forget(key)  # coming back from another persona starts afresh
            self.set_persona(key, persona.name)
            self._context(req, persona)
            if req.args.strip() and self.images.get(key) is not None:
                await self.ask(req, persona, req.args)
            else:
                await self._notice(req.surface, t("image_needed" if req.args.strip() else persona.greeting_key, lang))
            return
        picture = await self._take_in(req, persona)
        if picture is None:
            return
        self.set_persona(key, persona.name)
        self._context(req, persona)
        question = req.args.strip() or t("image_describe_question", lang)
        await self.ask(req, persona, question, attachment=picture.marker())

    async def _take_in(self, req: Request, persona: Persona) -> Picture | None:
        msg, image = req.msg, req.msg.image
        assert image is not None
        capabilities = self.hub.get(persona.role).capabilities  # loaded already? then its picture size is known
        side = (capabilities and capabilities.image_side) or DEFAULT_SIDE
        started = time.perf_counter()
        try:
            prepared = await prepare_image(
                image, max_bytes=self.settings.max_image_bytes, max_pixels=self.settings.max_image_pixels, side=side
            )
        except ImageProblem as problem:
            self.metrics.image(problem.key.removeprefix("image_"))
            log.info(
                "refused an image from %s:%s (%r, %s bytes declared): %s",
                msg.platform, msg.user_id, image.filename[:64], image.size, problem,
            )
            await self._notice(req.surface, t(problem.key, req.lang, **problem.values))
            return None
        log.info(
            "image from %s:%s: %s → %dx%d in %.0f ms",
            msg.platform, msg.user_id, prepared.describe(), *prepared.image.size, (time.perf_counter() - started) * 1000,
        )
        self.metrics.image("ok")
        return self.images.put(req.key, uuid.uuid4().hex[:12], prepared)

    # -- asking a persona ----------------------------------------------------------------
    async def ask(self, req: Request, persona: Persona, text: str, *, attachment: str | None = None) -> None:
        msg, lang = req.msg, req.lang
        bind(persona=persona.name)
        tenant = f"{msg.platform}:{msg.user_id}"
        text, problem = clean_text(text, self.settings.max_input_chars)
        if problem is not None:
            log.info("rejected input from %s:%s: %s", msg.platform, msg.user_id, problem.key)
            self.metrics.request(msg.platform, persona.name, "refused", tenant)
            await self._notice(req.surface, t(problem.key, lang, **problem.values))
            return
        feature = self.features.by_persona.get(persona.name)
        wait = self.buckets[feature.bucket if feature else "messages"].take(tenant)
        if wait:
            log.info("rate-limited %s for %.0fs", tenant, wait)
            self.metrics.request(msg.platform, persona.name, "rate_limited", tenant)
            await self._notice(req.surface, t("rate_limited", lang, seconds=max(1, round(wait))))
            return
        session = self.session(req.key)
        self._context(req, persona)
        timed = TimedSurface(req.surface)  # when the answer showed, how many edits it took
        ticket = Ticket()
        session.tickets[ticket.id] = ticket
        tag = AnswerTag(stop=ticket.id)
        if (bind_tag := getattr(req.surface, "bind", None)) is not None:
            bind_tag(tag)
        record = ExchangeRecord(self.store, req.key, persona.name)
        stream = self._open_stream(req, record, timed)
        if session.lock.locked():
            stream.set_status(t("queued_session", lang))
        turn = None
        try:
            if await self._wait_turn(session, ticket):
                try:
                    turn = self._turn(req, session, persona, text, tenant, stream, attachment, record, ticket)
                    tag.answer_id = record.answer_id
                    await self._answer(turn, stream, record)
                finally:
                    session.lock.release()
        finally:  # also on cancellation (shutdown) and for a queued answer stopped: close the reply cleanly
            session.tickets.pop(ticket.id, None)
            await asyncio.shield(stream.finish(empty_text=t("stopped_mark", lang)))
        self.metrics.answer(
            msg.platform, persona.name, tenant, first_text=timed.first_text, total=time.monotonic() - timed.started,
            edits=timed.edits, tokens=turn.stats.completion_tokens if turn else 0, agent=persona.role == "agent",
        )

    def _open_stream(self, req: Request, record: ExchangeRecord, surface: ReplySurface) -> ReplyStream:
        """A ReplyStream (writing to `surface`, which wraps the request's) whose messages are
        noted with the answer, to mark them after a crash."""
        stream = ReplyStream(surface)
        where = getattr(req.surface, "reference", None)  # the console has nothing to mark later

        def placed(handle: object, base: int, prefix: str) -> None:
            message = where(handle) if where is not None else None
            if message is not None:
                record.place(recovery.reference(req.msg.platform, req.lang, message, base, prefix))

        stream.on_placed = placed
        return stream.start()

    async def recover(self, platform: str, repair: recovery.Repair, limit: int) -> int:
        """Called by an adapter once it is up: mark its answers cut by the last crash."""
        return await recovery.recover(self.store, platform, repair, limit)

    def _turn(
        self, req: Request, session: Session, persona: Persona, text: str, tenant: str, stream: ReplyStream,
        attachment: str | None, record: ExchangeRecord, ticket: Ticket,
    ) -> Turn:
        """Everything the responder needs, read once: the history (since the picture, for a
        picture persona) and the picture itself; then the question is stored."""
        lang = req.lang
        rows = self.store.history(session.key, persona.name)
        picture = None
        if persona.argument == "image":
            since, token = since_picture(rows, attachment)
            remembered = self.images.get(session.key)
            picture = remembered if remembered is not None and token is not None and remembered.token == token else None
            rows = rows[since:]
        history = [ChatMessage(m.role, m.content) for m in rows if m.status in VISIBLE and m.content]
        record.begin(text, attachment)  # the question, and the answer row it grows into

        def on_wait(kind: str, n: int) -> None:
            if kind == "queued":
                stream.set_status(t("queued_model", lang, n=n))
            elif kind == "loading":
                stream.set_status(t("loading_model", lang))
            elif stream.status:  # replace a queue notice; otherwise show nothing until text
                stream.set_status(t("thinking", lang))

        session.cancel, session.stopped = ticket.cancel, ticket.stopped  # Ticket.stop() sets both
        return Turn(req.msg, session.key, tenant, persona, history, text, lang, session.cancel, on_wait, picture=picture)

    async def _answer(self, turn: Turn, stream: ReplyStream, record: ExchangeRecord) -> None:
        key, persona, lang, cancel = turn.session_key, turn.persona, turn.lang, turn.cancel
        status, suffix = "ok", ""
        try:
            await self._stream_answer(turn, stream, self.sessions[key].stopped, record)
            if cancel.is_set:
                status, suffix = "stopped", t("stopped_mark", lang)
        except ModelError as exc:
            log.error("%s failed for %s: %s", persona.name, turn.tenant, exc)
            status, suffix = "failed", t(exc.user_message_key, lang)
        except asyncio.CancelledError:  # shutdown: mark what was shown as stopped, then go
            status = "stopped"
            stream.feed(("\n\n" if stream.text.strip() else "") + t("stopped_mark", lang))
            raise
        except Exception:
            log.exception("%s failed for %s", persona.name, turn.tenant)
            status, suffix = "failed", t("internal_error", lang)
        finally:
            self.sessions[key].cancel = self.sessions[key].stopped = None
            answer = turn.stored_answer if turn.stored_answer is not None else stream.text
            record.update(answer, status)
            self.metrics.request(turn.msg.platform, persona.name, "answered" if status == "ok" else status, turn.tenant)
            log.info(
                "answered %s as %s: %s, %d prompt + %d answer tokens",
                turn.tenant, persona.name, status, turn.stats.prompt_tokens, turn.stats.completion_tokens,
            )
        if not record.saved:
            suffix = (suffix + "\n\n" if suffix else "") + t("not_saved", lang)
        if suffix:
            stream.feed(("\n\n" if stream.text.strip() else "") + suffix)
        await stream.finish(empty_text=t("empty_answer", lang))

    async def _stream_answer(self, turn: Turn, stream: ReplyStream, stopped: asyncio.Event, record: ExchangeRecord) -> None:
        """Show the responder's deltas; a /stop before any text marks the reply stopped at once."""
        saved_at = self.clock()
        async with aclosing(self.responders[turn.persona.name].respond(turn)) as deltas:
            shown = UntilStopped(deltas, stopped, armed=lambda: not stream.text)
            try:
                async for delta in shown:
                    stream.feed(delta)
                    if self.clock() - saved_at >= SAVE_EVERY:
                        saved_at = self.clock()
                        record.update(stream.text)
                if shown.cut:  # say so now; the model may still be reading the prompt
                    if turn.stored_answer is None:
                        turn.stored_answer = stream.text
                    record.update(turn.stored_answer, "stopped")  # stored before it is shown
                    stream.feed(("\n\n" if stream.text.strip() else "") + t("stopped_mark", turn.lang))
                    await stream.finish()
            finally:
                await shown.drain()

    # -- shutdown: one policy for every adapter --------------------------------------------
    @contextmanager
    def _tracked(self, platform: str, key: str) -> Iterator[None]:
        task = asyncio.current_task()
        if task is not None:
            self._inflight[task] = (platform, key)
        try:
            yield
        finally:
            if task is not None:
                self._inflight.pop(task, None)

    def _answering(self, platform: str) -> set[asyncio.Task]:
        return {task for task, (where, _) in self._inflight.items() if where == platform and not task.done()}

    async def drain(self, platform: str) -> None:
        """Called by an adapter at shutdown, after it stopped taking new messages and before it
        closes its connection: the answers in flight get SHUTDOWN_GRACE seconds to finish; then
        they are stopped like /stop (again while queued ones start), which still delivers their
        text with a "stopped" mark; whatever still hangs after STOP_WAIT is cancelled."""
        pending = self._answering(platform)
        if not pending:
            return
        grace = self.settings.shutdown_grace
        log.info("%s: letting %d answer(s) finish (up to %.1f s)", platform, len(pending), grace)
        await asyncio.wait(pending, timeout=grace)
        pending = self._answering(platform)
        if pending:
            log.warning("%s: stopping %d answer(s) still running", platform, len(pending))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + STOP_WAIT
        while pending and loop.time() < deadline:
            for key in {self._inflight[task][1] for task in pending if task in self._inflight}:
                self.stop(key)
            await asyncio.wait(pending, timeout=0.2)
            pending = self._answering(platform)
        for task in pending:
            task.cancel()  # once: the core's finally still closes the reply
        await asyncio.gather(*pending, return_exceptions=True)

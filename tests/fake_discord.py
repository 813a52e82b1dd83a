"""A local, strict fake of Discord for the tests and the bench: the real discord.py talks to it.

It speaks Discord's real wire protocols on 127.0.0.1:
- a WebSocket gateway (`/gateway`): HELLO, HEARTBEAT/ACK, IDENTIFY → READY + GUILD_CREATE,
  RESUME, zlib-stream compression, and the dispatches a test triggers (MESSAGE_CREATE,
  INTERACTION_CREATE);
- the REST API (`/api/v10/...`): users/@me, application info, command sync, interaction
  callbacks, webhook edits of @original, follow-ups, channel messages and edits, typing, and a CDN
  path for attachments.

It keeps message state and is strict the way Discord is: content over 2000 characters, empty
messages, malformed components and unknown commands are 400s; an interaction acknowledged after
3 s fails with 10062, twice with 40060; expired interaction tokens give 50027; rate-limit buckets
answer with X-RateLimit-* headers and Discord-shaped 429s (with the `Via` header discord.py needs
to retry): 5 writes per 5 s per channel, 5 per 2 s per interaction token, and 50 requests in any
second overall. The overall cap counts bot-token requests, as Discord documents ("interaction
endpoints are not bound to the bot's Global Rate Limit"); `global_routes="all"` counts interaction
callbacks and webhooks too, stricter than Discord. Like a real network and server, each REST request takes a random 3 to
60 ms (`jitter`), and it takes effect at a random point within that time. Every error it returns
is recorded in `errors`, so a test can assert there were none.

Use `patched(fake)` to point discord.py at it; nothing outside the tests is changed.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import itertools
import json
import random
import re
import time
from collections import deque
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable

from aiohttp import WSMsgType, web

API = "/api/v10"
DISCORD_EPOCH_MS = 1420070400000
MAX_CONTENT = 2000
ACK_DEADLINE = 3.0  # seconds to answer or defer an interaction
TOKEN_LIFETIME = 15 * 60.0  # interaction tokens
PRIVILEGED_INTENTS = {1 << 1: "GUILD_MEMBERS", 1 << 8: "GUILD_PRESENCES", 1 << 15: "MESSAGE_CONTENT"}
MESSAGE_CONTENT_INTENT = 1 << 15
EVERYONE_PERMISSIONS = "2248473465835073"
COMMAND_NAME = re.compile(r"^[-_\w]{1,32}$")
LOCALES = {
    "id", "da", "de", "en-GB", "en-US", "es-ES", "es-419", "fr", "hr", "it", "lt", "hu", "nl", "no", "pl",
    "pt-BR", "ro", "fi", "sv-SE", "vi", "tr", "cs", "el", "bg", "ru", "uk", "hi", "th", "zh-CN", "ja",
    "zh-TW", "ko",
}
OPTION_TYPES = {3: str, 4: int, 5: bool, 10: float, 11: "attachment"}


class FakeError(Exception):
    """Raised inside a handler to answer with a Discord-shaped JSON error."""

    def __init__(self, status: int, code: int, message: str) -> None:
        super().__init__(f"{status} {code} {message}")
        self.status, self.code, self.message = status, code, message


def now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat()


def json_response(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    # discord.py only parses bodies whose Content-Type is exactly "application/json".
    return web.Response(
        body=json.dumps(data).encode(), status=status, headers={"Content-Type": "application/json", **(headers or {})}
    )


# ----------------------------------------------------------------------------------------------
# State
# ----------------------------------------------------------------------------------------------


@dataclass
class User:
    id: int
    name: str
    bot: bool = False

    def payload(self) -> dict:
        data = {"id": str(self.id), "username": self.name, "discriminator": "0", "global_name": self.name, "avatar": None}
        if self.bot:
            data["bot"] = True
        return data


@dataclass
class Channel:
    id: int
    name: str
    guild_id: int | None = None  # None: a DM
    parent_id: int | None = None  # set for threads
    recipient: User | None = None  # DMs

    @property
    def type(self) -> int:
        if self.guild_id is None:
            return 1
        return 11 if self.parent_id else 0

    def payload(self) -> dict:
        data: dict[str, Any] = {"id": str(self.id), "type": self.type, "name": self.name}
        if self.guild_id is None:
            data["recipients"] = [self.recipient.payload()] if self.recipient else []
            data["last_message_id"] = None
            return data
        data.update(guild_id=str(self.guild_id), position=0, permission_overwrites=[], nsfw=False, topic=None,
                    last_message_id=None, rate_limit_per_user=0, flags=0)
        if self.parent_id:
            data.update(
                parent_id=str(self.parent_id), owner_id="1", message_count=0, member_count=1, total_message_sent=0,
                thread_metadata={"archived": False, "auto_archive_duration": 1440, "archive_timestamp": now_iso(), "locked": False},
            )
        else:
            data["parent_id"] = None
        return data


@dataclass
class Guild:
    id: int
    name: str
    preferred_locale: str = "en-US"
    channels: list[Channel] = field(default_factory=list)


@dataclass
class Write:
    at: float  # monotonic time the fake applied it
    content: str
    components: list


@dataclass
class Message:
    id: int
    channel_id: int
    author: User
    content: str
    components: list = field(default_factory=list)
    flags: int = 0
    attachments: list = field(default_factory=list)
    mentions: list[User] = field(default_factory=list)
    reference_id: int | None = None
    interaction_id: int | None = None  # set for interaction responses and follow-ups
    webhook_id: int | None = None
    writes: list[Write] = field(default_factory=list)
    deleted: bool = False

    @property
    def custom_ids(self) -> list[str]:
        return [c.get("custom_id", "") for row in self.components for c in row.get("components", [])]


@dataclass
class Interaction:
    id: int
    token: str
    kind: int  # 2 application command, 3 component
    user: User
    channel: Channel
    name: str = ""  # command name or custom_id
    locale: str = "en-US"
    dispatched_at: float = 0.0
    acked_at: float | None = None
    ack_type: int | None = None
    ephemeral: bool = False
    original: Message | None = None
    followups: list[Message] = field(default_factory=list)
    expired: bool = False
    source_message: Message | None = None  # for components: the message the button is on

    @property
    def messages(self) -> list[Message]:
        return ([self.original] if self.original else []) + self.followups


@dataclass
class Bucket:
    limit: int
    per: float
    remaining: int = 0
    reset_at: float = 0.0

    def take(self, now: float) -> float:
        """0 when allowed, else the seconds to wait."""
        if now >= self.reset_at:
            self.remaining, self.reset_at = self.limit, now + self.per
        if self.remaining <= 0:
            return self.reset_at - now
        self.remaining -= 1
        return 0.0


@dataclass
class Injected:
    method: str
    path: re.Pattern
    status: int
    retry_after: float
    count: int


# ----------------------------------------------------------------------------------------------
# The server
# ----------------------------------------------------------------------------------------------


class FakeDiscord:
    def __init__(
        self,
        token: str = "MTE5.fake-bot-token.for-tests-only-aBcDeFgHiJkLmNoPqRsT",
        *,
        granted_intents: int = 0,  # privileged intents the application has enabled in the portal
        heartbeat_interval_ms: int = 41250,
        ack_deadline: float = ACK_DEADLINE,
        token_lifetime: float = TOKEN_LIFETIME,
        message_bucket: tuple[int, float] = (5, 5.0),  # per channel
        webhook_bucket: tuple[int, float] = (5, 2.0),  # per interaction token
        global_limit: int = 50,  # requests in any second
        global_routes: str = "bot",  # "bot": bot-token routes only (Discord's rule), or "all" REST requests
        jitter: tuple[float, float] = (0.003, 0.060),  # seconds each REST request takes, at random
        seed: int = 0,
    ) -> None:
        self.token = token
        self.granted_intents = granted_intents
        self.heartbeat_interval_ms = heartbeat_interval_ms
        self.ack_deadline = ack_deadline
        self.token_lifetime = token_lifetime
        self.limits = {"message": message_bucket, "webhook": webhook_bucket, "global": (global_limit, 1.0)}
        self.global_routes = global_routes
        self.jitter = jitter
        self._random = random.Random(seed)
        self._accepted: deque[float] = deque()  # when each request counted for the overall cap
        self._ids = itertools.count(1)
        self.bot = User(self.snowflake(), "InternLM Bot", bot=True)
        self.application_id = self.snowflake()
        self.guild = Guild(self.snowflake(), "Test Server")
        self.channel = self.add_channel("general", self.guild)
        self.other_channel = self.add_channel("random", self.guild)
        self.thread = self.add_channel("a thread", self.guild, parent=self.channel)
        self.guilds = [self.guild]
        self.users: dict[int, User] = {}
        self.alice = self.add_user("alice")
        self.bob = self.add_user("bob")
        self.dms: dict[int, Channel] = {}
        self.messages: dict[int, Message] = {}
        self.interactions: dict[int, Interaction] = {}
        self.tokens: dict[str, Interaction] = {}
        self.commands: dict[str, list[dict]] = {}  # "global" or guild id -> synced command payloads
        self.syncs: list[str] = []  # scopes, in order, of every bulk overwrite
        self.files: dict[str, tuple[bytes, str]] = {}  # CDN path -> (bytes, content type)
        self.file_downloads = 0
        self.errors: list[tuple[str, str, int, int]] = []  # (method, path, status, code) we answered
        self.rate_limited = 0  # 429s answered (injected or from buckets)
        self.global_hits = 0  # of those, for the overall cap
        self.identified: list[dict] = []  # IDENTIFY payloads (token removed)
        self.heartbeats = 0
        self.resumed = 0  # successful RESUMEs
        self.typing: list[int] = []  # channel ids
        self.ready = asyncio.Event()
        self.log: list[tuple[float, str, str]] = []  # (time, method, path) of every REST request
        self._buckets: dict[str, Bucket] = {}
        self._injected: list[Injected] = []
        self._sockets: list[web.WebSocketResponse] = []
        self._senders: dict[web.WebSocketResponse, Callable] = {}
        self._seq = 0
        self._session_id = "fake-session"
        self._runner: web.AppRunner | None = None
        self.port = 0
        self._changed = asyncio.Condition()

    # -- ids and fixtures --------------------------------------------------------------------
    def snowflake(self) -> int:
        ms = int(time.time() * 1000) - DISCORD_EPOCH_MS
        return (ms << 22) | (next(self._ids) & 0x3FFFFF)

    def add_user(self, name: str) -> User:
        user = User(self.snowflake(), name)
        self.users[user.id] = user
        return user

    def add_channel(self, name: str, guild: Guild, parent: Channel | None = None) -> Channel:
        channel = Channel(self.snowflake(), name, guild.id, parent.id if parent else None)
        guild.channels.append(channel)
        return channel

    def dm_channel(self, user: User) -> Channel:
        if user.id not in self.dms:
            self.dms[user.id] = Channel(self.snowflake(), "", None, recipient=user)
        return self.dms[user.id]

    def add_file(self, name: str, data: bytes, content_type: str) -> dict:
        """An attachment payload whose URL this fake serves (like cdn.discordapp.com)."""
        attachment_id = self.snowflake()
        path = f"/attachments/{attachment_id}/{name}"
        self.files[path] = (data, content_type)
        return {
            "id": str(attachment_id), "filename": name, "size": len(data), "content_type": content_type,
            "url": f"{self.http_url}{path}", "proxy_url": f"{self.http_url}{path}", "width": 8, "height": 8,
        }

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def api_base(self) -> str:
        return self.http_url + API

    @property
    def gateway_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/gateway/"

    # -- lifecycle -----------------------------------------------------------------------------
    async def start(self) -> "FakeDiscord":
        app = web.Application(middlewares=[self._middleware], client_max_size=32 * 2**20)
        app.router.add_get("/gateway/", self._gateway)
        app.router.add_get("/attachments/{id}/{name}", self._cdn)
        routes = [
            ("GET", "/users/@me", self._me),
            ("GET", "/oauth2/applications/@me", self._application),
            ("GET", "/applications/{app}/commands", self._get_commands),
            ("PUT", "/applications/{app}/commands", self._put_commands),
            ("GET", "/applications/{app}/guilds/{guild}/commands", self._get_commands),
            ("PUT", "/applications/{app}/guilds/{guild}/commands", self._put_commands),
            ("POST", "/interactions/{id}/{token}/callback", self._callback),
            ("GET", "/webhooks/{app}/{token}/messages/{message}", self._webhook_get),
            ("PATCH", "/webhooks/{app}/{token}/messages/{message}", self._webhook_edit),
            ("DELETE", "/webhooks/{app}/{token}/messages/{message}", self._webhook_delete),
            ("POST", "/webhooks/{app}/{token}", self._followup),
            ("POST", "/channels/{channel}/messages", self._channel_send),
            ("PATCH", "/channels/{channel}/messages/{message}", self._channel_edit),
            ("POST", "/channels/{channel}/typing", self._typing),
        ]
        for method, path, handler in routes:
            app.router.add_route(method, API + path, handler)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def stop(self) -> None:
        for ws in list(self._sockets):
            await ws.close()
        if self._runner is not None:
            await self._runner.cleanup()

    async def __aenter__(self) -> "FakeDiscord":
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- REST plumbing ---------------------------------------------------------------------------
    @web.middleware
    async def _middleware(self, request: web.Request, handler: Callable) -> web.StreamResponse:
        path = request.path
        self.log.append((time.monotonic(), request.method, path))
        if not path.startswith(API):
            return await handler(request)
        before, after = self._latency()
        if before:
            await asyncio.sleep(before)
        try:
            bot_route = not path.startswith(API + "/interactions/") and not path.startswith(API + "/webhooks/")
            if bot_route and request.headers.get("Authorization") != f"Bot {self.token}":
                raise FakeError(401, 0, "401: Unauthorized")
            injected = self._take_injected(request.method, path)
            if injected is not None:
                response = self._too_many(injected.retry_after, request, status=injected.status)
            else:
                wait, headers = self._rate_limit(request, bot_route)
                if wait:
                    response = self._too_many(wait, request)
                else:
                    response = await handler(request)
                    response.headers.update(headers)
        except FakeError as exc:
            self.errors.append((request.method, path, exc.status, exc.code))
            response = json_response({"message": exc.message, "code": exc.code}, exc.status)
        finally:
            async with self._changed:
                self._changed.notify_all()
        if after:
            await asyncio.sleep(after)
        return response

    def _latency(self) -> tuple[float, float]:
        """(before, after) the moment a request takes effect: a random total within `jitter`."""
        low, high = self.jitter
        if high <= 0:
            return 0.0, 0.0
        total = self._random.uniform(low, high)
        split = self._random.random()
        return total * split, total * (1 - split)

    def _too_many(self, retry_after: float, request: web.Request, status: int = 429) -> web.Response:
        self.rate_limited += 1
        self.errors.append((request.method, request.path, status, 0))
        body = {"message": "You are being rate limited.", "retry_after": round(retry_after, 3), "global": False, "code": 0}
        headers = {
            "Via": "1.1 google", "Retry-After": str(max(1, round(retry_after))), "X-RateLimit-Scope": "user",
            "X-RateLimit-Limit": "5", "X-RateLimit-Remaining": "0", "X-RateLimit-Reset-After": f"{retry_after:.3f}",
        }
        return json_response(body, status, headers)

    def inject(self, method: str, path_regex: str, *, status: int = 429, retry_after: float = 0.3, count: int = 1) -> None:
        """Answer the next `count` matching requests with a Discord-shaped 429 (or another status)."""
        self._injected.append(Injected(method.upper(), re.compile(path_regex), status, retry_after, count))

    def _take_injected(self, method: str, path: str) -> Injected | None:
        for rule in self._injected:
            if rule.count > 0 and rule.method == method and rule.path.search(path):
                rule.count -= 1
                return rule
        return None

    def _rate_limit(self, request: web.Request, bot_route: bool) -> tuple[float, dict[str, str]]:
        now = time.monotonic()
        info = request.match_info
        if "channel" in info and request.method in ("POST", "PATCH") and request.path.endswith(("messages", info.get("message", "-"))):
            name, key = "message", f"message:{info['channel']}"
        elif "token" in info and not request.path.endswith("/callback"):
            name, key = "webhook", f"webhook:{info['token']}"
        else:
            name, key = "", ""
        if bot_route or self.global_routes == "all":  # counted at acceptance, in a sliding second
            limit, per = self.limits["global"]
            while self._accepted and self._accepted[0] <= now - per:
                self._accepted.popleft()
            if len(self._accepted) >= limit:
                self.global_hits += 1
                return self._accepted[-limit] + per - now, {}
        bucket = None
        if name:
            limit, per = self.limits[name]
            bucket = self._buckets.setdefault(key, Bucket(limit, per))
            wait = bucket.take(now)
            if wait:
                return wait, {}
        if bot_route or self.global_routes == "all":
            self._accepted.append(now)
        if bucket is None:
            return 0.0, {}
        headers = {
            "X-RateLimit-Bucket": f"fake-{name}", "X-RateLimit-Limit": str(limit),
            "X-RateLimit-Remaining": str(bucket.remaining), "X-RateLimit-Reset": f"{time.time() + bucket.reset_at - now:.3f}",
            "X-RateLimit-Reset-After": f"{bucket.reset_at - now:.3f}",
        }
        return wait, headers

    async def _json(self, request: web.Request) -> dict:
        content_type = request.headers.get("Content-Type", "")
        if content_type.startswith("multipart/form-data"):
            form = await request.post()
            raw = form.get("payload_json")
            if raw is None:
                raise FakeError(400, 50035, "Invalid Form Body: payload_json missing")
            return json.loads(raw if isinstance(raw, str) else raw.file.read())
        if content_type != "application/json":
            raise FakeError(400, 50035, f"Invalid Form Body: unexpected content type {content_type!r}")
        try:
            return await request.json()
        except ValueError:
            raise FakeError(400, 50109, "The request body contains invalid JSON.") from None

    # -- validation --------------------------------------------------------------------------------
    def _check_message(self, body: dict, *, new: bool) -> None:
        content = body.get("content")
        if content is not None and not isinstance(content, str):
            raise FakeError(400, 50035, "Invalid Form Body: content must be a string")
        if content is not None and len(content) > MAX_CONTENT:
            raise FakeError(400, 50035, f"Invalid Form Body: content: Must be {MAX_CONTENT} or fewer in length.")
        components = body.get("components")
        if components:
            self._check_components(components)
        if new and not (content or body.get("embeds") or components or body.get("attachments") or body.get("sticker_ids")):
            raise FakeError(400, 50006, "Cannot send an empty message")

    def _check_components(self, rows: list) -> None:
        if len(rows) > 5:
            raise FakeError(400, 50035, "Invalid Form Body: too many action rows")
        seen: set[str] = set()
        for row in rows:
            if row.get("type") != 1 or not 1 <= len(row.get("components", [])) <= 5:
                raise FakeError(400, 50035, "Invalid Form Body: components must be action rows of 1-5 items")
            for item in row["components"]:
                if item.get("type") != 2 or item.get("style") not in (1, 2, 3, 4, 5, 6):
                    raise FakeError(400, 50035, "Invalid Form Body: unsupported component")
                custom_id = item.get("custom_id")
                if item["style"] != 5 and (not custom_id or len(custom_id) > 100 or custom_id in seen):
                    raise FakeError(400, 50035, "Invalid Form Body: custom_id missing, too long or duplicated")
                if len(item.get("label") or "") > 80:
                    raise FakeError(400, 50035, "Invalid Form Body: label longer than 80")
                seen.add(custom_id)

    def _message_payload(self, message: Message) -> dict:
        channel = self.channel_by_id(message.channel_id)
        data: dict[str, Any] = {
            "id": str(message.id), "channel_id": str(message.channel_id), "author": message.author.payload(),
            "content": message.content, "timestamp": now_iso(), "edited_timestamp": None, "tts": False,
            "mention_everyone": False, "mentions": [u.payload() for u in message.mentions], "mention_roles": [],
            "attachments": message.attachments, "embeds": [], "pinned": False, "type": 0, "flags": message.flags,
            "components": message.components,
        }
        if channel is not None and channel.guild_id is not None:
            data["guild_id"] = str(channel.guild_id)
            if not message.author.bot:
                data["member"] = self._member(message.author, with_user=False)
        if message.webhook_id:
            data["webhook_id"] = str(message.webhook_id)
            data["application_id"] = str(self.application_id)
        if message.reference_id:
            data["type"] = 19
            data["message_reference"] = {"message_id": str(message.reference_id), "channel_id": str(message.channel_id)}
        return data

    def _member(self, user: User, *, with_user: bool = True) -> dict:
        data = {"roles": [], "joined_at": now_iso(), "deaf": False, "mute": False, "flags": 0, "nick": None,
                "avatar": None, "pending": False, "permissions": EVERYONE_PERMISSIONS}
        if with_user:
            data["user"] = user.payload()
        return data

    def channel_by_id(self, channel_id: int) -> Channel | None:
        for guild in self.guilds:
            for channel in guild.channels:
                if channel.id == channel_id:
                    return channel
        return next((c for c in self.dms.values() if c.id == channel_id), None)

    def _new_message(self, channel_id: int, author: User, body: dict, **extra: Any) -> Message:
        message = Message(self.snowflake(), channel_id, author, body.get("content") or "", body.get("components") or [],
                          int(body.get("flags") or 0), **extra)
        message.writes.append(Write(time.monotonic(), message.content, message.components))
        self.messages[message.id] = message
        return message

    def _apply_edit(self, message: Message, body: dict) -> None:
        if "content" in body:
            message.content = body["content"] or ""
        if "components" in body:
            message.components = body["components"] or []
        if not (message.content or message.components or message.attachments):
            raise FakeError(400, 50006, "Cannot send an empty message")
        message.writes.append(Write(time.monotonic(), message.content, message.components))

    # -- REST handlers ---------------------------------------------------------------------------
    async def _me(self, request: web.Request) -> web.Response:
        return json_response({**self.bot.payload(), "verified": True, "mfa_enabled": False, "flags": 0})

    async def _application(self, request: web.Request) -> web.Response:
        return json_response({
            "id": str(self.application_id), "name": self.bot.name, "icon": None, "description": "", "rpc_origins": [],
            "bot_public": True, "bot_require_code_grant": False, "owner": self.alice.payload(), "verify_key": "00" * 32,
            "flags": (1 << 19) if self.granted_intents & MESSAGE_CONTENT_INTENT else 0, "team": None,
            "bot": self.bot.payload(), "summary": "",
        })

    def _scope(self, request: web.Request) -> str:
        if request.match_info["app"] != str(self.application_id):
            raise FakeError(403, 50001, "Missing Access")
        guild = request.match_info.get("guild")
        if guild is not None and guild not in {str(g.id) for g in self.guilds}:
            raise FakeError(403, 50001, "Missing Access")
        return guild or "global"

    async def _get_commands(self, request: web.Request) -> web.Response:
        return json_response(self.commands.get(self._scope(request), []))

    async def _put_commands(self, request: web.Request) -> web.Response:
        scope = self._scope(request)
        body = await self._json(request)
        if not isinstance(body, list) or len(body) > 100:
            raise FakeError(400, 50035, "Invalid Form Body: expected a list of at most 100 commands")
        names: set[str] = set()
        stored = []
        for command in body:
            self._check_command(command)
            if command["name"] in names:
                raise FakeError(400, 50035, f"Invalid Form Body: duplicate command {command['name']}")
            names.add(command["name"])
            stored.append({
                **command, "id": str(self.snowflake()), "application_id": str(self.application_id), "version": "1",
                "type": command.get("type", 1), "default_member_permissions": command.get("default_member_permissions"),
                "nsfw": False, **({"guild_id": scope} if scope != "global" else {}),
            })
        self.commands[scope] = stored
        self.syncs.append(scope)
        return json_response(stored)

    def _check_command(self, command: dict) -> None:
        name = command.get("name", "")
        if not COMMAND_NAME.match(name) or name != name.lower():
            raise FakeError(400, 50035, f"Invalid Form Body: bad command name {name!r}")
        self._check_texts(command, name)
        options = command.get("options") or []
        if len(options) > 25:
            raise FakeError(400, 50035, "Invalid Form Body: more than 25 options")
        optional_seen = False
        for option in options:
            if not COMMAND_NAME.match(option.get("name", "")) or option["name"] != option["name"].lower():
                raise FakeError(400, 50035, f"Invalid Form Body: bad option name in {name}")
            if option.get("type") not in OPTION_TYPES:
                raise FakeError(400, 50035, f"Invalid Form Body: unsupported option type in {name}")
            self._check_texts(option, f"{name}.{option['name']}")
            if option.get("required"):
                if optional_seen:
                    raise FakeError(400, 50035, f"Invalid Form Body: required option after an optional one in {name}")
            else:
                optional_seen = True

    def _check_texts(self, item: dict, where: str) -> None:
        description = item.get("description", "")
        if not 1 <= len(description) <= 100:
            raise FakeError(400, 50035, f"Invalid Form Body: description of {where} must be 1-100 characters")
        for key in ("name_localizations", "description_localizations"):
            for locale, text in (item.get(key) or {}).items():
                if locale not in LOCALES:
                    raise FakeError(400, 50035, f"Invalid Form Body: unknown locale {locale} in {where}")
                limit = 32 if key == "name_localizations" else 100
                if not 1 <= len(text) <= limit:
                    raise FakeError(400, 50035, f"Invalid Form Body: {key} of {where} too long")

    def _interaction_for(self, token: str, *, need_ack: bool = True) -> Interaction:
        interaction = self.tokens.get(token)
        if interaction is None:
            raise FakeError(404, 10015, "Unknown Webhook")
        if interaction.expired or time.monotonic() - interaction.dispatched_at > self.token_lifetime:
            raise FakeError(401, 50027, "Invalid Webhook Token")
        if need_ack and interaction.acked_at is None:
            raise FakeError(404, 10015, "Unknown Webhook")
        return interaction

    async def _callback(self, request: web.Request) -> web.Response:
        interaction = self.interactions.get(int(request.match_info["id"]))
        if interaction is None or interaction.token != request.match_info["token"]:
            raise FakeError(404, 10062, "Unknown interaction")
        body = await self._json(request)
        if time.monotonic() - interaction.dispatched_at > self.ack_deadline:
            raise FakeError(404, 10062, "Unknown interaction")
        if interaction.acked_at is not None:
            raise FakeError(400, 40060, "Interaction has already been acknowledged.")
        kind = body.get("type")
        data = body.get("data") or {}
        flags = int(data.get("flags") or 0)
        allowed = {2: (4, 5), 3: (4, 5, 6, 7)}[interaction.kind]
        if kind not in allowed:
            raise FakeError(400, 50035, f"Invalid Form Body: callback type {kind} for interaction type {interaction.kind}")
        if kind == 4:
            self._check_message(data, new=True)
        interaction.acked_at, interaction.ack_type = time.monotonic(), kind
        interaction.ephemeral = bool(flags & 64)
        message = None
        if kind in (4, 5):
            content = data.get("content", "") if kind == 4 else ""
            message = self._new_message(
                interaction.channel.id, self.bot, {"content": content, "components": data.get("components"), "flags": flags | (128 if kind == 5 else 0)},
                interaction_id=interaction.id, webhook_id=self.application_id,
            )
            interaction.original = message
        elif kind == 7 and interaction.source_message is not None:
            self._apply_edit(interaction.source_message, data)
        if request.query.get("with_response") not in ("1", "true", "True"):
            return web.Response(status=204)
        result: dict[str, Any] = {
            "interaction": {
                "id": str(interaction.id), "type": interaction.kind,
                "response_message_loading": kind == 5, "response_message_ephemeral": interaction.ephemeral,
                **({"response_message_id": str(message.id)} if message else {}),
            },
        }
        if message is not None:
            result["resource"] = {"type": kind, "message": self._message_payload(message)}
        return json_response(result)

    def _webhook_message(self, interaction: Interaction, ref: str) -> Message:
        if ref == "@original":
            if interaction.kind == 3 and interaction.ack_type in (6, 7):
                message = interaction.source_message
            else:
                message = interaction.original
        else:
            message = next((m for m in interaction.followups if str(m.id) == ref), None)
        if message is None or message.deleted:
            raise FakeError(404, 10008, "Unknown Message")
        return message

    async def _webhook_get(self, request: web.Request) -> web.Response:
        interaction = self._interaction_for(request.match_info["token"])
        return json_response(self._message_payload(self._webhook_message(interaction, request.match_info["message"])))

    async def _webhook_edit(self, request: web.Request) -> web.Response:
        interaction = self._interaction_for(request.match_info["token"])
        message = self._webhook_message(interaction, request.match_info["message"])
        body = await self._json(request)
        self._check_message(body, new=False)
        self._apply_edit(message, body)
        message.flags &= ~128  # no longer "thinking…"
        return json_response(self._message_payload(message))

    async def _webhook_delete(self, request: web.Request) -> web.Response:
        interaction = self._interaction_for(request.match_info["token"])
        message = self._webhook_message(interaction, request.match_info["message"])
        message.deleted = True
        return web.Response(status=204)

    async def _followup(self, request: web.Request) -> web.Response:
        if request.match_info["app"] != str(self.application_id):
            raise FakeError(404, 10015, "Unknown Webhook")
        interaction = self._interaction_for(request.match_info["token"])
        body = await self._json(request)
        self._check_message(body, new=True)
        original = interaction.original
        if original is not None and original.flags & 128:
            # Like Discord: the first follow-up after a "thinking" defer becomes the original response.
            self._apply_edit(original, body)
            original.flags &= ~128
            return json_response(self._message_payload(original))
        message = self._new_message(interaction.channel.id, self.bot, body, interaction_id=interaction.id,
                                    webhook_id=self.application_id)
        interaction.followups.append(message)
        if request.query.get("wait") in ("1", "true", "True"):
            return json_response(self._message_payload(message))
        return web.Response(status=204)

    def _channel(self, request: web.Request) -> Channel:
        channel = self.channel_by_id(int(request.match_info["channel"]))
        if channel is None:
            raise FakeError(404, 10003, "Unknown Channel")
        return channel

    async def _channel_send(self, request: web.Request) -> web.Response:
        channel = self._channel(request)
        body = await self._json(request)
        self._check_message(body, new=True)
        reference = body.get("message_reference") or {}
        reference_id = int(reference["message_id"]) if reference.get("message_id") else None
        if reference_id is not None and (reference_id not in self.messages or self.messages[reference_id].deleted):
            if reference.get("fail_if_not_exists", True):
                raise FakeError(400, 50035, "Invalid Form Body: message_reference: Unknown message")
            reference_id = None
        message = self._new_message(channel.id, self.bot, body, reference_id=reference_id)
        return json_response(self._message_payload(message))

    async def _channel_edit(self, request: web.Request) -> web.Response:
        channel = self._channel(request)
        message = self.messages.get(int(request.match_info["message"]))
        if message is None or message.deleted or message.channel_id != channel.id:
            raise FakeError(404, 10008, "Unknown Message")
        if message.author.id != self.bot.id:
            raise FakeError(403, 50005, "Cannot edit a message authored by another user")
        body = await self._json(request)
        self._check_message(body, new=False)
        self._apply_edit(message, body)
        return json_response(self._message_payload(message))

    async def _typing(self, request: web.Request) -> web.Response:
        self.typing.append(self._channel(request).id)
        return web.Response(status=204)

    async def _cdn(self, request: web.Request) -> web.Response:
        found = self.files.get(request.path)
        if found is None:
            return web.Response(status=404)
        self.file_downloads += 1
        return web.Response(body=found[0], headers={"Content-Type": found[1]})

    # -- the gateway -------------------------------------------------------------------------------
    async def _gateway(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(max_msg_size=0)
        await ws.prepare(request)
        compress = request.query.get("compress")
        if request.query.get("v") != "10" or request.query.get("encoding") != "json" or compress not in (None, "zlib-stream"):
            await ws.close(code=4012, message=b"Invalid API version or encoding")
            return ws
        deflate = zlib.compressobj() if compress else None
        self._sockets.append(ws)

        async def send(payload: dict) -> None:
            raw = json.dumps(payload)
            if deflate is None:
                await ws.send_str(raw)
            else:
                await ws.send_bytes(deflate.compress(raw.encode()) + deflate.flush(zlib.Z_SYNC_FLUSH))

        ws_send_lock = asyncio.Lock()

        async def locked_send(payload: dict) -> None:
            async with ws_send_lock:
                await send(payload)

        self._senders[ws] = locked_send  # used by dispatch()
        await locked_send({"op": 10, "d": {"heartbeat_interval": self.heartbeat_interval_ms}, "s": None, "t": None})
        identified = False
        try:
            async for msg in ws:
                if msg.type is not WSMsgType.TEXT:
                    await ws.close(code=4002, message=b"Decode error")
                    break
                payload = json.loads(msg.data)
                op, data = payload.get("op"), payload.get("d")
                if op == 1:
                    self.heartbeats += 1
                    await locked_send({"op": 11, "d": None, "s": None, "t": None})
                elif op == 2:
                    if identified:
                        await ws.close(code=4005, message=b"Already authenticated")
                        break
                    if data.get("token") != self.token:
                        await ws.close(code=4004, message=b"Authentication failed")
                        break
                    intents = int(data.get("intents", 0))
                    if any(intents & bit and not self.granted_intents & bit for bit in PRIVILEGED_INTENTS):
                        await ws.close(code=4014, message=b"Disallowed intent(s)")
                        break
                    self.identified.append({k: v for k, v in data.items() if k != "token"})
                    identified = True
                    await self._send_ready(locked_send, intents)
                elif op == 6:
                    if data.get("token") != self.token or data.get("session_id") != self._session_id:
                        await locked_send({"op": 9, "d": False, "s": None, "t": None})
                    else:
                        identified = True
                        self.resumed += 1
                        await self._dispatch_on(locked_send, "RESUMED", {})
                elif op in (3, 4, 8):
                    continue  # presence, voice, member requests: accepted, ignored
                else:
                    await ws.close(code=4001, message=b"Unknown opcode")
                    break
        finally:
            if ws in self._sockets:
                self._sockets.remove(ws)
            self._senders.pop(ws, None)
        return ws

    async def _send_ready(self, send: Callable, intents: int) -> None:
        self.intents = intents
        await self._dispatch_on(send, "READY", {
            "v": 10, "user": {**self.bot.payload(), "verified": True, "mfa_enabled": False, "flags": 0},
            "guilds": [{"id": str(g.id), "unavailable": True} for g in self.guilds], "session_id": self._session_id,
            "resume_gateway_url": self.gateway_url, "shard": [0, 1], "private_channels": [], "relationships": [],
            "application": {"id": str(self.application_id), "flags": 0},
        })
        for guild in self.guilds:
            await self._dispatch_on(send, "GUILD_CREATE", self._guild_payload(guild))
        self.ready.set()

    def _guild_payload(self, guild: Guild) -> dict:
        return {
            "id": str(guild.id), "name": guild.name, "icon": None, "owner_id": str(self.alice.id), "unavailable": False,
            "roles": [{"id": str(guild.id), "name": "@everyone", "permissions": EVERYONE_PERMISSIONS, "position": 0,
                       "color": 0, "hoist": False, "managed": False, "mentionable": False, "flags": 0}],
            "channels": [c.payload() for c in guild.channels if not c.parent_id],
            "threads": [c.payload() for c in guild.channels if c.parent_id],
            "members": [self._member(self.bot)], "member_count": 3, "emojis": [], "stickers": [], "features": [],
            "preferred_locale": guild.preferred_locale, "large": False, "joined_at": now_iso(), "voice_states": [],
            "presences": [], "stage_instances": [], "guild_scheduled_events": [], "premium_tier": 0,
            "verification_level": 0, "default_message_notifications": 0, "explicit_content_filter": 0, "mfa_level": 0,
            "nsfw_level": 0, "system_channel_flags": 0, "afk_timeout": 300, "premium_progress_bar_enabled": False,
        }

    async def _dispatch_on(self, send: Callable, event: str, data: dict) -> None:
        self._seq += 1
        await send({"op": 0, "t": event, "s": self._seq, "d": data})

    async def dispatch(self, event: str, data: dict) -> None:
        if not self._sockets:
            raise RuntimeError("no client is connected to the fake gateway")
        for ws in list(self._sockets):
            await self._dispatch_on(self._senders[ws], event, data)

    async def disconnect_clients(self, code: int = 4000) -> None:
        """Drop the gateway connections (the client should resume)."""
        for ws in list(self._sockets):
            await ws.close(code=code, message=b"fake disconnect")

    # -- what a test does as a user ---------------------------------------------------------------
    async def send_message(
        self, user: User, channel: Channel, content: str, *, mention_bot: bool = False, attachments: list[dict] | None = None,
    ) -> Message:
        """A user writes in a channel (or DM). Like Discord, guild message content is empty for a
        bot without the MESSAGE_CONTENT intent unless the message mentions it."""
        if mention_bot:
            content = f"<@{self.bot.id}> {content}"
        message = Message(self.snowflake(), channel.id, user, content, attachments=attachments or [],
                          mentions=[self.bot] if mention_bot else [])
        self.messages[message.id] = message
        payload = self._message_payload(message)
        can_read = channel.guild_id is None or mention_bot or getattr(self, "intents", 0) & MESSAGE_CONTENT_INTENT
        if not can_read:
            payload.update(content="", attachments=[], embeds=[], components=[])
        await self.dispatch("MESSAGE_CREATE", payload)
        return message

    async def slash(
        self, command: str, user: User, channel: Channel | None = None, *, locale: str = "en-US", **options: Any,
    ) -> Interaction:
        """A user runs a synced slash command; options are checked against its synced definition."""
        channel = channel or self.channel
        scope = str(channel.guild_id) if channel.guild_id is not None else None
        definition = next((c for c in self.commands.get(scope or "", []) if c["name"] == command), None) or next(
            (c for c in self.commands.get("global", []) if c["name"] == command), None
        )
        if definition is None:
            raise AssertionError(f"/{command} is not a synced command here (synced: {self.commands})")
        known = {o["name"]: o for o in definition.get("options") or []}
        resolved: dict[str, dict] = {}
        option_payloads = []
        for name, value in options.items():
            if name not in known:
                raise AssertionError(f"/{command} has no option {name!r}")
            kind = known[name]["type"]
            if kind == 11:
                resolved.setdefault("attachments", {})[value["id"]] = value
                value = value["id"]
            elif not isinstance(value, OPTION_TYPES[kind]):
                raise AssertionError(f"option {name!r} of /{command} must be {OPTION_TYPES[kind]}")
            option_payloads.append({"name": name, "type": kind, "value": value})
        missing = [n for n, o in known.items() if o.get("required") and n not in options]
        if missing:
            raise AssertionError(f"/{command} needs {missing}")
        data = {"id": definition["id"], "name": command, "type": 1, "options": option_payloads}
        if resolved:
            data["resolved"] = resolved
        if definition.get("guild_id"):
            data["guild_id"] = definition["guild_id"]
        interaction = self._new_interaction(2, user, channel, command, locale)
        await self.dispatch("INTERACTION_CREATE", self._interaction_payload(interaction, data))
        return interaction

    async def press(self, message: Message, custom_id: str, user: User, *, locale: str = "en-US", omit: tuple[str, ...] = ()) -> Interaction:
        """A user presses a button on a message (`omit`: fields left out, a malformed event)."""
        if custom_id not in message.custom_ids:
            raise AssertionError(f"message {message.id} has no button {custom_id!r} (has {message.custom_ids})")
        channel = self.channel_by_id(message.channel_id)
        assert channel is not None
        interaction = self._new_interaction(3, user, channel, custom_id, locale)
        interaction.source_message = message
        payload = self._interaction_payload(interaction, {"custom_id": custom_id, "component_type": 2})
        payload["message"] = self._message_payload(message)
        for name in omit:
            payload.pop(name, None)
        await self.dispatch("INTERACTION_CREATE", payload)
        return interaction

    def _new_interaction(self, kind: int, user: User, channel: Channel, name: str, locale: str) -> Interaction:
        interaction_id = self.snowflake()
        token = f"aW50ZXJhY3Rpb246{interaction_id}:fake-interaction-token"
        interaction = Interaction(interaction_id, token, kind, user, channel, name, locale, time.monotonic())
        self.interactions[interaction_id] = interaction
        self.tokens[token] = interaction
        return interaction

    def _interaction_payload(self, interaction: Interaction, data: dict) -> dict:
        channel = interaction.channel
        payload: dict[str, Any] = {
            "id": str(interaction.id), "application_id": str(self.application_id), "type": interaction.kind,
            "data": data, "channel_id": str(channel.id), "channel": {**channel.payload(), "permissions": EVERYONE_PERMISSIONS},
            "token": interaction.token, "version": 1, "locale": interaction.locale, "app_permissions": EVERYONE_PERMISSIONS,
            "entitlements": [], "attachment_size_limit": 10 * 2**20,
        }
        if channel.guild_id is not None:
            payload.update(guild_id=str(channel.guild_id), member=self._member(interaction.user), context=0,
                           guild_locale="en-US", guild={"id": str(channel.guild_id), "locale": "en-US", "features": []},
                           authorizing_integration_owners={"0": str(channel.guild_id)})
        else:
            payload.update(user=interaction.user.payload(), context=1, authorizing_integration_owners={"1": str(interaction.user.id)})
        return payload

    def expire_tokens(self) -> None:
        for interaction in self.interactions.values():
            interaction.expired = True

    # -- what a test reads ---------------------------------------------------------------------------
    def bot_messages(self, channel: Channel | None = None) -> list[Message]:
        return [m for m in self.messages.values() if m.author.id == self.bot.id and not m.deleted
                and (channel is None or m.channel_id == channel.id)]

    async def wait_for(self, predicate: Callable[[], Any], what: str = "condition") -> Any:
        """Wait until `predicate()` is truthy (re-checked after every request and every 50 ms, as
        it may read state outside the fake). No deadline of its own: a busy machine only makes it
        slower; pytest-timeout ends a real hang (`what` names the wait in a debugger)."""
        while True:
            value = predicate()
            if value:
                return value
            async with self._changed:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), 0.05)


@contextlib.contextmanager
def patched(fake: FakeDiscord):
    """Point discord.py at the fake (REST base and gateway URL) for the duration of a test."""
    import discord.gateway
    import discord.http
    import yarl

    old = discord.http.Route.BASE, discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY
    discord.http.Route.BASE = fake.api_base
    discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(fake.gateway_url)
    try:
        yield fake
    finally:
        discord.http.Route.BASE, discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = old

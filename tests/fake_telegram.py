"""A strict local Telegram Bot API server for tests and benches (aiohttp on 127.0.0.1).

The real python-telegram-bot talks to it over HTTP (`base_url = fake.base_url`). It keeps
every chat's messages, answers like Telegram does (the same error texts), and is strict where
Telegram is: text over 4096 characters, empty text, malformed entities or HTML, bad inline
keyboards, identical edits ("message is not modified"), edits of deleted messages, unknown
callback queries. It enforces the flood limits strictly (a write less than a second after the
chat's previous accepted write, a 21st in a group's minute, a 31st in any second overall) by
answering 429 with `retry_after`, and injects 429s, 5xx answers, timeouts and entity rejections
on demand. Like a real network and server, it takes a random few to 60 ms per request (`jitter`),
and a write counts as accepted at a random point within that time.

Test-side API: `private_chat`, `group_chat`, `send_text`, `send_photo`, `send_document`,
`press`, `delete_message`, `messages`, `texts`, `wait_until`, `fail_next`, and the records
`writes`, `calls`, `flood_429s`, `answers`, `commands`.
"""

from __future__ import annotations

import asyncio
import html.parser
import itertools
import json
import math
import random
import re
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

import aiohttp
from aiohttp import web

MAX_TEXT = 4096
MAX_DOWNLOAD = 20 * 1024 * 1024
ENTITY_TYPES = {
    "mention", "hashtag", "cashtag", "bot_command", "url", "email", "phone_number", "bold", "italic",
    "underline", "strikethrough", "spoiler", "blockquote", "expandable_blockquote", "code", "pre",
    "text_link", "text_mention", "custom_emoji", "date_time",
}
CHAT_ACTIONS = {
    "typing", "upload_photo", "record_video", "upload_video", "record_voice", "upload_voice",
    "upload_document", "choose_sticker", "find_location", "record_video_note", "upload_video_note",
}
JSON_FIELDS = {
    "entities", "caption_entities", "reply_markup", "reply_parameters", "commands", "scope",
    "allowed_updates", "link_preview_options",
}
NOT_MODIFIED = (
    "Bad Request: message is not modified: specified new message content and reply markup are "
    "exactly the same as a current content and reply markup of the message"
)
_COMMAND = re.compile(r"^/[A-Za-z0-9_]{1,32}(?:@[A-Za-z0-9_]{3,32})?")
_MENTION = re.compile(r"(?<![\w@])@[A-Za-z0-9_]{4,32}")
_SECRET = re.compile(r"[A-Za-z0-9_-]{1,256}")


def utf16_len(text: str) -> int:
    return len(text.encode("utf-16-le")) // 2


class ApiError(Exception):
    def __init__(self, code: int, description: str, retry_after: int | None = None) -> None:
        super().__init__(description)
        self.code, self.description, self.retry_after = code, description, retry_after


def bad(description: str) -> ApiError:
    return ApiError(400, f"Bad Request: {description}")


@dataclass
class Fault:
    kind: str  # "429" | "500" | "502" | "timeout" | "entities"
    retry_after: int = 1
    delay: float = 0.0  # for "timeout": how long to hold the request before dropping it
    chat_id: int | None = None  # only requests for this chat


@dataclass
class Message:
    message_id: int
    chat_id: int
    text: str
    entities: list[dict] = field(default_factory=list)
    reply_markup: dict | None = None
    from_bot: bool = True
    user_id: int | None = None
    thread_id: int | None = None
    reply_to: int | None = None
    deleted: bool = False
    versions: list[tuple[float, str]] = field(default_factory=list)  # (time, text) of every write


@dataclass
class Write:
    at: float
    chat_id: int
    method: str  # sendMessage | editMessageText
    message_id: int
    text: str


@dataclass
class Chat:
    id: int
    type: str  # private | group | supergroup
    title: str = ""
    is_forum: bool = False
    messages: dict[int, Message] = field(default_factory=dict)
    writes: deque = field(default_factory=deque)  # times of accepted sends/edits (flood check)


class _HtmlChecker(html.parser.HTMLParser):
    """Telegram's HTML subset: known tags only, properly closed, <a> with href."""

    ALLOWED = {"b", "strong", "i", "em", "u", "ins", "s", "strike", "del", "a", "code", "pre", "tg-spoiler",
               "span", "blockquote", "tg-emoji"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.text = ""
        self.entities: list[dict] = []
        self._starts: list[int] = []

    def handle_starttag(self, tag, attrs):
        if tag not in self.ALLOWED:
            raise bad(f'can\'t parse entities: Unsupported start tag "{tag}" at byte offset {self.getpos()[1]}')
        if tag == "a" and not dict(attrs).get("href"):
            raise bad("can't parse entities: Can't find href attribute of tag \"a\"")
        self.stack.append(tag)
        self._starts.append(utf16_len(self.text))

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            raise bad(f'can\'t parse entities: Can\'t find end tag corresponding to start tag "{self.stack[-1] if self.stack else tag}"')
        self.stack.pop()
        start = self._starts.pop()
        kind = {"b": "bold", "strong": "bold", "i": "italic", "em": "italic", "u": "underline", "ins": "underline",
                "s": "strikethrough", "strike": "strikethrough", "del": "strikethrough", "a": "text_link",
                "code": "code", "pre": "pre", "tg-spoiler": "spoiler", "span": "spoiler", "blockquote": "blockquote"}.get(tag)
        if kind and utf16_len(self.text) > start:
            self.entities.append({"type": kind, "offset": start, "length": utf16_len(self.text) - start})

    def handle_data(self, data):
        self.text += data

    def close(self):
        super().close()
        if self.stack:
            raise bad(f'can\'t parse entities: Can\'t find end tag corresponding to start tag "{self.stack[-1]}"')


def parse_html(text: str) -> tuple[str, list[dict]]:
    if re.search(r"&(?![a-zA-Z]+;|#\d+;|#x[0-9a-fA-F]+;)", text):
        raise bad("can't parse entities: Unsupported HTML entity")
    checker = _HtmlChecker()
    checker.feed(text)
    checker.close()
    return checker.text, checker.entities


def check_entities(text: str, entities: Any) -> list[dict]:
    if not isinstance(entities, list):
        raise bad("can't parse entities: entities must be an array")
    size = utf16_len(text)
    spans = []
    for entity in entities:
        if not isinstance(entity, dict) or entity.get("type") not in ENTITY_TYPES:
            raise bad(f"can't parse entities: unsupported entity {entity!r}"[:200])
        offset, length = entity.get("offset"), entity.get("length")
        if not isinstance(offset, int) or not isinstance(length, int) or offset < 0 or length < 1:
            raise bad("can't parse entities: wrong entity offset or length")
        if offset + length > size:
            raise bad(f"can't parse entities: entity ends at {offset + length}, after the end of the text ({size})")
        if entity["type"] == "text_link" and not str(entity.get("url", "")).strip():
            raise bad("can't parse entities: text_link entity has no URL")
        spans.append((offset, offset + length, entity["type"]))
    for (a0, a1, at), (b0, b1, bt) in itertools.combinations(spans, 2):
        overlap = min(a1, b1) - max(a0, b0)
        if overlap <= 0:
            continue
        nested = (a0 <= b0 and b1 <= a1) or (b0 <= a0 and a1 <= b1)
        if not nested:
            raise bad("can't parse entities: entities must not partially overlap")
        if {at, bt} & {"pre", "code"} and at != bt:
            raise bad("can't parse entities: pre and code entities can't contain other entities")
    return entities


def check_keyboard(markup: Any) -> dict:
    if not isinstance(markup, dict) or not isinstance(markup.get("inline_keyboard"), list):
        raise bad("can't parse reply keyboard markup JSON object")
    for row in markup["inline_keyboard"]:
        if not isinstance(row, list):
            raise bad("can't parse reply keyboard markup JSON object")
        for button in row:
            if not isinstance(button, dict) or not str(button.get("text", "")).strip():
                raise bad("can't parse inline keyboard button: Text buttons are unallowed in the inline keyboard")
            actions = [k for k in ("callback_data", "url", "switch_inline_query", "copy_text", "web_app") if k in button]
            if len(actions) != 1:
                raise bad("can't parse inline keyboard button: exactly one optional field must be used")
            if "callback_data" in button and not 1 <= len(str(button["callback_data"]).encode()) <= 64:
                raise bad("BUTTON_DATA_INVALID")
    return markup


class FakeTelegram:
    def __init__(
        self,
        token: str,
        *,
        username: str = "InternLMTestBot",
        bot_id: int = 7_000_000_001,
        enforce_limits: bool = True,
        private_limit: tuple[int, float] = (1, 1.0),  # writes per seconds, per private chat
        group_limits: tuple[tuple[int, float], ...] = ((20, 60.0),),
        global_limit: tuple[int, float] = (30, 1.0),
        jitter: tuple[float, float] = (0.003, 0.060),  # seconds each request takes, at random
        seed: int = 0,
    ) -> None:
        # The limits are Telegram's "1/s per chat, 20/min per group, 30/s overall", counted
        # strictly at the moment each write is accepted.
        self.token = token
        self.username = username
        self.bot_id = bot_id
        self.enforce_limits = enforce_limits
        self.private_limit = private_limit
        self.group_limits = group_limits
        self.global_limit = global_limit
        self.jitter = jitter
        self._random = random.Random(seed)
        self.chats: dict[int, Chat] = {}
        self.users: dict[int, dict] = {}
        self.updates: list[dict] = []
        self.webhook: dict | None = None
        self.webhook_deliveries: list[int] = []  # HTTP status of each delivery
        self.files: dict[str, bytes] = {}
        self.file_sizes: dict[str, int] = {}
        self.downloads: list[str] = []
        self.queries: dict[str, dict] = {}  # callback query id -> query (pending answer)
        self.answers: list[dict] = []
        self.commands: dict[str | None, list[dict]] = {}  # language_code -> menu
        self.writes: list[Write] = []
        self.actions: list[tuple[float, int, str]] = []
        self.calls: list[tuple[float, str, dict]] = []
        self.errors: list[tuple[str, int, str]] = []  # (method, code, description) answered
        self.flood_429s = 0  # 429s from limit enforcement (not injected)
        self.flood_hits: list[tuple[float, int, str]] = []  # (time, chat, "overall" | "chat" | "group")
        self.faults: dict[str, deque[Fault]] = {}
        self._global_writes: deque[float] = deque()
        self._ids = itertools.count(1)
        self._update_ids = itertools.count(1)
        self._query_ids = itertools.count(1)
        self._changed = asyncio.Condition()
        self._runner: web.AppRunner | None = None
        self._delivery: asyncio.Task | None = None
        self._background: set[asyncio.Task] = set()
        self._closing = False
        self.port = 0

    # -- lifecycle -------------------------------------------------------------------
    async def start(self) -> "FakeTelegram":
        app = web.Application(client_max_size=64 * 2**20)
        app.router.add_route("*", "/{path:.*}", self._dispatch)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        self._closing = True
        await self._notify()
        if self._delivery:
            self._delivery.cancel()
        if self._runner:
            await self._runner.cleanup()

    async def __aenter__(self) -> "FakeTelegram":
        return await self.start()

    async def __aexit__(self, *exc) -> None:
        await self.close()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/bot"

    @property
    def file_base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/file/bot"

    # -- the test's side: users, chats, updates ------------------------------------------
    def user(self, user_id: int, *, lang: str | None = "en", name: str = "") -> dict:
        user = {"id": user_id, "is_bot": False, "first_name": name or f"User{user_id}", "username": f"user{user_id}"}
        if lang:
            user["language_code"] = lang
        self.users[user_id] = user
        return user

    def private_chat(self, user_id: int, *, lang: str | None = "en") -> int:
        self.user(user_id, lang=lang)
        self.chats.setdefault(user_id, Chat(user_id, "private"))
        return user_id

    def group_chat(self, chat_id: int, *, supergroup: bool = True, forum: bool = False, title: str = "Group") -> int:
        assert chat_id < 0, "group ids are negative"
        self.chats[chat_id] = Chat(chat_id, "supergroup" if supergroup else "group", title, is_forum=forum)
        return chat_id

    def _chat_dict(self, chat: Chat) -> dict:
        if chat.type == "private":
            user = self.users[chat.id]
            return {"id": chat.id, "type": "private", "first_name": user["first_name"], "username": user["username"]}
        out = {"id": chat.id, "type": chat.type, "title": chat.title}
        if chat.is_forum:
            out["is_forum"] = True
        return out

    def _bot_user(self) -> dict:
        return {"id": self.bot_id, "is_bot": True, "first_name": "InternLM", "username": self.username}

    def _message_dict(self, message: Message, *, nested: bool = False) -> dict:
        chat = self.chats[message.chat_id]
        out: dict[str, Any] = {
            "message_id": message.message_id,
            "date": int(time.time()),
            "chat": self._chat_dict(chat),
            "from": self._bot_user() if message.from_bot else self.users[message.user_id],
        }
        if message.text:
            out["text"] = message.text
        if message.entities:
            out["entities"] = message.entities
        if message.reply_markup:
            out["reply_markup"] = message.reply_markup
        if message.thread_id is not None:
            out["message_thread_id"] = message.thread_id
            if chat.is_forum:
                out["is_topic_message"] = True
        if message.reply_to is not None and not nested and message.reply_to in chat.messages:
            out["reply_to_message"] = self._message_dict(chat.messages[message.reply_to], nested=True)
        return out

    def send_text(self, chat_id: int, user_id: int, text: str, *, reply_to: int | None = None, thread_id: int | None = None, **extra: Any) -> int:
        """A user writes `text` in a chat; entities for /commands and @mentions are added as Telegram does."""
        entities = []
        command = _COMMAND.match(text)
        if command:
            entities.append({"type": "bot_command", "offset": 0, "length": utf16_len(command.group(0))})
        for mention in _MENTION.finditer(text):
            entities.append({"type": "mention", "offset": utf16_len(text[: mention.start()]), "length": utf16_len(mention.group(0))})
        return self._user_message(chat_id, user_id, {"text": text, **({"entities": entities} if entities else {})}, reply_to, thread_id, extra)

    def add_file(self, content: bytes, *, size: int | None = None) -> str:
        file_id = f"file-{next(self._ids)}"
        self.files[file_id] = content
        self.file_sizes[file_id] = len(content) if size is None else size
        return file_id

    def send_photo(self, chat_id: int, user_id: int, content: bytes, *, caption: str | None = None, size: int | None = None, **kw: Any) -> int:
        file_id = self.add_file(content, size=size)
        sizes = [{"file_id": file_id, "file_unique_id": file_id + "u", "width": 64, "height": 64, "file_size": self.file_sizes[file_id]}]
        body: dict[str, Any] = {"photo": sizes}
        if caption is not None:
            body["caption"] = caption
        return self._user_message(chat_id, user_id, body, kw.get("reply_to"), kw.get("thread_id"), {})

    def send_document(self, chat_id: int, user_id: int, content: bytes, *, file_name: str, mime_type: str, caption: str | None = None, size: int | None = None) -> int:
        file_id = self.add_file(content, size=size)
        body: dict[str, Any] = {"document": {"file_id": file_id, "file_unique_id": file_id + "u", "file_name": file_name,
                                             "mime_type": mime_type, "file_size": self.file_sizes[file_id]}}
        if caption is not None:
            body["caption"] = caption
        return self._user_message(chat_id, user_id, body, None, None, {})

    def _user_message(self, chat_id: int, user_id: int, body: dict, reply_to: int | None, thread_id: int | None, extra: dict) -> int:
        chat = self.chats[chat_id]
        if user_id not in self.users:
            self.user(user_id)
        message = Message(next(self._ids), chat_id, body.get("text", ""), body.get("entities", []), from_bot=False,
                          user_id=user_id, thread_id=thread_id, reply_to=reply_to)
        chat.messages[message.message_id] = message
        data = self._message_dict(message)
        data.update({k: v for k, v in body.items() if k not in ("text", "entities")})
        data.update(extra)
        self._push({"message": data})
        return message.message_id

    def press(self, chat_id: int, message_id: int, user_id: int, data: str | None = None) -> str:
        """A user presses an inline button of a bot message (its callback_data by default)."""
        message = self.chats[chat_id].messages[message_id]
        if data is None:
            data = message.reply_markup["inline_keyboard"][0][0]["callback_data"]
        query_id = str(next(self._query_ids))
        self.queries[query_id] = {"id": query_id, "from": self.users[user_id], "message": self._message_dict(message),
                                  "chat_instance": str(chat_id), "data": data}
        self._push({"callback_query": self.queries[query_id]})
        return query_id

    def delete_message(self, chat_id: int, message_id: int) -> None:
        """The user deletes a bot message in their client."""
        self.chats[chat_id].messages[message_id].deleted = True

    def _push(self, update: dict) -> None:
        update["update_id"] = next(self._update_ids)
        self.updates.append(update)
        task = asyncio.get_running_loop().create_task(self._notify())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    # -- the test's side: observing ----------------------------------------------------
    def messages(self, chat_id: int, *, thread_id: int | None = None, include_deleted: bool = False) -> list[Message]:
        """The bot's messages in a chat, oldest first."""
        return [
            m for m in self.chats[chat_id].messages.values()
            if m.from_bot and (include_deleted or not m.deleted) and (thread_id is None or m.thread_id == thread_id)
        ]

    def texts(self, chat_id: int, **kw: Any) -> list[str]:
        return [m.text for m in self.messages(chat_id, **kw)]

    def buttons(self, message: Message) -> list[str]:
        markup = message.reply_markup or {}
        return [b.get("callback_data", "") for row in markup.get("inline_keyboard", []) for b in row]

    async def wait_until(self, predicate: Callable[[], bool]) -> None:
        """Wait until `predicate()` holds, re-checked after every change the fake records. No
        deadline of its own (a busy machine only makes it slower); pytest-timeout ends a hang."""
        async with self._changed:
            await self._changed.wait_for(predicate)

    def fail_next(self, method: str, kind: str, *, times: int = 1, retry_after: int = 1, delay: float = 0.0, chat_id: int | None = None) -> None:
        """Answer the next `times` calls of `method` with a 429, a 5xx, a timeout or an entity error."""
        for _ in range(times):
            self.faults.setdefault(method, deque()).append(Fault(kind, retry_after, delay, chat_id))

    def calls_of(self, method: str) -> list[dict]:
        return [params for _, name, params in self.calls if name == method]

    # -- HTTP ----------------------------------------------------------------------------
    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        path = request.match_info["path"]
        if path.startswith("file/bot"):
            return await self._download(path[len("file/bot") :])
        if not path.startswith("bot"):
            return web.json_response({"ok": False, "error_code": 404, "description": "Not Found"}, status=404)
        token, _, method = path[3:].partition("/")
        if token != self.token:
            return web.json_response({"ok": False, "error_code": 401, "description": "Unauthorized"}, status=401)
        before, after = self._latency(method)
        try:
            params = await self._params(request)
            self.calls.append((time.monotonic(), method, params))
            if before:
                await asyncio.sleep(before)
            fault = self._fault(method, params)
            if fault is not None:
                return await self._apply(fault, method)
            handler = getattr(self, f"_api_{method}", None)
            if handler is None:
                raise ApiError(404, "Not Found")
            result = await handler(params)
            response = web.json_response({"ok": True, "result": result})
        except ApiError as exc:
            self.errors.append((method, exc.code, exc.description))
            body: dict[str, Any] = {"ok": False, "error_code": exc.code, "description": exc.description}
            if exc.retry_after is not None:
                body["parameters"] = {"retry_after": exc.retry_after}
            response = web.json_response(body, status=exc.code)
        finally:
            await self._notify()
        if after:
            await asyncio.sleep(after)
        return response

    def _latency(self, method: str) -> tuple[float, float]:
        """(before, after) the moment a request takes effect: a random total within `jitter`."""
        low, high = self.jitter
        if method == "getUpdates" or high <= 0:
            return 0.0, 0.0
        total = self._random.uniform(low, high)
        split = self._random.random()
        return total * split, total * (1 - split)

    async def _params(self, request: web.Request) -> dict:
        params: dict[str, Any] = dict(request.query)
        if request.content_type == "application/json":
            params.update(await request.json())
        elif request.can_read_body:
            form = await request.post()
            params.update({k: v for k, v in form.items() if isinstance(v, str)})
        for name in JSON_FIELDS & params.keys():
            if isinstance(params[name], str):
                try:
                    params[name] = json.loads(params[name])
                except ValueError:
                    raise bad(f"can't parse {name} JSON object") from None
        return params

    def _fault(self, method: str, params: dict) -> Fault | None:
        queue = self.faults.get(method)
        if not queue:
            return None
        fault = queue[0]
        if fault.chat_id is not None and str(fault.chat_id) != str(params.get("chat_id")):
            return None
        if fault.kind == "entities" and not (params.get("entities") or params.get("parse_mode")):
            return None  # only formatted writes are rejected
        return queue.popleft()

    async def _apply(self, fault: Fault, method: str) -> web.Response:
        if fault.kind == "timeout":
            await asyncio.sleep(fault.delay)
            raise ApiError(504, "Gateway Timeout")
        if fault.kind == "429":
            raise ApiError(429, f"Too Many Requests: retry after {fault.retry_after}", retry_after=fault.retry_after)
        if fault.kind == "entities":
            raise bad("can't parse entities: Unsupported start tag at byte offset 0")
        code = int(fault.kind)
        raise ApiError(code, {500: "Internal Server Error", 502: "Bad Gateway", 503: "Service Unavailable"}.get(code, "Error"))

    async def _download(self, rest: str) -> web.Response:
        token, _, file_path = rest.partition("/")
        file_id = file_path.rsplit("/", 1)[-1]
        if token != self.token or file_id not in self.files:
            return web.Response(status=404, text="Not Found")
        self.downloads.append(file_id)
        return web.Response(body=self.files[file_id], content_type="application/octet-stream")

    # -- helpers for the API methods --------------------------------------------------------
    def _chat(self, params: dict) -> Chat:
        raw = params.get("chat_id")
        if raw is None or raw == "":
            raise bad("chat_id is empty")
        try:
            chat_id = int(raw)
        except (TypeError, ValueError):
            raise bad("chat not found") from None
        if chat_id not in self.chats:
            raise bad("chat not found")
        return self.chats[chat_id]

    def _content(self, params: dict) -> tuple[str, list[dict]]:
        text = params.get("text")
        if text is None or not str(text).strip():
            raise bad("message text is empty")
        text = str(text)
        mode = params.get("parse_mode")
        if mode:
            if mode != "HTML":
                raise bad(f"unsupported parse_mode {mode!r} (this fake checks HTML only)")
            text, entities = parse_html(text)
        else:
            entities = check_entities(text, params.get("entities") or [])
        if not text.strip():
            raise bad("message text is empty")
        if len(text) > MAX_TEXT:
            raise bad("message is too long")
        return text, entities

    def _markup(self, params: dict) -> dict | None:
        markup = params.get("reply_markup")
        return None if markup is None else check_keyboard(markup)

    def _check_flood(self, chat: Chat, now: float) -> None:
        if not self.enforce_limits:
            return
        while self._global_writes and self._global_writes[0] <= now - 60:
            self._global_writes.popleft()
        while chat.writes and chat.writes[0] <= now - 60:
            chat.writes.popleft()
        rules = [("overall", self._global_writes, *self.global_limit)]
        if chat.type == "private":
            rules.append(("chat", chat.writes, *self.private_limit))
        else:
            rules += [("group", chat.writes, count, seconds) for count, seconds in self.group_limits]
        for scope, times, count, seconds in rules:
            recent = [at for at in times if at > now - seconds]
            if len(recent) >= count:
                self.flood_429s += 1
                self.flood_hits.append((now, chat.id, scope))
                retry = max(1, math.ceil(recent[-count] + seconds - now))
                raise ApiError(429, f"Too Many Requests: retry after {retry}", retry_after=retry)

    def _record(self, chat: Chat, message: Message, method: str, now: float) -> None:
        chat.writes.append(now)
        self._global_writes.append(now)
        message.versions.append((now, message.text))
        self.writes.append(Write(now, chat.id, method, message.message_id, message.text))

    # -- Bot API methods -------------------------------------------------------------------
    async def _api_getMe(self, params: dict) -> dict:
        return {**self._bot_user(), "can_join_groups": True, "can_read_all_group_messages": False,
                "supports_inline_queries": False, "can_connect_to_business": False, "has_main_web_app": False}

    async def _api_deleteWebhook(self, params: dict) -> bool:
        self.webhook = None
        if str(params.get("drop_pending_updates", "")).lower() == "true":
            self.updates.clear()
        return True

    async def _api_setWebhook(self, params: dict) -> bool:
        url = params.get("url", "")
        secret = params.get("secret_token")
        if secret is not None and not _SECRET.fullmatch(secret):
            raise bad("secret token contains unallowed characters")
        if not url:
            self.webhook = None
            return True
        self.webhook = {"url": url, "secret_token": secret, "allowed_updates": params.get("allowed_updates")}
        if self._delivery is None or self._delivery.done():
            self._delivery = asyncio.get_running_loop().create_task(self._deliver_loop())
        return True

    async def _api_getWebhookInfo(self, params: dict) -> dict:
        return {"url": (self.webhook or {}).get("url", ""), "has_custom_certificate": False, "pending_update_count": len(self.updates)}

    async def _api_getUpdates(self, params: dict) -> list[dict]:
        if self.webhook is not None:
            raise ApiError(409, "Conflict: can't use getUpdates method while webhook is active; use deleteWebhook to delete the webhook first")
        offset = int(params.get("offset", 0) or 0)
        limit = int(params.get("limit", 100) or 100)
        timeout = float(params.get("timeout", 0) or 0)
        if offset:
            self.updates = [u for u in self.updates if u["update_id"] >= offset]
        allowed = params.get("allowed_updates")

        def ready() -> list[dict]:
            return [u for u in self.updates if not allowed or any(k in u for k in allowed)][:limit]

        if not ready() and timeout > 0 and not self._closing:
            try:
                async with self._changed:
                    await asyncio.wait_for(self._changed.wait_for(lambda: bool(ready()) or self._closing), timeout)
            except asyncio.TimeoutError:
                pass
        return ready()

    async def _deliver_loop(self) -> None:
        """Webhook mode: POST each update to the webhook with the secret header, in order."""
        async with aiohttp.ClientSession() as session:
            while not self._closing and self.webhook is not None:
                if not self.updates:
                    async with self._changed:
                        await self._changed.wait_for(lambda: bool(self.updates) or self._closing or self.webhook is None)
                    continue
                update = self.updates[0]
                hook = self.webhook
                headers = {"X-Telegram-Bot-Api-Secret-Token": hook["secret_token"]} if hook.get("secret_token") else {}
                try:
                    async with session.post(hook["url"], json=update, headers=headers) as response:
                        status = response.status
                except aiohttp.ClientError:
                    status = 0
                self.webhook_deliveries.append(status)
                if status == 200:
                    self.updates.pop(0)
                else:
                    await asyncio.sleep(0.2)

    async def _api_setMyCommands(self, params: dict) -> bool:
        commands = params.get("commands")
        if not isinstance(commands, list) or len(commands) > 100:
            raise bad("can't parse commands JSON object")
        for command in commands:
            if not re.fullmatch(r"[a-z0-9_]{1,32}", str(command.get("command", ""))):
                raise bad("BOT_COMMAND_INVALID")
            if not 1 <= len(str(command.get("description", ""))) <= 256:
                raise bad("BOT_COMMAND_DESCRIPTION_INVALID")
        self.commands[params.get("language_code") or None] = commands
        return True

    async def _api_sendChatAction(self, params: dict) -> bool:
        chat = self._chat(params)
        if params.get("action") not in CHAT_ACTIONS:
            raise bad("wrong parameter action in request")
        self.actions.append((time.monotonic(), chat.id, params["action"]))
        return True

    async def _api_sendMessage(self, params: dict) -> dict:
        chat = self._chat(params)
        text, entities = self._content(params)
        markup = self._markup(params)
        thread = params.get("message_thread_id")
        if thread is not None and not chat.is_forum:
            raise bad("message thread not found")
        reply_to = None
        reply = params.get("reply_parameters")
        if reply:
            target = chat.messages.get(int(reply.get("message_id", 0)))
            if target is None or target.deleted:
                if not reply.get("allow_sending_without_reply"):
                    raise bad("message to be replied not found")
            else:
                reply_to = target.message_id
        now = time.monotonic()
        self._check_flood(chat, now)
        message = Message(next(self._ids), chat.id, text, entities, markup, thread_id=int(thread) if thread else None, reply_to=reply_to)
        chat.messages[message.message_id] = message
        self._record(chat, message, "sendMessage", now)
        return self._message_dict(message)

    async def _api_editMessageText(self, params: dict) -> dict:
        if params.get("inline_message_id"):
            raise bad("inline messages are not supported by this fake")
        chat = self._chat(params)
        message = chat.messages.get(int(params.get("message_id") or 0))
        if message is None or message.deleted or not message.from_bot:
            raise bad("message to edit not found")
        text, entities = self._content(params)
        markup = self._markup(params)
        if (text, entities, markup) == (message.text, message.entities, message.reply_markup):
            raise bad(NOT_MODIFIED)
        now = time.monotonic()
        self._check_flood(chat, now)
        message.text, message.entities, message.reply_markup = text, entities, markup
        self._record(chat, message, "editMessageText", now)
        return {**self._message_dict(message), "edit_date": int(time.time())}

    async def _api_answerCallbackQuery(self, params: dict) -> bool:
        query = self.queries.pop(str(params.get("callback_query_id")), None)
        if query is None:
            raise bad("query is too old and response timeout expired or query ID is invalid")
        text = params.get("text") or ""
        if len(text) > 200:
            raise bad("MESSAGE_TOO_LONG")
        self.answers.append({"query": query, "text": text, "show_alert": str(params.get("show_alert", "")).lower() == "true"})
        return True

    async def _api_getFile(self, params: dict) -> dict:
        file_id = params.get("file_id", "")
        if file_id not in self.files:
            raise bad("invalid file_id")
        if self.file_sizes[file_id] > MAX_DOWNLOAD:
            raise bad("file is too big")
        return {"file_id": file_id, "file_unique_id": file_id + "u", "file_size": self.file_sizes[file_id],
                "file_path": f"photos/{file_id}"}

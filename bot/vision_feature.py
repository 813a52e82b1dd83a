"""Questions about a photo: the "vision" persona (command /image, model role "vision").

An image arrives (a photo with a caption, `/image` with an attachment, `/image PATH question` on
the console): it is checked and shrunk by `bot/images.py`, kept in this process's memory for the
session, and asked about. Plain follow-up messages continue the conversation about the same
picture until another image, a persona switch or /reset.

What is stored where: the picture lives only in `ImageMemory` (RAM, capped, idle entries
dropped); the history database records the question with an attachment marker
`image:<token> <format> <w>x<h> <size>`. The token ties the conversation in the database to the
picture in memory: once /reset deletes the marked row, or a restart empties the memory, a
follow-up asks for the picture again instead of answering without it.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import AsyncIterator, Callable

from PIL import Image

from models.base import ChatBackend, ChatMessage, GenerationParams, ModelError

from .app import App
from .i18n import register, t
from .images import DEFAULT_SIDE, ImageProblem, PreparedImage, prepare_image
from .messages import Incoming, ReplySurface
from .personas import Persona
from .responders import Turn, fit_to_context
from .store import VISIBLE

log = logging.getLogger(__name__)

VISION = "vision"
MARKER = "image:"
MEMORY_BYTES = 256 * 2**20  # decoded pictures kept for follow-ups, all sessions together
MEMORY_IDLE_SECONDS = 6 * 3600  # a picture nobody asked about for this long is dropped

# XComposer2's own default meta instruction; sent explicitly so that every backend (the remote
# code's `chat`, an LMDeploy server, a generic VLM's chat template) gets the same one.
XCOMPOSER_SYSTEM_PROMPT = (
    "You are an AI assistant whose name is InternLM-XComposer (浦语·灵笔).\n"
    "- InternLM-XComposer (浦语·灵笔) is a multi-modality conversational language model that is developed by "
    "Shanghai AI Laboratory (上海人工智能实验室). It is designed to be helpful, honest, and harmless.\n"
    "- InternLM-XComposer (浦语·灵笔) can understand and communicate fluently in the language chosen by the "
    "user such as English and 中文."
)

TEXTS = {
    "image_pdf": {
        "en": "That is a PDF, not a picture. Please send a photo or a screenshot (JPEG, PNG, WebP, GIF).",
        "zh": "这是 PDF 文件，不是图片。请发送照片或截图（JPEG、PNG、WebP、GIF）。",
    },
    "image_not_image": {
        "en": "That file is not an image I can read. Please send a JPEG, PNG, WebP or GIF picture.",
        "zh": "无法识别这个文件为图片。请发送 JPEG、PNG、WebP 或 GIF 格式的图片。",
    },
    "image_too_many_pixels": {
        "en": "That picture is too large: {pixels} megapixels (the limit is {limit}). Please send a smaller one.",
        "zh": "图片尺寸太大：{pixels} 百万像素（上限 {limit}）。请发送小一些的图片。",
    },
    "image_corrupt": {
        "en": "That image file is damaged and cannot be decoded. Please send it again.",
        "zh": "图片文件已损坏，无法解码。请重新发送。",
    },
    "image_too_big": {
        "en": "That file is too big ({size} MB; the limit is {limit} MB). Please send a smaller picture.",
        "zh": "文件太大（{size} MB，上限 {limit} MB）。请发送小一些的图片。",
    },
    "image_download_failed": {
        "en": "I could not download that picture. Please send it again.",
        "zh": "图片下载失败，请重新发送。",
    },
    "image_needed": {
        "en": "Please send the picture first (with your question as its caption). "
        "A picture is forgotten after /reset, a persona switch or a restart of the bot.",
        "zh": "请先发送图片（把问题写在图片说明里）。执行 /reset、切换角色或机器人重启后需要重新发送图片。",
    },
    "image_describe_question": {"en": "Describe this image.", "zh": "请描述这张图片。"},
    "help_image": {
        "en": "Pictures: send a photo with your question as its caption (or /image with an attachment); "
        "then ask follow-up questions about it as plain messages.",
        "zh": "图片：发送图片并把问题写在图片说明里（或用 /image 附带图片），之后可直接发消息继续追问这张图片。",
    },
}


class NeedImage(ModelError):
    """A follow-up question, but the session has no picture (any more)."""

    user_message_key = "image_needed"


@dataclass
class _Remembered:
    token: str
    picture: PreparedImage
    used: float


class ImageMemory:
    """The picture each session is talking about. In RAM only; least recently used pictures
    are dropped beyond `max_bytes`, and any picture idle for `idle_seconds`."""

    def __init__(
        self, max_bytes: int = MEMORY_BYTES, idle_seconds: float = MEMORY_IDLE_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_bytes = max_bytes
        self.idle_seconds = idle_seconds
        self.clock = clock
        self._items: OrderedDict[str, _Remembered] = OrderedDict()
        self.nbytes = 0

    def __len__(self) -> int:
        return len(self._items)

    def put(self, key: str, token: str, picture: PreparedImage) -> None:
        self.forget(key)
        self._items[key] = _Remembered(token, picture, self.clock())
        self.nbytes += picture.nbytes
        self._evict()

    def get(self, key: str) -> _Remembered | None:
        self._evict()
        item = self._items.get(key)
        if item is not None:
            item.used = self.clock()
            self._items.move_to_end(key)
        return item

    def forget(self, key: str) -> None:
        item = self._items.pop(key, None)
        if item is not None:
            self.nbytes -= item.picture.nbytes

    def _evict(self) -> None:
        now = self.clock()
        while self._items:
            key, oldest = next(iter(self._items.items()))
            if self.nbytes <= self.max_bytes and now - oldest.used < self.idle_seconds:
                break
            self.forget(key)


def _token_of(attachment: str | None) -> str | None:
    if not attachment or not attachment.startswith(MARKER):
        return None
    return attachment[len(MARKER) :].split(" ", 1)[0]


class VisionResponder:
    """Asks the vision model about the session's picture, with the conversation since it came."""

    def __init__(self, app: App, memory: ImageMemory) -> None:
        self.app = app
        self.memory = memory

    async def respond(self, turn: Turn) -> AsyncIterator[str]:
        remembered = self.memory.get(turn.session_key)
        rows = self.app.store.history(turn.session_key, turn.persona.name)
        # ask() has written the question (and an empty answer row) before calling us.
        current = max((i for i, r in enumerate(rows) if r.role == "user"), default=None)
        anchor = None
        if current is not None:
            anchor = next((i for i in range(current, -1, -1) if _token_of(rows[i].attachment)), None)
        if remembered is None or anchor is None or _token_of(rows[anchor].attachment) != remembered.token:
            raise NeedImage(f"no picture in memory for {turn.session_key} (token mismatch or forgotten)")
        history = [ChatMessage(r.role, r.content) for r in rows[anchor:current] if r.status in VISIBLE and r.content]
        persona = turn.persona
        system = [ChatMessage("system", persona.system_prompt)] if persona.system_prompt else []
        question = [ChatMessage("user", turn.text)]
        image = remembered.picture.image

        def prompt(backend: ChatBackend) -> list[ChatMessage]:
            nonlocal image
            side = int(getattr(backend, "image_side", 0) or 0)
            if side and max(image.size) > side:  # taken in before the model was loaded: shrink to its size now
                image = image.copy()
                image.thumbnail((side, side), Image.Resampling.BICUBIC)
            reserve = persona.params.max_new_tokens + int(getattr(backend, "image_tokens", 0))
            messages = fit_to_context(backend, system, history, question, reserve)
            first = next(i for i, m in enumerate(messages) if m.role == "user")
            messages[first] = replace(messages[first], image=image)  # the picture goes with the first question kept
            return messages

        deltas = self.app.hub.get(persona.role).stream(
            prompt, params=persona.params, cancel=turn.cancel, tenant=turn.tenant, on_wait=turn.on_wait, stats=turn.stats
        )
        try:
            async for delta in deltas:
                yield delta
        finally:
            await deltas.aclose()


class ImageHandler:
    """`App.image_handler`: a message with an image, or the /image command."""

    def __init__(self, memory: ImageMemory) -> None:
        self.memory = memory

    async def __call__(self, app: App, msg: Incoming, surface: ReplySurface, args: str, lang: str) -> None:
        key = app.session_key(msg)
        persona = app.personas[VISION]
        if not app.access.allows_role(msg, persona.role):
            log.info("refused %s:%s for the vision persona", msg.platform, msg.user_id)
            await surface.post(t("not_allowed", lang), phase="notice")
            return
        if msg.image is None:  # /image without a picture: switch, and ask if a picture is there
            if app.current_persona(key).name != VISION:
                self.memory.forget(key)  # coming back from another persona starts afresh
            app.set_persona(key, VISION)
            if args.strip() and self.memory.get(key) is not None:
                await app.ask(msg, surface, persona, args, lang)
            else:
                await surface.post(t("image_needed" if args.strip() else "greeting_vision", lang), phase="notice")
            return
        side = int(getattr(app.hub.get(persona.role).backend, "image_side", None) or DEFAULT_SIDE)
        started = time.perf_counter()
        try:
            picture = await prepare_image(
                msg.image, max_bytes=app.settings.max_image_bytes, max_pixels=app.settings.max_image_pixels, side=side
            )
        except ImageProblem as problem:
            log.info(
                "refused an image from %s:%s (%r, %s bytes declared): %s",
                msg.platform, msg.user_id, msg.image.filename[:64], msg.image.size, problem,
            )
            await surface.post(t(problem.key, lang, **problem.values), phase="notice")
            return
        log.info(
            "image from %s:%s: %s → %dx%d in %.0f ms",
            msg.platform, msg.user_id, picture.describe(), *picture.image.size, (time.perf_counter() - started) * 1000,
        )
        token = uuid.uuid4().hex[:12]
        self.memory.put(key, token, picture)
        app.set_persona(key, VISION)
        question = args.strip() or t("image_describe_question", lang)
        await app.ask(
            msg, surface, persona, question, lang, attachment=f"{MARKER}{token} {picture.describe()}", image=picture.image
        )


def vision_persona(app: App) -> Persona:
    s = app.settings
    params = GenerationParams(max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_p=s.top_p)
    return Persona(VISION, "image", VISION, XCOMPOSER_SYSTEM_PROMPT, params)


def install(app: App) -> ImageMemory:
    """Add the vision persona, its responder, the image handler, texts and a /help line."""
    register(TEXTS)
    memory = ImageMemory()
    app.add_persona(vision_persona(app), VisionResponder(app, memory))
    app.image_handler = ImageHandler(memory)
    app.help_sections.append(lambda lang: t("help_image", lang))
    return memory

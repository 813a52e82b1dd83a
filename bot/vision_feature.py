"""Questions about a photo: how the "vision" persona answers (declared in bot/features.py as
/image, model role "vision").

The core takes the picture in (`bot/images.py`: checked, shrunk, kept in the session's
`ImageMemory`) and hands it to `VisionResponder` on the turn (`Turn.picture`), together with the
conversation since the picture came (`Turn.history`). Plain follow-up messages continue the
conversation about the same picture until another image, a persona switch or /reset.
"""

from __future__ import annotations

from typing import AsyncIterator

from models.base import ChatBackend, ChatMessage, ModelError
from models.registry import ModelHub

from .responders import Turn, fit_to_context

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


class VisionResponder:
    """Asks the vision model about the turn's picture, with the conversation since it came."""

    def __init__(self, hub: ModelHub) -> None:
        self.hub = hub

    def respond(self, turn: Turn) -> AsyncIterator[str]:
        picture = turn.picture
        if picture is None:
            raise NeedImage(f"no picture in memory for {turn.session_key} (token mismatch or forgotten)")
        persona = turn.persona
        system = [ChatMessage("system", persona.system_prompt)] if persona.system_prompt else []
        question = [ChatMessage("user", turn.text)]

        def prompt(backend: ChatBackend) -> list[ChatMessage]:
            image = picture.image_for(backend.capabilities.image_side)
            reserve = persona.params.max_new_tokens + backend.capabilities.image_tokens
            messages = fit_to_context(backend, system, turn.history, question, reserve)
            first = next(i for i, m in enumerate(messages) if m.role == "user")
            messages[first] = ChatMessage(messages[first].role, messages[first].content, image=image)  # with the first question kept
            return messages

        return self.hub.get(persona.role).stream(
            prompt, params=persona.params, cancel=turn.cancel, tenant=turn.tenant, on_wait=turn.on_wait, stats=turn.stats
        )

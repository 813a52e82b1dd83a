"""Photos with a question, end to end with the tiny real VLM (tests/tiny_vlm.py): the console
(`/image PATH question`), the core for every bad file, Telegram (photo with caption) and
Discord (/image with an attachment)."""

from __future__ import annotations

import io
from dataclasses import replace
from pathlib import Path

import pytest
from PIL import Image

from bot.i18n import t
from bot.messages import ImageAttachment, Incoming
from bot.vision_feature import XCOMPOSER_SYSTEM_PROMPT
from bot.images import ImageMemory, PreparedImage
from tests import tiny_vlm
from tests.surfaces import RecordingSurface
from tests.test_images import animated_gif, bomb_png, encode



async def chat(app, *lines: str) -> str:
    """Type lines into the console adapter; what it printed."""
    from adapters.console import ConsoleAdapter

    out = io.StringIO()
    adapter = ConsoleAdapter(app, stdin=io.StringIO("".join(line + "\n" for line in lines)), out=out, err=io.StringIO())
    await adapter.run()
    return out.getvalue()


@pytest.fixture(scope="session")
def tiny_vision_model() -> Path:
    return tiny_vlm.vision_model_path()


@pytest.fixture
def vision_app(make_app, tiny_vision_model):
    def make(**overrides):
        return make_app(vision_model=str(tiny_vision_model), **overrides)

    return make


def picture(color: str, fmt: str = "PNG", size=(64, 48)) -> bytes:
    return encode(tiny_vlm.solid_image(color, size), fmt)


def photo(tmp_path: Path, name: str, color: str, fmt: str = "PNG") -> Path:
    path = tmp_path / name
    path.write_bytes(picture(color, fmt))
    return path


def incoming(text: str = "", image: ImageAttachment | None = None, lang: str = "en", user: str = "u1") -> Incoming:
    return Incoming(platform="test", chat_id="c1", user_id=user, text=text, image=image, language=lang)


def attached(data: bytes, *, size: int | None = -1, filename: str = "photo.jpg", mime: str = "image/jpeg") -> ImageAttachment:
    async def fetch() -> bytes:
        return data

    return ImageAttachment(fetch=fetch, size=len(data) if size == -1 else size, filename=filename, mime_type=mime)


async def ask(app, text: str = "", image: ImageAttachment | None = None, lang: str = "en") -> str:
    surface = RecordingSurface()
    await app.handle(incoming(text, image, lang), surface)
    return surface.visible


async def test_console_image_question_then_follow_ups_about_the_same_picture(vision_app, tmp_path):
    app = vision_app()
    red, blue = photo(tmp_path, "red.png", "red"), photo(tmp_path, "blue.jpg", "blue", "JPEG")
    out = await chat(app, f"/image {red} what is this", "And now?", f"/image {blue} 这张图里有什么？", "你确定吗？")
    assert out.splitlines() == ["red", "red", "blue", "blue"]
    vision = app.hub.get("vision")
    prompt = vision.last_prompt
    assert prompt[0].role == "system" and prompt[0].content == XCOMPOSER_SYSTEM_PROMPT
    # The follow-up carries the conversation since the blue picture, the picture on its first question.
    assert [(m.role, m.content) for m in prompt[1:]] == [("user", "这张图里有什么？"), ("assistant", "blue"), ("user", "你确定吗？")]
    assert prompt[1].image is not None and max(prompt[1].image.size) <= vision.backend.image_side == 32
    assert all(m.image is None for m in prompt[2:])
    # The history records the question and that a picture came with it, not the picture.
    rows = app.store.history(app.session_key(app_console_msg(app)), "vision")
    assert [r.content for r in rows] == ["what is this", "red", "And now?", "red", "这张图里有什么？", "blue", "你确定吗？", "blue"]
    assert rows[0].attachment.startswith("image:") and " png 64x48 " in rows[0].attachment
    assert rows[4].attachment.startswith("image:") and " jpeg 64x48 " in rows[4].attachment
    assert [r.attachment for r in rows if r.attachment] == [rows[0].attachment, rows[4].attachment]


def app_console_msg(app) -> Incoming:
    from adapters.console import ConsoleAdapter

    return ConsoleAdapter(app, stdin=io.StringIO(), out=io.StringIO(), err=io.StringIO()).incoming("")


async def test_a_picture_is_forgotten_after_reset_and_after_a_persona_switch(vision_app, tmp_path):
    app = vision_app()
    red = photo(tmp_path, "red.png", "red")
    needed = t("image_needed", "en")
    out = await chat(app, f"/image {red} what is this", "/reset", "again?")
    assert out.splitlines()[0] == "red" and out.splitlines()[-1] == needed
    out = await chat(app, f"/image {red} what is this", "/chat", "ping")
    assert out.splitlines()[0] == "red" and out.splitlines()[-1] == "pong"
    surface = RecordingSurface()  # /image with a question but no picture (the console would read a path)
    await app.handle(replace(app_console_msg(app), text="/image what about the picture?"), surface)
    assert surface.visible == needed
    out = await chat(app, "/image")  # no picture, no question: how to use it
    assert out == t("greeting_vision", "en") + "\n"


async def test_a_photo_without_caption_gets_a_description_and_regenerate_keeps_the_picture(vision_app):
    app = vision_app()
    assert await ask(app, image=attached(picture("green", "JPEG"))) == "green"
    # Taken in before the model was loaded (so at the default size), shrunk to the model's size after.
    assert max(app.hub.get("vision").last_prompt[1].image.size) == 32
    key = app.session_key(incoming())
    assert app.store.history(key, "vision")[0].content == "Describe this image."
    surface = RecordingSurface()
    await app.regenerate(incoming(), surface)
    assert surface.visible == "green"
    assert await ask(app, image=attached(picture("red")), lang="zh") == "red"
    assert app.store.history(key, "vision")[-2].content == "请描述这张图片。"


async def test_every_bad_file_gets_its_own_reply_and_never_reaches_the_model(vision_app):
    app = vision_app()
    good = picture("red", "JPEG", (640, 480))
    cases = [
        (attached(b"%PDF-1.5\n%\xe2\xe3\n", filename="paper.pdf", mime="application/pdf"), t("image_pdf", "en")),
        (attached(b"%PDF-1.5\n", filename="scan.jpg", mime="image/jpeg"), t("image_pdf", "en")),  # lying name
        (attached(bomb_png(), filename="bomb.png", mime="image/png"), t("image_too_many_pixels", "en", pixels="200", limit="50")),
        (attached(good[: len(good) // 2]), t("image_corrupt", "en")),
        (attached(b"x", size=50 * 2**20), t("image_too_big", "en", size="50", limit="20")),
        (attached(b"\xff\xd8" + bytes(50 * 2**20), size=None), t("image_too_big", "en", size="50", limit="20")),
        (attached("hello".encode(), filename="notes.txt", mime="text/plain"), t("image_not_image", "en")),
    ]
    for attachment, expected in cases:
        assert await ask(app, "what is this?", attachment) == expected
    assert app.hub.get("vision").backend is None  # nothing bad got as far as loading the model
    assert await ask(app, "what is this?", cases[2][0], lang="zh") == t("image_too_many_pixels", "zh", pixels="200", limit="50")
    # An animated GIF is answered about its first (red) frame; the second is blue.
    assert await ask(app, "what is this?", attached(animated_gif(), filename="a.gif", mime="image/gif")) == "red"
    assert app.store.history(app.session_key(incoming()), "vision")[0].attachment.endswith("first of 2 frames")


async def test_each_session_has_its_own_picture(vision_app):
    app = vision_app()
    first, second = incoming(user="u1"), incoming(user="u2")
    for msg, color in ((first, "red"), (second, "blue")):
        surface = RecordingSurface()
        await app.handle(replace(msg, text="what?", image=attached(picture(color))), surface)
        assert surface.visible == color
    for msg, color in ((first, "red"), (second, "blue")):
        surface = RecordingSurface()
        await app.handle(replace(msg, text="And now?"), surface)
        assert surface.visible == color


def test_image_memory_is_capped_and_forgets_idle_pictures():
    now = [0.0]
    memory = ImageMemory(max_bytes=3 * 10 * 10 * 3, idle_seconds=100, clock=lambda: now[0])

    def prepared() -> PreparedImage:
        return PreparedImage(Image.new("RGB", (10, 10)), "PNG", (10, 10), 100, 1)

    for key in "abc":
        memory.put(key, key, prepared())
    assert len(memory) == 3 and memory.nbytes == 900
    memory.get("a")  # a is now the most recently used
    memory.put("d", "d", prepared())
    assert memory.get("b") is None and memory.get("a") is not None and len(memory) == 3
    memory.put("a", "a2", prepared())  # a new picture replaces the old one of the session
    assert memory.get("a").token == "a2" and memory.nbytes == 900
    now[0] = 101.0
    assert memory.get("a") is None and len(memory) == 0 and memory.nbytes == 0


# -- the platforms ------------------------------------------------------------------------------


async def test_telegram_photo_with_a_caption_and_a_follow_up(vision_app):
    from tests.fake_telegram import FakeTelegram
    from tests.telegram_harness import TOKEN, running_bot, telegram_settings

    async with FakeTelegram(TOKEN) as fake:
        app = vision_app(**telegram_settings(fake))
        async with running_bot(app):
            chat_id = fake.private_chat(42, lang="zh-hans")
            fake.send_photo(chat_id, 42, picture("blue", "JPEG"), caption="这张图里有什么？")
            await fake.wait_until(lambda: "blue" in fake.texts(chat_id))
            fake.send_text(chat_id, 42, "你确定吗？")
            await fake.wait_until(lambda: fake.texts(chat_id).count("blue") == 2)
            fake.send_document(chat_id, 42, picture("red"), file_name="red.png", mime_type="image/png", caption="这是什么？")
            await fake.wait_until(lambda: "red" in fake.texts(chat_id))


async def test_discord_image_command_with_an_attachment(vision_app):
    from tests.discord_harness import answer_text, is_done, running
    from tests.fake_discord import FakeDiscord

    async with FakeDiscord() as fake:
        app = vision_app(discord_bot_token=fake.token)
        async with running(app, fake):
            upload = fake.add_file("red.png", picture("red"), "image/png")
            interaction = await fake.slash("image", fake.alice, image=upload, question="what is this?")
            await fake.wait_for(lambda: interaction.messages and is_done(interaction.messages[-1]), "/image")
            assert answer_text(interaction.messages) == "red"
            # A picture attached to a message that mentions the bot works the same way.
            upload = fake.add_file("blue.png", picture("blue"), "image/png")
            question = await fake.send_message(fake.alice, fake.channel, "what is this?", mention_bot=True, attachments=[upload])
            reply = await fake.wait_for(
                lambda: next((m for m in fake.bot_messages() if m.reference_id == question.id and is_done(m)), None), "reply"
            )
            assert answer_text([reply]) == "blue"
            assert fake.errors == []

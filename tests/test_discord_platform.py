"""The Discord adapter under Discord's rules: rate limits, expiring interaction tokens, images,
logging without the token, shutdown, and the strictness of the fake itself."""

from __future__ import annotations

import logging
import time

import aiohttp
import pytest

from bot.i18n import t
from bot.logs import setup_logging
from tests import tiny_models
from tests.discord_harness import answer_text, is_done, key_of, running, stack, until_done
from tests.fake_discord import API, FakeDiscord
from tests.slow import slow_down
from tests.surfaces import PictureRecorder, tiny_picture



def strip_fences(text: str) -> str:
    """Undo the splitter's fence closing/reopening at message boundaries."""
    pieces = [p.removesuffix("\n```") for p in text.split("\n```python\n")]
    return pieces[0] + "".join("\n" + p for p in pieces[1:])


async def test_rate_limits_are_retried_and_the_answer_completes(make_app):
    async with stack(make_app) as (fake, app, adapter):
        fake.inject("PATCH", r"/messages/@original$", retry_after=0.2, count=2)
        interaction = await fake.slash("chat", fake.alice, prompt="count")
        await until_done(fake, interaction)
        assert answer_text(interaction.messages) == tiny_models.COUNT_ANSWER
        fake.inject("POST", r"/channels/\d+/messages$", retry_after=0.2)
        question = await fake.send_message(fake.alice, fake.channel, "ping", mention_bot=True)
        reply = await fake.wait_for(lambda: next((m for m in fake.bot_messages() if m.reference_id == question.id and is_done(m)), None))
        assert reply.content.endswith("\npong")
        assert fake.rate_limited == 3
        assert all(status == 429 for _, _, status, _ in fake.errors)


async def test_long_answers_move_to_channel_messages_before_the_token_expires(make_app):
    offset = [0.0]
    options = {"clock": lambda: time.monotonic() + offset[0]}
    async with stack(make_app, adapter_options=options, max_new_tokens=150) as (fake, app, adapter):
        interaction = await fake.slash("chat", fake.alice, prompt="code")
        await fake.wait_for(lambda: interaction.original is not None and interaction.original.custom_ids)
        assert not is_done(interaction.original), "the answer must still be streaming for this test"
        offset[0] = 15 * 60.0  # a quarter of an hour later: Discord no longer takes this token
        fake.expire_tokens()
        in_channel = lambda: [m for m in fake.bot_messages(fake.channel) if m.interaction_id is None]  # noqa: E731
        await fake.wait_for(lambda: in_channel() and is_done(in_channel()[-1]), "the answer in channel messages")
        stored = app.store.history(app.session_key(key_of(fake, fake.alice, fake.channel)), "internlm")[-1].content
        assert len(stored) > 2000 and tiny_models.is_code_answer_prefix(stored)
        assert strip_fences("\n".join(m.content for m in in_channel())).rstrip("\n") == stored.rstrip("\n")
        assert fake.errors == [], "nothing was sent with the expired token"


async def test_images_in_messages_and_slash_commands_reach_the_image_path(make_app):
    async with stack(make_app) as (fake, app, adapter):
        app.responders["vision"] = recorder = PictureRecorder()
        png, jpeg = tiny_picture("PNG"), tiny_picture("JPEG")
        question = await fake.send_message(
            fake.alice, fake.channel, "what is this?", mention_bot=True,
            attachments=[fake.add_file("a.png", png, "image/png")],
        )
        reply = await fake.wait_for(lambda: next((m for m in fake.bot_messages() if m.reference_id == question.id and is_done(m)), None))
        assert answer_text([reply]) == f"got {len(png)} bytes"
        interaction = await fake.slash("image", fake.alice, image=fake.add_file("b.jpg", jpeg, "image/jpeg"), question="colour?")
        await until_done(fake, interaction)
        assert answer_text(interaction.messages) == f"got {len(jpeg)} bytes"
        assert recorder.seen == [
            ("what is this?", len(png), "image/png", "PNG", len(png)), ("colour?", len(jpeg), "image/jpeg", "JPEG", len(jpeg)),
        ]
        # A non-image attachment is not an image question: the text is answered as usual (here as a
        # follow-up about the picture, the current conversation), and the file is not downloaded.
        plain = await fake.send_message(fake.alice, fake.channel, "ping", mention_bot=True,
                                        attachments=[fake.add_file("notes.txt", b"hello", "text/plain")])
        reply = await fake.wait_for(lambda: next((m for m in fake.bot_messages() if m.reference_id == plain.id and is_done(m)), None))
        assert reply.content.endswith("\nfollow-up") and fake.file_downloads == 2 and len(recorder.seen) == 2
        assert fake.errors == []


async def test_agent_and_quiet_commands_route_through_the_core(make_app):
    async with stack(make_app) as (fake, app, adapter):
        reset = await fake.slash("reset", fake.alice)
        await fake.wait_for(lambda: reset.original is not None and reset.original.content)
        assert reset.ephemeral and reset.original.content == t("reset_done", "en", persona="InternLM")
        stop = await fake.slash("stop", fake.alice, locale="zh-CN")
        await fake.wait_for(lambda: stop.original is not None and stop.original.content)
        assert stop.original.content == t("stop_nothing", "zh")
        persona = await fake.slash("persona", fake.alice)
        await fake.wait_for(lambda: persona.original is not None and persona.original.content)
        assert persona.original.content == t("persona_current", "en", persona="InternLM")
        agent = await fake.slash("agent", fake.alice, prompt="ping")
        await fake.wait_for(lambda: agent.original is not None and agent.original.content)
        assert not agent.ephemeral and agent.original.content  # answered (by the agent, or "not available yet")
        assert fake.errors == []


async def test_the_token_never_reaches_the_log(make_app, make_settings):
    fake = FakeDiscord()
    settings = make_settings(discord_bot_token=fake.token, log_level="DEBUG")
    root = logging.getLogger()
    saved = list(root.handlers), root.level
    raw: list[str] = []

    class Raw(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            raw.append(record.getMessage())

    try:
        path = setup_logging(settings)
        root.addHandler(Raw())
        async with fake:
            fake.inject("PATCH", r"/messages/@original$", retry_after=0.1)
            async with running(make_app(settings), fake):
                interaction = await fake.slash("chat", fake.alice, prompt="ping")
                await until_done(fake, interaction)
                await fake.send_message(fake.alice, fake.dm_channel(fake.alice), "ping")
                await fake.wait_for(lambda: any(is_done(m) for m in fake.bot_messages(fake.dm_channel(fake.alice))))
        for handler in root.handlers:
            handler.flush()
        log_text = path.read_text()
    finally:
        for handler in list(root.handlers):
            root.removeHandler(handler)
        for handler in saved[0]:
            root.addHandler(handler)
        root.setLevel(saved[1])
    assert "answered discord:" in log_text and "synced" in log_text
    assert fake.token not in log_text
    assert interaction.token not in log_text, "interaction tokens are credentials too (for 15 minutes)"
    assert not [line for line in raw if fake.token in line]


async def test_shutdown_stops_answers_in_flight_and_closes_cleanly(make_app):
    fake = FakeDiscord()
    async with fake:
        app = make_app(discord_bot_token=fake.token, max_new_tokens=3000, shutdown_grace=0.0)
        await slow_down(app)  # still writing at shutdown, however fast the machine
        async with running(app, fake):
            interaction = await fake.slash("chat", fake.alice, prompt="code")
            await fake.wait_for(lambda: interaction.original is not None and interaction.original.custom_ids)
        last = interaction.messages[-1]
        assert is_done(last) and last.content.endswith(t("stopped_mark", "en"))
        assert not fake._sockets, "the gateway connection is closed"
        assert fake.errors == []


async def test_the_client_resumes_after_the_gateway_drops(make_app):
    async with stack(make_app) as (fake, app, adapter):
        await fake.disconnect_clients(4000)
        await fake.wait_for(lambda: len(fake._sockets) == 1 and fake.resumed, "a resumed session")
        interaction = await fake.slash("chat", fake.alice, prompt="ping")
        await until_done(fake, interaction)
        assert answer_text(interaction.messages) == "pong"
        assert len(fake.identified) == 1, "resumed, not identified again"


async def test_a_rejected_token_stops_the_adapter_with_a_clear_log_line(make_app, caplog):
    import discord

    async with FakeDiscord() as fake:
        app = make_app(discord_bot_token="MTE5.a-wrong-token.that-discord-does-not-know-xyz")
        with pytest.raises(discord.LoginFailure):
            async with running(app, fake):
                pass
    assert "Discord rejected DISCORD_BOT_TOKEN" in caplog.text
    assert "a-wrong-token" not in caplog.text
    assert fake.errors == [("GET", f"{API}/users/@me", 401, 0)]


async def test_a_late_acknowledgement_is_logged_not_crashed(make_app, caplog):
    async with stack(make_app, FakeDiscord(ack_deadline=0.0)) as (fake, app, adapter):
        interaction = await fake.slash("chat", fake.alice, prompt="ping")
        await fake.wait_for(lambda: fake.errors)
        assert fake.errors == [("POST", f"{API}/interactions/{interaction.id}/{interaction.token}/callback", 404, 10062)]
        fake.ack_deadline = 3.0
        ok = await fake.slash("chat", fake.alice, prompt="ping")
        await until_done(fake, ok)
    assert "could not defer /chat" in caplog.text


async def test_the_fake_is_strict(make_app):
    async with stack(make_app) as (fake, app, adapter):
        async with aiohttp.ClientSession(headers={"Authorization": f"Bot {fake.token}"}) as http:
            url = f"{fake.api_base}/channels/{fake.channel.id}/messages"
            async with http.post(url, json={"content": "x" * 2001}) as response:
                assert response.status == 400 and (await response.json())["code"] == 50035
            async with http.post(url, json={"content": ""}) as response:
                assert (await response.json())["code"] == 50006
            async with aiohttp.ClientSession() as anonymous, anonymous.post(url, json={"content": "hi"}) as response:
                assert response.status == 401
            interaction = await fake.slash("chat", fake.alice, prompt="ping")
            await until_done(fake, interaction)
            callback = f"{fake.api_base}/interactions/{interaction.id}/{interaction.token}/callback"
            async with http.post(callback, json={"type": 5}) as response:
                assert response.status == 400 and (await response.json())["code"] == 40060
        assert response.headers["Content-Type"] == "application/json"

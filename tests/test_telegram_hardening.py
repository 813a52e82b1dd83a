"""Telegram entry points under hostile input (issue 9): the chat allowlist and webhook mode."""

from __future__ import annotations

import asyncio
import socket

import aiohttp
import pytest

from bot.access import AccessPolicy
from bot.config import Settings
from bot.i18n import t
from bot.messages import Incoming
from tests.fake_telegram import FakeTelegram
from tests.telegram_harness import TOKEN, running_bot, telegram_settings

pytestmark = pytest.mark.filterwarnings("ignore::telegram.warnings.PTBDeprecationWarning")


async def test_chat_allowlist_ignores_forum_topic_ids(make_app):
    """TELEGRAM_ALLOWED_CHATS="-100888,7": topic 7 of a foreign supergroup is not chat 7."""
    async with FakeTelegram(TOKEN) as fake:
        app = make_app(**telegram_settings(fake), telegram_allowed_chats="-100888,7")
        async with running_bot(app):
            foreign = fake.group_chat(-100999, forum=True)
            fake.user(5)
            fake.send_text(foreign, 5, "@InternLMTestBot ping", thread_id=7)
            await fake.wait_until(lambda: fake.texts(foreign))
            assert fake.texts(foreign) == [t("not_allowed", "en")]
            assert app.hub.loaded == []  # the model was never asked
            allowed = fake.group_chat(-100888, forum=True)
            fake.send_text(allowed, 5, "@InternLMTestBot ping", thread_id=3)  # any topic of an allowed chat
            await fake.wait_until(lambda: "pong" in fake.texts(allowed))
            assert fake.messages(allowed)[-1].thread_id == 3


def test_only_discord_threads_are_matched_by_their_own_id():
    policy = AccessPolicy(Settings(_env_file=None, telegram_allowed_chats="-100888,7", discord_allowed_channels="55"))

    def msg(platform, chat, thread=None):
        return Incoming(platform=platform, chat_id=chat, user_id="1", text="hi", thread_id=thread)

    assert policy.allows(msg("telegram", "-100888", "3")) and policy.allows(msg("telegram", "7"))
    assert not policy.allows(msg("telegram", "-100999", "7"))
    assert policy.allows(msg("discord", "44", "55"))  # a listed thread inside another channel
    assert policy.allows(msg("discord", "55", "66")) and not policy.allows(msg("discord", "44", "66"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _raw_request(port: int, path: str, headers: dict[str, str], body: bytes) -> bytes:
    """Send a request by hand (headers may promise more body than is sent); return the status line."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        head = f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
        head += "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
        writer.write(head.encode() + body)
        await writer.drain()
        return await reader.readline()
    finally:
        writer.close()


async def test_webhook_refuses_before_reading_and_caps_and_checks_bodies(make_app):
    port, secret = _free_port(), "s3cret-Value_1"
    url = f"http://127.0.0.1:{port}/tg-hook"
    update = {"update_id": 7, "message": {"message_id": 1, "date": 0, "text": "ping",
                                          "chat": {"id": 42, "type": "private"}, "from": {"id": 42, "is_bot": False,
                                                                                          "first_name": "A"}}}
    async with FakeTelegram(TOKEN) as fake:
        app = make_app(**telegram_settings(
            fake, telegram_webhook_url=url, telegram_webhook_listen="127.0.0.1", telegram_webhook_port=port,
            telegram_webhook_secret=secret,
        ))
        async with running_bot(app):
            assert fake.webhook["url"] == url and fake.webhook["secret_token"] == secret
            fifty_mb = {"Content-Length": str(50 * 2**20)}
            # Only 1 KB of a promised 50 MB is sent: the answer must come from the headers alone.
            for wrong in ({}, {"X-Telegram-Bot-Api-Secret-Token": "wrong"}):
                status = await _raw_request(port, "/tg-hook", {**fifty_mb, **wrong}, b"x" * 1024)
                assert status.startswith(b"HTTP/1.1 403"), status
            right = {"X-Telegram-Bot-Api-Secret-Token": secret}
            status = await _raw_request(port, "/tg-hook", {**fifty_mb, **right}, b"x" * 1024)
            assert status.startswith(b"HTTP/1.1 413"), status
            async with aiohttp.ClientSession() as session:
                async def chunks():
                    for _ in range(17):  # 17 × 64 KB, sent chunked: found over the cap while reading
                        yield b" " * 65536

                async with session.post(url, data=chunks(), headers=right) as response:
                    assert response.status == 413
                for bad in (b"{not json", b"[1, 2]", b'{"update_id": "x", "message": 5}'):
                    async with session.post(url, data=bad, headers=right) as response:
                        assert response.status == 400, bad
                fake.private_chat(42)
                assert fake.texts(42) == []  # nothing refused reached the bot
                async with session.post(url, json=update, headers=right) as response:
                    assert response.status == 200
            await fake.wait_until(lambda: fake.texts(42) == ["pong"])

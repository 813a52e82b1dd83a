"""Webhook mode under unauthenticated floods: memory of the bot process (issue 9, item 4).

Starts the real bot (`python -m launcher`, Telegram adapter in webhook mode, against the fake Bot API
for setWebhook) as a child process, sends one empty unauthenticated POST (one-time costs of the
first request), then sends N parallel POSTs of SIZE MB each without the
secret token, streamed from a 1 MB buffer so the sender stays small. Reports the bot's resident
memory before, its peak during the flood (the kernel's high-water mark VmHWM, reset just before
the flood through /proc/PID/clear_refs), the growth, and how each request ended. Then checks that
one real update with the secret is still answered. Goal: growth ≤ 10 MB for 20 × 50 MB.

    .venv/bin/python bench/webhook.py [--n 20] [--size-mb 50]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import socket
import sys
import tempfile
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.fake_telegram import FakeTelegram  # noqa: E402
from tests.telegram_harness import TOKEN  # noqa: E402

SECRET = "bench-Secret_1"
CHUNK = b"x" * 2**20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def memory_kb(pid: int) -> dict[str, int]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0])
    return fields


async def post(session: aiohttp.ClientSession, url: str, size_mb: int) -> str:
    async def body():
        for _ in range(size_mb):
            yield CHUNK

    try:
        headers = {"Content-Length": str(size_mb * len(CHUNK)), "Content-Type": "application/json"}
        async with session.post(url, data=body(), headers=headers) as response:
            return str(response.status)
    except aiohttp.ClientError as exc:  # the bot closed the connection after its 403
        return type(exc).__name__


async def run(n: int, size_mb: int) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}/hook"
    async with FakeTelegram(TOKEN) as fake:
        with tempfile.TemporaryDirectory() as data:
            env = {k: v for k, v in os.environ.items() if not k.startswith(("TELEGRAM", "DISCORD"))}
            env.update(
                TELEGRAM_BOT_TOKEN=TOKEN, TELEGRAM_API_BASE_URL=fake.base_url, TELEGRAM_WEBHOOK_URL=url,
                TELEGRAM_WEBHOOK_LISTEN="127.0.0.1", TELEGRAM_WEBHOOK_PORT=str(port), TELEGRAM_WEBHOOK_SECRET=SECRET,
                DATA_DIR=data, LOG_LEVEL="ERROR", HF_HUB_OFFLINE="1",
            )
            bot = await asyncio.create_subprocess_exec(sys.executable, "-m", "launcher", cwd=ROOT, env=env,
                                                       stdout=asyncio.subprocess.DEVNULL)
            try:
                await fake.wait_until(lambda: fake.webhook is not None)
                async with aiohttp.ClientSession() as session:  # warm-up: the first request's one-time costs
                    await post(session, url, 0)
                before = memory_kb(bot.pid)
                Path(f"/proc/{bot.pid}/clear_refs").write_text("5")  # reset VmHWM to the current RSS
                async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=n)) as session:
                    outcomes = await asyncio.gather(*(post(session, url, size_mb) for _ in range(n)))
                    after = memory_kb(bot.pid)
                chat = fake.private_chat(42)
                fake.send_text(chat, 42, "/help")  # the fake POSTs it to the webhook, with the secret
                await fake.wait_until(lambda: fake.texts(42))
            finally:
                bot.terminate()
                await bot.wait()
    growth = (after["VmHWM"] - before["VmRSS"]) / 1024
    print(f"{n} parallel POSTs of {size_mb} MB without the secret token: {dict(collections.Counter(outcomes))}")
    print(f"bot RSS before {before['VmRSS'] / 1024:.1f} MB, peak during {after['VmHWM'] / 1024:.1f} MB, "
          f"after {after['VmRSS'] / 1024:.1f} MB: growth {growth:.1f} MB (goal ≤ 10 MB)")
    print("then a real update (with the secret) was answered")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=20)
    parser.add_argument("--size-mb", type=int, default=50)
    args = parser.parse_args()
    asyncio.run(run(args.n, args.size_mb))


if __name__ == "__main__":
    main()

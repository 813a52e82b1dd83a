"""Telegram streaming under load: N private chats at once against the fake Bot API server with
its flood limits enforced (about 1 write/s per chat, 30/s overall), each streaming a 500-token
answer from a model that emits one token every 20 ms.

Reports per N: writes (send + edits) per reply, 429s received, median and p95 delay between a
token being generated and it being visible on the server, and the time from the last token to
the final text. Goals: zero 429s; median visibility ≤ 1.2 s; last token → final ≤ 1.5 s.

    .venv/bin/python bench/telegram_streaming.py [--n 1 10 50] [--tokens 500] [--every 0.02]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import AsyncIterator

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bot.app import App, role_specs  # noqa: E402
from bot.config import Settings  # noqa: E402
from models.base import Cancel, Capabilities, ChatMessage, GenerationParams, StreamStats  # noqa: E402
from models.registry import ModelHub  # noqa: E402
from tests.fake_telegram import FakeTelegram  # noqa: E402
from tests.telegram_harness import TOKEN, running_bot, telegram_settings  # noqa: E402


class PacedBackend:
    """A stand-in model: "t000 t001 …", one token every `every` seconds, on a fixed schedule.
    Records when each token of each question was generated."""

    name = "paced"
    context_window = 8192
    capabilities = Capabilities()

    def __init__(self, tokens: int, every: float) -> None:
        self.tokens, self.every = tokens, every
        self.generated: dict[str, list[float]] = {}  # question -> generation time of each token

    def count_tokens(self, messages: list[ChatMessage]) -> int:
        return sum(len(m.content) for m in messages) // 4 + 8

    async def stream(
        self, messages: list[ChatMessage], *, params: GenerationParams, cancel: Cancel, stats: StreamStats | None = None
    ) -> AsyncIterator[str]:
        times = self.generated.setdefault(messages[-1].content, [])
        start = time.monotonic()
        for i in range(self.tokens):
            if cancel.is_set:
                return
            delay = start + (i + 1) * self.every - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            times.append(time.monotonic())
            yield f"t{i:03d} "


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


async def run(n: int, tokens: int, every: float) -> dict:
    backend = PacedBackend(tokens, every)
    with tempfile.TemporaryDirectory() as data:
        async with FakeTelegram(TOKEN) as fake:
            settings = Settings(
                _env_file=None, data_dir=Path(data), max_concurrent_generations=n, max_new_tokens=tokens + 10,
                **telegram_settings(fake),
            )
            app = App(settings, hub=ModelHub(role_specs(settings), factory=lambda spec: backend))
            async with running_bot(app):
                chats = [fake.private_chat(10_000 + i) for i in range(n)]
                started = time.monotonic()
                for chat in chats:
                    fake.send_text(chat, chat, f"bench {chat}")

                def finished() -> bool:
                    return all(
                        (m := fake.messages(c)) and m[-1].reply_markup and "regen" in json.dumps(m[-1].reply_markup)
                        for c in chats
                    )

                await fake.wait_until(finished)
                elapsed = time.monotonic() - started
            app.store.close()
        delays, tails, writes = [], [], []
        for chat in chats:
            generated = backend.generated[f"bench {chat}"]
            chat_writes = [w for w in fake.writes if w.chat_id == chat]
            writes.append(len(chat_writes))
            visible_at: list[float] = []
            for w in chat_writes:  # the text only grows: each write shows a prefix of the tokens
                shown = len(w.text.split())
                while len(visible_at) < min(shown, len(generated)):
                    visible_at.append(w.at)
            assert len(visible_at) == tokens, f"chat {chat}: {len(visible_at)} of {tokens} tokens shown"
            delays += [v - g for v, g in zip(visible_at, generated)]
            tails.append(chat_writes[-1].at - generated[-1])
            assert fake.messages(chat)[-1].text == " ".join(f"t{i:03d}" for i in range(tokens))
        rate_limited = sum(1 for _, code, _ in fake.errors if code == 429)
        if fake.flood_hits:  # which of the fake's limits was hit: overall, chat or group
            print(f"N={n}: 429s by limit: {sorted({scope for _, _, scope in fake.flood_hits})}", file=sys.stderr)
        return {
            "n": n,
            "writes_per_reply": round(statistics.mean(writes), 1),
            "429s": rate_limited,
            "visible_median_s": round(statistics.median(delays), 3),
            "visible_p95_s": round(percentile(delays, 95), 3),
            "last_token_to_final_median_s": round(statistics.median(tails), 3),
            "last_token_to_final_max_s": round(max(tails), 3),
            "wall_s": round(elapsed, 1),
        }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, nargs="+", default=[1, 10, 50])
    parser.add_argument("--tokens", type=int, default=500)
    parser.add_argument("--every", type=float, default=0.02, help="seconds per token")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)  # a 429 is reported in the table, not per chat
    header = f"{'N':>4} {'writes/reply':>12} {'429s':>5} {'visible med':>11} {'visible p95':>11} {'last→final med':>14} {'last→final max':>14}"
    print(header)
    for n in args.n:
        r = await run(n, args.tokens, args.every)
        print(
            f"{r['n']:>4} {r['writes_per_reply']:>12} {r['429s']:>5} {r['visible_median_s']:>10.2f}s {r['visible_p95_s']:>10.2f}s "
            f"{r['last_token_to_final_median_s']:>13.2f}s {r['last_token_to_final_max_s']:>13.2f}s",
            flush=True,
        )


if __name__ == "__main__":
    asyncio.run(main())

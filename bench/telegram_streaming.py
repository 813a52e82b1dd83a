"""Telegram streaming under load: N private chats ask at once; every model role is on the
`openai` backend, served by a model server in another process that streams a 500-token answer
at one token per 20 ms (bench/paced_server.py); every other setting is the default. The fake
Bot API server enforces Telegram's limits strictly where it accepts a write (1 write/s per chat,
30/s overall) and takes a random 3-60 ms per request (`--jitter`).

Reports per N: writes per reply, 429s received, message → first answer text (from the user's
message reaching the fake to the first write showing answer text; compare the model's own
first token, measured from the request reaching the model server), the delay between a token
being generated and being visible on the server, last token → final text, complete replies.
Goals: 0 × 429; first text at N=1 ≤ the model's first token + 0.3 s, at N=50 p50 ≤ 2 s; token →
visible p50 ≤ 0.8 s; every reply complete.

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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.paced_server import PacedServer, openai_settings  # noqa: E402
from bot.app import App  # noqa: E402
from bot.config import Settings  # noqa: E402
from tests.fake_telegram import FakeTelegram  # noqa: E402
from tests.telegram_harness import TOKEN, running_bot, telegram_settings  # noqa: E402


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def finished(fake: FakeTelegram, chat: int) -> bool:
    messages = fake.messages(chat)
    return bool(messages) and bool(messages[-1].reply_markup) and "regen" in json.dumps(messages[-1].reply_markup)


async def run(n: int, server: PacedServer, jitter: tuple[float, float]) -> dict:
    tokens = server.tokens
    with tempfile.TemporaryDirectory() as data:
        async with FakeTelegram(TOKEN, jitter=jitter) as fake:
            settings = Settings(_env_file=None, data_dir=Path(data), **openai_settings(server), **telegram_settings(fake))
            app = App(settings)
            async with running_bot(app):
                chats = [fake.private_chat(10_000 + i) for i in range(n)]
                asked: dict[int, float] = {}
                for chat in chats:
                    fake.send_text(chat, chat, f"bench {n}-{chat}")
                    asked[chat] = time.monotonic()
                await fake.wait_until(lambda: all(finished(fake, c) for c in chats))
            app.store.close()
    times = server.times()
    first_text, first_token, delays, tails, writes, complete = [], [], [], [], [], 0
    expected = " ".join(f"t{i:03d}" for i in range(tokens))
    for chat in chats:
        record = times[f"bench {n}-{chat}"]
        generated = record["tokens"]
        first_token.append(generated[0] - record["requested"])
        chat_writes = [w for w in fake.writes if w.chat_id == chat]
        writes.append(len(chat_writes))
        first_text.append(next(w.at for w in chat_writes if "t000" in w.text) - asked[chat])
        visible_at: list[float] = []
        for w in chat_writes:  # the text only grows: each write shows a prefix of the tokens
            shown = len([word for word in w.text.split() if word.startswith("t")])
            while len(visible_at) < min(shown, len(generated)):
                visible_at.append(w.at)
        delays += [v - g for v, g in zip(visible_at, generated)]
        tails.append(chat_writes[-1].at - generated[-1])
        complete += fake.messages(chat)[-1].text == expected and len(generated) == tokens
    if fake.flood_hits:  # which of the fake's limits was hit: overall, chat or group
        print(f"N={n}: 429s by limit: {sorted({scope for _, _, scope in fake.flood_hits})}", file=sys.stderr)
    return {
        "n": n,
        "writes_per_reply": statistics.mean(writes),
        "429s": sum(1 for _, code, _ in fake.errors if code == 429),
        "first_text_p50": statistics.median(first_text),
        "first_text_max": max(first_text),
        "model_first_token_p50": statistics.median(first_token),
        "visible_p50": statistics.median(delays),
        "visible_p95": percentile(delays, 95),
        "last_to_final_p50": statistics.median(tails),
        "last_to_final_max": max(tails),
        "complete": f"{complete}/{n}",
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, nargs="+", default=[1, 10, 50])
    parser.add_argument("--tokens", type=int, default=500)
    parser.add_argument("--every", type=float, default=0.02, help="seconds per token")
    parser.add_argument("--jitter", type=float, nargs=2, default=(0.003, 0.060), metavar=("MIN", "MAX"),
                        help="seconds each Bot API request takes, at random")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)  # a 429 is reported in the table, not per chat
    print(f"answer: {args.tokens} tokens x {args.every * 1000:.0f} ms; Bot API jitter {args.jitter[0] * 1000:.0f}-"
          f"{args.jitter[1] * 1000:.0f} ms; limits 1/s per chat, 30/s overall")
    print(f"{'N':>4} {'writes/reply':>12} {'429s':>5} {'1st text p50':>12} {'1st text max':>12} {'model 1st tok':>13} "
          f"{'visible p50':>11} {'visible p95':>11} {'last→final p50':>14} {'max':>6} {'complete':>8}")
    with PacedServer(tokens=args.tokens, every=args.every) as server:
        for n in args.n:
            r = await run(n, server, tuple(args.jitter))
            print(
                f"{r['n']:>4} {r['writes_per_reply']:>12.1f} {r['429s']:>5} {r['first_text_p50']:>11.2f}s "
                f"{r['first_text_max']:>11.2f}s {r['model_first_token_p50']:>12.3f}s {r['visible_p50']:>10.2f}s "
                f"{r['visible_p95']:>10.2f}s {r['last_to_final_p50']:>13.2f}s {r['last_to_final_max']:>5.2f}s "
                f"{r['complete']:>8}",
                flush=True,
            )


if __name__ == "__main__":
    asyncio.run(main())

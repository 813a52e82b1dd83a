"""Discord streaming under load: N users run /chat at once in one channel; every model role is
on the `openai` backend, served by a model server in another process that streams a 500-token
answer at one token per 20 ms (bench/paced_server.py); every other setting is the default.
The fake Discord enforces 5 writes per 5 s per channel, 5 per 2 s per interaction token and
50 bot-token requests in any second (interaction routes are exempt, as Discord documents;
`--global-routes all` counts them too, stricter than Discord), and takes a random 3-60 ms per
request.

Reports per N: time to defer (goal p99 ≤ 500 ms), writes per reply after the defer, 429s,
message → first answer text (the interaction reaching the bot → the first write showing answer
text; compare the model's own first token), token → visible delay, complete replies.
Goals: 0 × 429; first text at N=1 ≤ the model's first token + 0.3 s, at N=50 p50 ≤ 2 s; token →
visible p50 ≤ 0.6 s; every reply complete.

    .venv/bin/python bench/discord_streaming.py [--n 1 10 50] [--tokens 500] [--every 0.02] [--global-routes all]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.paced_server import PacedServer, openai_settings  # noqa: E402
from bot.app import App  # noqa: E402
from bot.config import Settings  # noqa: E402
from tests.discord_harness import answer_text, is_done, running  # noqa: E402
from tests.fake_discord import FakeDiscord  # noqa: E402


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))] if values else float("nan")


async def bench_once(n: int, server: PacedServer, jitter: tuple[float, float], global_routes: str) -> dict[str, float]:
    tokens = server.tokens
    with tempfile.TemporaryDirectory() as tmp:
        fake = FakeDiscord(jitter=jitter, global_routes=global_routes)
        settings = Settings(_env_file=None, data_dir=Path(tmp), discord_bot_token=fake.token, **openai_settings(server))
        app = App(settings)
        async with fake, running(app, fake):
            users = [fake.add_user(f"user{i}") for i in range(n)]
            interactions = await asyncio.gather(
                *(fake.slash("chat", u, prompt=f"q{n}-{i}") for i, u in enumerate(users))
            )
            await fake.wait_for(lambda: all(i.messages and is_done(i.messages[-1]) for i in interactions), "all answers")
        app.store.close()
    times = server.times()
    expected = " ".join(f"t{i:03d}" for i in range(tokens))
    defers, writes, first_text, first_token, delays, complete = [], [], [], [], [], 0
    for i, interaction in enumerate(interactions):
        record = times[f"q{n}-{i}"]
        generated = record["tokens"]
        first_token.append(generated[0] - record["requested"])
        defers.append(interaction.acked_at - interaction.dispatched_at)
        all_writes = sorted((w for m in interaction.messages for w in m.writes), key=lambda w: w.at)
        writes.append(len(all_writes) - 1)  # after the "thinking…" placeholder
        first_text.append(next(w.at for w in all_writes if "t000" in w.content) - interaction.dispatched_at)
        shown: dict[str, float] = {}
        for w in all_writes:
            for word in w.content.split():
                shown.setdefault(word, w.at)
        delays += [shown[f"t{k:03d}"] - at for k, at in enumerate(generated) if f"t{k:03d}" in shown]
        text = " ".join(answer_text(interaction.messages).split())
        complete += text == expected and len(generated) == tokens
    return {
        "n": n, "defer_p50_ms": 1000 * statistics.median(defers), "defer_p99_ms": 1000 * pct(defers, 0.99),
        "writes_per_reply": statistics.mean(writes), "http_429": fake.rate_limited,
        "first_text_p50": statistics.median(first_text), "first_text_max": max(first_text),
        "model_first_token_p50": statistics.median(first_token),
        "visible_p50": statistics.median(delays), "visible_p90": pct(delays, 0.9),
        "errors": len(fake.errors), "complete": f"{complete}/{n}",
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, nargs="+", default=[1, 10, 50])
    parser.add_argument("--tokens", type=int, default=500)
    parser.add_argument("--every", type=float, default=0.02, help="seconds per token")
    parser.add_argument("--jitter", type=float, nargs=2, default=(0.003, 0.060), metavar=("MIN", "MAX"),
                        help="seconds each REST request takes, at random")
    parser.add_argument("--global-routes", choices=("bot", "all"), default="bot",
                        help="what the 50/s overall cap counts: bot-token requests (Discord's rule) or all")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    print(f"answer: {args.tokens} tokens x {args.every * 1000:.0f} ms; REST jitter {args.jitter[0] * 1000:.0f}-"
          f"{args.jitter[1] * 1000:.0f} ms; limits 5/5 s per channel, 5/2 s per token, 50/s overall "
          f"({'bot-token requests' if args.global_routes == 'bot' else 'all requests, interaction routes included'})")
    print(f"{'N':>4} {'defer p50':>10} {'defer p99':>10} {'writes/reply':>12} {'429s':>5} {'1st text p50':>12} "
          f"{'1st text max':>12} {'model 1st tok':>13} {'visible p50':>11} {'visible p90':>11} {'errors':>6} {'complete':>8}")
    with PacedServer(tokens=args.tokens, every=args.every) as server:
        for n in args.n:
            r = await bench_once(n, server, tuple(args.jitter), args.global_routes)
            print(
                f"{r['n']:>4} {r['defer_p50_ms']:>8.1f}ms {r['defer_p99_ms']:>8.1f}ms {r['writes_per_reply']:>12.1f} "
                f"{r['http_429']:>5} {r['first_text_p50']:>11.2f}s {r['first_text_max']:>11.2f}s "
                f"{r['model_first_token_p50']:>12.3f}s {r['visible_p50']:>10.2f}s {r['visible_p90']:>10.2f}s "
                f"{r['errors']:>6} {r['complete']:>8}",
                flush=True,
            )


if __name__ == "__main__":
    asyncio.run(main())

"""Bench: N concurrent slash commands through the real Discord adapter against the fake Discord.

The model is a stand-in that really takes 20 ms per token on a worker thread (like the
transformers backend), served `--slots` at a time, so with N > slots the model is busy and the
rest queue. Measured per N:
- time to defer: INTERACTION_CREATE sent → deferral received by the fake (goal p99 ≤ 500 ms);
- edits per reply: writes to each response after the "thinking…" placeholder;
- token-to-visible delay: a token leaves the model → the fake holds a message showing it
  (goal median ≤ 1.2 s);
- 429s answered by the fake (goal 0) and any other errors.

Run: .venv/bin/python bench/discord_streaming.py [--n 1 10 50] [--tokens 100] [--slots 8] [--spin]
(--spin spends each token's 20 ms computing in Python on the worker thread, holding the GIL the
way an in-process model does, instead of sleeping.)
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bot.app import App, role_specs  # noqa: E402
from bot.config import Settings  # noqa: E402
from models.base import Cancel, Capabilities, ChatMessage, GenerationParams, StreamStats  # noqa: E402
from models.registry import ModelHub  # noqa: E402
from tests.discord_harness import is_done, running  # noqa: E402
from tests.fake_discord import FakeDiscord  # noqa: E402

TOKEN_SECONDS = 0.020


class SleepyBackend:
    """Answers "<q>-t0 <q>-t1 …" for the question <q>, one token per 20 ms, on a thread.
    Records when each token was emitted, keyed by the question."""

    name = "sleepy"
    context_window = 8192
    capabilities = Capabilities()

    def __init__(self, tokens: int, spin: bool = False) -> None:
        self.tokens = tokens
        self.spin = spin  # burn the 20 ms in Python (holding the GIL, like a busy in-process model)
        self.emitted: dict[str, list[float]] = {}

    def count_tokens(self, messages: list[ChatMessage]) -> int:
        return sum(len(m.content.split()) for m in messages)

    async def stream(self, messages: list[ChatMessage], *, params: GenerationParams, cancel: Cancel,
                     stats: StreamStats | None = None):
        question = messages[-1].content
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[str | None] = asyncio.Queue()
        times = self.emitted.setdefault(question, [])

        def generate() -> None:
            for i in range(self.tokens):
                if cancel.is_set:
                    break
                if self.spin:
                    until = time.monotonic() + TOKEN_SECONDS
                    while time.monotonic() < until:
                        pass
                else:
                    time.sleep(TOKEN_SECONDS)
                times.append(time.monotonic())
                loop.call_soon_threadsafe(queue.put_nowait, f"{question}-t{i} ")
            loop.call_soon_threadsafe(queue.put_nowait, None)

        threading.Thread(target=generate, daemon=True).start()
        while (token := await queue.get()) is not None:
            yield token


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))] if values else float("nan")


async def bench_once(n: int, tokens: int, slots: int, spin: bool = False) -> dict[str, float]:
    backend = SleepyBackend(tokens, spin)
    with tempfile.TemporaryDirectory() as tmp:
        fake = FakeDiscord()
        settings = Settings(
            _env_file=None, data_dir=Path(tmp), discord_bot_token=fake.token, max_concurrent_generations=slots,
            rate_limit_messages=1000, rate_limit_per_minute=1000,
        )
        app = App(settings, hub=ModelHub(role_specs(settings), factory=lambda spec: backend))
        async with fake, running(app, fake):
            users = [fake.add_user(f"user{i}") for i in range(n)]
            started = time.monotonic()
            interactions = await asyncio.gather(*(fake.slash("chat", u, prompt=f"q{i}") for i, u in enumerate(users)))
            await fake.wait_for(lambda: all(i.messages and is_done(i.messages[-1]) for i in interactions), "all answers")
            elapsed = time.monotonic() - started
        app.store.close()
    defers = [i.acked_at - i.dispatched_at for i in interactions]
    edits = [len(i.original.writes) - 1 for i in interactions]
    delays: list[float] = []
    for i, interaction in enumerate(interactions):
        writes = interaction.original.writes
        for k, emitted_at in enumerate(backend.emitted[f"q{i}"]):
            marker = f"q{i}-t{k} "
            shown = next((w.at for w in writes if marker in w.content), None)
            if shown is not None:
                delays.append(shown - emitted_at)
    return {
        "n": n, "defer_p50_ms": 1000 * statistics.median(defers), "defer_p99_ms": 1000 * pct(defers, 0.99),
        "defer_max_ms": 1000 * max(defers), "edits_per_reply": statistics.mean(edits),
        "visible_p50_s": statistics.median(delays), "visible_p90_s": pct(delays, 0.9),
        "http_429": fake.rate_limited, "errors": len(fake.errors), "wall_s": elapsed,
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, nargs="+", default=[1, 10, 50])
    parser.add_argument("--tokens", type=int, default=100, help="tokens per answer (20 ms each)")
    parser.add_argument("--slots", type=int, default=8, help="generations the model runs at once")
    parser.add_argument("--spin", action="store_true", help="spend each token's 20 ms in Python, holding the GIL")
    args = parser.parse_args()
    how = "busy-looping (GIL held)" if args.spin else "sleeping"
    print(f"answer: {args.tokens} tokens x {TOKEN_SECONDS * 1000:.0f} ms {how}, model slots: {args.slots}")
    header = f"{'N':>4} {'defer p50':>10} {'defer p99':>10} {'defer max':>10} {'edits/reply':>12} {'visible p50':>12} {'visible p90':>12} {'429s':>5} {'errors':>6} {'wall':>7}"
    print(header)
    for n in args.n:
        r = await bench_once(n, args.tokens, args.slots, args.spin)
        print(
            f"{r['n']:>4} {r['defer_p50_ms']:>8.1f}ms {r['defer_p99_ms']:>8.1f}ms {r['defer_max_ms']:>8.1f}ms "
            f"{r['edits_per_reply']:>12.1f} {r['visible_p50_s']:>11.2f}s {r['visible_p90_s']:>11.2f}s "
            f"{r['http_429']:>5} {r['errors']:>6} {r['wall_s']:>6.1f}s"
        )


if __name__ == "__main__":
    asyncio.run(main())

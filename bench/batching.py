"""Continuous batching: how many tokens per second one in-process model gives N users at once.

For each random-weight model (greedy, end-of-turn suppressed so every answer has exactly
--tokens tokens), in one process, alternating runs:
- ceiling: raw `model.generate` on a batch of N equal prompts (the same prompt ids the bot
  sends), timed in the bot's generation process on the same model object (bench/baselines.py);
- bot: N users ask at the same moment through `App.handle` (the model in its generation
  process by default), each on a surface that takes every edit at once.
It prints aggregate tokens/s (all users), per-user tokens/s (medians), bot ÷ ceiling (the median
of adjacent pairs' ratios), and the time to first token of a request that arrives while 7
others stream, against that request's own prefill (one forward of its prompt, alone) + 2 decode
steps of a batch of 8 (from the ceiling run). Goals (2-core CPU): bot ÷ ceiling ≥ 0.8 at N = 8; late first token ≤ prefill +
2 steps. On a GPU (InternLM2-1.8B shape, bf16): aggregate at N = 16 ≥ 10 × N = 1.

    .venv/bin/python bench/batching.py [--models wide,deep] [--users 1,2,4,8,16] [--tokens 64]
    python bench/batching.py --models internlm2-1.8b --device cuda --dtype bfloat16 --users 1,16
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the bench trains a tokenizer, then starts processes

import torch  # noqa: E402

import baselines  # noqa: E402  (bench/baselines.py: raw generate where the model lives)
import streaming as streaming_bench  # noqa: E402  (bench/streaming.py: tokenizer and random models)
from bot.app import App  # noqa: E402
from bot.config import Settings  # noqa: E402
from bot.messages import Incoming, SurfaceLimits  # noqa: E402

MODELS = {
    "wide": dict(hidden=1024, layers=6),  # bench/streaming.py's model: compute-bound on a CPU
    "deep": dict(hidden=128, layers=96),  # per-op overhead bound, like a 1.8B model on a GPU (32 layers: ~6 ms/token here)
    "internlm2-1.8b": streaming_bench.INTERNLM2_1_8B,
}
QUESTION = "code"


class TimingSurface:
    """Takes every edit at once; notes when the answer's first text and its end arrive."""

    limits = SurfaceLimits(10**9, 0.0)

    def __init__(self) -> None:
        self.first = 0.0
        self.done = 0.0

    async def post(self, text: str, *, phase: str) -> int:
        self._seen(phase)
        return 0

    async def edit(self, handle, text: str, *, phase: str) -> None:
        self._seen(phase)

    def _seen(self, phase: str) -> None:
        now = time.perf_counter()
        if phase != "status" and not self.first:
            self.first = now
        if phase == "done":
            self.done = now

    async def typing(self) -> None:
        pass


class Bench:
    def __init__(self, path: Path, args, data_dir: Path) -> None:
        settings = Settings(
            _env_file=None, chat_model=str(path), data_dir=data_dir, device=args.device, dtype=args.dtype,
            temperature=0.0, max_new_tokens=args.tokens, max_context_tokens=4096, rate_limit_messages=10**6,
            max_concurrent_generations=max(max(args.users), 8), generation_host=args.host,
        )
        self.app = App(settings)
        self.loop = asyncio.new_event_loop()
        self.tokens = args.tokens
        self.asked = 0
        self.ask_all(1)  # load and warm up
        self.model = self.app.hub.get("chat")
        self.backend = self.model.backend
        self.prompt_ids = self.backend.encode(self.model.last_prompt)
        self.device = self.backend.device
        self.raw_batch(1)  # warm up the baseline too

    def close(self) -> None:
        self.app.hub.close()
        self.loop.close()
        self.app.store.close()

    # -- the bot -------------------------------------------------------------------------------
    def _user(self) -> Incoming:
        self.asked += 1  # a new user each time: no history, the same prompt
        return Incoming(platform="bench", chat_id=f"c{self.asked}", user_id=f"u{self.asked}", text=QUESTION)

    def ask_all(self, n: int) -> tuple[float, float]:
        """(aggregate tokens/s, median per-user tokens/s) of n users asking at once."""
        async def go():
            surfaces = [TimingSurface() for _ in range(n)]
            before = self.app.hub.get("chat").backend.metrics.tokens if self.app.hub.loaded else 0
            started = time.perf_counter()
            await asyncio.gather(*(self.app.handle(self._user(), s) for s in surfaces))
            elapsed = time.perf_counter() - started
            produced = self.app.hub.get("chat").backend.metrics.tokens - before
            per_user = statistics.median(self.tokens / (s.done - started) for s in surfaces)
            return produced / elapsed, per_user
        return self.loop.run_until_complete(go())

    def late_arrival(self, streaming: int = 7) -> float:
        """First-token latency of a request that arrives while `streaming` others stream."""
        async def go():
            others = [TimingSurface() for _ in range(streaming)]
            keys, tasks = [], []
            persona = self.app.personas["internlm"]  # the others answer for as long as it takes
            self.app.personas["internlm"] = replace(persona, params=persona.params.with_(max_new_tokens=100 * self.tokens))
            for surface in others:
                incoming = self._user()
                keys.append(self.app.session_key(incoming))
                tasks.append(asyncio.create_task(self.app.handle(incoming, surface)))
            while not all(s.first for s in others):
                await asyncio.sleep(0.005)
            self.app.personas["internlm"] = persona
            steps = self.backend.metrics.steps
            while self.backend.metrics.steps < steps + 3:  # a few steps into their answers
                await asyncio.sleep(0.005)
            late = TimingSurface()
            asked = time.perf_counter()
            await self.app.handle(self._user(), late)
            for key in keys:
                self.app.stop(key)
            await asyncio.gather(*tasks)
            return late.first - asked
        return self.loop.run_until_complete(go())

    # -- the ceiling ---------------------------------------------------------------------------
    def raw_batch(self, n: int) -> tuple[float, float]:
        """(aggregate tokens/s, seconds per decode step) of generate on n equal prompts, timed in
        the process where the bot's model lives, on that model object (bench/baselines.py)."""
        elapsed, produced = self.in_worker(baselines.generate_batch, self.prompt_ids, n, self.tokens, self.backend.eos_ids)
        return produced / elapsed, (elapsed - self.prefill()) / self.tokens

    def prefill(self) -> float:
        return self.in_worker(baselines.prefill_seconds, self.prompt_ids)

    def in_worker(self, fn, *args):
        return self.loop.run_until_complete(self.backend.call_in_worker(fn, *args))


def bench_model(name: str, path: Path, params: int, args, data_dir: Path) -> list[str]:
    bench = Bench(path, args, data_dir)
    lines = [f"{name}: random Llama {params / 1e6:.0f}M, prompt {len(bench.prompt_ids)} tokens, "
             f"{args.tokens} tokens per answer, {bench.backend.host_kind} host, median of {args.repeats}"]
    lines.append(f"{'N':>3} {'ceiling tok/s':>14} {'bot tok/s':>10} {'bot/ceiling':>12} {'per-user bot':>13} "
                 f"{'per-user ceiling':>17} {'bot ×N=1':>9}")
    base = None
    step8 = None
    try:
        for n in args.users:
            raw, bot, per_user, step = [], [], [], []
            for _ in range(args.repeats):
                tps, seconds = bench.raw_batch(n)
                raw.append(tps)
                step.append(seconds)
                agg, user = bench.ask_all(n)
                bot.append(agg)
                per_user.append(user)
            r, b = statistics.median(raw), statistics.median(bot)
            ratio = statistics.median(y / x for x, y in zip(raw, bot))  # adjacent runs share the machine's load
            base = base or b
            if n == 8:
                step8 = statistics.median(step)
            lines.append(f"{n:>3} {r:>14.1f} {b:>10.1f} {ratio:>12.3f} {statistics.median(per_user):>13.1f} "
                         f"{r / n:>17.1f} {b / base:>9.2f}")
            print(lines[-1], flush=True)
        if args.late:
            step8 = step8 or statistics.median(bench.raw_batch(8)[1] for _ in range(args.repeats))
            late = []
            for _ in range(args.repeats):  # each arrival against its own prefill, measured next to it
                ttft, prefill = bench.late_arrival(), bench.prefill()
                late.append((ttft / (prefill + 2 * step8), ttft, prefill))
            ratio_late, ttft, prefill = sorted(late)[len(late) // 2]
            goal = prefill + 2 * step8
            lines.append(f"late arrival (7 streaming): first token {1000 * ttft:.1f} ms; its prefill {1000 * prefill:.1f} ms "
                         f"+ 2 decode steps at batch 8 ({1000 * step8:.1f} ms each) = {1000 * goal:.1f} ms; "
                         f"ratio {ratio_late:.2f} (goal ≤ 1)")
            print(lines[-1], flush=True)
    finally:
        bench.close()
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="wide,deep", help=f"comma list of {', '.join(MODELS)}")
    parser.add_argument("--users", default="1,2,4,8,16", help="comma list of N")
    parser.add_argument("--tokens", type=int, default=64, help="tokens per answer")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--host", default="process", choices=["process", "thread"])
    parser.add_argument("--no-late", dest="late", action="store_false", help="skip the late-arrival measurement")
    parser.add_argument("--hidden", type=int, help="override the models' width (quick dry runs)")
    parser.add_argument("--layers", type=int, help="override the models' depth (quick dry runs)")
    args = parser.parse_args()
    args.users = [int(n) for n in args.users.split(",")]
    if args.device == "cpu":
        torch.set_num_threads(min(2, os.cpu_count() or 1))
    where = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU, {torch.get_num_threads()} threads"
    print(f"torch {torch.__version__}, {where}, dtype {args.dtype}", flush=True)
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer_dir = streaming_bench.bench_tokenizer(Path(tmp) / "tokenizer")
        for name in args.models.split(","):
            shape = dict(MODELS[name])
            shape.update({k: v for k, v in (("hidden", args.hidden), ("layers", args.layers)) if v})
            if args.hidden:
                shape.pop("heads", None), shape.pop("kv_heads", None), shape.pop("intermediate", None)
            path, params = streaming_bench.random_model(tokenizer_dir, Path(tmp) / name, **shape)
            out += bench_model(name, path, params, args, Path(tmp) / f"data-{name}") + [""]
    print("\n".join(out))


if __name__ == "__main__":
    main()

"""Streaming overhead of the whole bot path against raw `model.generate`, in one process.

For each model (the tiny test model, and a random-weight Llama sized to take ~20 ms per token
on this CPU) it measures, alternating runs to share any drift:
- raw: `model.generate` with a streamer on the same prompt ids, greedy, a fixed token count;
- bot: `App.handle` through the console adapter with output discarded (same persona prompt).
It prints tokens/s of each, their ratio (goal ≥ 0.97) and the bot's added first-token latency
(goal ≤ 20 ms).

With --metrics it also runs the bot path with metrics on (the status server up, every figure
recorded, and a client scraping /metrics and polling the status page's /api/status every
second, as Prometheus and an open page would) against metrics off (METRICS_PORT empty), on the
same loaded model, alternating, and prints their tokens/s ratio (goal ≥ 0.99).

    .venv/bin/python bench/streaming.py [--tokens 200] [--repeats 3] [--metrics]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM  # noqa: E402

from adapters.console import ConsoleAdapter  # noqa: E402
from bot.app import App  # noqa: E402
from bot.config import Settings  # noqa: E402
from bot.status_server import StatusServer  # noqa: E402
from tests import tiny_models  # noqa: E402


# InternLM2-Chat-1.8B's shape: 24 layers, hidden 2048, 16 query / 8 key-value heads, FFN 8192.
INTERNLM2_1_8B = dict(hidden=2048, layers=24, heads=16, kv_heads=8, intermediate=8192)


def bench_tokenizer(out: Path) -> Path:
    """The test tokenizer (InternLM2 special tokens and chat template), trained in a second."""
    corpus = [tiny_models.INTERNLM_SYSTEM_PROMPT, tiny_models.CODE_HEADER, tiny_models.CODE_LINE * 3, "ping pong"]
    tiny_models.build_tokenizer(corpus, whole=corpus).save_pretrained(out)
    return out


def random_model(tokenizer_dir: Path, out: Path, hidden: int, layers: int, heads: int = 0, kv_heads: int = 0, intermediate: int = 0) -> tuple[Path, int]:
    """A Llama with random weights and the tiny tokenizer; end-of-turn logits suppressed so
    every greedy run produces exactly the requested number of tokens."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=intermediate or hidden * 11 // 4,
        num_hidden_layers=layers, num_attention_heads=heads or hidden // 64, num_key_value_heads=kv_heads or heads or hidden // 64,
        max_position_embeddings=4096, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # a zero row gives logit 0; the best of thousands of random logits is > 0
        for token in (tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")):
            model.lm_head.weight[token] = 0.0
    params = sum(p.numel() for p in model.parameters())
    model.to(torch.bfloat16).save_pretrained(out)  # half the bytes to write; loads in any dtype
    tokenizer.save_pretrained(out)
    return out, params


def raw_run(backend, prompt_ids: list[int], tokens: int) -> tuple[float, float]:
    """(tokens/s, first-token latency) of model.generate with a plain streamer."""
    first: list[float] = []

    class Streamer:
        seen_prompt = False

        def put(self, value):
            if not self.seen_prompt:
                self.seen_prompt = True
                return
            if not first:
                first.append(time.perf_counter())

        def end(self):
            pass

    ids = torch.tensor([prompt_ids], device=backend.device)
    started = time.perf_counter()
    with torch.inference_mode():
        out = backend.model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens, do_sample=False,
            eos_token_id=backend.eos_ids, pad_token_id=backend.eos_ids[0], streamer=Streamer(),
            temperature=None, top_p=None, top_k=None,
        )
    elapsed = time.perf_counter() - started
    produced = out.shape[1] - ids.shape[1]
    return produced / elapsed, first[0] - started


async def bot_run(app: App, text: str) -> tuple[float, float, int]:
    """(tokens/s, first-text latency, tokens) through App + console adapter, output discarded."""
    out = _FirstWrite()
    adapter = ConsoleAdapter(app, stdin=io.StringIO(text + "\n"), out=out, err=io.StringIO())
    started = time.perf_counter()
    await adapter.run()
    elapsed = time.perf_counter() - started
    stats = app.hub.get("chat").last_stats
    return stats.completion_tokens / elapsed, out.first - started, stats.completion_tokens


async def bot_run_watched(app: App, text: str, every: float = 1.0) -> tuple[float, float, int]:
    """bot_run with the status server up and a client scraping it every `every` seconds."""
    import aiohttp

    server = await StatusServer(app, "127.0.0.1", 0).start()
    base = f"http://127.0.0.1:{server.port}"
    scrapes = 0

    async def scrape() -> None:
        nonlocal scrapes
        async with aiohttp.ClientSession() as http:
            while True:
                for path in ("/metrics", "/api/status"):
                    async with http.get(base + path) as response:
                        await response.read()
                        scrapes += response.status == 200
                await asyncio.sleep(every)

    scraper = asyncio.create_task(scrape())
    try:
        return await bot_run(app, text)
    finally:
        scraper.cancel()
        await asyncio.gather(scraper, return_exceptions=True)
        await server.stop()
        assert scrapes, "the status server was never scraped"


def metrics_costs(app: App, calls_per_answer: int = 12, rounds: int = 2000) -> tuple[float, float]:
    """(µs of recording per answer, ms per scrape of /metrics + /api/status): the CPU the
    metrics add, measured directly (steadier than a tokens/s ratio on a busy machine)."""
    from bot.status_data import status_snapshot

    metrics = app.metrics
    started = time.perf_counter()
    for i in range(rounds):  # what one answer records: its outcome, its timings, its API calls
        metrics.request("console", "internlm", "answered", f"console:{i % 50}")
        metrics.answer("console", "internlm", f"console:{i % 50}", first_text=0.2, total=3.0, edits=10, tokens=200, agent=False)
        for _ in range(calls_per_answer):
            metrics.api_call("console", "editMessageText", "ok")
    record_us = (time.perf_counter() - started) / rounds * 1e6
    loop = asyncio.new_event_loop()
    started = time.perf_counter()
    for _ in range(50):
        metrics.exposition()
        loop.run_until_complete(status_snapshot(app, started=0.0))
    loop.close()
    return record_us, (time.perf_counter() - started) / 50 * 1000


class _FirstWrite(io.TextIOBase):
    first: float = 0.0

    def write(self, text: str) -> int:
        if not self.first and text.strip():
            self.first = time.perf_counter()
        return len(text)


def bench_model(
    label: str, path: Path, tokens: int, repeats: int, data_dir: Path, device: str = "cpu", dtype: str = "auto",
    metrics: bool = False,
) -> dict:
    settings = Settings(
        _env_file=None, chat_model=str(path), data_dir=data_dir, device=device, dtype=dtype, temperature=0.0,
        max_new_tokens=tokens, max_context_tokens=4096, rate_limit_messages=1000, metrics_port=None,
    )
    app = App(settings)  # metrics off (METRICS_PORT empty)
    watched = App(settings.model_copy(update={"metrics_port": 0, "data_dir": data_dir / "on"}), hub=app.hub) if metrics else None
    loop = asyncio.new_event_loop()
    loop.run_until_complete(bot_run(app, "/reset"))
    loop.run_until_complete(bot_run(app, "ping"))  # load + warm up
    backend = app.hub.get("chat").backend
    raw_tps, raw_first, bot_tps, bot_first, on_tps, off_tps = [], [], [], [], [], []
    question = "code"
    for repeat in range(repeats):
        if watched is not None:  # metrics on and off on the same loaded model, in turns
            for on in (True, False) if repeat % 2 == 0 else (False, True):
                loop.run_until_complete(bot_run(watched if on else app, "/reset"))
                runs = bot_run_watched(watched, question) if on else bot_run(app, question)
                (on_tps if on else off_tps).append(loop.run_until_complete(runs)[0])
        loop.run_until_complete(bot_run(app, "/reset"))
        tps, first, produced = loop.run_until_complete(bot_run(app, question))
        bot_tps.append(tps)
        bot_first.append(first)
        prompt = app.hub.get("chat").last_prompt
        tps, first = raw_run(backend, backend.encode(prompt), produced)
        raw_tps.append(tps)
        raw_first.append(first)
    loop.close()
    app.store.close()
    if watched is not None:
        watched.store.close()
    raw, bot = statistics.median(raw_tps), statistics.median(bot_tps)
    result = {
        "model": label,
        "tokens": produced,
        "ms/token (raw)": 1000 / raw,
        "raw tok/s": raw,
        "bot tok/s": bot,
        "ratio": bot / raw,
        "added first-token ms": 1000 * (statistics.median(bot_first) - statistics.median(raw_first)),
    }
    if watched is not None:
        result["metrics on tok/s"] = statistics.median(on_tps)
        result["metrics off tok/s"] = statistics.median(off_tps)
        result["metrics on/off"] = result["metrics on tok/s"] / result["metrics off tok/s"]
        record_us, scrape_ms = metrics_costs(watched)
        answer_s = tokens / result["metrics off tok/s"]
        result["recording µs/answer"] = record_us
        result["scrape ms"] = scrape_ms
        # share of one answer's time: its own recording plus one scrape per second while it runs
        result["metrics cost %"] = 100 * (record_us / 1e6 + answer_s * scrape_ms / 1000) / answer_s
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--hidden", type=int, default=1024, help="random model width")
    parser.add_argument("--layers", type=int, default=6, help="random model depth")
    parser.add_argument("--internlm2-1.8b", dest="internlm2", action="store_true", help="random model of InternLM2-1.8B's shape")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto", help="auto | bfloat16 | float16 | float32")
    parser.add_argument("--skip-tiny", action="store_true", help="only the random model (no tiny-model training)")
    parser.add_argument("--metrics", action="store_true", help="also compare metrics on (scraped every second) with metrics off")
    args = parser.parse_args()
    if args.device == "cpu":
        torch.set_num_threads(min(2, os.cpu_count() or 1))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        if args.skip_tiny:
            tokenizer_dir = bench_tokenizer(Path(tmp) / "tokenizer")
        else:
            tokenizer_dir = tiny_models.chat_model_path()
            rows.append(bench_model("tiny test model", tokenizer_dir, args.tokens, args.repeats, Path(tmp) / "d1", args.device, args.dtype, args.metrics))
        shape = INTERNLM2_1_8B if args.internlm2 else dict(hidden=args.hidden, layers=args.layers)
        big, params = random_model(tokenizer_dir, Path(tmp) / "random", **shape)
        label = f"random Llama {params / 1e6:.0f}M" + (" (InternLM2-1.8B shape)" if args.internlm2 else "")
        rows.append(bench_model(label, big, args.tokens, args.repeats, Path(tmp) / "d2", args.device, args.dtype, args.metrics))
    where = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU, {torch.get_num_threads()} threads"
    print(f"torch {torch.__version__}, {where}, dtype {args.dtype}, {args.tokens} tokens, median of {args.repeats}")
    header = list(rows[0])
    print(" | ".join(header))
    for row in rows:
        print(" | ".join(f"{v:.3f}" if isinstance(v, float) else str(v) for v in row.values()))


if __name__ == "__main__":
    main()

"""Streaming overhead of the whole bot path against raw `model.generate`, in one process.

For each model (the tiny test model, and a random-weight Llama sized to take ~20 ms per token
on this CPU) it measures, alternating runs to share any drift:
- raw: `model.generate` with a streamer on the same prompt ids, greedy, a fixed token count,
  timed in the process where the bot's model lives, on that model object (bench/baselines.py);
- bot: `App.handle` through the console adapter with output discarded (same persona prompt),
  the model in its generation process (`--host thread`: on a thread of this process).
It prints tokens/s of each, their ratio (goal ≥ 0.97) and the bot's added first-token latency
(goal ≤ 20 ms).

With --metrics it also runs the bot path with metrics on (the status server up, every figure
recorded, and another process fetching /metrics and the status page's /api/status every 5 s,
as an open status page does (Prometheus' default is every 15 s); --scrape-every changes it) against metrics off (METRICS_PORT empty), on the
same loaded model, alternating, and prints their ratio of tokens per second and of tokens per
CPU-second of the bot process (goal ≥ 0.99; the CPU ratio is the one that holds still on a
shared machine), and the metrics' own cost measured directly.

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
sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the bench trains a tokenizer, then starts processes

import torch  # noqa: E402
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM  # noqa: E402

import baselines  # noqa: E402  (bench/baselines.py)
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
    cache = os.environ.get("BENCH_MODEL_CACHE")  # reuse across bench scripts (bench/gpu_all.sh)
    if cache:
        out = Path(cache) / f"llama-{hidden}x{layers}-h{heads}-kv{kv_heads}-ff{intermediate}-v{len(tokenizer)}"
        if (out / "params.txt").exists():
            return out, int((out / "params.txt").read_text())
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
    (out / "params.txt").write_text(str(params))
    return out, params


def raw_run(loop, backend, prompt_ids: list[int], tokens: int) -> tuple[float, float]:
    """(tokens/s, first-text latency) of model.generate, greedy, timed where the bot's model
    lives (its generation process), on the same model object. First text: the first token after
    which the answer has visible text, as the bot's console counts it (a random model may begin
    with whitespace or half a character; both paths then wait for more tokens)."""
    elapsed, times, ids = loop.run_until_complete(
        backend.call_in_worker(baselines.generate_timed, prompt_ids, tokens, backend.eos_ids))
    first = times[-1] if times else elapsed
    for n in range(1, len(ids) + 1):
        text = backend.tokenizer.decode(ids[:n], skip_special_tokens=True)
        if text.strip() and not text.endswith("\ufffd"):
            first = times[n - 1]
            break
    return len(ids) / elapsed, first


async def bot_run(app: App, text: str) -> tuple[float, float, int, float]:
    """(tokens/s, first-text latency, tokens, tokens per CPU-second of this process) through
    App + console adapter, output discarded. CPU time counts every thread of the process and
    nothing else, so it moves far less than wall time when other jobs share the machine."""
    out = _FirstWrite()
    adapter = ConsoleAdapter(app, stdin=io.StringIO(text + "\n"), out=out, err=io.StringIO())
    started, cpu = time.perf_counter(), time.process_time()
    await adapter.run()
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
    tokens = app.hub.get("chat").last_stats.completion_tokens
    return tokens / elapsed, out.first - started, tokens, tokens / cpu


# Scrapes like Prometheus and an open status page would, from its own process (its CPU is not
# the bot's), whenever the server is up; prints one line per round that got through.
SCRAPER = """
import sys, time, urllib.request
base, every = sys.argv[1], float(sys.argv[2])
while True:
    try:
        for path in ("/metrics", "/api/status"):
            urllib.request.urlopen(base + path, timeout=60).read()
        print("scraped", flush=True)
    except OSError:
        pass  # the server is down between runs
    time.sleep(every)
"""


class Scraped:
    """The status server of a metrics-on App, up only during its runs, and a scraper process
    started once (starting a process per run would cost this big process a fork each time)."""

    def __init__(self, app: App, every: float = 1.0) -> None:
        import socket
        import subprocess

        self.app = app
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.scraper = subprocess.Popen(
            [sys.executable, "-c", SCRAPER, f"http://127.0.0.1:{self.port}", str(every)], stdout=subprocess.PIPE, text=True,
        )

    async def run(self, text: str) -> tuple[float, float, int, float]:
        server = await StatusServer(self.app, "127.0.0.1", self.port).start()
        try:
            return await bot_run(self.app, text)
        finally:
            await server.stop()

    def close(self) -> int:
        """Stop the scraper; returns how many rounds it completed."""
        self.scraper.kill()
        out, _ = self.scraper.communicate()
        return out.count("scraped")


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
    metrics: bool = False, scrape_every: float = 5.0, host: str = "process",
) -> dict:
    settings = Settings(
        _env_file=None, chat_model=str(path), data_dir=data_dir, device=device, dtype=dtype, temperature=0.0,
        max_new_tokens=tokens, max_context_tokens=4096, rate_limit_messages=1000, metrics_port=None,
        generation_host=host,
    )
    app = App(settings)  # metrics off (METRICS_PORT empty)
    watched = App(settings.model_copy(update={"metrics_port": 0, "data_dir": data_dir / "on"}), hub=app.hub) if metrics else None
    scraped = Scraped(watched, scrape_every) if watched is not None else None
    loop = asyncio.new_event_loop()
    loop.run_until_complete(bot_run(app, "/reset"))
    loop.run_until_complete(bot_run(app, "ping"))  # load + warm up
    if watched is not None:  # the first readiness probe imports the hub clients: once per process
        from bot.status_data import status_snapshot

        loop.run_until_complete(status_snapshot(watched, started=0.0))
    backend = app.hub.get("chat").backend
    raw_tps, raw_first, bot_tps, bot_first, on_tps, off_tps, on_cpu, off_cpu = [], [], [], [], [], [], [], []
    question = "code"
    for repeat in range(-1, repeats):  # round -1, unmeasured: both paths see these shapes once
        if watched is not None and repeat >= 0:  # metrics on and off on the same loaded model, in turns
            for on in (True, False) if repeat % 2 == 0 else (False, True):
                loop.run_until_complete(bot_run(watched if on else app, "/reset"))
                runs = scraped.run(question) if on else bot_run(app, question)
                tps, _, _, per_cpu = loop.run_until_complete(runs)
                (on_tps if on else off_tps).append(tps)
                (on_cpu if on else off_cpu).append(per_cpu)
        loop.run_until_complete(bot_run(app, "/reset"))
        tps, first, produced, _ = loop.run_until_complete(bot_run(app, question))
        tps_raw, first_raw = raw_run(loop, backend, backend.encode(app.hub.get("chat").last_prompt), produced)
        if repeat >= 0:
            bot_tps.append(tps)
            bot_first.append(first)
            raw_tps.append(tps_raw)
            raw_first.append(first_raw)
    app.hub.close()
    loop.close()
    app.store.close()
    if watched is not None:
        watched.store.close()
        scrapes = scraped.close()
        assert scrapes >= 1, "the status server was never scraped"
    raw, bot = statistics.median(raw_tps), statistics.median(bot_tps)
    result = {
        "model": label,
        "host": backend.host_kind,
        "tokens": produced,
        "ms/token (raw)": 1000 / raw,
        "raw tok/s": raw,
        "bot tok/s": bot,
        "ratio": statistics.median(b / r for r, b in zip(raw_tps, bot_tps)),  # adjacent runs share the load
        "added first-token ms": 1000 * (statistics.median(bot_first) - statistics.median(raw_first)),
    }
    if watched is not None:
        result["metrics on tok/s"] = statistics.median(on_tps)
        result["metrics off tok/s"] = statistics.median(off_tps)
        result["metrics on/off"] = result["metrics on tok/s"] / result["metrics off tok/s"]
        result["metrics on/off per CPU-s"] = statistics.median(on_cpu) / statistics.median(off_cpu)
        record_us, scrape_ms = metrics_costs(watched)
        answer_s = tokens / result["metrics off tok/s"]
        result["recording µs/answer"] = record_us
        result["scrape ms"] = scrape_ms
        # share of one answer's time: its own recording plus the scrapes while it runs
        result["metrics cost %"] = 100 * (record_us / 1e6 + answer_s / scrape_every * scrape_ms / 1000) / answer_s
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
    parser.add_argument("--host", default="process", choices=["process", "thread"], help="where the bot's model generates")
    parser.add_argument("--metrics", action="store_true", help="also compare metrics on (and scraped) with metrics off")
    parser.add_argument("--scrape-every", type=float, default=5.0, help="seconds between scrapes with --metrics (the page polls every 5 s)")
    args = parser.parse_args()
    if args.device == "cpu":
        torch.set_num_threads(min(2, os.cpu_count() or 1))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        if args.skip_tiny:
            tokenizer_dir = bench_tokenizer(Path(tmp) / "tokenizer")
        else:
            tokenizer_dir = tiny_models.chat_model_path()
            rows.append(bench_model("tiny test model", tokenizer_dir, args.tokens, args.repeats, Path(tmp) / "d1", args.device, args.dtype, args.metrics, args.scrape_every,
                                    args.host))
        shape = INTERNLM2_1_8B if args.internlm2 else dict(hidden=args.hidden, layers=args.layers)
        big, params = random_model(tokenizer_dir, Path(tmp) / "random", **shape)
        label = f"random Llama {params / 1e6:.0f}M" + (" (InternLM2-1.8B shape)" if args.internlm2 else "")
        rows.append(bench_model(label, big, args.tokens, args.repeats, Path(tmp) / "d2", args.device, args.dtype, args.metrics, args.scrape_every,
                                    args.host))
    where = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU, {torch.get_num_threads()} threads"
    print(f"torch {torch.__version__}, {where}, dtype {args.dtype}, {args.tokens} tokens, median of {args.repeats}")
    header = list(rows[0])
    print(" | ".join(header))
    for row in rows:
        print(" | ".join(f"{v:.3f}" if isinstance(v, float) else str(v) for v in row.values()))


if __name__ == "__main__":
    main()

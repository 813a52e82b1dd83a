"""Streaming overhead of the whole bot path against raw `model.generate`, in one process.

For each model (the tiny test model, and a random-weight Llama sized to take ~20 ms per token
on this CPU) it measures, alternating runs to share any drift:
- raw: `model.generate` with a streamer on the same prompt ids, greedy, a fixed token count,
  timed in the process where the bot's model lives, on that model object (bench/baselines.py);
- bot: `App.handle` through the console adapter with output discarded (same persona prompt),
  the model in its generation process (`--host thread`: on a thread of this process).
It prints tokens/s of each, their ratio (goal ≥ 0.97) and the bot's added first-token latency
(goal ≤ 20 ms).

    .venv/bin/python bench/streaming.py [--tokens 200] [--repeats 3]
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


async def bot_run(app: App, text: str) -> tuple[float, float, int]:
    """(tokens/s, first-text latency, tokens) through App + console adapter, output discarded."""
    out = _FirstWrite()
    adapter = ConsoleAdapter(app, stdin=io.StringIO(text + "\n"), out=out, err=io.StringIO())
    started = time.perf_counter()
    await adapter.run()
    elapsed = time.perf_counter() - started
    stats = app.hub.get("chat").last_stats
    return stats.completion_tokens / elapsed, out.first - started, stats.completion_tokens


class _FirstWrite(io.TextIOBase):
    first: float = 0.0

    def write(self, text: str) -> int:
        if not self.first and text.strip():
            self.first = time.perf_counter()
        return len(text)


def bench_model(label: str, path: Path, tokens: int, repeats: int, data_dir: Path, device: str = "cpu", dtype: str = "auto",
                host: str = "process") -> dict:
    settings = Settings(
        _env_file=None, chat_model=str(path), data_dir=data_dir, device=device, dtype=dtype, temperature=0.0,
        max_new_tokens=tokens, max_context_tokens=4096, rate_limit_messages=1000, generation_host=host,
    )
    app = App(settings)
    loop = asyncio.new_event_loop()
    loop.run_until_complete(bot_run(app, "/reset"))
    loop.run_until_complete(bot_run(app, "ping"))  # load + warm up
    backend = app.hub.get("chat").backend
    raw_tps, raw_first, bot_tps, bot_first = [], [], [], []
    question = "code"
    for warm_up in (True,) + (False,) * repeats:  # one unmeasured round: both paths see these shapes once
        loop.run_until_complete(bot_run(app, "/reset"))
        tps, first, produced = loop.run_until_complete(bot_run(app, question))
        tps_raw, first_raw = raw_run(loop, backend, backend.encode(app.hub.get("chat").last_prompt), produced)
        if not warm_up:
            bot_tps.append(tps)
            bot_first.append(first)
            raw_tps.append(tps_raw)
            raw_first.append(first_raw)
    app.hub.close()
    loop.close()
    app.store.close()
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
    args = parser.parse_args()
    if args.device == "cpu":
        torch.set_num_threads(min(2, os.cpu_count() or 1))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        if args.skip_tiny:
            tokenizer_dir = bench_tokenizer(Path(tmp) / "tokenizer")
        else:
            tokenizer_dir = tiny_models.chat_model_path()
            rows.append(bench_model("tiny test model", tokenizer_dir, args.tokens, args.repeats, Path(tmp) / "d1", args.device, args.dtype,
                                    args.host))
        shape = INTERNLM2_1_8B if args.internlm2 else dict(hidden=args.hidden, layers=args.layers)
        big, params = random_model(tokenizer_dir, Path(tmp) / "random", **shape)
        label = f"random Llama {params / 1e6:.0f}M" + (" (InternLM2-1.8B shape)" if args.internlm2 else "")
        rows.append(bench_model(label, big, args.tokens, args.repeats, Path(tmp) / "d2", args.device, args.dtype, args.host))
    where = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU, {torch.get_num_threads()} threads"
    print(f"torch {torch.__version__}, {where}, dtype {args.dtype}, {args.tokens} tokens, median of {args.repeats}")
    header = list(rows[0])
    print(" | ".join(header))
    for row in rows:
        print(" | ".join(f"{v:.3f}" if isinstance(v, float) else str(v) for v in row.values()))


if __name__ == "__main__":
    main()

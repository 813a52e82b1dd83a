"""Streaming overhead of the whole bot path against raw `model.generate`, in one process.

For each model (the tiny test model, and a random-weight Llama sized to take ~20 ms per token
on this CPU) it measures, alternating runs to share any drift:
- raw: `model.generate` with a streamer on the same prompt ids, greedy, a fixed token count;
- bot: `App.handle` through the console adapter with output discarded (same persona prompt).
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
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM  # noqa: E402

from adapters.console import ConsoleAdapter  # noqa: E402
from bot.app import App  # noqa: E402
from bot.config import Settings  # noqa: E402
from tests import tiny_models  # noqa: E402


def random_model(tokenizer_dir: Path, out: Path, hidden: int, layers: int) -> Path:
    """A Llama with random weights and the tiny tokenizer; end-of-turn logits suppressed so
    every run produces exactly the requested number of tokens."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 11 // 4,
        num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64,
        max_position_embeddings=4096, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for token in (tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")):
            model.lm_head.weight[token] = -model.lm_head.weight.abs().max()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


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

    ids = torch.tensor([prompt_ids])
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


class _FirstWrite(io.TextIOBase):
    first: float = 0.0

    def write(self, text: str) -> int:
        if not self.first and text.strip():
            self.first = time.perf_counter()
        return len(text)


def bench_model(label: str, path: Path, tokens: int, repeats: int, data_dir: Path) -> dict:
    settings = Settings(
        _env_file=None, chat_model=str(path), data_dir=data_dir, device="cpu", temperature=0.0,
        max_new_tokens=tokens, max_context_tokens=4096, rate_limit_messages=1000,
    )
    app = App(settings)
    loop = asyncio.new_event_loop()
    loop.run_until_complete(bot_run(app, "/reset"))
    loop.run_until_complete(bot_run(app, "ping"))  # load + warm up
    backend = app.hub.get("chat").backend
    raw_tps, raw_first, bot_tps, bot_first = [], [], [], []
    question = "code"
    for _ in range(repeats):
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
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--hidden", type=int, default=1024, help="random model width")
    parser.add_argument("--layers", type=int, default=6, help="random model depth")
    args = parser.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    tiny = tiny_models.chat_model_path()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        rows.append(bench_model("tiny test model", tiny, args.tokens, args.repeats, Path(tmp) / "d1"))
        big = random_model(tiny, Path(tmp) / "random", args.hidden, args.layers)
        params = sum(p.numel() for p in LlamaForCausalLM.from_pretrained(big).parameters()) / 1e6
        rows.append(bench_model(f"random Llama {params:.0f}M", big, args.tokens, args.repeats, Path(tmp) / "d2"))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.tokens} tokens, median of {args.repeats}")
    header = list(rows[0])
    print(" | ".join(header))
    for row in rows:
        print(" | ".join(f"{v:.3f}" if isinstance(v, float) else str(v) for v in row.values()))


if __name__ == "__main__":
    main()

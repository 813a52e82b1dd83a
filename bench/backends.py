"""Bench: tokens per second through the openai backend (HTTP + SSE to an OpenAI-compatible
server in another process) vs the same model in-process (TransformersBackend). Goal: ratio >= 0.9.

The server is tests/openai_server.py serving the same checkpoint with the same backend class,
so the difference is the serving path: JSON request, SSE framing, the `openai` client's parsing,
and a second process competing for the CPUs. The prompt is the tiny chat model's endless "code"
answer, so every run generates exactly --tokens tokens. Runs alternate (in-process, server) to
share any drift in machine load; medians are reported.

    .venv/bin/python bench/backends.py [--model PATH] [--tokens 400] [--rounds 5] [--device cpu]

Without --model it uses the tiny chat model the tests build (tests/tiny_models.py).
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from contextlib import aclosing
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models.base import Cancel, ChatMessage, GenerationParams, StreamStats  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the server exited with {process.returncode}")
        try:
            urllib.request.urlopen(url + "/models", timeout=2).read()
            return
        except OSError:
            time.sleep(0.3)
    raise SystemExit("the server did not come up")


async def tokens_per_second(backend, tokens: int) -> float:
    params = GenerationParams(max_new_tokens=tokens, temperature=0.0)
    stats = StreamStats()
    started = time.perf_counter()
    async with aclosing(backend.stream([ChatMessage("user", "code")], params=params, cancel=Cancel(), stats=stats)) as deltas:
        async for _ in deltas:
            pass
    elapsed = time.perf_counter() - started
    if stats.completion_tokens != tokens:
        raise SystemExit(f"expected {tokens} tokens, got {stats.completion_tokens}: is the model the tiny chat model?")
    return tokens / elapsed


async def run(model: str, tokens: int, rounds: int, device: str) -> None:
    from models.openai_backend import OpenAIBackend
    from models.transformers_backend import TransformersBackend

    local = TransformersBackend(model, device=device)
    local.load()
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "tests.openai_server", "--model", f"bench={model}", "--port", str(port), "--device", device],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        base_url = f"http://127.0.0.1:{port}/v1"
        await asyncio.to_thread(wait_ready, base_url, server)
        remote = OpenAIBackend(base_url=base_url, model="bench", timeout=120)
        await tokens_per_second(local, 16)  # warm-up both paths
        await tokens_per_second(remote, 16)
        inproc, served = [], []
        for _ in range(rounds):
            inproc.append(await tokens_per_second(local, tokens))
            served.append(await tokens_per_second(remote, tokens))
        a, b = statistics.median(inproc), statistics.median(served)
        print(f"model {model} on {device}, {tokens} tokens per run, {rounds} rounds (medians)")
        print(f"  in-process (TransformersBackend):        {a:7.1f} tokens/s  (runs: {', '.join(f'{x:.0f}' for x in inproc)})")
        print(f"  openai backend → local server over HTTP: {b:7.1f} tokens/s  (runs: {', '.join(f'{x:.0f}' for x in served)})")
        print(f"  ratio served / in-process: {b / a:.2f}   (goal >= 0.9)")
    finally:
        server.terminate()
        server.wait(10)
        local.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", help="a checkpoint directory (default: the tiny chat model)")
    parser.add_argument("--tokens", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, ... (both paths use the same)")
    args = parser.parse_args()
    model = args.model
    if model is None:
        from tests.tiny_models import chat_model_path

        model = str(chat_model_path())
    asyncio.run(run(model, args.tokens, args.rounds, args.device))


if __name__ == "__main__":
    main()

"""A model server for the streaming benches: tests/openai_server.py's OpenAI-compatible server in
its own process (as LMDeploy or vLLM would be), serving a stand-in model that streams
"t000 t001 …", one token every `every` seconds on a fixed schedule from the request, and that
batches without limit (every request streams at once, like a batching engine).

The parent reads, per question, when the request reached the model and when each token was
generated (`GET /bench/times`; both processes share the system's monotonic clock).

    python bench/paced_server.py --port N [--tokens 500] [--every 0.02]
    with PacedServer(tokens=500, every=0.02) as server: server.base_url, server.times()
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import AsyncIterator

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODEL = "paced"


class PacedModel:
    """The stand-in model; records request and token times, keyed by the last user message."""

    name = MODEL
    context_window = 8192

    def __init__(self, tokens: int, every: float) -> None:
        self.tokens, self.every = tokens, every
        self.times: dict[str, dict] = {}

    def count_tokens(self, messages) -> int:
        return sum(len(m.content) for m in messages) // 4 + 8

    async def stream(self, messages, *, params, cancel, stats=None, **options) -> AsyncIterator[str]:
        start = time.monotonic()
        record = self.times[messages[-1].content] = {"requested": start, "tokens": []}
        for i in range(min(self.tokens, params.max_new_tokens)):
            if cancel.is_set:
                return
            delay = start + (i + 1) * self.every - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            record["tokens"].append(time.monotonic())
            if stats is not None:
                stats.completion_tokens = i + 1
            yield f"t{i:03d} "


async def _serve(port: int, tokens: int, every: float) -> None:
    from aiohttp import web

    from tests.openai_server import OpenAICompatibleServer

    model = PacedModel(tokens, every)
    server = OpenAICompatibleServer({MODEL: model}, port=port)
    await server.start()
    extra = web.Application()
    extra.router.add_get("/bench/times", lambda request: web.json_response(model.times))
    runner = web.AppRunner(extra, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port + 1).start()
    print(f"serving {MODEL} at {server.base_url}", flush=True)
    await asyncio.Event().wait()


def _free_port_pair() -> int:
    for _ in range(50):
        with socket.socket() as a:
            a.bind(("127.0.0.1", 0))
            port = a.getsockname()[1]
        try:
            with socket.socket() as b:
                b.bind(("127.0.0.1", port + 1))
            return port
        except OSError:
            continue
    raise RuntimeError("no free pair of ports")


class PacedServer:
    def __init__(self, *, tokens: int, every: float) -> None:
        self.tokens, self.every = tokens, every
        self.port = _free_port_pair()
        self.process: subprocess.Popen | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def __enter__(self) -> "PacedServer":
        self.process = subprocess.Popen(
            [sys.executable, __file__, "--port", str(self.port), "--tokens", str(self.tokens), "--every", str(self.every)],
            stdout=subprocess.PIPE, text=True,
        )
        line = self.process.stdout.readline()
        if not line.startswith("serving"):
            self.process.kill()
            raise RuntimeError(f"the paced model server did not start: {line!r}")
        return self

    def times(self) -> dict[str, dict]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port + 1}/bench/times", timeout=30) as response:
            return json.loads(response.read())

    def __exit__(self, *exc) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(10)
            self.process.stdout.close()


def openai_settings(server: PacedServer) -> dict:
    """Every model role on the openai backend, served by the paced server."""
    values: dict = {}
    for role in ("chat", "bajie", "agent", "vision"):
        values.update({f"{role}_backend": "openai", f"{role}_base_url": server.base_url, f"{role}_model": MODEL})
    return values


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--tokens", type=int, default=500)
    parser.add_argument("--every", type=float, default=0.02)
    args = parser.parse_args()
    try:
        asyncio.run(_serve(args.port, args.tokens, args.every))
    except KeyboardInterrupt:
        pass

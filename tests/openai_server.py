"""A local OpenAI-compatible chat-completions server that serves the tiny models FOR REAL.

Like LMDeploy's `api_server` or vLLM, as far as the bot uses them: `POST /v1/chat/completions`
(streaming SSE or one JSON answer) and `GET /v1/models`, on 127.0.0.1. Text models run through
the project's `TransformersBackend`, vision models through `models.vision`; pictures come as
`image_url` parts with base64 data URLs. It honours `max_tokens`, `temperature` (0 = greedy),
`top_p`, `stop` and LMDeploy's `skip_special_tokens`, and stops generating when the client goes
away (the next write fails; the backend stream is closed, which stops `generate`).

Strict about requests: unknown models are 404, malformed messages or image parts 400, a wrong
API key 401. Faults for tests: `go_down()` / `come_up()` (stop / resume listening on the same
port), `fail_next(n, status)` (answer n requests with that HTTP status), `drop_after(chars)`
(cut the TCP connection of the next streaming request once it has sent that many characters of
the answer; counted in characters, not chunks, because a busy backend coalesces its deltas), `stall_next(seconds)` (say
nothing before answering), `pause_after(chunks, seconds)` (go silent mid-stream).

    async with OpenAICompatibleServer({"tiny-chat": backend}) as server:
        server.base_url   # http://127.0.0.1:PORT/v1

CLI (for benches and manual tries): `python -m tests.openai_server --model NAME=PATH ... [--port N]`.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import logging
import time
import uuid
from contextlib import aclosing
from dataclasses import dataclass, field

from aiohttp import web
from PIL import Image

from models.base import Cancel, ChatMessage, GenerationParams, StreamStats

log = logging.getLogger(__name__)


@dataclass
class Generation:
    """What the server did for one request (tests read these)."""

    model: str
    messages: list[ChatMessage]
    params: GenerationParams
    stream: bool
    text: str = ""
    finish: str = "running"  # stop | length | disconnected | dropped | error
    completion_tokens: int = 0
    done: asyncio.Event = field(default_factory=asyncio.Event)
    worker: object = None  # the backend's generate thread, when it has one


class BadRequest(Exception):
    pass


class OpenAICompatibleServer:
    def __init__(self, models: dict, *, api_key: str = "", host: str = "127.0.0.1", port: int = 0) -> None:
        self.models = models
        self.api_key = api_key
        self.host, self.port = host, port
        self.generations: list[Generation] = []
        self.requests: list[dict] = []  # every JSON body received, in order
        self._failures: list[int] = []
        self._drop_after: int | None = None
        self._stalls: list[float] = []
        self._pause: tuple[int, float] | None = None
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None

    # -- lifecycle ---------------------------------------------------------------------
    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    async def start(self) -> "OpenAICompatibleServer":
        app = web.Application(client_max_size=64 * 2**20)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_get("/v1/models", self._models)
        self._stopping = asyncio.Event()
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await self.come_up()
        return self

    async def come_up(self) -> None:
        self._site = web.TCPSite(self._runner, self.host, self.port, reuse_address=True)
        await self._site.start()
        self.port = self._site._server.sockets[0].getsockname()[1]

    async def go_down(self) -> None:
        """Stop listening: new connections are refused (in-flight streams are cut)."""
        if self._site is not None:
            await self._site.stop()
            self._site = None
        for connection in self._runner.server.connections:  # kept-alive ones too: really down
            connection.force_close()

    async def stop(self) -> None:
        self._stopping.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> "OpenAICompatibleServer":
        return await self.start()

    async def __aexit__(self, *exc) -> None:
        await self.stop()

    # -- fault injection -----------------------------------------------------------------
    def fail_next(self, n: int = 1, status: int = 500) -> None:
        self._failures.extend([status] * n)

    def drop_after(self, chars: int) -> None:
        self._drop_after = chars

    def pause_after(self, chunks: int, seconds: float) -> None:
        """In the next stream, go silent for `seconds` after `chunks` chunks (a busy engine)."""
        self._pause = (chunks, seconds)

    def stall_next(self, seconds: float) -> None:
        """Say nothing for `seconds` before answering the next request (a hung engine)."""
        self._stalls.append(seconds)

    # -- handlers --------------------------------------------------------------------------
    async def _models(self, request: web.Request) -> web.Response:
        if (denied := self._check_key(request)) is not None:
            return denied
        return web.json_response({"object": "list", "data": [{"id": m, "object": "model", "owned_by": "tests"} for m in self.models]})

    def _check_key(self, request: web.Request) -> web.Response | None:
        if self.api_key and request.headers.get("Authorization") != f"Bearer {self.api_key}":
            return _error(401, "invalid API key", "AuthenticationError")
        return None

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        if (denied := self._check_key(request)) is not None:
            return denied
        try:
            body = await request.json()
        except ValueError:
            return _error(400, "body is not JSON")
        self.requests.append(body)
        if self._stalls:
            try:  # a hung engine; `stop()` ends the wait so the test does not linger
                await asyncio.wait_for(self._stopping.wait(), self._stalls.pop(0))
                return _error(503, "shutting down", "ServiceUnavailable")
            except TimeoutError:
                pass
        if self._failures:
            status = self._failures.pop(0)
            return _error(status, f"injected failure {status}", "InternalServerError")
        name = body.get("model")
        if name not in self.models:
            return _error(404, f"The model `{name}` does not exist.", "NotFoundError")
        try:
            messages = await asyncio.to_thread(parse_messages, body.get("messages"))
            params = parse_params(body)
        except BadRequest as exc:
            return _error(400, str(exc))
        backend = self.models[name]
        generation = Generation(name, messages, params, bool(body.get("stream")))
        self.generations.append(generation)
        skip = bool(body.get("skip_special_tokens", True))
        try:
            if generation.stream:
                return await self._stream(request, backend, generation, skip, body)
            return await self._complete(backend, generation, skip)
        finally:
            generation.done.set()

    async def _complete(self, backend, generation: Generation, skip: bool) -> web.Response:
        stats = StreamStats()
        async with aclosing(backend.stream(generation.messages, params=generation.params, cancel=Cancel(), stats=stats,
                                           skip_special_tokens=skip)) as deltas:
            generation.worker = getattr(backend, "last_worker", None)
            async for delta in deltas:
                generation.text += delta
        generation.completion_tokens = stats.completion_tokens
        generation.finish = _finish_reason(generation, stats)
        return web.json_response({
            "id": f"chatcmpl-{uuid.uuid4().hex[:16]}", "object": "chat.completion", "created": int(time.time()),
            "model": generation.model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": generation.text}, "finish_reason": generation.finish}],
            "usage": _usage(stats),
        })

    async def _stream(self, request: web.Request, backend, generation: Generation, skip: bool, body: dict) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        chunk_id = f"chatcmpl-{uuid.uuid4().hex[:16]}"
        drop_after, self._drop_after = self._drop_after, None
        pause, self._pause = self._pause, None

        async def send(delta: dict, finish: str | None = None, usage: dict | None = None) -> None:
            chunk = {"id": chunk_id, "object": "chat.completion.chunk", "created": int(time.time()), "model": generation.model,
                     "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
            if usage is not None:
                chunk["usage"] = usage
            await response.write(f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n".encode())

        stats = StreamStats()
        sent = 0
        try:
            await send({"role": "assistant", "content": ""})
            async with aclosing(backend.stream(generation.messages, params=generation.params, cancel=Cancel(),
                                               stats=stats, skip_special_tokens=skip)) as deltas:
                generation.worker = getattr(backend, "last_worker", None)
                async for delta in deltas:
                    if drop_after is not None and len(generation.text) + len(delta) > drop_after:
                        if head := delta[:drop_after - len(generation.text)]:
                            generation.text += head
                            await send({"content": head})
                        generation.finish = "dropped"
                        request.transport.abort()  # mid-stream: no terminating chunk, no [DONE]
                        return response
                    if pause is not None and sent == pause[0]:
                        # Silent, but the connection stays open; a client that hangs up now is
                        # noticed at the next write, as with a real server.
                        try:
                            await asyncio.wait_for(self._stopping.wait(), pause[1])
                        except TimeoutError:
                            pass
                    generation.text += delta
                    await send({"content": delta})
                    sent += 1
            generation.completion_tokens = stats.completion_tokens
            generation.finish = _finish_reason(generation, stats)
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            await send({}, generation.finish, None if include_usage else _usage(stats))
            if include_usage:
                await response.write(f"data: {json.dumps({'id': chunk_id, 'object': 'chat.completion.chunk', 'created': int(time.time()), 'model': generation.model, 'choices': [], 'usage': _usage(stats)})}\n\n".encode())
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
        except (ConnectionResetError, ConnectionError, asyncio.CancelledError) as exc:
            # The client hung up: leaving the `async with` above has stopped generation.
            generation.completion_tokens = stats.completion_tokens
            generation.finish = "disconnected"
            log.info("client went away after %d chunks (%s)", sent, type(exc).__name__)
            if isinstance(exc, asyncio.CancelledError):
                raise
        return response


def _finish_reason(generation: Generation, stats: StreamStats) -> str:
    return "length" if stats.completion_tokens >= generation.params.max_new_tokens else "stop"


def _usage(stats: StreamStats) -> dict:
    return {"prompt_tokens": stats.prompt_tokens, "completion_tokens": stats.completion_tokens,
            "total_tokens": stats.prompt_tokens + stats.completion_tokens}


def _error(status: int, message: str, kind: str = "BadRequestError") -> web.Response:
    return web.json_response({"error": {"message": message, "type": kind, "code": status}}, status=status)


def parse_messages(raw) -> list[ChatMessage]:
    if not isinstance(raw, list) or not raw:
        raise BadRequest("messages must be a non-empty list")
    out = []
    for m in raw:
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant", "environment", "tool"):
            raise BadRequest(f"bad message {str(m)[:80]}")
        content = m.get("content")
        if isinstance(content, str):
            out.append(ChatMessage(m["role"], content))
            continue
        if not isinstance(content, list):
            raise BadRequest("content must be a string or a list of parts")
        texts, image = [], None
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                texts.append(str(part["text"]))
            elif kind == "image_url":
                if image is not None:
                    raise BadRequest("one image per message, please")
                image = decode_data_url((part.get("image_url") or {}).get("url", ""))
            else:
                raise BadRequest(f"unknown content part type {kind!r}")
        out.append(ChatMessage(m["role"], "".join(texts), image=image))
    return out


def decode_data_url(url: str) -> Image.Image:
    head, _, data = url.partition(",")
    if not (head.startswith("data:image/") and head.endswith(";base64")):
        raise BadRequest("image_url must be a base64 data URL (data:image/...;base64,...)")
    try:
        image = Image.open(io.BytesIO(base64.b64decode(data, validate=True)))
        image.load()
    except Exception as exc:
        raise BadRequest(f"image_url does not hold a readable image: {exc}") from None
    return image.convert("RGB")


def parse_params(body: dict) -> GenerationParams:
    stop = body.get("stop") or ()
    stop = (stop,) if isinstance(stop, str) else tuple(stop)
    try:
        return GenerationParams(
            max_new_tokens=int(body.get("max_tokens") or body.get("max_completion_tokens") or 512),
            temperature=float(body.get("temperature", 1.0)),
            top_p=float(body.get("top_p", 1.0)),
            stop=stop,
        )
    except (TypeError, ValueError) as exc:
        raise BadRequest(f"bad sampling parameters: {exc}") from None


def load_backend(path: str, device: str = "cpu", host: str = "thread"):
    """A text or vision backend for the checkpoint at `path`, as the bot would load it (text
    models generate on a thread of this process unless `host` is "process")."""
    from models.transformers_backend import TransformersBackend
    from models.vision import detect_kind, load_vision_backend, read_config

    if detect_kind(read_config(path)) is not None:
        return load_vision_backend(path, model=path, device=device)
    backend = TransformersBackend(path, device=device, host=host)
    backend.load()
    return backend


async def _serve(models: dict[str, str], port: int, api_key: str, device: str) -> None:
    backends = {name: load_backend(path, device) for name, path in models.items()}
    async with OpenAICompatibleServer(backends, api_key=api_key, port=port) as server:
        print(f"serving {', '.join(backends)} at {server.base_url}", flush=True)
        await asyncio.Event().wait()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", action="append", required=True, metavar="NAME=PATH")
    parser.add_argument("--port", type=int, default=23333)
    parser.add_argument("--api-key", default="")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    try:
        asyncio.run(_serve(dict(m.split("=", 1) for m in args.model), args.port, args.api_key, args.device))
    except KeyboardInterrupt:
        pass

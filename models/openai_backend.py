"""A model served by an OpenAI-compatible server (LMDeploy `api_server` or `proxy`, vLLM).

Any role can use it (`<ROLE>_BACKEND=openai`, `<ROLE>_BASE_URL`, `<ROLE>_API_KEY`, and
`<ROLE>_MODEL` = the name the server serves). Streaming chat completions through the `openai`
package's async client:
- the persona's system prompt and stop words are sent explicitly (LMDeploy's default template
  adds no system prompt), and stop words are also enforced here, whatever the server does;
- a picture travels as an `image_url` part holding a base64 JPEG data URL;
- connection errors, timeouts, 429 and 5xx are retried with exponential backoff and jitter
  while nothing has been shown yet; a stream that breaks after text was shown fails the answer;
- cancellation closes the HTTP stream (the server then stops generating), also while waiting
  for the first byte;
- an unreachable server becomes `ServerUnavailable`, which the user sees as a short notice.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import random
import time
from contextlib import aclosing
from typing import AsyncIterator

import httpx2  # the `openai` package's HTTP client (its pinned dependency): read errors while streaming
import openai
from openai import AsyncOpenAI

from .base import Cancel, Capabilities, ChatMessage, GenerationParams, ModelError, ModelUnavailable, StreamStats
from .generation import XCOMPOSER2_IMAGE_TOKENS, first_stop

log = logging.getLogger(__name__)

JPEG_QUALITY = 90
CANCEL_POLL = 0.05  # seconds between checks of the cancel flag while the server is silent
WARM_UP_TIMEOUT = 10.0  # seconds for the start-up request that opens the first connection
_DOWN_STATUSES = (502, 503, 504)  # a proxy in front of a dead engine


class ServerUnavailable(ModelUnavailable):
    """The model server cannot be reached (refused, timed out, proxy says its engine is down)."""

    user_message_key = "model_server_down"


class _Retry(Exception):
    def __init__(self, reason: str, down: bool) -> None:
        super().__init__(reason)
        self.down = down


def approx_tokens(text: str) -> int:
    """A slightly high estimate for InternLM-style tokenizers: a CJK character is about one
    token, other text about four characters per token. Used only for context budgeting."""
    wide = sum(1 for ch in text if ord(ch) >= 0x2E80)
    return wide + (len(text) - wide + 2) // 3


def image_data_url(image) -> str:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def to_openai_messages(messages: list[ChatMessage]) -> list[dict]:
    """Chat messages → the request's `messages` (blocking: encodes pictures)."""
    out = []
    for m in messages:
        if m.image is None:
            out.append({"role": m.role, "content": m.content})
        else:
            out.append({
                "role": m.role,
                "content": [
                    {"type": "image_url", "image_url": {"url": image_data_url(m.image)}},
                    {"type": "text", "text": m.content},
                ],
            })
    return out


class OpenAIBackend:
    # Pictures at the intake's default size (the server resizes for its model); their token cost
    # is a budget, not exact. The server applies its own chat template, so tool roles go plain.
    capabilities = Capabilities(images=True, image_side=0, image_tokens=XCOMPOSER2_IMAGE_TOKENS, agent=True)

    def __init__(
        self, *, base_url: str, model: str, api_key: str = "", timeout: float = 120.0, max_retries: int = 3,
        context_window: int = 8192, variable: str = "CHAT", backoff: float = 0.5, backoff_max: float = 8.0,
    ) -> None:
        if not base_url:
            raise ModelUnavailable(f"{variable}_BACKEND=openai needs {variable}_BASE_URL (e.g. http://127.0.0.1:23333/v1)")
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.name = f"{model} at {self.base_url}"
        self.api_key = api_key
        self.timeout = timeout
        self.max_retries = max_retries
        self.context_window = context_window
        self.variable = variable
        self.backoff, self.backoff_max = backoff, backoff_max
        self._client: tuple[asyncio.AbstractEventLoop, AsyncOpenAI] | None = None
        self._warming: asyncio.Task | None = None

    @classmethod
    def from_spec(cls, spec) -> "OpenAIBackend":
        return cls(
            base_url=spec.base_url, model=spec.model, api_key=spec.api_key, timeout=spec.timeout,
            max_retries=spec.max_retries, context_window=spec.max_context_tokens, variable=spec.role.upper(),
        )

    def client(self) -> AsyncOpenAI:
        """One client (connection pool) per event loop; our own retry loop, not the library's."""
        loop = asyncio.get_running_loop()
        if self._client is None or self._client[0] is not loop:
            # LMDeploy and vLLM accept any key unless started with --api-keys / --api-key.
            client = AsyncOpenAI(base_url=self.base_url, api_key=self.api_key or "none", timeout=self.timeout, max_retries=0)
            self._client = (loop, client)
        return self._client[1]

    def prepare(self) -> None:
        """At start: build the client now, and in the background open a connection with one
        cheap request (`GET /models`), so the first user's request finds everything warm (a
        cold first request took 150 ms instead of 15). A server that is not up yet is fine."""
        self.client()
        self._warming = asyncio.create_task(self._warm_up())

    async def _warm_up(self) -> None:
        started = time.perf_counter()
        try:
            await self.client().with_options(timeout=WARM_UP_TIMEOUT).models.list()
            log.info("%s answered in %.0f ms", self.base_url, 1000 * (time.perf_counter() - started))
        except Exception as exc:  # the first user's request will try (and report) again
            log.info("%s is not reachable yet (%s)", self.base_url, type(exc).__name__)

    def count_tokens(self, messages: list[ChatMessage]) -> int:
        total = 3  # the assistant prompt
        for m in messages:
            total += 5 + approx_tokens(m.content) + (self.capabilities.image_tokens if m.image is not None else 0)
        return total

    async def stream(
        self, messages: list[ChatMessage], *, params: GenerationParams, cancel: Cancel,
        stats: StreamStats | None = None, skip_special_tokens: bool = True,
    ) -> AsyncIterator[str]:
        if any(m.image is not None for m in messages):  # encoding a picture blocks: a thread
            payload = await asyncio.to_thread(to_openai_messages, messages)
        else:  # a thread hop would only delay the first token
            payload = to_openai_messages(messages)
        request: dict = dict(
            model=self.model, messages=payload, stream=True, max_tokens=params.max_new_tokens,
            temperature=0.0 if params.greedy else params.temperature, top_p=params.top_p,
        )
        if params.stop:
            request["stop"] = list(params.stop)
        if not skip_special_tokens:  # LMDeploy and vLLM both take this extension
            request["extra_body"] = {"skip_special_tokens": False}
        stats = stats if stats is not None else StreamStats()
        stats.prompt_tokens = self.count_tokens(messages)
        attempt = 0
        shown = ""
        while True:
            try:
                async with aclosing(self._one_attempt(request, params, cancel, stats)) as deltas:
                    async for delta in deltas:
                        shown += delta
                        yield delta
                return
            except _Retry as retry:
                if shown:  # the user already sees part of an answer: do not start another one
                    raise ModelError(f"{self.name}: the stream broke mid-answer ({retry})") from None
                if attempt >= self.max_retries:
                    kind = ServerUnavailable if retry.down else ModelError
                    raise kind(f"{self.name}: {retry} (after {attempt + 1} attempts)") from None
                delay = min(self.backoff_max, self.backoff * 2**attempt) * random.uniform(0.5, 1.0)
                attempt += 1
                log.warning("%s: %s; retry %d/%d in %.2fs", self.name, retry, attempt, self.max_retries, delay)
                if await _sleep_unless(cancel, delay):
                    return

    async def _one_attempt(
        self, request: dict, params: GenerationParams, cancel: Cancel, stats: StreamStats
    ) -> AsyncIterator[str]:
        started = time.perf_counter()
        # The raw streaming response: the client still does the URL, auth, timeouts and HTTP
        # errors, but the SSE lines are parsed here with json.loads, which costs a tenth of
        # building the library's typed chunk objects (they dominated the serving overhead).
        opening = self.client().chat.completions.with_streaming_response.create(**request)
        try:
            response = await _unless_cancelled(asyncio.ensure_future(opening.__aenter__()), cancel)
        except openai.APITimeoutError:
            raise _Retry(f"no answer within {self.timeout:g}s (timed out; OPENAI_TIMEOUT)", down=True) from None
        except openai.APIConnectionError as exc:  # refused, reset, DNS
            raise _Retry(f"cannot reach the server: {exc.__cause__ or exc}", down=True) from None
        except openai.APIStatusError as exc:
            self._raise_for_status(exc)
        if response is None:  # cancelled before the server answered
            return
        text, finished, chunks = "", False, 0
        closer = asyncio.create_task(_close_when_cancelled(cancel, response))
        try:
            async for chunk in _sse_chunks(response):
                if cancel.is_set:
                    break
                usage = chunk.get("usage")
                if usage:
                    stats.prompt_tokens = usage.get("prompt_tokens") or stats.prompt_tokens
                    stats.completion_tokens = usage.get("completion_tokens") or stats.completion_tokens
                for choice in chunk.get("choices") or ():
                    if choice.get("finish_reason"):
                        finished = True
                    delta = (choice.get("delta") or {}).get("content")
                    if not delta:
                        continue
                    chunks += 1
                    text += delta
                    hit = first_stop(text, params.stop)
                    if hit is not None:  # a server that ignored `stop`: cut here and hang up
                        delta = delta[: max(0, len(delta) - (len(text) - hit))]
                        if delta:
                            yield delta
                        return
                    yield delta
            if not finished and not cancel.is_set:
                raise _Retry("the stream ended without a finish reason", down=False)
        except httpx2.TransportError as exc:  # reset, cut, or silent for longer than the timeout
            if cancel.is_set:  # our own close interrupted the read
                return
            timed_out = isinstance(exc, httpx2.TimeoutException)
            reason = f"nothing for {self.timeout:g}s (timed out)" if timed_out else f"{type(exc).__name__}: {exc}"
            raise _Retry(f"the stream broke: {reason}", down=timed_out) from None
        except _Retry:
            raise
        except Exception:
            if cancel.is_set:  # closing under a waiting read may surface as another error
                return
            raise
        finally:
            closer.cancel()
            await response.close()  # unfinished: drops the connection, so the server stops
            stats.completion_tokens = max(stats.completion_tokens, chunks)
            log.debug("%s: %d chunks in %.2fs", self.name, chunks, time.perf_counter() - started)

    def _raise_for_status(self, exc: openai.APIStatusError) -> None:
        status = exc.status_code
        detail = _error_text(exc)
        if status >= 500 or status == 429:
            raise _Retry(f"HTTP {status}: {detail}", down=status in _DOWN_STATUSES) from None
        if status in (401, 403):
            raise ModelUnavailable(f"{self.name} refused the key (HTTP {status}); check {self.variable}_API_KEY") from None
        if status == 404:
            raise ModelUnavailable(
                f"{self.name}: HTTP 404 ({detail}); is {self.variable}_MODEL the name the server lists at "
                f"{self.base_url}/models, and does {self.variable}_BASE_URL end with /v1?"
            ) from None
        raise ModelError(f"{self.name} rejected the request: HTTP {status}: {detail}") from None


def _error_text(exc: openai.APIStatusError) -> str:
    body = exc.body
    if isinstance(body, dict):
        error = body.get("error", body)
        message = error.get("message") if isinstance(error, dict) else error
        return str(message or body)[:300]
    return str(exc.message)[:300]


async def _sse_chunks(response) -> AsyncIterator[dict]:
    """The JSON objects of a chat-completions event stream, until `data: [DONE]`."""
    data: list[str] = []
    lines = response.iter_lines()
    while True:
        line = await anext(lines, None)
        if line is not None and line.startswith("data:"):
            data.append(line[5:].lstrip())
            continue
        if line is not None and (line or not data):  # "event:", "id:", ": comment", or an empty gap
            continue
        if not data:  # the end of the body
            return
        payload, data = "\n".join(data), []  # a blank line (or the end) closes an event
        if payload == "[DONE]":
            return
        try:
            chunk = json.loads(payload)
        except ValueError:
            raise ModelError(f"the server sent a malformed event: {payload[:200]!r}") from None
        if isinstance(chunk, dict) and chunk.get("error"):
            error = chunk["error"]
            message = error.get("message") if isinstance(error, dict) else error
            raise ModelError(f"the server reported an error mid-stream: {str(message)[:300]}")
        yield chunk
        if line is None:
            return


async def _unless_cancelled(task: asyncio.Future, cancel: Cancel):
    """The task's result, or None (the task cancelled) once `cancel` is set."""
    try:
        while not task.done():
            if cancel.is_set:
                task.cancel()
                try:
                    await task
                except asyncio.CancelledError:
                    pass
                except Exception:  # failing while being cancelled: nobody wants the error
                    pass
                return None
            await asyncio.wait({task}, timeout=CANCEL_POLL)
    except asyncio.CancelledError:
        task.cancel()
        raise
    return task.result()


async def _close_when_cancelled(cancel: Cancel, response) -> None:
    """Close the stream as soon as `cancel` is set, even while a read is waiting for bytes."""
    while not cancel.is_set:
        await asyncio.sleep(CANCEL_POLL)
    await response.close()


async def _sleep_unless(cancel: Cancel, seconds: float) -> bool:
    """Sleep; True if cancelled meanwhile."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if cancel.is_set:
            return True
        await asyncio.sleep(min(CANCEL_POLL, max(0.0, deadline - time.monotonic())))
    return cancel.is_set



async def ping(base_url: str, api_key: str = "", timeout: float = 3.0) -> str | None:
    """None when the server answers `GET /models`; otherwise why not (for readiness checks)."""
    client = AsyncOpenAI(base_url=base_url.rstrip("/"), api_key=api_key or "none", timeout=timeout, max_retries=0)
    try:
        await client.models.list()
        return None
    except openai.APIStatusError as exc:
        return f"the model server at {base_url} answered HTTP {exc.status_code}"
    except Exception as exc:
        return f"the model server at {base_url} cannot be reached ({type(exc).__name__})"
    finally:
        await client.close()

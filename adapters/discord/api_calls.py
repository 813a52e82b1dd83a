"""Counts every REST call discord.py makes, by route and result (ok, 429, error), through
aiohttp's request tracing (discord.py's `http_trace` option). discord.py retries 429s itself;
each attempt is counted, so pushback shows even when the retry then succeeds.

Routes are reduced to templates ("PATCH /webhooks/{id}/{token}/messages/{id}"): ids and
interaction tokens never become label values.
"""

from __future__ import annotations

import re
from typing import Callable
from urllib.parse import urlparse

import aiohttp

Recorder = Callable[[str, str], None]  # (method, result)
_API_PREFIX = re.compile(r"^/api/v\d+")


def route_of(method: str, url: object) -> str:
    path = urlparse(str(url)).path
    if not _API_PREFIX.match(path):  # attachments from the CDN and the like
        return f"{method} file"
    parts = []
    for part in _API_PREFIX.sub("", path).strip("/").split("/"):
        if part.isdigit():
            parts.append("{id}")
        elif len(part) > 24:  # interaction and webhook tokens
            parts.append("{token}")
        else:
            parts.append(part)
    return f"{method} /" + "/".join(parts)


def result_of(status: int) -> str:
    return "ok" if status < 400 else "429" if status == 429 else "error"


def api_call_trace(record: Recorder) -> aiohttp.TraceConfig:
    trace = aiohttp.TraceConfig()

    async def on_end(session, context, params: aiohttp.TraceRequestEndParams) -> None:
        record(route_of(params.method, params.url), result_of(params.response.status))

    async def on_exception(session, context, params: aiohttp.TraceRequestExceptionParams) -> None:
        record(route_of(params.method, params.url), "error")

    trace.on_request_end.append(on_end)
    trace.on_request_exception.append(on_exception)
    return trace

"""Counts every Bot API call python-telegram-bot makes, by method and result (ok, 429, error),
and tells the core's health when polling works or fails.

PTB keeps two HTTP clients on the bot (one for getUpdates, one for everything else); each
one's `do_request` is wrapped, so calls are counted whatever code made them (our surfaces,
PTB's own rate limiter, setMyCommands, file downloads).
"""

from __future__ import annotations

import re
from typing import Any, Callable

from telegram import Bot

Recorder = Callable[[str, str], None]  # (method, result)
_METHOD = re.compile(r"[a-z][A-Za-z]{2,40}")  # Bot API method names; anything else is a file download


def method_of(url: str) -> str:
    name = url.rsplit("/", 1)[-1].split("?", 1)[0]
    return name if _METHOD.fullmatch(name) else "file"


def result_of(code: int) -> str:
    return "ok" if 200 <= code < 300 else "429" if code == 429 else "error"


def count_api_calls(bot: Bot, record: Recorder) -> None:
    for request in set(bot._request):  # (getUpdates client, general client); PTB has no public hook
        inner = request.do_request

        async def do_request(url: str, method: str, *args: Any, _inner=inner, **kwargs: Any) -> tuple[int, bytes]:
            name = method_of(url)
            try:
                code, payload = await _inner(url, method, *args, **kwargs)
            except BaseException as exc:
                if not isinstance(exc, GeneratorExit):
                    record(name, "error")
                raise
            record(name, result_of(code))
            return code, payload

        request.do_request = do_request

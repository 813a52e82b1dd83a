"""The webhook endpoint: Telegram POSTs updates here (TELEGRAM_WEBHOOK_URL mode).

python-telegram-bot's own webhook server (tornado) reads a whole request body before its handler
checks the secret token, so anyone could make the bot buffer large bodies. This one (aiohttp)
decides on the headers first: a missing or wrong `X-Telegram-Bot-Api-Secret-Token` is answered
403 and the connection closed without reading the body; a body over MAX_BODY (declared, or
found while reading a chunked one) is 413; a body that is not a JSON update is 400. Good updates
go to the Application's update queue, as its own webhook would put them.
"""

from __future__ import annotations

import hmac
import json
import logging

from aiohttp import web
from telegram import Update
from telegram.ext import Application

log = logging.getLogger(__name__)

SECRET_HEADER = "X-Telegram-Bot-Api-Secret-Token"
# Telegram updates are a few KB (a 4096-character message with its entities and a quoted reply
# is well under 64 KB); 1 MiB leaves room for any update and none for abuse.
MAX_BODY = 1 << 20
READ_BUFFER = 1 << 14


class WebhookServer:
    def __init__(self, application: Application, *, listen: str, port: int, path: str, secret: str,
                 max_body: int = MAX_BODY) -> None:
        self.application = application
        self.listen, self.port = listen, port
        self.path = "/" + path.strip("/")
        self._secret = secret.encode()
        self.max_body = max_body
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application(client_max_size=self.max_body)
        app.router.add_post(self.path, self._handle)
        # A small read buffer: what a connection may hold before its handler has decided.
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False, read_bufsize=READ_BUFFER)
        await self._runner.setup()
        await web.TCPSite(self._runner, self.listen, self.port).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        given = request.headers.get(SECRET_HEADER, "").encode()
        if not hmac.compare_digest(given, self._secret):
            log.warning("telegram webhook: refused a request without the right secret token from %s", request.remote)
            return _closing(web.Response(status=403, text="forbidden"))
        if request.content_length is not None and request.content_length > self.max_body:
            log.warning("telegram webhook: refused a %d-byte body (limit %d)", request.content_length, self.max_body)
            return web.Response(status=413, text="request body too large")
        try:
            body = await request.read()  # client_max_size also caps a chunked body
        except web.HTTPRequestEntityTooLarge:
            log.warning("telegram webhook: refused a chunked body over %d bytes", self.max_body)
            return web.Response(status=413, text="request body too large")
        try:
            data = json.loads(body)
            if not isinstance(data, dict):
                raise ValueError("not a JSON object")
            update = Update.de_json(data, self.application.bot)
        except Exception as exc:  # a malformed update is the sender's fault, not the bot's
            log.warning("telegram webhook: refused a malformed update (%s)", type(exc).__name__)
            return web.Response(status=400, text="malformed update")
        await self.application.update_queue.put(update)
        return web.Response(text="ok")


def _closing(response: web.Response) -> web.Response:
    """Close the connection after answering, so an unauthenticated body is never read (aiohttp
    would otherwise read and discard it for keep-alive; for the sender that has the secret it
    does, so that its client sees the 413)."""
    response.force_close()
    return response

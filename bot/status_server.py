"""The operator's HTTP server inside the bot process (aiohttp): Prometheus metrics, health
probes and the live status page.

    /metrics   Prometheus text format
    /healthz   200 while the process and its event loop answer
    /readyz    200 when every configured adapter is connected and every model is loaded or
               loadable; 503 otherwise (the JSON body says what is missing)
    /          the status page (English / 简体中文); /api/status is what it polls

Bound to METRICS_HOST:METRICS_PORT (127.0.0.1 by default). With STATUS_TOKEN set, everything
but the two probes needs it, as `Authorization: Bearer …` or `?token=…`; the probes then give
details only with it. Settings refuse a non-loopback host without a token.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from typing import TYPE_CHECKING

from aiohttp import web
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from .i18n import lang_of
from .status_data import status_snapshot
from .status_page import render_page

if TYPE_CHECKING:
    from .app import App

log = logging.getLogger(__name__)

OPEN_PATHS = ("/healthz", "/readyz")
SAMPLE_EVERY = 5.0  # seconds between samples of the models' queues and counters for the charts


class ServerStartError(RuntimeError):
    """The server cannot listen; the message says what to change."""


class StatusServer:
    def __init__(self, app: "App", host: str, port: int, token: str = "") -> None:
        self.app = app
        self.host = host
        self.port = port  # 0: any free port; the real one is known after start()
        self.token = token
        self.started = time.time()
        self._runner: web.AppRunner | None = None
        self._sampler: asyncio.Task | None = None

    # -- lifecycle ---------------------------------------------------------------------
    async def start(self) -> "StatusServer":
        web_app = web.Application(middlewares=[self._guard])
        web_app.add_routes([
            web.get("/", self.page),
            web.get("/api/status", self.status),
            web.get("/metrics", self.metrics),
            web.get("/healthz", self.healthz),
            web.get("/readyz", self.readyz),
        ])
        self._runner = web.AppRunner(web_app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        try:
            await site.start()
        except OSError as exc:
            await self._runner.cleanup()
            raise ServerStartError(f"the status server cannot listen on {self.host}:{self.port} ({exc.strerror or exc}); "
                               "set METRICS_PORT to a free port, or leave it empty to turn the server off") from None
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        log.info("status page and metrics on http://%s:%d/", self.host, self.port)
        self._sampler = asyncio.create_task(self._sample())
        return self

    async def _sample(self) -> None:
        """Queue peaks and token counts for the charts also while nobody has the page open."""
        while True:
            self.app.metrics.sample_models()
            await asyncio.sleep(SAMPLE_EVERY)

    async def stop(self) -> None:
        if self._sampler is not None:
            self._sampler.cancel()
            await asyncio.gather(self._sampler, return_exceptions=True)
            self._sampler = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # -- access --------------------------------------------------------------------------
    def authorized(self, request: web.Request) -> bool:
        if not self.token:
            return True
        header = request.headers.get("Authorization", "")
        given = header[7:].strip() if header.lower().startswith("bearer ") else request.query.get("token", "")
        return hmac.compare_digest(given.encode(), self.token.encode())

    @web.middleware
    async def _guard(self, request: web.Request, handler):
        if request.path not in OPEN_PATHS and not self.authorized(request):
            return web.json_response(
                {"error": "a STATUS_TOKEN is required (Authorization: Bearer <token>, or ?token=<token>)"},
                status=401, headers={"WWW-Authenticate": 'Bearer realm="status"'},
            )
        response = await handler(request)
        response.headers.setdefault("Cache-Control", "no-store")
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("Referrer-Policy", "no-referrer")  # a ?token= never leaves in a Referer
        return response

    # -- handlers ----------------------------------------------------------------------
    async def healthz(self, request: web.Request) -> web.Response:
        # Answering at all proves the event loop is responsive; a blocked loop times the probe out.
        return web.json_response({"alive": True, "uptime_seconds": round(time.time() - self.started, 1)})

    async def readyz(self, request: web.Request) -> web.Response:
        ready, report = await self.app.health.readiness(self.app.hub)
        body = report if self.authorized(request) else {"ready": ready}
        return web.json_response(body, status=200 if ready else 503)

    async def metrics(self, request: web.Request) -> web.Response:
        body = self.app.metrics.exposition()
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def status(self, request: web.Request) -> web.Response:
        return web.json_response(await status_snapshot(self.app, started=self.started))

    async def page(self, request: web.Request) -> web.Response:
        lang = request.query.get("lang") or lang_of(request.headers.get("Accept-Language", "").split(",")[0])
        lang = lang_of(lang)
        snapshot = await status_snapshot(self.app, started=self.started)
        html, nonce = render_page(snapshot, lang)
        csp = (
            f"default-src 'none'; script-src 'nonce-{nonce}'; style-src 'nonce-{nonce}'; "
            "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
        )
        return web.Response(text=html, content_type="text/html", charset="utf-8", headers={"Content-Security-Policy": csp})

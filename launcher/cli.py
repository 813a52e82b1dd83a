"""Command line: run the configured adapters, force the console, or check the configuration."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

from bot.app import role_specs
from bot.config import ROLES, ConfigError, Settings, load_settings
from bot.logs import setup_logging
from bot.platforms import PLATFORMS, platform_names

from .compose import build_app, create_adapters

log = logging.getLogger("bot")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launcher", description="InternLM chat bot for Telegram, Discord and the console.")
    parser.add_argument(
        "mode", nargs="?", default="run", choices=("run", "console", "check"),
        help="run: every adapter with a token (the console when none); console: local chat; check: show configuration",
    )
    args = parser.parse_args(argv)
    try:
        settings = load_settings()
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.mode == "check":
        return check(settings)
    platforms = [] if args.mode == "console" else platform_names(settings)
    setup_logging(settings, quiet_stderr=not platforms)
    from bot.status_server import ServerStartError

    try:
        asyncio.run(serve(settings, platforms))
    except KeyboardInterrupt:
        pass
    except ServerStartError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


async def serve(settings: Settings, platforms: list[str]) -> None:
    """Run the adapters until SIGTERM/SIGINT (or end of console input)."""
    app = build_app(settings)
    try:
        await app.prepare()
        status = await start_status_server(app, settings) if platforms else None  # not for the local console
    except BaseException:
        app.store.close()
        raise
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    signals = (signal.SIGTERM,) if not platforms else (signal.SIGTERM, signal.SIGINT)
    for sig in signals:
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):
            pass
    adapters = create_adapters(app, settings, platforms)
    for adapter in adapters:
        app.health.expect(adapter.name)
    log.info("starting %s", ", ".join(a.name for a in adapters))
    tasks = [asyncio.create_task(a.run(stop), name=a.name) for a in adapters]
    stopper = asyncio.create_task(stop.wait())
    try:
        done, _ = await asyncio.wait([*tasks, stopper], return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            if task is not stopper and task.exception():
                log.error("adapter %s stopped: %r", task.get_name(), task.exception())
                app.health.adapter(task.get_name(), "failed", str(task.exception())[:200])
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), timeout=settings.shutdown_grace + 30)
    except asyncio.TimeoutError:
        log.warning("adapters did not stop in time")
    finally:
        stopper.cancel()
        for task in tasks:
            task.cancel()
        if status is not None:
            await status.stop()
        app.store.close()
        log.info("stopped")


async def start_status_server(app, settings: Settings):
    """Metrics, health and the status page, unless METRICS_PORT is empty."""
    if settings.metrics_port is None:
        return None
    from bot.status_server import StatusServer

    server = StatusServer(app, settings.metrics_host, settings.metrics_port, settings.status_token.get_secret_value())
    return await server.start()


def check(settings: Settings) -> int:
    """Say what is configured and whether each model resolves; start nothing."""
    from models.base import ModelUnavailable
    from models.hub import resolve

    print(f"configuration: OK (data in {settings.data_dir.resolve()})")
    platforms = platform_names(settings)
    for name in (p.name for p in PLATFORMS):
        print(f"adapter {name}: {'configured' if name in platforms else 'not configured (no token)'}")
    print(f"adapter console: {'not used (a platform token is set)' if platforms else 'used (no platform token)'}")
    problems = 0
    for role, spec in role_specs(settings).items():
        resolution = None
        if spec.backend == "openai":
            where = f"served by {spec.base_url or '(no base URL!)'} as {spec.model}"
            problems += not spec.base_url
        else:
            try:
                resolution = resolve(spec.model, hub=spec.hub, variable=spec.variable, download=False)
                where = resolution.detail
            except ModelUnavailable as exc:
                resolution, where, problems = None, f"ERROR: {exc}", problems + 1
        print(f"model {role:<6} [{spec.backend}] {spec.model}: {where}")
        if role == "vision" and spec.backend == "transformers" and resolution is not None:
            from models.vision import vision_readiness

            ready, line = vision_readiness(resolution.path, spec.model, spec.device)
            problems += not ready
            print(f"  vision: {line if ready else 'NOT READY: ' + line}")
    assert set(ROLES) == set(role_specs(settings))
    return 1 if problems else 0

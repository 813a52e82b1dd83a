"""Command line: run the configured adapters, force the console, or check the configuration."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

from bot.app import App, role_specs
from bot.config import ROLES, ConfigError, Settings, load_settings
from bot.datadir import DataDirError, cause, claim
from bot.logs import setup_logging
from bot.messages import AdapterCannotRun
from bot.platforms import PLATFORMS, platform_names
from bot.store import HistoryStore
from bot.supervisor import supervise

from .compose import adapter_factories, build_app

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
    try:  # one process per DATA_DIR, and one that takes writes; else one line, no traceback
        lock = claim(settings.data_dir)
        setup_logging(settings, quiet_stderr=not platforms)
        store = open_store(settings)
    except DataDirError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from bot.status_server import ServerStartError

    try:
        asyncio.run(serve(settings, platforms, store))
    except KeyboardInterrupt:
        pass
    except ServerStartError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except AdapterCannotRun as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        lock.release()
    return 0


def open_store(settings: Settings) -> HistoryStore:
    try:
        return HistoryStore(settings.db_path)
    except Exception as exc:  # sqlite3 errors and OSError: full, read-only, corrupt
        raise DataDirError(f"DATA_DIR {settings.data_dir.resolve()}: cannot open {settings.db_path.name}: {cause(exc)}") from None


async def serve(
    settings: Settings, platforms: list[str], store: HistoryStore | None = None, *,
    app: App | None = None, stop: asyncio.Event | None = None,
) -> None:
    """Run the adapters until SIGTERM/SIGINT (or end of console input). A dead adapter is
    restarted while the others serve; `AdapterCannotRun` at start ends the process."""
    app = app or build_app(settings, store)
    try:
        await app.prepare()
        status = await start_status_server(app, settings) if platforms else None  # not for the local console
    except BaseException:
        app.store.close()
        raise
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    signals = (signal.SIGTERM,) if not platforms else (signal.SIGTERM, signal.SIGINT)
    for sig in signals:
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):
            pass
    factories = adapter_factories(app, settings, platforms)
    for name, _ in factories:
        app.health.expect(name)
    log.info("starting %s", ", ".join(name for name, _ in factories))
    tasks = [
        asyncio.create_task(supervise(name, make, stop, on_failure=_health_reporter(app, name)), name=name)
        for name, make in factories
    ]
    stopper = asyncio.create_task(stop.wait())
    failure: BaseException | None = None
    try:
        done, _ = await asyncio.wait([*tasks, stopper], return_when=asyncio.FIRST_COMPLETED)
        failure = next((t.exception() for t in done if t is not stopper and t.exception()), None)
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), timeout=settings.shutdown_grace + 30)
    except asyncio.TimeoutError:
        log.warning("adapters did not stop in time")
    finally:
        stopper.cancel()
        for task in tasks:
            task.cancel()
        for sig in signals:
            try:
                loop.remove_signal_handler(sig)
            except (NotImplementedError, RuntimeError):
                pass
        if status is not None:
            await status.stop()
        app.store.close()
        log.info("stopped")
    if failure is not None:
        raise failure


async def start_status_server(app, settings: Settings):
    """Metrics, health and the status page, unless METRICS_PORT is empty."""
    if settings.metrics_port is None:
        return None
    from bot.status_server import StatusServer

    server = StatusServer(app, settings.metrics_host, settings.metrics_port, settings.status_token.get_secret_value())
    return await server.start()


def _health_reporter(app: App, name: str):
    """The status page and /readyz show an adapter that died (and is being restarted) as failed."""
    return lambda failure: app.health.adapter(name, "failed", failure[:200])


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

"""What the status page shows, as one JSON-ready snapshot (also served at /api/status).

Configuration without secrets, adapter and model states, the last hour's chart series and
the last day's usage per user id (never names or message text).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING
from urllib.parse import urlsplit, urlunsplit

from .metrics import model_names

if TYPE_CHECKING:
    from .app import App


def _without_credentials(url: str) -> str | None:
    """A server URL as shown on the page: any user:password@ part removed."""
    if not url:
        return None
    parts = urlsplit(url)
    return urlunsplit(parts._replace(netloc=parts.hostname + (f":{parts.port}" if parts.port else ""))) if parts.username else url


def configuration(app: "App") -> list[list]:
    """(setting, value) pairs as the operator wrote them in .env; never a secret."""
    from .platforms import platform_names

    s = app.settings
    rows: list[list] = []
    for role, spec in app.hub.specs.items():
        server = _without_credentials(spec.base_url)
        rows.append([f"{role.upper()}_MODEL", f"{spec.model} ({spec.backend}{', ' + server if server else ''})"])
    rows += [
        ["platforms", ", ".join(platform_names(s)) or "console"],
        ["DEVICE / DTYPE", f"{s.device} / {s.dtype}"],
        ["MAX_CONCURRENT_GENERATIONS", s.max_concurrent_generations],
        ["OPENAI_MAX_CONCURRENT", s.openai_max_concurrent],
        ["MAX_CONTEXT_TOKENS", s.max_context_tokens],
        ["MAX_NEW_TOKENS", s.max_new_tokens],
        ["RATE_LIMIT_MESSAGES / _PER_MINUTE", f"{s.rate_limit_messages} / {s.rate_limit_per_minute:g}"],
        ["AGENT_RATE_LIMIT_MESSAGES / _PER_MINUTE", f"{s.agent_rate_limit_messages} / {s.agent_rate_limit_per_minute:g}"],
        ["AGENT_TOOLS", s.agent_tools],
        ["personas", ", ".join(sorted(app.personas))],
        ["METRICS_HOST:METRICS_PORT", f"{s.metrics_host}:{s.metrics_port}"],
    ]
    return rows


def models(app: "App") -> list[dict]:
    out = []
    for name, model in model_names(app.hub):
        fig = model.figures
        out.append({
            "model": name,
            "roles": app.hub.roles_of(model),
            "backend": model.spec.backend,
            "state": fig.state,
            "error": fig.error or None,
            "device": fig.device or None,
            "memory_bytes": fig.memory_bytes,
            "load_seconds": None if fig.load_seconds is None else round(fig.load_seconds, 2),
            "queue": model.scheduler.waiting,
            "in_flight": model.scheduler.active,
            "batch_size": fig.batch_size,
            "tokens": fig.tokens,
        })
    return out


async def status_snapshot(app: "App", *, started: float) -> dict:
    app.metrics.sample_models()
    ready, report = await app.health.readiness(app.hub)
    return {
        "now": time.time(),
        "uptime_seconds": round(time.time() - started),
        "ready": ready,
        "readiness": report,
        "config": configuration(app),
        "adapters": [
            {"name": name, "state": a.state, "detail": a.detail, "since": a.since} for name, a in app.health.adapters.items()
        ],
        "models": models(app),
        "series": app.metrics.recent.series(),
        "usage": [
            {"user": user, "messages": u.messages, "tokens": u.tokens, "agent_runs": u.agent_runs}
            for user, u in app.metrics.usage.last_day()
        ],
    }

"""Who a log line is about: platform, persona and session, set where they become known and read
by the JSON log format. Context variables follow each request's task (and `to_thread`)."""

from __future__ import annotations

import logging
from contextvars import ContextVar

FIELDS = ("platform", "persona", "session")
_vars: dict[str, ContextVar[str | None]] = {name: ContextVar(f"log_{name}", default=None) for name in FIELDS}


def bind(**fields: str | None) -> None:
    """Set fields for the rest of the current task (each request runs in its own task)."""
    for name, value in fields.items():
        _vars[name].set(value)


def current() -> dict[str, str]:
    return {name: value for name, var in _vars.items() if (value := var.get()) is not None}


class ContextFilter(logging.Filter):
    """Copies the fields onto each record (on the thread and in the context that logs it)."""

    def filter(self, record: logging.LogRecord) -> bool:
        for name, value in current().items():
            if not hasattr(record, name):
                setattr(record, name, value)
        return True

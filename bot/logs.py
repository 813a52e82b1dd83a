"""Logging to DATA_DIR/bot.log and stderr, with every configured secret redacted.

LOG_FORMAT=text gives one readable line per event; LOG_FORMAT=json one JSON object per line
(time, level, logger, message, and platform / persona / session where known), for log
collectors. Redaction applies to the whole line in both.
"""

from __future__ import annotations

import json
import logging
import time
import logging.handlers
import re
from pathlib import Path

from .config import Settings
from .log_context import FIELDS, ContextFilter

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# Libraries that log request URLs (which carry the Telegram token) at INFO.
NOISY = ("httpx", "httpcore", "telegram.ext.Updater", "discord.gateway", "discord.http", "discord.webhook", "aiohttp.access")
_TOKEN_IN_URL = re.compile(r"/bot\d+:[A-Za-z0-9_-]{20,}")


def secrets_of(settings: Settings) -> list[str]:
    values = [
        getattr(settings, name).get_secret_value()
        for name, field in type(settings).model_fields.items()
        if "SecretStr" in str(field.annotation)
    ]
    return sorted({v for v in values if len(v) >= 6}, key=len, reverse=True)


class RedactingFormatter(logging.Formatter):
    def __init__(self, secrets: list[str], fmt: str = FORMAT) -> None:
        super().__init__(fmt)
        self.secrets = secrets

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record), self.secrets)


class JsonFormatter(logging.Formatter):
    """One JSON object per line; secrets redacted inside every field."""

    converter = staticmethod(time.gmtime)  # the "Z" in the timestamps

    def __init__(self, secrets: list[str]) -> None:
        super().__init__()
        self.secrets = secrets

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update({name: getattr(record, name) for name in FIELDS if getattr(record, name, None) is not None})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exception"] = record.exc_text
        entry = {key: redact(str(value), self.secrets) for key, value in entry.items()}
        return json.dumps(entry, ensure_ascii=False)


def redact(text: str, secrets: list[str]) -> str:
    for secret in secrets:
        text = text.replace(secret, "***")
    return _TOKEN_IN_URL.sub("/bot***", text)


def setup_logging(settings: Settings, *, quiet_stderr: bool = False) -> Path:
    """Configure the root logger. `quiet_stderr` (console chat) keeps stderr to warnings."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    path = settings.data_dir / "bot.log"
    secrets = secrets_of(settings)
    formatter = JsonFormatter(secrets) if settings.log_format == "json" else RedactingFormatter(secrets)
    to_file = logging.handlers.RotatingFileHandler(path, maxBytes=10 * 2**20, backupCount=3, encoding="utf-8")
    to_stderr = logging.StreamHandler()
    to_stderr.setLevel(logging.WARNING if quiet_stderr else settings.log_level)
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in (to_file, to_stderr):
        handler.setFormatter(formatter)
        handler.addFilter(ContextFilter())
        root.addHandler(handler)
    root.setLevel(settings.log_level)
    for name in NOISY:
        logging.getLogger(name).setLevel(logging.WARNING)
    return path

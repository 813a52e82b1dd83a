"""The one table of chat platforms: which setting turns each on, which adapter serves it, and
which settings hold its allowlists.

The CLI (`launcher/`), `check` and the access policy all read this table. The adapter is named
by its import path, not imported: `bot/` never imports `adapters/`; the composition root in
`launcher/` imports it when the platform is configured. A new platform is one row here, its
settings in `bot/config.py` and its package in `adapters/`.
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import Settings


@dataclass(frozen=True)
class Platform:
    name: str  # also the `Incoming.platform` of its messages and the prefix of its session keys
    token: str  # the Settings field whose value turns the platform on
    adapter: str  # "module:Class" of its adapter; constructed as Class(app, settings)
    allowed_users: str | None = None  # Settings fields of its allowlists (empty list = everyone)
    allowed_chats: str | None = None
    allowed_guilds: str | None = None
    # Whether a thread has an id of its own that the chat allowlist may name (a Discord thread is
    # a channel); a Telegram forum topic id is not a chat id, so it never matches that list.
    threads_are_chats: bool = False


PLATFORMS: tuple[Platform, ...] = (
    Platform(
        "telegram", "telegram_bot_token", "adapters.telegram:TelegramAdapter",
        allowed_users="telegram_allowed_users", allowed_chats="telegram_allowed_chats",
    ),
    Platform(
        "discord", "discord_bot_token", "adapters.discord:DiscordAdapter",
        allowed_users="discord_allowed_users", allowed_chats="discord_allowed_channels",
        allowed_guilds="discord_allowed_guilds", threads_are_chats=True,
    ),
)

CONSOLE_ADAPTER = "adapters.console:ConsoleAdapter"  # used when no platform is configured


def configured(settings: Settings) -> list[Platform]:
    """The platforms whose token is set, in table order."""
    return [p for p in PLATFORMS if getattr(settings, p.token).get_secret_value().strip()]


def platform_names(settings: Settings) -> list[str]:
    return [p.name for p in configured(settings)]

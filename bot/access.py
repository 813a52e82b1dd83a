"""Allowlists: who may use the bot at all (per platform, from `bot/platforms.py`), and who may
use a feature that declares its own allowlist (the agent). Checked once per request, by the
router, for the feature that will answer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from .config import Settings
from .messages import Incoming
from .platforms import PLATFORMS

if TYPE_CHECKING:
    from .features import Feature


@dataclass(frozen=True)
class Allowlist:
    users: frozenset[str] = frozenset()
    chats: frozenset[str] = frozenset()
    guilds: frozenset[str] = frozenset()
    # A Discord thread is a channel with its own id, so listing it admits it; a Telegram forum
    # topic id is a small number that any supergroup may have, so only chat ids count there.
    threads_are_chats: bool = False

    def permits(self, msg: Incoming) -> bool:
        """Empty lists allow everyone; each non-empty list must contain the message's id."""
        if self.users and msg.user_id not in self.users:
            return False
        if self.chats and msg.chat_id not in self.chats and not (
            self.threads_are_chats and msg.thread_id and msg.thread_id in self.chats
        ):
            return False
        if self.guilds and (msg.guild_id or "") not in self.guilds:
            return False
        return True


def _ids(settings: Settings, name: str | None) -> frozenset[str]:
    return getattr(settings, name) if name else frozenset()


class AccessPolicy:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.platforms = {
            p.name: Allowlist(_ids(settings, p.allowed_users), _ids(settings, p.allowed_chats),
                              _ids(settings, p.allowed_guilds), threads_are_chats=p.threads_are_chats)
            for p in PLATFORMS
        }

    def allows(self, msg: Incoming) -> bool:
        """May this user use the bot on this platform at all?"""
        rule = self.platforms.get(msg.platform)
        return rule is None or rule.permits(msg)

    def allows_feature(self, msg: Incoming, feature: "Feature") -> bool:
        """May this user use this feature? (A feature's allowlist holds "platform:id" or "id".)"""
        users = _ids(self.settings, feature.allowlist)
        return not users or msg.user_id in users or f"{msg.platform}:{msg.user_id}" in users

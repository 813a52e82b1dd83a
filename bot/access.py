"""Allowlists: who may use the bot at all, and who may use a persona (the agent)."""

from __future__ import annotations

from dataclasses import dataclass

from .config import Settings
from .messages import Incoming


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


class AccessPolicy:
    def __init__(self, settings: Settings) -> None:
        self.platforms = {
            "telegram": Allowlist(settings.telegram_allowed_users, settings.telegram_allowed_chats),
            "discord": Allowlist(
                settings.discord_allowed_users, settings.discord_allowed_channels, settings.discord_allowed_guilds,
                threads_are_chats=True,
            ),
        }
        self.agent_users = settings.agent_allowed_users

    def allows(self, msg: Incoming) -> bool:
        rule = self.platforms.get(msg.platform)
        return rule is None or rule.permits(msg)

    def allows_role(self, msg: Incoming, role: str) -> bool:
        if role != "agent" or not self.agent_users:
            return True
        return msg.user_id in self.agent_users or f"{msg.platform}:{msg.user_id}" in self.agent_users

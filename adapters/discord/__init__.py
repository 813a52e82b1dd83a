"""Discord adapter (discord.py 2): messages and slash commands → the core, answers streamed by edits."""

from .adapter import DiscordAdapter

__all__ = ["DiscordAdapter"]

"""Telegram adapter (python-telegram-bot 22): updates → the core, answers streamed by edits."""

from .adapter import TelegramAdapter

__all__ = ["TelegramAdapter"]

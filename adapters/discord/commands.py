"""The slash commands: built from the core's command menu, described and localised (zh-CN),
and synced to Discord only when the set changed (a hash per scope in DATA_DIR).

Each command's callback only hands over to the adapter, which defers at once and routes the
command through `App.handle`.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Awaitable, Callable, Iterable, Protocol

import discord
from discord import app_commands
from discord.app_commands import locale_str

from bot.i18n import t

from . import texts  # noqa: F401  (registers the texts)

log = logging.getLogger(__name__)

HASH_FILE = "discord_commands.json"
CHINESE = {discord.Locale.chinese}  # zh-CN; other locales see English


def text(key: str) -> locale_str:
    """An English text that the translator localises by its i18n key (descriptions: ≤ 100 chars)."""
    return locale_str(t(key, "en")[:100], key=key)


class I18nTranslator(app_commands.Translator):
    async def translate(self, string: locale_str, locale: discord.Locale, context: app_commands.TranslationContext) -> str | None:
        key = string.extras.get("key")
        if key is None or locale not in CHINESE:
            return None
        return t(key, "zh")[:100]


class MenuEntry(Protocol):
    """One command of the core's menu (a `bot.features.Feature`)."""

    command: str
    description_key: str
    argument: str  # "prompt", "image" or "none"


OnCommand = Callable[..., Awaitable[None]]  # (interaction, command, text, attachment=None)


def build_tree(client: discord.Client, menu: Iterable[MenuEntry], on_command: OnCommand) -> app_commands.CommandTree:
    """One app command per declared feature in the core's menu (bot/features.py), shaped by its
    argument: a prompt, an image with a question, or nothing. Each hands over to `on_command`."""
    tree = app_commands.CommandTree(client)
    callbacks = {"prompt": _prompt_callback, "image": _image_callback, "none": _plain_callback}
    for entry in menu:
        callback = callbacks[entry.argument](on_command, entry.command)
        tree.add_command(app_commands.Command(name=entry.command, description=text(entry.description_key), callback=callback))
    return tree


def _prompt_callback(on_command: OnCommand, name: str) -> Any:
    @app_commands.describe(prompt=text("discord_arg_prompt"))
    async def command(interaction: discord.Interaction, prompt: str | None = None) -> None:
        await on_command(interaction, name, prompt or "")

    return command


def _image_callback(on_command: OnCommand, name: str) -> Any:
    @app_commands.describe(image=text("discord_arg_image"), question=text("discord_arg_question"))
    async def command(interaction: discord.Interaction, image: discord.Attachment, question: str | None = None) -> None:
        await on_command(interaction, name, question or "", attachment=image)

    return command


def _plain_callback(on_command: OnCommand, name: str) -> Any:
    async def command(interaction: discord.Interaction) -> None:
        await on_command(interaction, name, "")

    return command


# -- syncing ---------------------------------------------------------------------------------------


async def command_digest(tree: app_commands.CommandTree, guild: discord.abc.Snowflake | None) -> str:
    translator = tree.translator or I18nTranslator()
    payloads = [await c.get_translated_payload(tree, translator) for c in tree.get_commands(guild=guild)]
    blob = json.dumps(sorted(payloads, key=lambda p: p["name"]), sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()


def _load(path: Path) -> dict[str, str]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


async def sync_commands(tree: app_commands.CommandTree, application_id: int, guild_ids: frozenset[str], data_dir: Path) -> list[str]:
    """Sync globally, or to each of DISCORD_GUILD_IDS (instant), skipping scopes whose command
    set is unchanged since the last sync. Returns the scopes synced."""
    path = data_dir / HASH_FILE
    stored = _load(path)
    scopes: list[discord.Object | None] = []
    for raw in sorted(guild_ids):
        if raw.isdigit():
            scopes.append(discord.Object(int(raw)))
        else:
            log.error("DISCORD_GUILD_IDS: %r is not a guild id (a number); skipped", raw[:40])
    if not guild_ids:
        scopes.append(None)
    synced = []
    for guild in scopes:
        if guild is not None:
            tree.copy_global_to(guild=guild)
        scope = f"{application_id}:{guild.id if guild else 'global'}"
        digest = await command_digest(tree, guild)
        if stored.get(scope) == digest:
            log.info("Discord commands unchanged for %s; not syncing", scope)
            continue
        try:
            await tree.sync(guild=guild)
        except discord.HTTPException as exc:
            where = f"guild {guild.id}" if guild else "the application"
            log.error("could not sync slash commands to %s (is the bot in it, with the applications.commands scope?): %s", where, exc)
            continue
        log.info("synced %d Discord commands to %s", len(tree.get_commands(guild=guild)), scope)
        stored[scope] = digest
        synced.append(scope)
    if synced:
        data_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(stored, indent=1))
    return synced

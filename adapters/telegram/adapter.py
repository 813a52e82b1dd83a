"""TelegramAdapter: python-telegram-bot in our own event loop, updates → App.handle.

Long polling by default; webhook mode when TELEGRAM_WEBHOOK_URL is set (every request must
carry the secret token, TELEGRAM_WEBHOOK_SECRET or a random one per start). Each update is
handled in its own task, so many chats stream at once; the core keeps one session's messages
in order. On stop (SIGTERM) polling ends first, then the core drains the answers in flight
(`App.drain`: the one shutdown policy of every adapter), then the HTTP client closes.
"""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
from urllib.parse import urlparse

from telegram import BotCommand, CallbackQuery, Update
from telegram.error import InvalidToken, TelegramError
from telegram.ext import AIORateLimiter, Application, ContextTypes, TypeHandler

from bot.app import App
from bot.config import Settings
from bot.i18n import lang_of, t
from bot.logs import redact

from . import texts  # noqa: F401  (registers the adapter's texts)
from .api_calls import count_api_calls
from .handlers import BotIdentity, incoming_from_callback, incoming_from_message
from .surface import REGENERATE, STOP, Pacer, TelegramSurface
from .webhook import WebhookServer

log = logging.getLogger(__name__)

UPDATES = ["message", "callback_query"]
TOKEN_LOGGERS = ("telegram.Bot", "telegram.ext.ExtBot")  # they log "Set Bot API URL: …/bot<token>"
MENU_LANGUAGES = (("en", None), ("zh", "zh"))  # (our language, Telegram's language_code)
_COMMAND_NAME = re.compile(r"[a-z0-9_]{1,32}")


def file_base_url(settings: Settings) -> str:
    """TELEGRAM_FILE_BASE_URL, or the one that goes with a self-hosted TELEGRAM_API_BASE_URL."""
    if settings.telegram_file_base_url:
        return settings.telegram_file_base_url
    api = settings.telegram_api_base_url
    if api.rstrip("/").endswith("/bot"):
        return api.rstrip("/")[: -len("bot")] + "file/bot"
    return ""


class TelegramAdapter:
    name = "telegram"

    def __init__(
        self,
        app: App,
        settings: Settings,
        *,
        read_timeout: float = 15.0,
        poll_timeout: int = 30,
    ) -> None:
        self.app = app
        self.settings = settings
        self.read_timeout = read_timeout
        self.poll_timeout = poll_timeout
        self.pacer = Pacer()
        self.me: BotIdentity | None = None
        self.application: Application | None = None
        self.ready = asyncio.Event()  # set once updates are being received (for tests and logs)
        self._tasks: set[asyncio.Task] = set()  # keeps the handling tasks referenced
        self._stopping = False
        self.webhook: WebhookServer | None = None

    # -- building --------------------------------------------------------------------
    def build(self) -> Application:
        token = self.settings.telegram_bot_token.get_secret_value()
        if not token:
            raise RuntimeError("TELEGRAM_BOT_TOKEN is not set")
        builder = (
            Application.builder()
            .token(token)
            # Overall 30/s and 20/min per group; a 429 is raised to us (max_retries=0) so the
            # reply stream can send its newest text instead of a stale retry.
            .rate_limiter(AIORateLimiter(overall_max_rate=30, overall_time_period=1, group_max_rate=20, group_time_period=60, max_retries=0))
            .concurrent_updates(True)
            .read_timeout(self.read_timeout)
            .write_timeout(self.read_timeout)
            .connect_timeout(self.read_timeout)
            .pool_timeout(self.read_timeout)
            .get_updates_read_timeout(self.read_timeout)
        )
        if self.settings.telegram_api_base_url:
            builder = builder.base_url(self.settings.telegram_api_base_url)
        if file_base_url(self.settings):
            builder = builder.base_file_url(file_base_url(self.settings))
        application = builder.build()
        application.add_handler(TypeHandler(Update, self._on_update))
        application.add_error_handler(self._on_error)
        return application

    # -- running ---------------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> None:
        _quiet_libraries()
        hide_token = _HideToken(self.settings.telegram_bot_token.get_secret_value())
        for name in TOKEN_LOGGERS:
            logging.getLogger(name).addFilter(hide_token)
        try:
            await self._serve(stop)
        finally:
            for name in TOKEN_LOGGERS:
                logging.getLogger(name).removeFilter(hide_token)

    async def _serve(self, stop: asyncio.Event) -> None:
        application = self.application = self.build()
        count_api_calls(application.bot, self._api_call)
        try:
            await application.initialize()  # getMe
        except InvalidToken:
            raise RuntimeError("Telegram rejected TELEGRAM_BOT_TOKEN (check it with @BotFather)") from None
        try:
            bot = application.bot
            self.me = BotIdentity(bot.id, bot.username or "")
            await self._register_commands()
            await application.start()
            mode = await self._start_receiving(application)
            log.info("telegram: @%s is ready (%s)", self.me.username, mode)
            self.ready.set()
            self.app.health.adapter(self.name, "connected", mode)
            await stop.wait()
            log.info("telegram: stopping")
        finally:
            self._stopping = True
            self.app.health.adapter(self.name, "stopped")
            await self._shutdown(application)

    def _api_call(self, method: str, result: str) -> None:
        """Every Bot API call, for the metrics; getUpdates also tells whether polling works."""
        self.app.metrics.api_call(self.name, method, result)
        if method == "getUpdates" and self.ready.is_set() and not self._stopping:
            self.app.health.adapter(self.name, "connected" if result == "ok" else "disconnected", "long polling")

    async def _start_receiving(self, application: Application) -> str:
        url = self.settings.telegram_webhook_url
        if not url:
            await application.updater.start_polling(
                timeout=self.poll_timeout, allowed_updates=UPDATES, error_callback=self._polling_error
            )
            return "long polling"
        secret = self.settings.telegram_webhook_secret.get_secret_value() or secrets.token_urlsafe(32)
        # Our own endpoint, not the updater's: it checks the secret before reading a body.
        self.webhook = WebhookServer(
            application, listen=self.settings.telegram_webhook_listen, port=self.settings.telegram_webhook_port,
            path=urlparse(url).path, secret=secret,
        )
        await self.webhook.start()
        await application.bot.set_webhook(url=url, secret_token=secret, allowed_updates=UPDATES)
        return f"webhook on {self.settings.telegram_webhook_listen}:{self.settings.telegram_webhook_port}"

    async def _shutdown(self, application: Application) -> None:
        try:
            if application.updater and application.updater.running:
                await application.updater.stop()
            if self.webhook is not None:
                await self.webhook.stop()
            if application.running:
                await application.stop()  # hands out the updates already fetched
            await self.app.drain(self.name)
        finally:
            await application.shutdown()
            log.info("telegram: stopped")

    async def _register_commands(self) -> None:
        bot = self.application.bot
        for lang, code in MENU_LANGUAGES:
            commands = [
                BotCommand(f.command, t(f.description_key, lang)[:256])
                for f in self.app.menu(self.name) if _COMMAND_NAME.fullmatch(f.command)
            ]
            try:
                await bot.set_my_commands(commands, language_code=code)
            except TelegramError as exc:  # the menu is a convenience; the bot works without it
                log.warning("telegram: setMyCommands (%s) failed: %s", lang, exc)

    # -- updates -----------------------------------------------------------------------
    def _spawn(self, coroutine) -> None:
        task = asyncio.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _on_update(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        if update.callback_query is not None:
            self._spawn(self._on_button(update.callback_query))
            return
        message = update.message
        if message is None or self.me is None:
            return
        incoming = incoming_from_message(message, self.me, self.application.bot)
        if incoming is None:
            return
        reply_to = message.message_id if incoming.is_group else None
        self._spawn(self.app.handle(incoming, self.surface(incoming, reply_to=reply_to)))

    def surface(self, incoming, *, reply_to: int | None = None) -> TelegramSurface:
        return TelegramSurface(
            self.application.bot,
            self.pacer,
            int(incoming.chat_id),
            is_group=incoming.is_group,
            owner_id=incoming.user_id,
            lang=incoming.lang,
            thread_id=int(incoming.thread_id) if incoming.thread_id else None,
            reply_to=reply_to,
        )

    async def _on_button(self, query: CallbackQuery) -> None:
        kind, _, owner = (query.data or "").partition(":")
        incoming = incoming_from_callback(query)
        lang = lang_of(query.from_user.language_code)
        try:
            if incoming is None or kind not in (STOP, REGENERATE):
                await query.answer(t("telegram_button_expired", lang), show_alert=True)
            elif owner != str(query.from_user.id):
                log.info("telegram: user %s pressed a button of user %s", query.from_user.id, owner)
                await query.answer(t("telegram_not_your_button", lang), show_alert=True)
            elif kind == STOP:
                stopped = self.app.stop_for(incoming)
                await query.answer(t("stop_done" if stopped else "stop_nothing", lang))
            else:
                await query.answer()
                await self.app.regenerate(incoming, self.surface(incoming))
        except TelegramError as exc:
            log.warning("telegram: handling a button press failed: %s", exc)

    # -- errors ------------------------------------------------------------------------
    async def _on_error(self, update: object, context: ContextTypes.DEFAULT_TYPE) -> None:
        log.error("telegram: an update could not be handled: %r", context.error, exc_info=context.error)

    @staticmethod
    def _polling_error(error: TelegramError) -> None:
        log.warning("telegram: fetching updates failed (%s); retrying", error)


class _HideToken(logging.Filter):
    """python-telegram-bot logs its API URLs (which contain the token) at DEBUG. Rewriting the
    record protects every handler, also those `bot.logs.setup_logging` did not install."""

    def __init__(self, token: str) -> None:
        super().__init__()
        self.token = token

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        hidden = redact(message, [self.token] if self.token else [])
        if hidden != message:
            record.msg, record.args = hidden, None
        return True


def _quiet_libraries() -> None:
    """httpx logs every request URL (with the bot token) at INFO; AIORateLimiter logs a
    traceback for each 429, which the surface already reports in one line."""
    for name in ("httpx", "httpcore"):
        logger = logging.getLogger(name)
        if logger.getEffectiveLevel() < logging.WARNING:
            logger.setLevel(logging.WARNING)
    logging.getLogger("telegram.ext.AIORateLimiter").setLevel(logging.CRITICAL)

"""The few texts only the Telegram adapter writes (buttons, button refusals, setup hints)."""

from bot.i18n import register

register(
    {
        "telegram_stop_button": {"en": "⏹ Stop", "zh": "⏹ 停止"},
        "telegram_regenerate_button": {"en": "🔄 Regenerate", "zh": "🔄 重新生成"},
        "telegram_not_your_button": {
            "en": "Only the person who asked can use this button.",
            "zh": "只有提问的人才能使用这个按钮。",
        },
        "telegram_button_expired": {
            "en": "This button no longer works. Please send your question again.",
            "zh": "这个按钮已失效，请重新发送你的问题。",
        },
    }
)

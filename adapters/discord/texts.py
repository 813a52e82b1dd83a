"""The Discord adapter's own user-visible texts (both languages), registered with bot.i18n."""

from __future__ import annotations

from bot.i18n import register

register({
    "discord_button_stop": {"en": "Stop", "zh": "停止"},
    "discord_button_regenerate": {"en": "Regenerate", "zh": "重新生成"},
    "discord_not_yours": {
        "en": "Only the person who asked can use these buttons.",
        "zh": "只有提问的人才能使用这些按钮。",
    },
    "discord_arg_prompt": {
        "en": "What to ask (leave empty to switch to this persona)",
        "zh": "要问的内容（留空则切换到这个角色）",
    },
    "discord_arg_image": {"en": "The image to ask about", "zh": "要提问的图片"},
    "discord_arg_question": {"en": "Your question about the image", "zh": "关于这张图片的问题"},
})

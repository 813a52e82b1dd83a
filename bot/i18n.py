"""Every text the bot itself writes, in English and 简体中文.

The language comes from the user's language code on the platform; anything starting with
"zh" is Chinese, everything else English.
"""

from __future__ import annotations

LANGS = ("en", "zh")


def lang_of(code: str | None) -> str:
    return "zh" if code and code.lower().replace("_", "-").startswith("zh") else "en"


TEXTS: dict[str, dict[str, str]] = {
    # --- greetings and help ---------------------------------------------------------
    "start": {
        "en": "Hi! I am a bot for the InternLM models.\n\n{commands}\n\nJust send a message to talk to the current persona ({persona}).",
        "zh": "你好！我是书生·浦语（InternLM）模型机器人。\n\n{commands}\n\n直接发消息即可与当前角色（{persona}）对话。",
    },
    "help_header": {"en": "Commands:", "zh": "命令："},
    "help_footer": {
        "en": "Plain messages go to the current persona. History is kept per persona until /reset.",
        "zh": "普通消息发给当前角色。每个角色的对话历史会一直保留，直到 /reset。",
    },
    # command descriptions, persona titles and greetings are declared with each feature
    # (bot/features.py) and registered when an App is built
    "persona_current": {"en": "Current persona: {persona}.", "zh": "当前角色：{persona}。"},
    # --- session ----------------------------------------------------------------------
    "reset_done": {"en": "Forgot the conversation with {persona}.", "zh": "已清除与{persona}的对话历史。"},
    "stop_done": {"en": "Stopped.", "zh": "已停止。"},
    "stop_nothing": {"en": "Nothing is running.", "zh": "当前没有正在生成的回答。"},
    "stopped_mark": {"en": "⏹ stopped", "zh": "⏹ 已停止"},
    "queued_session": {"en": "⏳ Waiting for your previous answer to finish…", "zh": "⏳ 正在等待上一个回答完成……"},
    "queued_model": {"en": "⏳ In the queue: {n} ahead of you…", "zh": "⏳ 排队中：前面还有 {n} 个请求……"},
    "loading_model": {"en": "⏳ Loading the model, this can take a minute…", "zh": "⏳ 正在加载模型，可能需要一分钟……"},
    "thinking": {"en": "…", "zh": "…"},
    "empty_answer": {"en": "(the model gave an empty answer)", "zh": "（模型没有给出回答）"},
    "regenerate_nothing": {"en": "There is nothing to regenerate.", "zh": "没有可以重新生成的回答。"},
    # --- input problems -----------------------------------------------------------
    "unknown_command": {"en": "Unknown command /{command}. Send /help for the list.", "zh": "未知命令 /{command}。发送 /help 查看命令列表。"},
    "empty_input": {"en": "Please send some text.", "zh": "请输入文字内容。"},
    "too_long": {
        "en": "That message is too long ({length} characters; the limit is {limit}). Please shorten it.",
        "zh": "消息太长（{length} 个字符，上限 {limit}），请缩短后再发。",
    },
    "binary_input": {"en": "That looks like binary data, not text.", "zh": "这看起来是二进制数据，而不是文字。"},
    "rate_limited": {
        "en": "You are sending messages too fast. Please wait {seconds} s.",
        "zh": "发送太频繁了，请等待 {seconds} 秒。",
    },
    "not_allowed": {
        "en": "Sorry, this bot is private and you are not on its list of allowed users.",
        "zh": "抱歉，这是一个私有机器人，你不在允许使用的名单中。",
    },
    "not_available": {
        "en": "{feature} is not available yet on this bot.",
        "zh": "本机器人暂不支持{feature}。",
    },
    "feature_image": {"en": "Image questions", "zh": "图片问答"},
    # --- model problems -----------------------------------------------------------
    "model_failed": {
        "en": "⚠️ The model failed while answering. Please try again.",
        "zh": "⚠️ 模型在回答时出错，请重试。",
    },
    "model_unavailable": {
        "en": "⚠️ The model is not available right now. The operator has been told (see the bot's log).",
        "zh": "⚠️ 模型暂时不可用，已记录到日志，请稍后再试。",
    },
    "model_server_down": {
        "en": "⚠️ The model server is not reachable right now. Please try again in a minute.",
        "zh": "⚠️ 暂时无法连接模型服务器，请稍后再试。",
    },
    "internal_error": {"en": "⚠️ Something went wrong. Please try again.", "zh": "⚠️ 出了点问题，请重试。"},
}


def t(key: str, lang: str | None = "en", **values: object) -> str:
    texts = TEXTS[key]
    text = texts.get(lang_of(lang) if lang not in LANGS else lang) or texts["en"]
    return text.format(**values) if values else text


def register(texts: dict[str, dict[str, str]]) -> None:
    """Let a feature module add its own texts (both languages are required)."""
    for key, value in texts.items():
        missing = set(LANGS) - set(value)
        if missing:
            raise ValueError(f"text {key!r} lacks {sorted(missing)}")
        TEXTS[key] = value

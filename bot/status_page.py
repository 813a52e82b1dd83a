"""The status page: one self-contained HTML document (no CDN, no external file), in English or
简体中文. A small inline script draws every table and chart (inline SVG) from the snapshot
embedded in the page, then polls /api/status and redraws, so the page stays live without a
reload. Every value goes into the page as text (never as markup), so ids and model names
cannot inject anything.
"""

from __future__ import annotations

import json
import secrets
from importlib import resources

from .i18n import LANGS, register, t

TEXTS = {
    "status_title": {"en": "InternLM bot: status", "zh": "InternLM 机器人：运行状态"},
    "status_ready": {"en": "ready", "zh": "就绪"},
    "status_not_ready": {"en": "not ready", "zh": "未就绪"},
    "status_uptime": {"en": "up", "zh": "已运行"},
    "status_updated": {"en": "updated", "zh": "更新于"},
    "status_adapters": {"en": "Platforms", "zh": "平台"},
    "status_models": {"en": "Models", "zh": "模型"},
    "status_config": {"en": "Configuration", "zh": "配置"},
    "status_charts": {"en": "Last hour", "zh": "最近一小时"},
    "status_usage": {"en": "Usage per user, last 24 hours", "zh": "最近 24 小时各用户用量"},
    "status_usage_note": {"en": "User ids only; no names, no message text.", "zh": "只显示用户 id，不含名字和消息内容。"},
    "status_col_name": {"en": "name", "zh": "名称"},
    "status_col_state": {"en": "state", "zh": "状态"},
    "status_col_since": {"en": "since", "zh": "起始时间"},
    "status_col_detail": {"en": "detail", "zh": "详情"},
    "status_col_model": {"en": "model", "zh": "模型"},
    "status_col_roles": {"en": "roles", "zh": "角色"},
    "status_col_backend": {"en": "backend", "zh": "后端"},
    "status_col_device": {"en": "device", "zh": "设备"},
    "status_col_memory": {"en": "memory", "zh": "内存"},
    "status_col_load": {"en": "load time", "zh": "加载耗时"},
    "status_col_queue": {"en": "queue", "zh": "排队"},
    "status_col_in_flight": {"en": "generating", "zh": "生成中"},
    "status_col_tokens": {"en": "tokens", "zh": "token 数"},
    "status_col_user": {"en": "user id", "zh": "用户 id"},
    "status_col_messages": {"en": "messages", "zh": "消息数"},
    "status_col_agent_runs": {"en": "agent runs", "zh": "智能体运行次数"},
    "status_col_setting": {"en": "setting", "zh": "设置"},
    "status_col_value": {"en": "value", "zh": "值"},
    "status_chart_answers": {"en": "Answers per minute", "zh": "每分钟回答数"},
    "status_chart_tokens": {"en": "Tokens per second, per model", "zh": "各模型每秒 token 数"},
    "status_chart_queue": {"en": "Queue length (peak per minute)", "zh": "排队长度（每分钟峰值）"},
    "status_chart_first_text": {"en": "Time to first text (s)", "zh": "首字延迟（秒）"},
    "status_chart_429": {"en": "Rate-limit answers (429) per minute", "zh": "每分钟限流响应（429）数"},
    "status_no_users": {"en": "No users yet.", "zh": "暂无用户。"},
    "status_no_data": {"en": "no data yet", "zh": "暂无数据"},
    "status_state_starting": {"en": "starting", "zh": "启动中"},
    "status_state_connected": {"en": "connected", "zh": "已连接"},
    "status_state_disconnected": {"en": "disconnected", "zh": "已断开"},
    "status_state_stopped": {"en": "stopped", "zh": "已停止"},
    "status_state_failed": {"en": "failed", "zh": "失败"},
    "status_state_not loaded": {"en": "not loaded", "zh": "未加载"},
    "status_state_loading": {"en": "loading", "zh": "加载中"},
    "status_state_ready": {"en": "ready", "zh": "就绪"},
    "status_language": {"en": "中文", "zh": "English"},
    "status_hours": {"en": "h", "zh": "小时"},
    "status_minutes": {"en": "min", "zh": "分"},
    "status_seconds": {"en": "s", "zh": "秒"},
}
register(TEXTS)


def page_texts(lang: str) -> dict[str, str]:
    return {key.removeprefix("status_"): t(key, lang) for key in TEXTS}


def _json_for_script(value: object) -> str:
    """JSON that cannot close its <script> element."""
    return json.dumps(value, ensure_ascii=False).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def render_page(snapshot: dict, lang: str) -> tuple[str, str]:
    """(the HTML, the nonce its inline style and script carry for the Content-Security-Policy)."""
    assert lang in LANGS
    nonce = secrets.token_urlsafe(16)
    other = "zh" if lang == "en" else "en"
    assets = resources.files(__package__) / "status_assets"
    style = (assets / "status.css").read_text(encoding="utf-8")
    script = (assets / "status.js").read_text(encoding="utf-8")
    title = t("status_title", lang)
    html = f"""<!doctype html>
<html lang="{'zh-CN' if lang == 'zh' else 'en'}">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="icon" href="data:,">
<title>{title}</title>
<style nonce="{nonce}">{style}</style>
</head>
<body>
<header>
  <h1>{title}</h1>
  <span id="readiness" class="badge"></span>
  <span id="clock" class="muted"></span>
  <a id="language" data-lang="{other}" href="?lang={other}">{t("status_language", lang)}</a>
</header>
<main>
  <section><h2>{t("status_adapters", lang)}</h2><table id="adapters"></table></section>
  <section><h2>{t("status_models", lang)}</h2><table id="models"></table></section>
  <section><h2>{t("status_charts", lang)}</h2><div id="charts" class="charts"></div></section>
  <section><h2>{t("status_usage", lang)}</h2><p class="muted">{t("status_usage_note", lang)}</p><table id="usage"></table></section>
  <section><h2>{t("status_config", lang)}</h2><table id="config"></table></section>
</main>
<script id="initial" type="application/json">{_json_for_script(snapshot)}</script>
<script id="texts" type="application/json">{_json_for_script(page_texts(lang))}</script>
<script nonce="{nonce}">{script}</script>
</body>
</html>
"""
    return html, nonce

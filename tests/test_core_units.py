"""Store, limits, access, config and i18n: small pieces of the core."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys

import pytest

from bot.access import AccessPolicy
from bot.features import FEATURES, Catalogue
from bot.config import ConfigError, Settings, load_settings
from bot.i18n import TEXTS, lang_of, t
from bot.limits import TokenBucket, clean_text
from bot.logs import RedactingFormatter, redact
from bot.messages import Incoming
from bot.store import HistoryStore


def test_store_keeps_history_per_session_and_persona(tmp_path):
    store = HistoryStore(tmp_path / "db.sqlite3")
    store.add("s1", "internlm", "user", "hi")
    store.add("s1", "internlm", "assistant", "hello")
    store.add("s1", "bajie", "user", "你好")
    store.add("s2", "internlm", "user", "other")
    assert [m.content for m in store.history("s1", "internlm")] == ["hi", "hello"]
    assert [m.content for m in store.history("s1", "bajie")] == ["你好"]
    assert store.reset("s1", "internlm") == 2
    assert store.history("s1", "internlm") == [] and len(store.history("s1", "bajie")) == 1
    store.set_persona("s1", "bajie")
    assert store.persona("s1", "internlm") == "bajie" and store.persona("s9", "internlm") == "internlm"


def test_answer_cut_by_kill_9_is_kept_and_marked_interrupted(tmp_path):
    path = tmp_path / "db.sqlite3"
    script = (
        "import os, sys; sys.path.insert(0, %r)\n"
        "from bot.store import HistoryStore\n"
        "s = HistoryStore(%r)\n"
        "s.add('k', 'internlm', 'user', 'question')\n"
        "a = s.add('k', 'internlm', 'assistant', '', status='streaming')\n"
        "s.update(a, 'half an ans')\n"
        "os.kill(os.getpid(), 9)\n"
    ) % (os.getcwd(), str(path))
    proc = subprocess.run([sys.executable, "-c", script])
    assert proc.returncode == -9
    store = HistoryStore(path)
    assert store.recovered == 1
    rows = store.history("k", "internlm")
    assert [(m.role, m.content, m.status) for m in rows] == [
        ("user", "question", "ok"),
        ("assistant", "half an ans", "interrupted"),
    ]
    assert sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_token_bucket_allows_a_burst_then_refills():
    now = [0.0]
    bucket = TokenBucket(3, per_minute=6, clock=lambda: now[0])
    assert [bucket.take("u") for _ in range(3)] == [0, 0, 0]
    wait = bucket.take("u")
    assert 9.9 < wait <= 10.0  # 6 per minute: one every 10 s
    assert bucket.take("other") == 0  # buckets are per user
    now[0] += 10
    assert bucket.take("u") == 0


@pytest.mark.parametrize(
    "raw, cleaned, problem",
    [
        ("  hello\r\nworld  ", "hello\nworld", None),
        ("", "", "empty_input"),
        ("   \n\t ", "", "empty_input"),
        ("a\x00b", "", "binary_input"),
        ("\x01\x02\x03\x04abc", "", "binary_input"),
        ("\ufffd\ufffd\ufffdab", "", "binary_input"),
        ("bell\x07 inside", "bell inside", None),
        ("x" * 101, "", "too_long"),
        ("猪八戒你好", "猪八戒你好", None),
    ],
)
def test_clean_text(raw, cleaned, problem):
    text, found = clean_text(raw, max_chars=100)
    assert text == cleaned
    assert (found.key if found else None) == problem


def incoming(**kw):
    base = dict(platform="telegram", chat_id="10", user_id="1")
    base.update(kw)
    return Incoming(**base)


def test_allowlists_per_platform_and_for_the_agent():
    settings = Settings(
        _env_file=None, telegram_allowed_users="1, 2", discord_allowed_guilds="g1", agent_allowed_users="telegram:2"
    )
    policy = AccessPolicy(settings)
    assert policy.allows(incoming(user_id="1")) and not policy.allows(incoming(user_id="3"))
    assert policy.allows(incoming(platform="console", user_id="anyone"))
    assert policy.allows(incoming(platform="discord", guild_id="g1", user_id="9"))
    assert not policy.allows(incoming(platform="discord", guild_id="g2", user_id="9"))
    assert not policy.allows(incoming(platform="discord", user_id="9"))  # DMs have no guild
    features = Catalogue(FEATURES).by_command
    assert policy.allows_feature(incoming(user_id="2"), features["agent"])
    assert not policy.allows_feature(incoming(user_id="1"), features["agent"])
    assert policy.allows_feature(incoming(user_id="1"), features["chat"])


def test_bad_setting_is_one_line_naming_it(monkeypatch):
    monkeypatch.setenv("MAX_NEW_TOKENS", "lots")
    with pytest.raises(ConfigError, match="^Invalid setting MAX_NEW_TOKENS: "):
        load_settings(_env_file=None)
    monkeypatch.delenv("MAX_NEW_TOKENS")
    monkeypatch.setenv("DEVICE", "gpu")
    with pytest.raises(ConfigError, match="DEVICE"):
        load_settings(_env_file=None)


def test_every_text_has_both_languages_and_language_codes_map():
    for key, texts in TEXTS.items():
        assert texts.get("en") and texts.get("zh"), key
    assert lang_of("zh-hans") == "zh" and lang_of("zh_CN") == "zh" and lang_of("en-US") == "en" and lang_of(None) == "en"
    assert t("stop_done", "zh-TW") == "已停止。" and t("stop_done", "de") == "Stopped."


def test_secrets_are_redacted_from_log_lines():
    token = "123456789:AAH-secret_token_value_abcdefghijkl"
    assert token not in redact(f"GET https://api.telegram.org/bot{token}/getMe", [])
    import logging

    formatter = RedactingFormatter(["sk-local-api-key-123"])
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "key=%s", ("sk-local-api-key-123",), None)
    assert "sk-local-api-key-123" not in formatter.format(record)


def test_env_example_documents_exactly_the_settings():
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / ".env.example").read_text()
    documented = set(re.findall(r"^([A-Z][A-Z0-9_]*)=", text, re.M))
    assert documented == {name.upper() for name in Settings.model_fields}
    Settings(_env_file=str(Path(__file__).resolve().parent.parent / ".env.example"))  # and it loads

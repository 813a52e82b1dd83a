"""The figures behind the status page: minute buckets, percentiles, the 24-hour usage window,
bounded model labels, the page's escaping and the settings' loopback check."""

from __future__ import annotations

import pytest

from bot.config import ConfigError, is_loopback, load_settings
from bot.recent import RecentFigures, percentile
from bot.status_page import _json_for_script, render_page
from bot.usage import UsageLog


class Clock:
    def __init__(self, now: float = 1_000_020.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_recent_figures_bucket_by_minute_and_forget_after_an_hour():
    clock = Clock()
    recent = RecentFigures(clock)
    for value in (0.2, 0.4, 0.6, 0.8, 3.0):
        recent.sample("first_text", value)
    recent.add("answers", 5)
    recent.counter("tokens:m", 600)  # counted from 0 at start
    recent.peak("queue:m", 3)
    recent.peak("queue:m", 1)
    clock.now += 60
    recent.add("answers", 2)
    recent.counter("tokens:m", 660)  # +60 this minute
    series = recent.series()
    assert len(series["minutes"]) == 60 and series["minutes"][-1] == int(clock.now // 60) * 60
    assert series["answers"][-2:] == [5, 2]
    assert series["first_text_p50"][-2] == 0.6 and series["first_text_p95"][-2] == 3.0
    assert series["first_text_p50"][-1] is None  # no answer this minute: a gap, not a zero
    assert series["queue"]["m"][-2] == 3
    assert series["tokens_per_second"]["m"][-2] == 10.0  # 600 tokens over a whole minute
    assert series["tokens_per_second"]["m"][-1] == round(60 / max(1.0, clock.now % 60), 2)
    clock.now += 3600
    recent.add("answers", 1)
    assert sum(recent.series()["answers"]) == 1  # the old hour is gone
    assert len(recent._minutes) == 1


def test_percentile_is_nearest_rank():
    assert percentile([], 50) is None
    assert percentile([5.0], 95) == 5.0
    assert percentile(list(range(1, 101)), 95) == 95
    assert percentile([1, 2, 3, 4], 50) == 2


def test_usage_covers_the_last_24_hours_busiest_first():
    clock = Clock(100 * 3600.0)
    usage = UsageLog(clock)
    usage.add("telegram:1", messages=1, tokens=10)
    clock.now += 3600
    usage.add("telegram:1", messages=1, tokens=10, agent_runs=1)
    usage.add("discord:2", messages=3, tokens=500)
    day = usage.last_day()
    assert [(u, x.messages, x.tokens, x.agent_runs) for u, x in day] == [("discord:2", 3, 500, 0), ("telegram:1", 2, 20, 1)]
    clock.now += 23 * 3600  # the first hour has left the window
    usage.add("telegram:3", messages=1)
    assert {u: x.messages for u, x in usage.last_day()} == {"telegram:1": 1, "discord:2": 3, "telegram:3": 1}


def test_page_data_cannot_close_its_script_element():
    hostile = {"user": "</script><script>alert(1)</script>", "model": "a&b"}
    text = _json_for_script(hostile)
    assert "<" not in text and ">" not in text and "&" not in text
    snapshot = {"now": 0, "uptime_seconds": 0, "ready": True, "series": {}, "usage": [hostile]}
    html, nonce = render_page(snapshot, "zh")
    assert html.count("</script>") == 3 and "alert(1)</script>" not in html
    assert f'nonce="{nonce}"' in html and '<html lang="zh-CN">' in html


@pytest.mark.parametrize("host, loopback", [
    ("127.0.0.1", True), ("127.0.0.53", True), ("::1", True), ("[::1]", True), ("localhost", True),
    ("0.0.0.0", False), ("::", False), ("192.168.1.5", False), ("bot.example.org", False),
])
def test_loopback_hosts(host, loopback):
    assert is_loopback(host) is loopback


def test_settings_refuse_a_public_host_without_a_token_and_accept_it_with_one():
    with pytest.raises(ConfigError, match="METRICS_HOST=0.0.0.0 .*STATUS_TOKEN"):
        load_settings(_env_file=None, metrics_host="0.0.0.0")
    assert load_settings(_env_file=None, metrics_host="0.0.0.0", status_token="t" * 16).metrics_host == "0.0.0.0"
    assert load_settings(_env_file=None, metrics_host="0.0.0.0", metrics_port="").metrics_port is None  # off: no server

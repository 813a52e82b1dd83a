"""Metrics, health probes, the status page (in a real headless Chromium), STATUS_TOKEN and JSON
logs, driven by a scripted conversation through the real Telegram adapter and the fake Bot API."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from contextlib import asynccontextmanager
from pathlib import Path
from urllib.parse import urlparse

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from bot.logs import setup_logging
from bot.metrics import model_names
from bot.status_server import StatusServer
from tests.fake_telegram import FakeTelegram
from tests.headless_browser import Browser
from tests.slow import slow_down
from tests.telegram_harness import TOKEN, running_bot, telegram_settings

pytestmark = pytest.mark.filterwarnings("ignore::telegram.warnings.PTBDeprecationWarning")

ROOT = Path(__file__).resolve().parent.parent
STATUS_TOKEN = "status-token-0123456789"


@asynccontextmanager
async def status_server(app, host: str = "127.0.0.1", token: str = ""):
    server = await StatusServer(app, host, 0, token).start()
    try:
        yield f"http://127.0.0.1:{server.port}"
    finally:
        await server.stop()


async def scrape(http: aiohttp.ClientSession, base: str) -> dict[tuple[str, frozenset], float]:
    async with http.get(base + "/metrics") as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain; version=")
        text = await response.text()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: dict, name: str, **labels: str) -> float:
    """The sum of the samples of `name` whose labels include `labels` (0 when there are none)."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and wanted <= ls)


def label_of(app, role: str) -> str:
    """The `model` label of a role's model."""
    return next(name for name, model in model_names(app.hub) if model is app.hub.get(role))


def answered(fake: FakeTelegram, chat: int) -> bool:
    messages = fake.messages(chat)
    return bool(messages) and any(b.startswith("regen:") for b in fake.buttons(messages[-1]))


async def converse(app, fake: FakeTelegram, user: int, text: str = "ping", *, fail_first_with_429: bool = False) -> None:
    """One user asks; waits until the answer is final and its figures are recorded."""
    chat = fake.private_chat(user)
    if fail_first_with_429:
        fake.fail_next("sendMessage", "429", retry_after=1, chat_id=chat)
    done_before = app.metrics.registry.get_sample_value("internlm_bot_answer_seconds_count", {"platform": "telegram", "persona": "internlm"}) or 0
    fake.send_text(chat, user, text)
    await fake.wait_until(lambda: answered(fake, chat) and fake.texts(chat)[-1] == "pong")
    await fake.wait_until(
        lambda: app.metrics.registry.get_sample_value("internlm_bot_answer_seconds_count", {"platform": "telegram", "persona": "internlm"}) == done_before + 1
    )


async def test_metrics_parse_and_move_as_a_telegram_conversation_runs(make_app):
    async with FakeTelegram(TOKEN) as fake:
        app = make_app(**telegram_settings(fake))
        model = label_of(app, "chat")
        async with status_server(app) as base, aiohttp.ClientSession() as http:
            before = await scrape(http, base)
            assert value(before, "internlm_bot_requests_total") == 0
            assert value(before, "internlm_bot_model_state", model=model, state="not loaded") == 1
            async with running_bot(app):
                await converse(app, fake, 42)
                await converse(app, fake, 43, fail_first_with_429=True)
                during = await scrape(http, base)
            after = await scrape(http, base)

    assert value(during, "internlm_bot_requests_total", platform="telegram", persona="internlm", outcome="answered") == 2
    assert value(during, "internlm_bot_first_text_seconds_count", platform="telegram", persona="internlm") == 2
    assert value(during, "internlm_bot_first_text_seconds_sum", platform="telegram") > 0
    assert value(during, "internlm_bot_answer_seconds_count", platform="telegram", persona="internlm") == 2
    assert value(during, "internlm_bot_answer_seconds_sum") >= value(during, "internlm_bot_first_text_seconds_sum")
    assert value(during, "internlm_bot_reply_edits_count", platform="telegram") == 2
    # the model: loaded once, two streams, the tokens of two "pong"s
    assert value(during, "internlm_bot_model_state", model=model, state="ready") == 1
    assert value(during, "internlm_bot_model_streams_total", model=model) == 2
    assert value(during, "internlm_bot_model_tokens_total", model=model) >= 2
    assert value(during, "internlm_bot_model_generation_seconds_total", model=model) > 0
    assert value(during, "internlm_bot_model_load_seconds", model=model) > 0
    assert value(during, "internlm_bot_model_memory_bytes", model=model, device="cpu") > 10_000
    assert value(during, "internlm_bot_model_queue_length", model=model) == 0
    assert value(during, "internlm_bot_model_streams_in_flight", model=model) == 0
    # Telegram's API calls as the fake saw them, and the injected 429
    calls = value(during, "internlm_bot_platform_api_calls_total", platform="telegram")
    assert value(during, "internlm_bot_platform_api_calls_total", method="sendMessage", result="ok") == len(fake.calls_of("sendMessage")) - 1
    assert value(during, "internlm_bot_platform_api_calls_total", method="sendMessage", result="429") == 1
    assert value(during, "internlm_bot_platform_api_calls_total", method="getUpdates", result="ok") >= 1
    assert value(during, "internlm_bot_platform_api_calls_total", method="setMyCommands", result="ok") == 2
    assert value(after, "internlm_bot_platform_api_calls_total", platform="telegram") >= calls
    # bounded labels: no user ids, chat ids or text anywhere
    labels = {v for (_, ls) in after for _, v in ls}
    assert not {"42", "43", "telegram:42", "telegram:43", "ping", "pong"} & labels


async def test_readyz_turns_ready_as_telegram_connects_and_reports_a_model_that_cannot_load(make_app, tmp_path):
    async with FakeTelegram(TOKEN) as fake, aiohttp.ClientSession() as http:
        app = make_app(**telegram_settings(fake))
        app.health.expect("telegram")  # as the CLI does for every configured adapter
        async with status_server(app) as base:
            async with http.get(base + "/healthz") as r:
                assert r.status == 200 and (await r.json())["alive"] is True
            async with http.get(base + "/readyz") as r:
                assert r.status == 503
                report = await r.json()
            assert report["adapters"] == {"telegram": "starting"}
            assert all(m["ok"] for m in report["models"].values())  # the tiny models are on disk
            async with running_bot(app):
                async with http.get(base + "/readyz") as r:
                    assert r.status == 200 and (await r.json())["adapters"] == {"telegram": "connected"}
            async with http.get(base + "/readyz") as r:
                assert r.status == 503 and (await r.json())["adapters"] == {"telegram": "stopped"}

        missing = tmp_path / "no-such-model"
        broken = make_app(**telegram_settings(fake), bajie_model=str(missing))
        broken.health.expect("telegram")
        async with status_server(broken) as base, running_bot(broken):
            async with http.get(base + "/readyz") as r:
                assert r.status == 503
                report = await r.json()
            assert report["adapters"] == {"telegram": "connected"}
            assert report["models"]["chat"] == {"ok": True, "problem": None}
            assert report["models"]["bajie"]["ok"] is False
            assert f"BAJIE_MODEL={missing}" in report["models"]["bajie"]["problem"]
            # asking Bajie tries to load it: the model shows as failed, the user gets a message
            chat = fake.private_chat(7)
            fake.send_text(chat, 7, "/bajie hello")
            await fake.wait_until(lambda: broken.hub.get("bajie").figures.state == "failed" and fake.texts(chat))
            async with http.get(base + "/api/status") as r:
                models = {m["model"]: m for m in (await r.json())["models"]}
            assert models[str(missing)]["state"] == "failed" and "BAJIE_MODEL" in models[str(missing)]["error"]


async def test_status_page_in_headless_chromium_shows_the_conversation_live(make_app):
    screenshot = Path(os.environ.get("STATUS_SCREENSHOT") or "")
    async with FakeTelegram(TOKEN) as fake:
        app = make_app(**telegram_settings(fake))
        app.health.expect("telegram")
        async with status_server(app) as base, running_bot(app), Browser() as browser:
            await converse(app, fake, 42)
            await converse(app, fake, 43, fail_first_with_429=True)
            await browser.open(base + "/?refresh=1&lang=en")
            await browser.wait_for("document.body.dataset.rendered")
            page = await browser.evaluate(PAGE_FIGURES)
            assert page["title"] == "InternLM bot: status"
            assert page["answers"] == 2  # the answers-per-minute chart holds both answers
            assert page["rate_limited"] == 1  # the injected 429
            assert page["tokens"] and all(series == label_of(app, "chat") for series, _ in page["tokens"])
            assert {s for s, _ in page["first_text"]} == {"p50", "p95"} and all(v > 0 for _, v in page["first_text"])
            assert page["usage"] == [["telegram:42", "1"], ["telegram:43", "1"]] or page["usage"] == [["telegram:43", "1"], ["telegram:42", "1"]]
            assert ["telegram", "connected"] in page["adapters"]
            assert "ready" in page["models"][0]
            config = dict(page["config"])
            assert config["CHAT_MODEL"].startswith(app.settings.chat_model) and config["platforms"] == "telegram"
            assert TOKEN not in page["html"] and TOKEN.split(":")[1] not in page["html"]  # no secret on the page
            if screenshot.name:
                await browser.screenshot(screenshot)
            # live: a new answer reaches the open page without a reload
            await browser.evaluate("window.notReloaded = true")
            await converse(app, fake, 42)
            await browser.wait_for(f"({PAGE_FIGURES}).answers === 3 && window.notReloaded === true")
            usage = (await browser.evaluate(PAGE_FIGURES))["usage"]
            assert ["telegram:42", "2"] in usage
            # 简体中文
            await browser.open(base + "/?lang=zh")
            await browser.wait_for("document.body.dataset.rendered")
            assert await browser.evaluate("document.querySelector('h1').textContent") == "InternLM 机器人：运行状态"
            assert "用户 id" in await browser.evaluate("document.getElementById('usage').textContent")
    # nothing the page loaded came from anywhere but the bot's own server
    assert browser.requests
    for url in browser.requests:
        parsed = urlparse(url)
        assert parsed.scheme in ("http", "data", "about") and (parsed.scheme != "http" or parsed.hostname == "127.0.0.1"), url


PAGE_FIGURES = """(() => {
  const dots = id => [...document.querySelectorAll('#chart-' + id + ' circle')].map(c => [c.dataset.series, Number(c.dataset.value)]);
  const total = id => dots(id).reduce((sum, [, v]) => sum + v, 0);
  const rows = id => [...document.querySelectorAll('#' + id + ' tr')].slice(1).map(tr => [...tr.children].map(td => td.textContent));
  return {
    title: document.querySelector('h1').textContent,
    answers: total('answers'), rate_limited: total('429'), tokens: dots('tokens'), first_text: dots('first-text'),
    usage: rows('usage').map(r => r.slice(0, 2)), adapters: rows('adapters').map(r => r.slice(0, 2)),
    models: rows('models').map(r => r.join(' ')), config: rows('config'),
    html: document.documentElement.outerHTML,
  };
})()"""


def test_a_non_loopback_metrics_host_without_status_token_refuses_to_start(tmp_path):
    env = {
        **os.environ, "METRICS_HOST": "0.0.0.0", "METRICS_PORT": "9464", "STATUS_TOKEN": "", "TELEGRAM_BOT_TOKEN": TOKEN,
        "DATA_DIR": str(tmp_path / "data"), "PYTHONPATH": str(ROOT),
    }
    done = subprocess.run([sys.executable, "-m", "launcher"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "METRICS_HOST=0.0.0.0" in done.stderr and "STATUS_TOKEN" in done.stderr
    assert not (tmp_path / "data").exists()  # refused before anything started


async def test_with_status_token_requests_without_it_get_401(make_app):
    app = make_app(metrics_host="0.0.0.0", status_token=STATUS_TOKEN)
    async with status_server(app, host="0.0.0.0", token=STATUS_TOKEN) as base, aiohttp.ClientSession() as http:
        for path in ("/", "/metrics", "/api/status"):
            async with http.get(base + path) as r:
                assert r.status == 401 and "STATUS_TOKEN" in (await r.json())["error"]
            async with http.get(base + path, headers={"Authorization": "Bearer wrong-token"}) as r:
                assert r.status == 401
            async with http.get(base + path, params={"token": "wrong"}) as r:
                assert r.status == 401
            async with http.get(base + path, headers={"Authorization": f"Bearer {STATUS_TOKEN}"}) as r:
                assert r.status == 200
            async with http.get(base + path, params={"token": STATUS_TOKEN}) as r:
                assert r.status == 200
        # the probes answer without it (orchestrators), with details only for the token's holder
        async with http.get(base + "/healthz") as r:
            assert r.status == 200
        async with http.get(base + "/readyz") as r:
            assert r.status == 200 and await r.json() == {"ready": True}
        async with http.get(base + "/readyz", params={"token": STATUS_TOKEN}) as r:
            assert set(await r.json()) == {"ready", "adapters", "models"}


async def test_json_logs_carry_platform_persona_session_and_hide_secrets(make_app):
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    try:
        async with FakeTelegram(TOKEN) as fake:
            app = make_app(**telegram_settings(fake), log_format="json")
            path = setup_logging(app.settings)
            async with running_bot(app):
                await converse(app, fake, 42)
                logging.getLogger("bot.test").warning("the token is %s", TOKEN)
        for handler in root.handlers:
            handler.flush()
        text = path.read_text()
    finally:
        for handler in list(root.handlers):
            root.removeHandler(handler)
            handler.close()
        for handler in saved[0]:
            root.addHandler(handler)
        root.setLevel(saved[1])
    lines = [json.loads(line) for line in text.splitlines()]  # every line is one JSON object
    assert all({"time", "level", "logger", "message"} <= set(line) for line in lines)
    answer = next(line for line in lines if line["message"].startswith("answered telegram:42"))
    assert answer["platform"] == "telegram" and answer["persona"] == "internlm"
    assert answer["session"].startswith("telegram:") and answer["session"].endswith(":42")
    assert TOKEN not in text and TOKEN.split(":")[1] not in text
    assert any(line["message"] == "the token is ***" for line in lines)


def test_docker_compose_probes_the_bots_readiness():
    import yaml

    bot = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]["bot"]
    port = bot["environment"]["METRICS_PORT"]
    assert f"http://127.0.0.1:{port}/readyz" in " ".join(bot["healthcheck"]["test"])
    assert bot["environment"]["METRICS_HOST"] == "0.0.0.0" and "STATUS_TOKEN" in bot["environment"]


async def test_discord_api_calls_and_connection_show_in_metrics_and_readiness(make_app):
    from tests.discord_harness import stack, until_done

    async with stack(make_app) as (fake, app, adapter), status_server(app) as base, aiohttp.ClientSession() as http:
        async with http.get(base + "/readyz") as r:
            assert r.status == 200 and (await r.json())["adapters"] == {"discord": "connected"}
        fake.inject("PATCH", r"/webhooks/.*/messages/@original", count=1)  # discord.py waits and retries
        interaction = await fake.slash("chat", fake.alice, prompt="ping")
        await until_done(fake, interaction)
        await fake.wait_for(lambda: app.metrics.registry.get_sample_value(
            "internlm_bot_answer_seconds_count", {"platform": "discord", "persona": "internlm"}) == 1)
        samples = await scrape(http, base)
    assert value(samples, "internlm_bot_requests_total", platform="discord", outcome="answered") == 1
    edits = "PATCH /webhooks/{id}/{token}/messages/@original"
    assert value(samples, "internlm_bot_platform_api_calls_total", platform="discord", method=edits, result="429") == 1
    assert value(samples, "internlm_bot_platform_api_calls_total", platform="discord", method=edits, result="ok") >= 1
    assert value(samples, "internlm_bot_platform_api_calls_total", platform="discord", method="POST /interactions/{id}/{token}/callback", result="ok") == 1
    methods = {dict(ls).get("method", "") for (n, ls) in samples if n == "internlm_bot_platform_api_calls_total"}
    assert not any(str(fake.alice.id) in m or str(fake.channel.id) in m or interaction.token in m for m in methods), methods


async def test_sandbox_runs_and_picture_intake_are_counted_by_outcome(make_app):
    import io

    from PIL import Image

    async with FakeTelegram(TOKEN) as fake:
        app = make_app(**telegram_settings(fake), agent_tools="python", sandbox_cpu_seconds=1, sandbox_memory_mb=64)
        sandbox = app.responders["agent"].sandbox  # the agent's own sandbox, as /agent uses it
        assert (await sandbox.run("print(1)")).ok
        await sandbox.run("while True: pass")
        await sandbox.run("x = bytearray(256 * 2**20)")
        await sandbox.run("raise SystemExit(3)")
        from models.sandbox import Sandbox, SandboxUnavailable

        no_bwrap = Sandbox(sandbox.limits, bwrap=None, on_run=app.metrics.sandbox_run)  # bubblewrap missing
        with pytest.raises(SandboxUnavailable):
            await no_bwrap.run("print(1)")
        async with running_bot(app):
            chat = fake.private_chat(42)
            fake.send_photo(chat, 42, b"this is not a picture", caption="what is this?")
            png = io.BytesIO()
            Image.new("RGB", (64, 64), "red").save(png, format="PNG")
            fake.send_photo(chat, 42, png.getvalue(), caption="what is this?")
            await fake.wait_until(lambda: len(fake.texts(chat)) >= 2 and app.metrics.registry.get_sample_value(
                "internlm_bot_image_intake_total", {"outcome": "ok"}) == 1)
        async with status_server(app) as base, aiohttp.ClientSession() as http:
            samples = await scrape(http, base)
    for outcome in ("ok", "timeout", "memory_cap", "error", "refused"):
        assert value(samples, "internlm_bot_sandbox_runs_total", outcome=outcome) == 1, outcome
        assert value(samples, "internlm_bot_sandbox_run_seconds_count", outcome=outcome) == 1, outcome
    assert value(samples, "internlm_bot_sandbox_run_seconds_sum", outcome="timeout") >= 1.0  # the CPU limit
    assert value(samples, "internlm_bot_image_intake_total", outcome="not_image") == 1
    assert value(samples, "internlm_bot_image_intake_total", outcome="ok") == 1


async def test_queue_length_shows_while_a_second_user_waits_for_the_model(make_app):
    async with FakeTelegram(TOKEN) as fake:
        # one answer at a time (the default batches 16), and a long answer holds the model
        app = make_app(**telegram_settings(fake), max_new_tokens=1800, max_concurrent_generations=1)
        model, label = app.hub.get("chat"), label_of(app, "chat")
        await slow_down(app, seconds_per_token=0.005)  # the first answer still holds the model while we look
        async with status_server(app) as base, aiohttp.ClientSession() as http, running_bot(app):
            first, second = fake.private_chat(42), fake.private_chat(43)
            fake.send_text(first, 42, "code")
            await fake.wait_until(lambda: model.scheduler.active == 1)
            fake.send_text(second, 43, "code")
            await fake.wait_until(lambda: model.scheduler.waiting == 1)
            samples = await scrape(http, base)
            async with http.get(base + "/api/status") as r:
                status = await r.json()
            fake.send_text(first, 42, "/stop")  # then the second answer runs; stop it too
            await fake.wait_until(lambda: model.scheduler.waiting == 0 and any("print(" in t for t in fake.texts(second)))
            fake.send_text(second, 43, "/stop")
            await fake.wait_until(lambda: model.scheduler.active == 0)
    assert value(samples, "internlm_bot_model_queue_length", model=label) == 1
    assert value(samples, "internlm_bot_model_streams_in_flight", model=label) == 1
    assert status["series"]["queue"][label][-1] == 1  # the chart's peak for this minute
    assert next(m for m in status["models"] if m["model"] == label)["queue"] == 1
    stopped = {"platform": "telegram", "persona": "internlm", "outcome": "stopped"}
    assert app.metrics.registry.get_sample_value("internlm_bot_requests_total", stopped) == 2

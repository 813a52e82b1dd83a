"""End to end through the console adapter and the App, with the tiny real models."""

from __future__ import annotations

import asyncio
import io
import os
import subprocess
import sys
import time
from pathlib import Path

from adapters.console import ConsoleAdapter, ConsoleSurface
from bot.i18n import t
from bot.messages import Incoming
from bot.personas import BAJIE_SYSTEM_PROMPT, INTERNLM_SYSTEM_PROMPT
from tests import worker_hooks
from tests.slow import slow_down
from tests.tiny_models import is_code_answer_prefix
from tests.surfaces import RecordingSurface
from tests.waiting import until

REPO = Path(__file__).resolve().parent.parent


async def chat(app, *lines: str) -> str:
    out = io.StringIO()
    adapter = ConsoleAdapter(app, stdin=io.StringIO("".join(line + "\n" for line in lines)), out=out, err=io.StringIO())
    await adapter.run()
    return out.getvalue()


def msg(text: str, user: str = "u1", chat: str = "c1", platform: str = "console", **kw) -> Incoming:
    return Incoming(platform=platform, chat_id=chat, user_id=user, text=text, **kw)


async def test_ping_streams_pong(make_app):
    app = make_app()
    assert await chat(app, "ping") == "pong\n"


async def test_bajie_switches_model_and_system_prompt(make_app, tiny_bajie_model, tiny_chat_model):
    app = make_app()
    out = await chat(app, "/bajie ping", "ping", "/chat", "ping")
    lines = out.splitlines()
    assert lines[0] == "俺老猪听见了：pong"
    assert lines[1] == "俺老猪听见了：pong"  # plain messages keep talking to the current persona
    assert lines[2].startswith("Now talking to InternLM")
    assert lines[3] == "pong"
    bajie = app.hub.get("bajie")
    assert bajie.backend.path == str(tiny_bajie_model) and bajie is not app.hub.get("chat")
    assert bajie.last_prompt[0].role == "system" and bajie.last_prompt[0].content == BAJIE_SYSTEM_PROMPT
    assert app.hub.get("chat").last_prompt[0].content == INTERNLM_SYSTEM_PROMPT


async def test_history_survives_a_restart_of_the_app(make_app, make_settings):
    settings = make_settings()
    first = make_app(settings)
    assert await chat(first, "remember banana") == "OK\n"
    first.store.close()
    second = make_app(settings)
    assert await chat(second, "recall") == "banana\n"
    assert await chat(second, "/reset") == "Forgot the conversation with InternLM.\n"
    assert second.store.history(second.session_key(second_console_msg(second)), "internlm") == []


def second_console_msg(app) -> Incoming:
    return ConsoleAdapter(app).incoming("")


def run_cli(args: list[str], stdin: str | bytes, data_dir: Path, chat_model: Path, bajie_model: Path, **env) -> subprocess.CompletedProcess:
    environment = {
        k: v for k, v in os.environ.items() if not k.endswith(("_TOKEN", "_MODEL")) and not k.startswith(("TELEGRAM", "DISCORD"))
    }
    environment.update(
        CHAT_MODEL=str(chat_model), BAJIE_MODEL=str(bajie_model), DATA_DIR=str(data_dir), TEMPERATURE="0",
        DEVICE="cpu", MAX_NEW_TOKENS="40", HF_HUB_OFFLINE="1", **env,
    )
    return subprocess.run(
        [sys.executable, "-m", "launcher", *args], input=stdin, capture_output=True, text=isinstance(stdin, str), cwd=REPO,
        env=environment,
    )


def test_piped_console_in_fresh_processes_keeps_the_conversation(tmp_path, tiny_chat_model, tiny_bajie_model):
    first = run_cli(["console"], "ping\n/bajie remember tiger\n", tmp_path, tiny_chat_model, tiny_bajie_model)
    assert first.returncode == 0, first.stderr
    assert first.stdout == "pong\nOK\n"
    second = run_cli([], "recall\n/chat\nrecall\n", tmp_path, tiny_chat_model, tiny_bajie_model)
    assert second.returncode == 0, second.stderr
    assert second.stdout.splitlines() == ["俺记得：tiger", "Now talking to InternLM. Ask me anything.", "I don't know."]
    assert "Traceback" not in second.stderr and (tmp_path / "bot.log").exists()


def test_invalid_utf8_gets_the_binary_notice_and_the_conversation_goes_on(tmp_path, tiny_chat_model, tiny_bajie_model):
    """printf 'ping\\n\\xff\\xfe x\\nping\\n' | PYTHONIOENCODING=utf-8 python -m launcher console: it used
    to print nothing and never exit (the reader thread died on UnicodeDecodeError)."""
    result = run_cli(["console"], b"ping\n\xff\xfe x\nping\n", tmp_path, tiny_chat_model, tiny_bajie_model,
                     PYTHONIOENCODING="utf-8", LANG="en_US.UTF-8")
    assert result.returncode == 0, result.stderr
    assert result.stdout.decode().splitlines() == ["pong", t("binary_input", "en"), "pong"]
    assert b"Traceback" not in result.stderr


def test_check_reports_adapters_and_models(tmp_path, tiny_chat_model, tiny_bajie_model):
    result = run_cli(["check"], "", tmp_path, tiny_chat_model, tiny_bajie_model, VISION_MODEL=str(tmp_path / "missing"))
    assert result.returncode == 1
    assert "adapter console: used (no platform token)" in result.stdout
    assert f"model chat   [transformers] {tiny_chat_model}: local directory" in result.stdout
    assert "model vision [transformers]" in result.stdout and "no such directory" in result.stdout
    bad = run_cli(["check"], "", tmp_path, tiny_chat_model, tiny_bajie_model, RATE_LIMIT_PER_MINUTE="-1")
    assert bad.returncode == 2 and bad.stderr.strip().startswith("error: Invalid setting RATE_LIMIT_PER_MINUTE")


async def test_stop_ends_generation_within_a_token_and_frees_the_model(make_app):
    app = make_app(max_new_tokens=1500)
    surface = RecordingSurface(max_length=1_000_000, interval=0.0)
    question = msg("code")
    model = app.hub.get("chat")
    await model.ensure_loaded()
    backend = model.backend
    await backend.call_in_worker(worker_hooks.log_decode_batches)
    await slow_down(app, seconds_per_token=0.005)  # the answer must still run when /stop comes, on any machine
    task = asyncio.create_task(app.handle(question, surface))
    await until(lambda: surface.messages and surface.messages[0].count("print") >= 3)
    assert backend.in_flight == 1 and backend.metrics.batch_size == 1
    assert app.stop(app.session_key(question))
    # Commands reach the engine in order: when this call runs there, the /stop has arrived.
    steps_at_stop = len(await backend.call_in_worker(worker_hooks.decode_batches))
    await task
    assert len(await backend.call_in_worker(worker_hooks.decode_batches)) == steps_at_stop  # no step after it
    assert backend.in_flight == 0 and backend.metrics.batch_size == 0  # the engine dropped the row
    final = surface.messages[-1]
    assert final.endswith("⏹ stopped")
    stored = app.store.history(app.session_key(question), "internlm")[-1]
    assert stored.status == "stopped" and is_code_answer_prefix(stored.content)
    assert model.scheduler.active == 0
    # The model is free at once: the next question is answered.
    again = RecordingSurface(max_length=1_000_000, interval=0.0)
    await app.handle(msg("ping"), again)
    assert again.messages == ["pong"]


async def test_stop_typed_in_the_console_during_an_answer(make_app):
    app = make_app(max_new_tokens=3000)
    await slow_down(app, seconds_per_token=0.005)  # still answering when /stop is typed, on any machine
    read_fd, write_fd = os.pipe()
    stdin, writer = os.fdopen(read_fd, "r"), os.fdopen(write_fd, "w")
    out = io.StringIO()
    adapter = ConsoleAdapter(app, stdin=stdin, out=out, err=io.StringIO())
    runner = asyncio.create_task(adapter.run())
    writer.write("code\n")
    writer.flush()
    await until(lambda: out.getvalue().count("print") >= 2)
    writer.write("/stop\n")
    writer.flush()
    await until(lambda: "⏹ stopped" in out.getvalue())
    writer.write("ping\n")
    writer.close()
    await runner
    text = out.getvalue()
    assert text.startswith("```python\nprint('hello world')")
    assert text.endswith("⏹ stopped\npong\n")
    assert text.count("print") < 500


async def test_two_users_stream_at_once_when_two_slots(make_app):
    app = make_app(max_concurrent_generations=2)
    a = RecordingSurface(max_length=1_000_000, interval=0.0, clock=time.monotonic)
    b = RecordingSurface(max_length=1_000_000, interval=0.0, clock=time.monotonic)
    await app.handle(msg("ping"), RecordingSurface())  # load the model first
    await slow_down(app)  # steps spread in time, so each answer's edits come step by step
    await asyncio.gather(app.handle(msg("count", user="a"), a), app.handle(msg("count", user="b"), b))
    answer = "one two three four five six seven eight nine ten eleven twelve"
    assert a.messages == [answer] and b.messages == [answer]
    assert app.hub.get("chat").backend.metrics.peak_batch_size == 2  # decoded together
    a_first, a_last = a.writes[0].at, a.writes[-1].at
    b_first, b_last = b.writes[0].at, b.writes[-1].at
    assert a_first < b_last and b_first < a_last  # interleaved, not one after the other


async def test_fair_queue_serves_other_users_between_a_flooders_requests(make_app, monkeypatch):
    # every queue position is shown, however short the wait (normally text that comes within
    # STATUS_DELAY overtakes it: tests/test_streaming.py)
    monkeypatch.setattr("bot.streaming.STATUS_DELAY", 0.0)
    app = make_app(max_concurrent_generations=1)
    await app.handle(msg("ping"), RecordingSurface())  # load the model first
    done: list[str] = []

    async def ask(name: str, user: str, chat: str):
        surface = RecordingSurface(max_length=1_000_000, interval=0.0)
        await app.handle(msg("count", user=user, chat=chat), surface)
        done.append(name)
        return surface

    # One user floods from three chats (three sessions); a second user asks once.
    tasks = [asyncio.create_task(ask(f"a{i}", "alice", f"chat{i}")) for i in range(3)]
    await asyncio.sleep(0)
    tasks.append(asyncio.create_task(ask("b", "bob", "chatb")))
    surfaces = await asyncio.gather(*tasks)
    assert done == ["a0", "a1", "b", "a2"]
    statuses = [w.text for w in surfaces[3].writes if w.phase == "status"]
    assert statuses and statuses[0].startswith("⏳ In the queue: 2 ahead")


async def test_a_second_message_waits_for_the_first_in_order(make_app, monkeypatch):
    monkeypatch.setattr("bot.streaming.STATUS_DELAY", 0.0)  # show the waiting line however short the wait
    app = make_app()
    first, second = RecordingSurface(), RecordingSurface()
    await asyncio.gather(app.handle(msg("remember cherry"), first), app.handle(msg("recall"), second))
    assert first.messages == ["OK"] and second.messages == ["cherry"]
    assert second.writes[0].text.startswith("⏳ Waiting for your previous answer")


async def test_bad_inputs_get_clear_replies_and_the_app_keeps_working(make_app):
    app = make_app(max_input_chars=200, rate_limit_messages=50)
    cases = {
        "": "Please send some text.",
        "   ": "Please send some text.",
        "x" * 5000: "That message is too long (5000 characters; the limit is 200). Please shorten it.",
        "\x00\x01binary\x02\x03": "That looks like binary data, not text.",
        "/frobnicate now": "Unknown command /frobnicate. Send /help for the list.",
    }
    for text, reply in cases.items():
        surface = RecordingSurface()
        await app.handle(msg(text), surface)
        assert surface.messages == [reply], text
    zh = RecordingSurface()
    await app.handle(msg("", language="zh-hans"), zh)
    assert zh.messages == ["请输入文字内容。"]
    assert app.store.history(app.session_key(msg("")), "internlm") == []
    ok = RecordingSurface()
    await app.handle(msg("ping"), ok)
    assert ok.messages == ["pong"]


async def test_rate_limit_replies_without_reaching_the_model(make_app):
    app = make_app(rate_limit_messages=2, rate_limit_per_minute=1)
    replies = []
    for _ in range(3):
        surface = RecordingSurface()
        await app.handle(msg("ping", user="fast"), surface)
        replies.append(surface.messages[0])
    assert replies[:2] == ["pong", "pong"]
    assert replies[2].startswith("You are sending messages too fast. Please wait ")
    assert len(app.store.history(app.session_key(msg("", user="fast")), "internlm")) == 4


async def test_users_not_on_the_allowlist_never_reach_a_model(make_app):
    app = make_app(telegram_allowed_users="42")
    stranger = RecordingSurface()
    await app.handle(msg("ping", user="7", platform="telegram", language="zh-CN"), stranger)
    assert stranger.messages == ["抱歉，这是一个私有机器人，你不在允许使用的名单中。"]
    again = RecordingSurface()
    await app.handle(msg("ping", user="7", platform="telegram"), again)
    assert again.messages == []  # one refusal per minute, not one per message
    assert app.hub.loaded == []
    friend = RecordingSurface()
    await app.handle(msg("ping", user="42", platform="telegram"), friend)
    assert friend.messages == ["pong"]


async def test_model_failing_mid_answer_keeps_question_and_partial_answer(make_app):
    app = make_app()
    await app.handle(msg("ping"), RecordingSurface())
    backend = app.hub.get("chat").backend
    await backend.call_in_worker(worker_hooks.fail_forward, 6, "CUDA out of memory (simulated in a forward hook)")
    surface = RecordingSurface()
    await app.handle(msg("count"), surface)
    await backend.call_in_worker(worker_hooks.remove_hooks)
    shown = surface.messages[-1]
    assert shown.startswith("one two") and shown.endswith("⚠️ The model failed while answering. Please try again.")
    rows = app.store.history(app.session_key(msg("")), "internlm")
    assert (rows[-2].role, rows[-2].content) == ("user", "count")
    assert rows[-1].status == "failed" and rows[-1].content.startswith("one two")
    after = RecordingSurface()
    await app.handle(msg("ping"), after)
    assert after.messages == ["pong"]


async def test_history_is_trimmed_by_tokens_to_the_context_budget(make_app):
    app = make_app(max_context_tokens=256, max_new_tokens=200, rate_limit_messages=100)
    asked = ["count", "ping", "你好", "count", "ping", "你好", "count", "ping", "remember violet"]
    for text in asked:
        surface = RecordingSurface()
        await app.handle(msg(text), surface)
        assert surface.messages and not surface.messages[0].startswith("⚠️")
    surface = RecordingSurface()
    await app.handle(msg("recall"), surface)
    assert surface.messages == ["violet"]  # the newest exchange survived the trimming
    model = app.hub.get("chat")
    prompt = model.last_prompt
    assert model.count_tokens(prompt) <= 256 - 200
    assert prompt[0].role == "system" and prompt[-1].content == "recall"
    kept_users = [m.content for m in prompt if m.role == "user"]
    assert kept_users[-2] == "remember violet" and len(kept_users) < len(asked) + 1  # the oldest went
    assert prompt[1].role == "user"  # whole exchanges are dropped, never half of one
    assert len(app.store.history(app.session_key(msg("")), "internlm")) == 2 * (len(asked) + 1)  # all kept on disk


async def test_help_persona_and_reset_in_both_languages(make_app):
    app = make_app()
    en, zh = RecordingSurface(), RecordingSurface()
    await app.handle(msg("/help"), en)
    await app.handle(msg("/help", language="zh-hans"), zh)
    for command in ("/chat", "/bajie", "/agent", "/image", "/reset", "/stop", "/persona", "/help", "/start"):
        assert command in en.messages[0] and command in zh.messages[0]
    assert "Talk to Bajie" in en.messages[0] and "与猪八戒对话" in zh.messages[0]
    persona = RecordingSurface()
    await app.handle(msg("/bajie"), RecordingSurface())
    await app.handle(msg("/persona"), persona)
    assert persona.messages == ["Current persona: Bajie (猪八戒)."]
    await app.handle(msg("remember ocean"), RecordingSurface())
    reset = RecordingSurface()
    await app.handle(msg("/reset"), reset)
    assert reset.messages == ["Forgot the conversation with Bajie (猪八戒)."]
    assert app.store.history(app.session_key(msg("")), "bajie") == []


async def test_regenerate_replaces_the_last_answer(make_app):
    app = make_app()
    await app.handle(msg("ping"), RecordingSurface())
    again = RecordingSurface()
    await app.regenerate(msg(""), again)
    assert again.messages == ["pong"]
    rows = app.store.history(app.session_key(msg("")), "internlm")
    assert [(m.role, m.content) for m in rows] == [("user", "ping"), ("assistant", "pong")]


def test_console_surface_prints_only_new_text():
    out, err = io.StringIO(), io.StringIO()
    surface = ConsoleSurface(out, err, tty=False)

    async def go():
        handle = await surface.post("⏳ queued", phase="status")
        await surface.edit(handle, "hel", phase="streaming")
        await surface.edit(handle, "hello", phase="streaming")
        await surface.edit(handle, "hello", phase="done")

    asyncio.run(go())
    assert out.getvalue() == "hello\n" and err.getvalue() == ""

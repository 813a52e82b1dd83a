"""/agent end to end: the tiny agent model, lagent's Internlm2Agent, and code in the real sandbox."""

from __future__ import annotations

import asyncio
import io
import json
import os
from pathlib import Path

import pytest

from adapters.console import ConsoleAdapter
from bot.i18n import t
from bot.messages import Incoming
from tests import tiny_agent_model as agent_model
from tests.slow import slow_down
from tests.surfaces import RecordingSurface
from tests.waiting import until

POWER = "1267650600228229401496703205376"


@pytest.fixture(scope="session")
def tiny_agent_model():
    return agent_model.agent_model_path()


@pytest.fixture
def make_agent_app(make_app, make_settings, tiny_agent_model):
    def make(**overrides):
        values = dict(agent_model=str(tiny_agent_model), agent_tools="python", sandbox_wall_seconds=20.0)
        values.update(overrides)
        return make_app(make_settings(**values))

    return make


async def console(app, *lines: str) -> str:
    out = io.StringIO()
    adapter = ConsoleAdapter(app, stdin=io.StringIO("".join(line + "\n" for line in lines)), out=out, err=io.StringIO())
    adapter.language = "en"
    await adapter.run()
    return out.getvalue()


def msg(text: str, user: str = "u1", chat: str = "c1", **kw) -> Incoming:
    return Incoming(platform="console", chat_id=chat, user_id=user, text=text, language="en", **kw)


async def ask(app, text: str, **kw) -> RecordingSurface:
    surface = RecordingSurface(interval=0.0)
    await app.handle(msg(text, **kw), surface)
    return surface


async def test_console_user_sees_the_code_its_real_output_and_the_answer(make_agent_app):
    app = make_agent_app()
    out = await console(app, f"/agent {agent_model.COMPUTE_ZH}")
    thought = "💭 我来用 Python 算一下。\n"
    code = "```python\nprint(2**100)\n```\n"
    output = t("agent_output", "en") + "\n```\n" + POWER + "\n```\n"
    assert out == thought + code + output + "\n" + agent_model.ANSWER_ZH + "\n"
    # what the agent keeps for the next turn: its own steps, with the real output
    key = app.session_key(ConsoleAdapter(app).incoming(""))
    stored = app.store.history(key, "agent")
    assert [m.role for m in stored] == ["user", "assistant"] and stored[1].status == "ok"
    steps = json.loads(stored[1].content)["agent_steps"]
    assert [s["role"] for s in steps] == ["language", "tool", "environment", "language"]
    assert steps[2]["content"] == POWER and steps[3]["content"] == agent_model.ANSWER_ZH


async def test_the_agent_prompt_is_internlm2s_tool_format(make_agent_app):
    app = make_agent_app()
    await ask(app, f"/agent {agent_model.COMPUTE_EN}")
    backend = app.hub.get("agent").backend
    prompt = backend.tokenizer.decode(backend.encode(app.hub.get("agent").last_prompt))
    assert "<|im_start|>system name=<|interpreter|>\n" in prompt
    assert "<|action_start|><|interpreter|>\n```python\nprint(2**100)\n```<|action_end|>\n<|im_end|>" in prompt
    assert f"<|im_start|>environment name=<|interpreter|>\n{POWER}<|im_end|>\n<|im_start|>assistant\n" in prompt


async def test_follow_ups_continue_the_same_agent_conversation(make_agent_app):
    app = make_agent_app()
    out = await console(app, f"/agent {agent_model.COMPUTE_EN}", agent_model.AGAIN)
    assert out.endswith(agent_model.ANSWER_EN + "\n" + agent_model.AGAIN_WITH_HISTORY + "\n")
    fresh = await ask(app, f"/agent {agent_model.AGAIN}", user="u2")
    assert fresh.visible == agent_model.AGAIN_FRESH


async def test_a_plain_answer_needs_no_tool(make_agent_app):
    app = make_agent_app()
    surface = await ask(app, "/agent ping")
    assert surface.visible == "pong" and surface.phases[-1] == "done"


def sandbox_running() -> bool:
    """A sandbox (bubblewrap) is running as a child of this process."""
    me = str(os.getpid())
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and (entry / "stat").read_text().rsplit(")", 1)[1].split()[1] == me \
                    and b"bwrap" in (entry / "cmdline").read_bytes():
                return True
        except OSError:
            pass
    return False


async def test_stop_kills_the_running_code_and_ends_the_turn(make_agent_app):
    app = make_agent_app(sandbox_wall_seconds=120.0)
    surface = RecordingSurface(interval=0.0)
    message = msg(f"/agent {agent_model.SLEEP_QUESTION}")
    answer = asyncio.create_task(app.handle(message, surface))
    await until(lambda: "print('awake')\n```" in surface.visible)
    await until(sandbox_running)
    assert app.stop(app.session_key(message))
    await answer
    text = surface.visible
    assert t("agent_stopped_run", "en") in text and text.endswith(t("stopped_mark", "en"))
    assert agent_model.ANSWER_EN not in text  # no model step after the stop
    stored = app.store.history(app.session_key(message), "agent")
    assert stored[-1].status == "stopped"
    assert json.loads(stored[-1].content)["agent_steps"][2]["content"] == "[stopped by the user]"


async def test_stop_while_the_model_writes(make_agent_app):
    app = make_agent_app(max_new_tokens=400)
    await slow_down(app, "agent", seconds_per_token=0.005)  # still writing when /stop comes, on any machine
    surface = RecordingSurface(interval=0.0)
    message = msg(f"/agent {agent_model.TICK_QUESTION}")
    answer = asyncio.create_task(app.handle(message, surface))
    await until(lambda: "tick" in surface.visible)
    app.stop(app.session_key(message))
    await answer
    text = surface.visible
    assert text.startswith("tick") and text.endswith(t("stopped_mark", "en"))
    assert text.count("tick") < 400
    assert app.hub.get("agent").scheduler.active == 0  # the model is free again


async def test_without_bubblewrap_the_agent_refuses_to_run_code(make_agent_app, monkeypatch, caplog):
    monkeypatch.setenv("PATH", "/nonexistent")  # no bwrap on PATH
    app = make_agent_app()
    surface = await ask(app, f"/agent {agent_model.COMPUTE_EN}")
    assert t("agent_sandbox_missing", "en") in surface.visible
    assert POWER not in surface.visible
    assert "bubblewrap (bwrap) is not installed" in caplog.text  # the admin is told how to fix it
    help_text = (await ask(app, "/help")).visible
    assert t("agent_help_no_sandbox", "en") in help_text


async def test_help_lists_the_tools_and_the_sandbox_limits(make_agent_app):
    app = make_agent_app(sandbox_cpu_seconds=7, sandbox_memory_mb=300, agent_tools="python,arxiv")
    text = (await ask(app, "/help")).visible
    assert "python (runs code), arxiv (searches papers)" in text
    assert "7 s of CPU" in text and "300 MB of memory" in text and "no network" in text
    zh = RecordingSurface(interval=0.0)
    await app.handle(Incoming(platform="console", chat_id="c", user_id="u", text="/help", language="zh-hans"), zh)
    assert "CPU 7 秒" in zh.visible


async def test_agent_allowed_users(make_agent_app):
    app = make_agent_app(agent_allowed_users="console:boss")
    refused = await ask(app, f"/agent {agent_model.COMPUTE_EN}", user="intern")
    assert refused.visible == t("agent_not_allowed", "en")
    allowed = await ask(app, f"/agent {agent_model.COMPUTE_EN}", user="boss")
    assert POWER in allowed.visible


async def test_shared_group_session_still_checks_the_agent_allowlist(make_agent_app):
    app = make_agent_app(agent_allowed_users="boss", group_sessions="shared")
    await ask(app, "/agent ping", user="boss", is_group=True)  # the group's persona is now the agent
    refused = await ask(app, agent_model.COMPUTE_EN, user="intern", is_group=True)
    assert refused.visible == t("agent_not_allowed", "en")
    assert POWER not in refused.visible


async def test_agent_rate_limit_is_separate_from_chat(make_agent_app):
    app = make_agent_app(agent_rate_limit_messages=1, agent_rate_limit_per_minute=0.01)
    assert (await ask(app, "/agent ping")).visible == "pong"
    limited = await ask(app, "/agent ping")
    assert limited.visible.startswith("You are sending messages too fast")
    assert (await ask(app, "/chat ping")).visible == "pong"  # chat has its own bucket


async def test_two_agent_sessions_run_code_at_once(make_agent_app):
    app = make_agent_app()
    first, second = await asyncio.gather(
        ask(app, f"/agent {agent_model.COMPUTE_EN}", user="a"), ask(app, f"/agent {agent_model.COMPUTE_ZH}", user="b")
    )
    assert POWER in first.visible and first.visible.endswith(agent_model.ANSWER_EN)
    assert POWER in second.visible and second.visible.endswith(agent_model.ANSWER_ZH)

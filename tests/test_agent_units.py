"""The agent's pure parts: prompt rendering, history, trimming, and the step display."""

from __future__ import annotations

import json

from lagent.schema import ActionReturn, AgentReturn

from bot.agent_feature import TEXTS, StepRenderer
from bot.i18n import register, t
from models.agent import fit_history, history_steps, make_protocol, stored_steps, to_chat_messages
from models.agent_events import StepDecoder
from models.base import ChatMessage
from models.sandbox import RunResult, SandboxLimits, SandboxUnavailable

register(TEXTS)


class Runs:
    def __init__(self, *runs):
        self.runs = list(runs)


class Display:
    """lagent's states → events (models.agent_events) → display text (bot), as in a real turn."""

    def __init__(self, lang, python, limits):
        self.decoder, self.renderer = StepDecoder(python), StepRenderer(lang, limits)

    def feed(self, state: AgentReturn) -> str:
        return "".join(self.renderer.feed(event) for event in self.decoder.feed(state))

    def stored(self) -> str:
        return self.decoder.stored()

    def flush(self) -> str:
        return self.renderer.flush()


def render(renderer: Display, *states: AgentReturn) -> str:
    return "".join(renderer.feed(s) for s in states)


def test_tool_messages_carry_internlm2_names_in_the_role():
    formatted = make_protocol().format(inner_step=[{"role": "user", "content": "hi"}], interpreter_executor=None)
    assert [m["role"] for m in formatted] == ["system", "user"]
    messages = to_chat_messages([
        {"role": "system", "content": "s", "name": "interpreter"},
        {"role": "environment", "content": "42", "name": "plugin"},
        {"role": "user", "content": "q"},
    ])
    assert [m.role for m in messages] == ["system name=<|interpreter|>", "environment name=<|plugin|>", "user"]
    assert [m.role for m in to_chat_messages([{"role": "environment", "content": "1", "name": "interpreter"}],
                                             named_roles=False)] == ["environment"]


def test_history_round_trips_the_agents_steps():
    steps = [{"role": "language", "content": "run"}, {"role": "environment", "content": "1", "name": "interpreter"}]
    history = [ChatMessage("user", "q1"), ChatMessage("assistant", stored_steps(steps)),
               ChatMessage("user", "q2"), ChatMessage("assistant", "plain text answer")]
    assert history_steps(history) == [{"role": "user", "content": "q1"}, *steps, {"role": "user", "content": "q2"},
                                      {"role": "assistant", "content": "plain text answer"}]


def test_fit_history_drops_whole_old_exchanges_first():
    system = [ChatMessage("system", "s"), ChatMessage("system name=<|interpreter|>", "p")]
    history = [ChatMessage("user", "a" * 10), ChatMessage("assistant", "b" * 10), ChatMessage("environment", "c" * 10),
               ChatMessage("user", "d" * 10), ChatMessage("assistant", "e" * 10)]
    current = [ChatMessage("user", "now")]
    messages = system + history + current

    def count(ms):
        return sum(len(m.content) for m in ms)

    assert fit_history(count, 1000, messages, len(history)) == messages
    assert fit_history(count, count(system + history[3:] + current), messages, len(history)) == system + history[3:] + current
    assert fit_history(count, 5, messages, len(history)) == system + current


def test_the_display_grows_only_and_shows_each_step():
    command = "```python\nprint(2**100)\n```"
    renderer = Display("en", Runs(RunResult("1267\n", 0)), SandboxLimits())
    streamed = render(
        renderer,
        AgentReturn(state=1, response="Let me"),
        AgentReturn(state=1, response="Let me run it."),
        AgentReturn(state=6, response={"parameters": {"command": "```python\nprint(2"}}),
        AgentReturn(state=6, response={"parameters": {"command": "```python\nprint(2**100)\n```"}}),
        AgentReturn(state=7, response={"parameters": {"command": command}}),
    )
    assert streamed == "💭 Let me run it.\n```python\nprint(2**100)\n```\n"
    action = ActionReturn(args={"command": command}, result=[{"type": "text", "content": "1267"}], thought="Let me run it.")
    steps = [{"role": "language", "content": "Let me run it."}]
    streamed += render(renderer, AgentReturn(state=8, actions=[action], inner_steps=steps))
    assert streamed.endswith(t("agent_output", "en") + "\n```\n1267\n```\n")
    assert json.loads(renderer.stored())["agent_steps"] == steps
    streamed += render(renderer, AgentReturn(state=1, response="Do"), AgentReturn(state=0, response="Done.", inner_steps=steps * 2))
    assert streamed.endswith("```\n\nDone.")
    assert json.loads(renderer.stored())["agent_steps"] == steps * 2


def test_a_long_text_streams_at_once_and_limits_are_explained():
    renderer = Display("zh", Runs(RunResult("x" * 3000, None, reason="wall", truncated=True)), SandboxLimits(wall_seconds=5))
    long = "word " * 40
    assert render(renderer, AgentReturn(state=1, response=long[:50])) == ""  # maybe a short thought: held
    assert render(renderer, AgentReturn(state=1, response=long)) == long
    action = ActionReturn(args={"command": "while True: pass"}, result=[], thought=long)
    out = render(renderer, AgentReturn(state=8, actions=[action], inner_steps=[]))
    assert out.startswith("\n```python\nwhile True: pass\n```\n")
    assert "x" * 1500 + "\n```" in out and "x" * 1501 not in out
    assert t("agent_stopped_wall", "zh", seconds="5") in out


def test_a_run_over_its_memory_cap_is_explained_to_the_user():
    renderer = Display("zh", Runs(RunResult("", 0, reason="memory")), SandboxLimits(memory_mb=300))
    action = ActionReturn(args={"command": "x = b'x' * 10**10"}, result=[], thought="")
    out = render(renderer, AgentReturn(state=8, actions=[action], inner_steps=[]))
    assert t("agent_stopped_memory", "zh", mb=300) in out and "300 MB" in out


def test_missing_sandbox_and_running_out_of_turns_are_shown():
    renderer = Display("en", Runs(SandboxUnavailable("no bwrap")), SandboxLimits())
    action = ActionReturn(args={"command": "print(1)"}, errmsg="no sandbox", thought="")
    out = render(renderer, AgentReturn(state=8, actions=[action], inner_steps=[]))
    assert out.startswith("💭 " + t("agent_running_code", "en") + "\n```python\nprint(1)\n```\n")
    assert t("agent_sandbox_missing", "en") in out
    out = render(renderer, AgentReturn(state=0, response={"name": "x"}, actions=[action, action]))
    assert out.endswith(t("agent_max_turns", "en", n=2))


def test_plugin_calls_show_the_query_and_a_short_result():
    renderer = Display("en", None, SandboxLimits())
    action = ActionReturn(args={"query": "InternLM2"}, type="ArxivSearch.get_arxiv_article_information",
                          result=[{"type": "text", "content": "Title: InternLM2 Technical Report " + "y" * 1000}], thought="Search.")
    out = render(renderer, AgentReturn(state=1, response="Search."), AgentReturn(state=3, response='{"name"'),
                 AgentReturn(state=5, actions=[action], inner_steps=[]))
    assert out.startswith("💭 Search.\n🔎 ArxivSearch.get_arxiv_article_information: InternLM2\n```\nTitle: InternLM2")
    assert "y" * 500 not in out


def test_arxiv_is_offered_to_the_model_only_when_configured():
    import asyncio

    from models.agent import StepContext, build_turn
    from models.base import Cancel, GenerationParams
    from models.registry import RoleSpec, ScheduledModel
    from models.sandbox import Sandbox

    model = ScheduledModel(RoleSpec(role="agent", model="unused"))
    loop = asyncio.new_event_loop()
    try:
        context = StepContext(loop=loop, cancel=Cancel(), tenant="t")
        for tools, plugin in ((("python",), False), (("python", "arxiv"), True)):
            turn = build_turn(model, GenerationParams(), context, sandbox=Sandbox(), tools=tools)
            agent = turn.agent
            prompt = agent._protocol.format(inner_step=[{"role": "user", "content": "q"}],
                                            plugin_executor=agent._action_executor,
                                            interpreter_executor=agent._interpreter_executor)
            names = [m.get("name") for m in prompt]
            assert names[:2] == [None, "interpreter"]
            assert ("plugin" in names) is plugin
            if plugin:
                assert "ArxivSearch.get_arxiv_article_information" in prompt[-2]["content"]
    finally:
        loop.close()


def test_text_held_as_a_possible_thought_is_shown_when_the_turn_stops():
    renderer = Display("en", None, SandboxLimits())
    assert render(renderer, AgentReturn(state=1, response="tick\ntick\n")) == ""
    assert renderer.flush() == "tick\ntick\n"
    assert renderer.flush() == ""


def test_the_agent_speaks_in_typed_events_and_pairs_each_run_with_its_result():
    import bot.agent_feature
    from models.agent_events import CodeRun, FinalAnswer, Thinking, ToolCall, WritingCode

    runs = Runs()
    decoder = StepDecoder(runs)
    assert decoder.feed(AgentReturn(state=1, response="Let me run it.")) == [Thinking("Let me run it.")]
    assert decoder.feed(AgentReturn(state=6, response={"parameters": {"command": "print(1"}})) == [WritingCode("print(1")]
    bad = ActionReturn(args={"command": "x"}, errmsg="invalid call", thought="t")
    assert decoder.feed(AgentReturn(state=8, actions=[bad], inner_steps=[])) == [CodeRun("x", "t", None, "invalid call")]
    runs.runs.append(RunResult("1\n", 0))  # the tool logs its run before lagent reports it
    good = ActionReturn(args={"command": "print(1)"}, result=[{"type": "text", "content": "1"}])
    [run] = decoder.feed(AgentReturn(state=8, actions=[bad, good], inner_steps=[]))
    assert run.result is runs.runs[0]  # not shifted by the invalid call before it
    tool = ActionReturn(args={"query": "q"}, type="ArxivSearch", errmsg="down")
    assert decoder.feed(AgentReturn(state=5, actions=[tool], inner_steps=[])) == [ToolCall("ArxivSearch", {"query": "q"}, "", "", "down")]
    assert decoder.feed(AgentReturn(state=0, response="Done.")) == [FinalAnswer("Done.", 0)]
    source = open(bot.agent_feature.__file__, encoding="utf-8").read()
    assert "lagent" not in source and "AgentReturn" not in source and ".actions" not in source

"""/agent: the Lagent tool-using agent as a persona (command "agent", model role "agent").

The responder runs `models.agent` and renders the events it reports (thinking, code being
written, a code run and its output, a tool call, the answer) as display text that only grows (a
ReplyStream shows appended text). History stores what `models.agent` hands back as the turn
(the agent's own steps), so a follow-up continues the same conversation.
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import aclosing
from typing import TYPE_CHECKING, AsyncIterator

from models.agent import StepContext, build_turn, run_agent
from models.agent_events import AgentEvent, CodeRun, FinalAnswer, Thinking, ToolCall, WritingCode, WritingToolCall
from models.sandbox import Sandbox, SandboxLimits, SandboxUnavailable

from .i18n import register, t
from .responders import Turn

if TYPE_CHECKING:
    from .app import App

log = logging.getLogger(__name__)

THOUGHT_HOLD = 160  # language text longer than this is shown as it streams, not held as a thought
DISPLAY_OUTPUT_CHARS = 1500  # the model sees up to SANDBOX_MAX_OUTPUT_CHARS; the chat shows less
DISPLAY_TOOL_CHARS = 400

TEXTS = {
    "agent_running_code": {"en": "Running Python…", "zh": "运行 Python……"},
    "agent_using_tool": {"en": "Using a tool…", "zh": "调用工具……"},
    "agent_output": {"en": "📤 Output:", "zh": "📤 输出："},
    "agent_no_output": {"en": "(no output)", "zh": "（没有输出）"},
    "agent_output_shortened": {"en": "✂️ (output shortened)", "zh": "✂️（输出已截断）"},
    "agent_stopped_wall": {
        "en": "⏱ Stopped: the {seconds} s time limit was reached.",
        "zh": "⏱ 已停止：超过了 {seconds} 秒的时间限制。",
    },
    "agent_stopped_cpu": {
        "en": "⏱ Stopped: the {seconds} s CPU time limit was reached.",
        "zh": "⏱ 已停止：超过了 {seconds} 秒的 CPU 时间限制。",
    },
    "agent_stopped_memory": {
        "en": "🧠 Stopped: the code needed more than its {mb} MB of memory (all its processes together).",
        "zh": "🧠 已停止：代码需要的内存超过了 {mb} MB 的上限（所有进程合计）。",
    },
    "agent_stopped_output": {
        "en": "✂️ Stopped: too much output (only the beginning is kept).",
        "zh": "✂️ 已停止：输出太多（只保留了开头部分）。",
    },
    "agent_stopped_run": {"en": "⏹ The run was stopped.", "zh": "⏹ 运行已停止。"},
    "agent_sandbox_missing": {
        "en": "⚠️ The code was not run: this bot has no working sandbox for code. The operator has been told (see the bot's log).",
        "zh": "⚠️ 代码没有运行：本机器人没有可用的代码沙箱。已记录到日志，请联系管理员。",
    },
    "agent_tool_call": {"en": "🔎 {tool}: {query}", "zh": "🔎 {tool}：{query}"},
    "agent_tool_failed": {"en": "⚠️ The tool failed: {error}", "zh": "⚠️ 工具调用失败：{error}"},
    "agent_max_turns": {
        "en": "(stopped after {n} steps without a final answer)",
        "zh": "（已执行 {n} 步，仍未得出最终回答）",
    },
    "agent_help": {
        "en": "Agent (/agent): InternLM2 with tools: {tools}. It answers in steps: you see the code it runs, the output, then the answer.",
        "zh": "智能体（/agent）：带工具的书生·浦语：{tools}。它会分步回答：你会看到它运行的代码、输出，然后是答案。",
    },
    "agent_tool_python": {"en": "python (runs code)", "zh": "python（运行代码）"},
    "agent_tool_arxiv": {"en": "arxiv (searches papers)", "zh": "arxiv（检索论文）"},
    "agent_no_tools": {"en": "none", "zh": "无"},
    "agent_help_sandbox": {
        "en": "Code runs in a sandbox: no network, no access to the bot's files, {cpu} s of CPU and {wall} s in all, "
        "{memory} MB of memory in all, {processes} processes, {chars} characters of output; nothing is kept between runs.",
        "zh": "代码在沙箱中运行：无网络，无法访问机器人的文件；限制为 CPU {cpu} 秒、总时长 {wall} 秒、内存共 {memory} MB、"
        "{processes} 个进程、输出 {chars} 个字符；每次运行之间不保留任何内容。",
    },
    "agent_help_unsafe": {
        "en": "⚠️ Code runs WITHOUT a sandbox on this bot (the operator turned it off).",
        "zh": "⚠️ 本机器人上的代码运行没有沙箱保护（管理员关闭了沙箱）。",
    },
    "agent_help_no_sandbox": {
        "en": "Python is off: this bot has no working sandbox for code.",
        "zh": "Python 已停用：本机器人没有可用的代码沙箱。",
    },
}


def _fence(text: str) -> str:
    """A code block whose content cannot close it early."""
    return "```\n" + text.replace("```", "`\u200b``").rstrip("\n") + "\n```\n"


class StepRenderer:
    """The agent's events → display deltas (append-only): per tool step a short thinking line,
    the code in a code block, its output; then the answer."""

    def __init__(self, lang: str, limits: SandboxLimits) -> None:
        self.lang = lang
        self.limits = limits
        self.shown = ""
        self._new_step()

    def _new_step(self) -> None:
        self.language = ""  # the model's text in the current step
        self.plain = False  # it is being shown as it streams (too long to be a thought)
        self.opened = False  # the step's header (thought, code fence) is shown
        self.code_lines = 0  # raw code lines consumed
        self.closed = False  # the code block is closed
        self._plain_shown = 0

    # -- output helpers ----------------------------------------------------------------------
    def _emit(self, text: str, out: list[str]) -> None:
        if text:
            self.shown += text
            out.append(text)

    def _gap(self) -> str:
        if not self.shown:
            return ""
        return "\n" if self.shown.endswith("\n") else "\n\n"

    # -- events --------------------------------------------------------------------------------
    def feed(self, event: AgentEvent) -> str:
        out: list[str] = []
        if isinstance(event, Thinking):
            self._language(event.text, out)
        elif isinstance(event, WritingCode):
            self._open(out, python=True)
            self._code(event.code, out, final=event.done)
        elif isinstance(event, WritingToolCall):
            self._open(out, python=False)
        elif isinstance(event, CodeRun):
            self._code_run(event, out)
        elif isinstance(event, ToolCall):
            self._tool_call(event, out)
        elif isinstance(event, FinalAnswer):
            self._end(event, out)
        return "".join(out)

    def _language(self, text: str, out: list[str]) -> None:
        self.language = text  # grows within a step; held back while it may be a short thought
        if not self.plain and (len(text) > THOUGHT_HOLD or "\n\n" in text):
            self.plain = True
            self._emit(self._gap(), out)
            self._emit(text, out)
            self._plain_shown = len(text)
        elif self.plain and len(text) > self._plain_shown:
            self._emit(text[self._plain_shown :], out)
            self._plain_shown = len(text)

    def _open(self, out: list[str], *, python: bool, thought: str | None = None) -> None:
        if self.opened:
            return
        self.opened = True
        thought = (self.language if thought is None else thought).strip()
        if self.plain:
            self._emit("\n", out)
        else:
            label = thought or t("agent_running_code" if python else "agent_using_tool", self.lang)
            self._emit(self._gap() + "💭 " + label + "\n", out)
        if python:
            self._emit("```python\n", out)

    def _code(self, command: str, out: list[str], *, final: bool) -> None:
        if self.closed:
            return
        lines = command.split("\n")
        complete = lines if final else lines[:-1]
        for line in complete[self.code_lines :]:
            if not line.strip().startswith("```"):
                self._emit(line.replace("```", "`\u200b``") + "\n", out)
        self.code_lines = len(complete)
        if final:
            self._emit("```\n", out)
            self.closed = True

    def _code_run(self, run: CodeRun, out: list[str]) -> None:
        self._open(out, python=True, thought=run.thought)
        self._code(run.code, out, final=True)
        self._emit(self._output(run), out)
        self._new_step()

    def _output(self, event: CodeRun) -> str:
        run = event.result
        if isinstance(run, SandboxUnavailable):
            return t("agent_sandbox_missing", self.lang) + "\n"
        if run is None:  # not our run (e.g. an invalid tool call): show what the model was told
            return _fence(event.told)
        text = run.output.rstrip("\n")
        shortened = run.truncated or len(text) > DISPLAY_OUTPUT_CHARS
        text = text[:DISPLAY_OUTPUT_CHARS]
        lines = [t("agent_output", self.lang), _fence(text) if text else t("agent_no_output", self.lang) + "\n"]
        if shortened and run.reason != "output":
            lines.append(t("agent_output_shortened", self.lang) + "\n")
        if run.reason == "wall":
            lines.append(t("agent_stopped_wall", self.lang, seconds=f"{self.limits.wall_seconds:g}") + "\n")
        elif run.reason == "cpu":
            lines.append(t("agent_stopped_cpu", self.lang, seconds=self.limits.cpu_seconds) + "\n")
        elif run.reason == "memory":
            lines.append(t("agent_stopped_memory", self.lang, mb=self.limits.memory_mb) + "\n")
        elif run.reason == "output":
            lines.append(t("agent_stopped_output", self.lang) + "\n")
        elif run.reason == "cancelled":
            lines.append(t("agent_stopped_run", self.lang) + "\n")
        return "\n".join(line.rstrip("\n") for line in lines) + "\n"

    def _tool_call(self, call: ToolCall, out: list[str]) -> None:
        self._open(out, python=False, thought=call.thought)
        query = ", ".join(str(v) for v in call.args.values())[:200]
        self._emit(t("agent_tool_call", self.lang, tool=call.tool, query=query) + "\n", out)
        if call.error is not None:
            self._emit(t("agent_tool_failed", self.lang, error=call.error[:DISPLAY_TOOL_CHARS]) + "\n", out)
        else:
            short = call.result[:DISPLAY_TOOL_CHARS] + ("…" if len(call.result) > DISPLAY_TOOL_CHARS else "")
            self._emit(_fence(short), out)
        self._new_step()

    def flush(self) -> str:
        """Show text still held back as a possible thought (the turn ended without an answer)."""
        out: list[str] = []
        if self.language and not self.plain and not self.opened:
            self._emit(self._gap() + self.language, out)
            self.plain, self._plain_shown = True, len(self.language)
        return "".join(out)

    def _end(self, answer: FinalAnswer, out: list[str]) -> None:
        if answer.text is not None:
            if self.plain:
                self._emit(answer.text[self._plain_shown :], out)
            elif answer.text.strip():
                self._emit(self._gap() + answer.text.strip(), out)
        else:  # the model ran out of turns while still calling tools
            self._emit(self._gap() + t("agent_max_turns", self.lang, n=answer.steps), out)
        self.language = ""


register(TEXTS)


class AgentResponder:
    """The agent persona's responder (declared in bot/features.py)."""

    def __init__(self, app: "App") -> None:
        self.hub = app.hub
        self.settings = app.settings
        unknown = [name for name in self.settings.enabled_tools if name not in ("python", "arxiv")]
        if unknown:
            log.warning("AGENT_TOOLS: unknown tools ignored: %s", ", ".join(unknown))
        self.sandbox = make_sandbox(self.settings)
        if self.sandbox is not None:
            self.sandbox.on_run = app.metrics.sandbox_run  # outcome and duration of each code run

    def respond(self, turn: Turn) -> AsyncIterator[str]:
        return self._respond(turn)

    async def _respond(self, turn: Turn) -> AsyncIterator[str]:
        context = StepContext(
            loop=asyncio.get_running_loop(), cancel=turn.cancel, tenant=turn.tenant, on_wait=turn.on_wait,
            stats=turn.stats,
        )
        agent_turn = build_turn(
            self.hub.get(turn.persona.role), turn.persona.params, context, sandbox=self.sandbox,
            tools=self.settings.enabled_tools, max_turn=self.settings.agent_max_turn,
            history=turn.history, question=turn.text,
        )
        renderer = StepRenderer(turn.lang, sandbox_limits(self.settings))
        async with aclosing(run_agent(agent_turn)) as events:
            async for event in events:
                delta = renderer.feed(event)
                turn.stored_answer = agent_turn.stored
                if delta:
                    yield delta
        turn.stored_answer = agent_turn.stored
        if tail := renderer.flush():
            yield tail


def sandbox_limits(settings) -> SandboxLimits:
    return SandboxLimits(
        cpu_seconds=settings.sandbox_cpu_seconds,
        wall_seconds=settings.sandbox_wall_seconds,
        memory_mb=settings.sandbox_memory_mb,
        max_processes=settings.sandbox_max_processes,
        max_output_chars=settings.sandbox_max_output_chars,
        total_memory_mb=settings.sandbox_total_memory_mb,
    )


def make_sandbox(settings) -> Sandbox | None:
    """The sandbox for the python tool (None when the tool is off); logs what the admin must do."""
    if "python" not in settings.enabled_tools:
        return None
    sandbox = Sandbox(sandbox_limits(settings), unsafe_no_bwrap=settings.sandbox_unsafe_no_bwrap)
    if sandbox.problem:
        log.error("agent: Python is disabled: %s", sandbox.problem)
    elif not sandbox.sandboxed:
        log.warning("agent: SANDBOX_UNSAFE_NO_BWRAP=true: model-written code runs on this host WITHOUT a sandbox")
    else:
        log.info("agent: sandbox memory %s; at most %d runs at once", sandbox.memory_mode, sandbox.max_concurrent)
    return sandbox


def help_section(settings, sandbox: Sandbox | None, lang: str) -> str:
    names = [t(f"agent_tool_{name}", lang) for name in settings.enabled_tools if name in ("python", "arxiv")]
    text = t("agent_help", lang, tools=", ".join(names) or t("agent_no_tools", lang))
    if sandbox is not None:
        if sandbox.problem:
            text += "\n" + t("agent_help_no_sandbox", lang)
        elif not sandbox.sandboxed:
            text += "\n" + t("agent_help_unsafe", lang)
        else:
            lim = sandbox.limits
            text += "\n" + t(
                "agent_help_sandbox", lang, cpu=lim.cpu_seconds, wall=f"{lim.wall_seconds:g}", memory=lim.memory_mb,
                processes=lim.max_processes, chars=lim.max_output_chars,
            )
    return text

"""What the agent does, as typed events: lagent's `AgentReturn` states decoded in one place.

lagent reports a turn as a stream of `AgentReturn` snapshots whose `state` says what the model is
doing (writing text, writing code, a tool's result, the end). `StepDecoder` turns each snapshot
into the events below, pairs each code run with the sandbox's own result, and keeps the turn as
history stores it, so nothing outside `models/` sees lagent's shapes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Protocol, Sequence, Union

from lagent.schema import AgentReturn, AgentStatusCode

from .base import ChatMessage
from .sandbox import RunResult, SandboxUnavailable

STORED_KEY = "agent_steps"  # marks an assistant message stored by the agent (JSON)


@dataclass(frozen=True)
class Thinking:
    """The model's text in the current step so far (it grows; a thought or the answer)."""

    text: str


@dataclass(frozen=True)
class WritingCode:
    """Python the model is writing, as far as it got (a ```python block, maybe unfinished)."""

    code: str
    done: bool = False  # the model finished writing it


@dataclass(frozen=True)
class WritingToolCall:
    """The model is writing a call to a tool (not Python)."""


@dataclass(frozen=True)
class CodeRun:
    """Python ran (or was refused): the code, the thought before it, and what came of it."""

    code: str
    thought: str
    result: RunResult | SandboxUnavailable | None  # None: not a run of ours (e.g. an invalid call)
    told: str = ""  # with no result: what the model was told instead


@dataclass(frozen=True)
class ToolCall:
    """A tool answered: its name, arguments, the thought before it, and its result or error."""

    tool: str
    args: dict = field(default_factory=dict)
    thought: str = ""
    result: str = ""
    error: str | None = None


@dataclass(frozen=True)
class FinalAnswer:
    """The turn ended: the answer, or None when the model ran out of steps still calling tools."""

    text: str | None
    steps: int = 0  # tool steps taken


AgentEvent = Union[Thinking, WritingCode, WritingToolCall, CodeRun, ToolCall, FinalAnswer]


class RunLog(Protocol):
    runs: list  # every run of the Python tool, in order (RunResult or SandboxUnavailable)


# -- history: what is stored between turns -----------------------------------------------------
def stored_steps(steps: list[dict]) -> str:
    """An agent turn (lagent inner steps after the user message) as the stored answer."""
    return json.dumps({STORED_KEY: steps}, ensure_ascii=False)


def history_steps(history: Sequence[ChatMessage]) -> list[dict]:
    """Stored history (user messages and stored answers) as lagent inner steps."""
    steps: list[dict] = []
    for m in history:
        if m.role == "assistant":
            try:
                data = json.loads(m.content)
                steps.extend(data[STORED_KEY])
                continue
            except (ValueError, TypeError, KeyError):
                pass  # an answer stored as plain text (e.g. cut by a crash)
        steps.append({"role": m.role, "content": m.content})
    return steps


class StepDecoder:
    """`AgentReturn` states → events, and the turn as stored between turns (lagent inner steps).

    Feed it on the thread that runs the agent, right after each state: the Python tool's run
    log is then exactly up to date, so the run a CODE_RETURN reports is the one logged since the
    previous one."""

    def __init__(self, python: RunLog | None) -> None:
        self.python = python
        self.steps: list[dict] = []  # completed inner steps of this turn
        self.language = ""  # the model's text in the current step
        self._runs_seen = 0

    def stored(self) -> str:
        """The turn so far as the stored answer ("" before the model said anything)."""
        steps = self.steps + ([{"role": "language", "content": self.language}] if self.language else [])
        return stored_steps(steps) if steps else ""

    def feed(self, state: AgentReturn) -> list[AgentEvent]:
        code, response = state.state, state.response
        if code == AgentStatusCode.STREAM_ING and isinstance(response, str):
            self.language = response
            return [Thinking(response)]
        if code in (AgentStatusCode.CODING, AgentStatusCode.CODE_END) and isinstance(response, dict):
            command = response.get("parameters", {}).get("command", "")
            return [WritingCode(command, done=code == AgentStatusCode.CODE_END)]
        if code in (AgentStatusCode.PLUGIN_START, AgentStatusCode.PLUGIN_END):
            return [WritingToolCall()]
        if code == AgentStatusCode.CODE_RETURN and state.actions:
            return [self._step_done(state, self._code_run(state.actions[-1]))]
        if code == AgentStatusCode.PLUGIN_RETURN and state.actions:
            return [self._step_done(state, self._tool_call(state.actions[-1]))]
        if code == AgentStatusCode.END:
            if state.inner_steps:
                self.steps = list(state.inner_steps)
            self.language = ""
            return [FinalAnswer(response if isinstance(response, str) else None, steps=len(state.actions))]
        return []

    def _step_done(self, state: AgentReturn, event: AgentEvent) -> AgentEvent:
        self.steps = list(state.inner_steps)
        self.language = ""
        return event

    def _code_run(self, action) -> CodeRun:
        runs = self.python.runs if self.python is not None else []
        new, self._runs_seen = runs[self._runs_seen :], len(runs)
        run = new[-1] if new else None
        told = "" if run is not None else (action.errmsg or action.format_result())
        return CodeRun((action.args or {}).get("command", ""), action.thought or "", run, told)

    @staticmethod
    def _tool_call(action) -> ToolCall:
        error = str(action.errmsg) if action.errmsg else None
        result = "" if error else action.format_result()
        return ToolCall(action.type or "tool", dict(action.args or {}), action.thought or "", result, error)

"""The Lagent agent (lagent 0.2.4 `Internlm2Agent` + `Internlm2Protocol`) on this project's models.

`ScheduledLLM` is a lagent LLM (a `lagent.llms.BaseModel`) that generates through the role's
`ScheduledModel`, so the agent shares loading, the fair queue, cancellation and the loaded
weights with every other persona. lagent's loop is synchronous: `run_agent` drives it on its own
thread, decodes each `AgentReturn` state into typed events (agent_events.py) and hands them
to the event loop; model steps and sandbox runs are in turn handed from that thread to the
event loop (`run_coroutine_threadsafe`).

Cancellation: `cancel` stops a generation within a step (the backend's stopping criterion), a
sandbox run within a step (the process is killed), and the loop between steps.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import queue
import threading
from contextlib import aclosing
from copy import deepcopy
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable, Sequence

import lagent.agents.internlm2_agent as _internlm2_agent
from lagent.actions import ActionExecutor
from lagent.agents.internlm2_agent import META_CN, PLUGIN_CN, Internlm2Agent, Internlm2Protocol
from lagent.llms import BaseModel
from lagent.schema import AgentReturn, AgentStatusCode, ModelStatusCode

from .agent_events import AgentEvent, StepDecoder, history_steps, stored_steps  # noqa: F401  (stored_steps: the format, for tests)
from .agent_tools import ArxivPapers, SandboxedPython
from .base import Cancel, ChatBackend, ChatMessage, GenerationParams, ModelError, ModelUnavailable, StreamStats
from .control_tokens import strip_control_tokens
from .prompting import trim_history
from .registry import ScheduledModel, WaitCallback
from .sandbox import Sandbox

log = logging.getLogger(__name__)

# lagent's stream_chat prints every response and tool result to stdout in colour; send it to
# the debug log instead (the module-level name shadows the builtin for that module only).
_internlm2_agent.print = lambda *args, **kwargs: log.debug("lagent: %s", " ".join(map(str, args)))

# lagent's interpreter prompt promises a stateful Jupyter notebook with files and plots; ours
# is a fresh, offline, text-only process per run, and the model should know that.
INTERPRETER_PROMPT = (
    "你现在已经能够在一个隔离的沙箱中运行 Python 代码。当你向 python 发送含有 Python 代码的消息时，"
    "它将在一个全新的进程中执行，并返回标准输出和错误信息。每次执行之间不会保留变量，沙箱没有网络，"
    "只能读写当前目录，请用 print 输出结果。这个工具适用于复杂的计算问题（解决数学和物理难题）、"
    "编程示例、文本处理和分析等场景。"
)

TOOL_NAMES = {"interpreter": "<|interpreter|>", "plugin": "<|plugin|>"}


def make_protocol() -> Internlm2Protocol:
    return Internlm2Protocol(meta_prompt=META_CN, interpreter_prompt=INTERPRETER_PROMPT, plugin_prompt=PLUGIN_CN)


# -- prompt rendering -------------------------------------------------------------------------
def to_chat_messages(formatted: Sequence[dict], *, named_roles: bool = True) -> list[ChatMessage]:
    """lagent's formatted prompt (dicts with role, content and maybe name) as ChatMessages.

    InternLM2 marks tool messages in the role line: `<|im_start|>system name=<|interpreter|>`.
    The chat template prints the role verbatim, so with `named_roles` the name goes into the
    role string; servers (openai backend) get the plain role."""
    out = []
    for m in formatted:
        role = m["role"]
        name = m.get("name")
        if named_roles and name:
            role = f"{role} name={TOOL_NAMES.get(name, name)}"
        out.append(ChatMessage(role, m["content"]))
    return out


def fit_history(
    count_tokens: Callable[[list[ChatMessage]], int], budget: int, messages: list[ChatMessage], n_history: int
) -> list[ChatMessage]:
    """Drop the oldest history exchanges (from a user message to the next) until `messages`
    fits `budget` tokens. `messages` = system prompts, then `n_history` history messages, then
    the current turn."""
    n_system = 0
    while n_system < len(messages) and messages[n_system].role.startswith("system"):
        n_system += 1
    system = messages[:n_system]
    history = messages[n_system : n_system + n_history]
    current = messages[n_system + n_history :]
    return trim_history(count_tokens, budget, system, history, current)


# -- the LLM adapter ---------------------------------------------------------------------------
@dataclass
class StepContext:
    """What one agent turn's model calls share."""

    loop: asyncio.AbstractEventLoop
    cancel: Cancel
    tenant: str
    on_wait: WaitCallback | None = None
    stats: StreamStats = field(default_factory=StreamStats)
    n_history: int = 0  # history messages in the prompt, for trimming to the context window


class ScheduledLLM(BaseModel):
    """A lagent LLM that generates with a `ScheduledModel` (called from the agent's thread)."""

    def __init__(self, model: ScheduledModel, params: GenerationParams, context: StepContext) -> None:
        super().__init__(
            path=model.spec.model, max_new_tokens=params.max_new_tokens, top_p=params.top_p,
            temperature=params.temperature,
        )
        self.model = model
        self.params = params
        self.context = context

    def generate(self, inputs, **gen_params) -> str:
        raise NotImplementedError("the agent calls chat/stream_chat with messages")

    def chat(self, inputs: list[dict], **gen_params) -> str:
        text = ""
        for _, text, _ in self.stream_chat(inputs, **gen_params):
            pass
        return text

    def stream_chat(self, inputs: list[dict], **gen_params):
        """Yields (ModelStatusCode, text so far, None), as lagent's LLMs do."""
        ctx = self.context
        if ctx.cancel.is_set:
            yield ModelStatusCode.SESSION_CLOSED, "", None
            return
        reserve = self.params.max_new_tokens

        def prompt(backend: ChatBackend) -> list[ChatMessage]:
            if not backend.capabilities.agent:
                raise ModelUnavailable(f"{self.model.spec.variable}={self.model.spec.model} cannot run the agent")
            messages = to_chat_messages(inputs, named_roles=backend.capabilities.special_tokens)
            return fit_history(backend.count_tokens, backend.context_window - reserve, messages, ctx.n_history)

        items: queue.Queue = queue.Queue()
        step_stats = StreamStats()
        abandoned = Cancel()  # lagent closed this generator early: stop this step only
        finished = threading.Event()
        running: list[asyncio.Task] = []

        async def pump() -> None:
            try:
                running.append(asyncio.current_task())
                if abandoned.is_set:
                    return
                stream = self.model.stream(
                    prompt, params=self.params, cancel=_Either(ctx.cancel, abandoned), tenant=ctx.tenant,
                    on_wait=ctx.on_wait, stats=step_stats, special_tokens=True,  # keep <|action_start|> etc.
                )
                async with aclosing(stream) as deltas:
                    async for delta in deltas:
                        items.put(("delta", delta))
                items.put(("end", None))
            except asyncio.CancelledError:
                items.put(("end", None))
            except BaseException as exc:
                items.put(("error", exc))
            finally:
                finished.set()

        asyncio.run_coroutine_threadsafe(pump(), ctx.loop)
        text = ""
        try:
            while True:
                kind, item = items.get()
                if kind == "delta":
                    text += item
                    yield ModelStatusCode.STREAM_ING, text, None
                elif kind == "error":
                    raise item
                else:
                    break
        finally:
            if not finished.is_set():  # stop the generation (or the wait for the model) and
                abandoned.set()  # return only once the model is free again
                ctx.loop.call_soon_threadsafe(lambda: running and running[0].cancel())
                finished.wait(60)
            ctx.stats.prompt_tokens += step_stats.prompt_tokens
            ctx.stats.completion_tokens += step_stats.completion_tokens
        if ctx.cancel.is_set:
            yield ModelStatusCode.SESSION_CLOSED, text, None
            return
        yield ModelStatusCode.END, text, None


class _Either(Cancel):
    """Set when either flag is set (the turn's /stop, or this step being abandoned)."""

    def __init__(self, *flags: Cancel) -> None:
        self.flags = flags

    def set(self) -> None:
        self.flags[-1].set()

    @property
    def is_set(self) -> bool:
        return any(flag.is_set for flag in self.flags)

    def on_set(self, callback):
        unsubscribe = [flag.on_set(callback) for flag in self.flags]
        return lambda: [u() for u in unsubscribe]


# -- running a turn ------------------------------------------------------------------------------
@dataclass
class AgentTurn:
    """One user turn for the agent: the tools it may use and what happened."""

    python: SandboxedPython | None
    agent: Internlm2Agent
    context: StepContext
    messages: list[dict]  # lagent's: the history's steps, then the question
    stored: str = ""  # the turn so far as history keeps it; follows the events `run_agent` yields


def build_turn(
    model: ScheduledModel,
    params: GenerationParams,
    context: StepContext,
    *,
    sandbox: Sandbox | None,
    tools: Sequence[str] = ("python",),
    max_turn: int = 4,
    history: Sequence[ChatMessage] = (),
    question: str = "",
) -> AgentTurn:
    """The agent for one question, after `history` (stored user messages and answers)."""
    steps = history_steps(history)
    context.n_history = len(make_protocol().format_sub_role(deepcopy(steps)))
    python = SandboxedPython(sandbox, context.loop, context.cancel) if "python" in tools and sandbox else None
    plugins = [ArxivPapers()] if "arxiv" in tools else []
    agent = Internlm2Agent(
        llm=ScheduledLLM(model, params, context),
        plugin_executor=ActionExecutor(plugins) if plugins else None,
        interpreter_executor=ActionExecutor([python]) if python else None,
        protocol=make_protocol(),
        max_turn=max_turn,
    )
    return AgentTurn(python, agent, context, steps + [{"role": "user", "content": question}])


def shown_state(state: AgentReturn) -> AgentReturn:
    """`state` as users may see it: the model's text without InternLM2 control tokens (a sampled
    `<|action_end|>` in a final answer reached users). A copy: lagent keeps using its own."""
    shown = copy.copy(state)
    if isinstance(shown.response, str):
        shown.response = strip_control_tokens(shown.response)
    actions = []
    for action in state.actions or []:
        if isinstance(getattr(action, "thought", None), str):
            action = copy.copy(action)
            action.thought = strip_control_tokens(action.thought)
        actions.append(action)
    shown.actions = actions
    return shown


class AgentFailed(ModelError):
    """lagent stopped with an error state or raised (e.g. a malformed tool call)."""


async def run_agent(turn: AgentTurn) -> AsyncIterator[AgentEvent]:
    """Run `Internlm2Agent.stream_chat` on a worker thread; yield what it does as events, in
    order, on the event loop (`turn.stored` follows). Leaving early (or `cancel`) stops the
    thread's work."""
    ctx = turn.context
    loop = asyncio.get_running_loop()
    states: asyncio.Queue = asyncio.Queue()
    done = object()
    consumer_gone = threading.Event()
    decoder = StepDecoder(turn.python)

    def work() -> None:
        result: object = done
        agent_states = turn.agent.stream_chat(turn.messages)
        try:
            for state in agent_states:  # decoded here, where the tool's run log is up to date
                update = (int(state.state), decoder.feed(shown_state(state)), decoder.stored())
                loop.call_soon_threadsafe(states.put_nowait, update)
                if ctx.cancel.is_set or consumer_gone.is_set():
                    break
        except BaseException as exc:  # handed to the event loop, never lost in the thread
            result = exc
        finally:
            try:
                agent_states.close()
            finally:
                loop.call_soon_threadsafe(states.put_nowait, result)

    thread = threading.Thread(target=work, name=f"agent:{ctx.tenant}", daemon=True)
    thread.start()
    finished = False
    try:
        while True:
            item = await states.get()
            if item is done:
                finished = True
                return
            if isinstance(item, BaseException):
                finished = True
                if isinstance(item, ModelError):
                    raise item
                log.error("the agent failed: %r", item)
                raise AgentFailed(f"the agent failed: {item!r}") from item
            code, events, turn.stored = item
            if code < 0 and not ctx.cancel.is_set:
                raise AgentFailed(f"the agent stopped with {AgentStatusCode(code).name}")
            for event in events:
                yield event
    finally:
        consumer_gone.set()
        if not finished:  # left early: the model and the sandbox see `cancel` and stop
            ctx.cancel.set()
        if thread.is_alive():
            await asyncio.to_thread(thread.join, 30)

"""Nothing InternLM2 uses as a control token reaches a user: the streaming filter (XComposer2's
`[UNUSED_TOKEN_…]` pieces, also split over deltas) and the agent's states (a sampled
`<|action_end|>` in a final answer once reached users verbatim)."""

from __future__ import annotations

from lagent.schema import ActionReturn, AgentReturn, AgentStatusCode

from bot.agent_feature import StepRenderer
from models.agent import shown_state
from models.agent_events import StepDecoder
from models.control_tokens import strip_control_tokens, without_control_tokens


async def _collect(*deltas: str) -> list[str]:
    async def source():
        for d in deltas:
            yield d

    return [d async for d in without_control_tokens(source())]


def test_strip_removes_every_internlm2_control_token_and_nothing_else():
    text = "<|im_start|>a<|action_start|><|interpreter|>b<|action_end|>c<|plugin|>[UNUSED_TOKEN_144]d[UNUSED_TOKEN_145]<|im_end|>"
    assert strip_control_tokens(text) == "abcd"
    kept = "a < b, x[1] = [UNUSED], <s>strike</s> and <|other|>"
    assert strip_control_tokens(kept) == kept


async def test_the_stream_filter_removes_pieces_split_over_deltas_and_keeps_the_rest():
    assert "".join(await _collect("[UNUSED_TOKEN_144]re", "d[UNUS", "ED_TOKEN_1", "43]")) == "red"
    assert "".join(await _collect("x<|act", "ion_end|>y", " [1]", " [")) == "xy [1] ["
    # Text is held back only while it may still become a token.
    assert await _collect("red", "[UNUSED_TOKEN_145]", " ok") == ["red", " ok"]
    assert await _collect("a[", "b") == ["a", "[b"]


def test_the_agent_never_shows_a_sampled_control_token():
    final = AgentReturn(state=AgentStatusCode.END, response="1 + 1 = 2<|action_end|>")
    shown = shown_state(final)
    assert shown.response == "1 + 1 = 2" and final.response == "1 + 1 = 2<|action_end|>"  # lagent's copy untouched
    streaming = AgentReturn(state=AgentStatusCode.STREAM_ING, response="Let me think<|im_end|> about it")
    action = ActionReturn(type="IPythonInterpreter", args={"command": "print(1)"}, thought="I run it<|action_end|>")
    assert shown_state(streaming).response == "Let me think about it"
    with_action = AgentReturn(state=AgentStatusCode.CODE_RETURN, actions=[action])
    assert shown_state(with_action).actions[0].thought == "I run it" and action.thought.endswith("<|action_end|>")
    decoder, renderer = StepDecoder(None), StepRenderer("en", None)
    text = ""
    for state in (AgentReturn(state=AgentStatusCode.STREAM_ING, response="The answer is 2.<|action_end|>"),
                  AgentReturn(state=AgentStatusCode.END, response="The answer is 2.<|action_end|>")):
        for event in decoder.feed(shown_state(state)):  # as run_agent feeds them
            text += renderer.feed(event)
    text += renderer.flush()
    assert "The answer is 2." in text and "<|" not in text

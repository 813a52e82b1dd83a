"""InternLM2's control tokens never reach a user.

The agent keeps them in the model's text (lagent parses `<|action_start|>…<|action_end|>`), and a
sampled one can land in a plain answer; XComposer2's tokenizer spells them `[UNUSED_TOKEN_146]`
(im_start), `[UNUSED_TOKEN_145]` (im_end), `[UNUSED_TOKEN_144]`… as ordinary pieces, which
survive `skip_special_tokens`. These helpers remove them from what is shown.
"""

from __future__ import annotations

import re
from typing import AsyncIterator

NAMED = ("<|im_start|>", "<|im_end|>", "<|action_start|>", "<|action_end|>", "<|interpreter|>", "<|plugin|>")
_UNUSED = "[UNUSED_TOKEN_"
CONTROL = re.compile("|".join(map(re.escape, NAMED)) + r"|\[UNUSED_TOKEN_\d+\]")


def strip_control_tokens(text: str) -> str:
    return CONTROL.sub("", text)


def _partial_tail(text: str) -> int:
    """Where a control token may be starting at the end of `text` (len(text) when none)."""
    start = max(text.rfind("<|"), text.rfind("["))
    if start < 0:
        return len(text)
    tail = text[start:]
    if any(name.startswith(tail) for name in NAMED) or _UNUSED.startswith(tail):
        return start
    if re.fullmatch(r"\[UNUSED_TOKEN_\d*", tail):
        return start
    return len(text)


async def without_control_tokens(deltas: AsyncIterator[str]) -> AsyncIterator[str]:
    """The stream with control tokens removed, also when one arrives split over deltas."""
    held = ""
    async for delta in deltas:
        text = strip_control_tokens(held + delta)
        cut = _partial_tail(text)
        held = text[cut:]
        if text[:cut]:
            yield text[:cut]
    if held:
        yield strip_control_tokens(held)

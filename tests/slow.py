"""Make a loaded tiny model generate at a human-visible pace (real tokens, just slower), so
tests can act while an answer is still streaming regardless of how fast the machine is."""

from __future__ import annotations

import time


async def slow_down(app, role: str = "chat", seconds_per_token: float = 0.02):
    """Load the role's model and sleep before each forward pass. Returns the hook handle."""
    model = app.hub.get(role)
    await model.ensure_loaded()
    return model.backend.model.register_forward_pre_hook(lambda *_: time.sleep(seconds_per_token))

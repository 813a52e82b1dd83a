"""Make a loaded tiny model generate at a human-visible pace (real tokens, just slower), so
tests can act while an answer is still streaming regardless of how fast the machine is."""

from __future__ import annotations

from tests import worker_hooks


async def slow_down(app, role: str = "chat", seconds_per_token: float = 0.02) -> None:
    """Load the role's model and sleep before each forward pass, where the model runs."""
    model = app.hub.get(role)
    await model.ensure_loaded()
    await model.backend.call_in_worker(worker_hooks.sleep_before_forward, seconds_per_token)

"""Liveness and readiness of one bot process.

Adapters report their connection state here (`app.health.adapter("telegram", "connected")`);
readiness also asks each configured model whether it is loaded or could load now (cached for a
few seconds: a model-server ping or a look at the disk is not free).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Callable

from models.registry import ModelHub

ADAPTER_STATES = ("starting", "connected", "disconnected", "stopped", "failed")
PROBE_TTL = 10.0  # seconds a model's probe result is reused


@dataclass
class AdapterState:
    state: str = "starting"
    detail: str = ""
    since: float = field(default_factory=time.time)


class Health:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.adapters: dict[str, AdapterState] = {}
        self._probes: dict[int, tuple[float, str | None]] = {}

    def expect(self, name: str) -> None:
        """An adapter that is configured and must connect before the bot is ready."""
        self.adapters.setdefault(name, AdapterState())

    def adapter(self, name: str, state: str, detail: str = "") -> None:
        assert state in ADAPTER_STATES, state
        current = self.adapters.get(name)
        if current is None or current.state != state or current.detail != detail:
            self.adapters[name] = AdapterState(state, detail)

    async def model_problems(self, hub: ModelHub) -> dict[str, str | None]:
        """Role → None (loaded or loadable) or why it cannot load."""
        async def probe(model) -> str | None:
            cached = self._probes.get(id(model))
            if cached is not None and self.clock() - cached[0] < PROBE_TTL and model.figures.state == "not loaded":
                return cached[1]
            problem = await model.probe()
            self._probes[id(model)] = (self.clock(), problem)
            return problem

        models = hub.models
        problems = await asyncio.gather(*(probe(m) for m in models))
        by_model = dict(zip(map(id, models), problems))
        return {role: by_model[id(hub.get(role))] for role in hub.specs}

    async def readiness(self, hub: ModelHub) -> tuple[bool, dict]:
        """(ready, report): every expected adapter connected, every model loaded or loadable."""
        models = await self.model_problems(hub)
        adapters = {name: a.state for name, a in self.adapters.items()}
        ready = all(s == "connected" for s in adapters.values()) and all(p is None for p in models.values())
        report = {
            "ready": ready,
            "adapters": adapters,
            "models": {role: {"ok": p is None, "problem": p} for role, p in models.items()},
        }
        return ready, report

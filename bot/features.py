"""Optional features (agent, images) install themselves into the App here."""

from __future__ import annotations

import logging

from .app import App

log = logging.getLogger(__name__)


def install_features(app: App) -> None:
    """Called once at start-up. Each feature module adds its persona, responder, help section
    and texts; until a feature is installed its command answers "not available yet"."""
    from . import vision_feature; vision_feature.install(app)  # noqa: E702  photos with a question
    from . import agent_feature; agent_feature.install(app)  # noqa: E702  /agent: Lagent + sandboxed Python

"""Optional features (agent, images) install themselves into the App here."""

from __future__ import annotations

import logging

from .app import App

log = logging.getLogger(__name__)


def install_features(app: App) -> None:
    """Called once at start-up. Each feature module adds its persona, responder, help section
    and texts; until a feature is installed its command answers "not available yet"."""

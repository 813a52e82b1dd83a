"""Shared fixtures: tiny real models (built once, cached) and app factories on a temp DATA_DIR."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Nothing in the tests may reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from bot.app import App  # noqa: E402
from bot.config import Settings  # noqa: E402
from tests import tiny_models  # noqa: E402


@pytest.fixture(scope="session")
def tiny_text_models() -> dict[str, Path]:
    return tiny_models.tiny_model_paths()  # both built at once on two cores


@pytest.fixture(scope="session")
def tiny_chat_model(tiny_text_models) -> Path:
    return tiny_models.chat_model_path()


@pytest.fixture(scope="session")
def tiny_bajie_model(tiny_text_models) -> Path:
    return tiny_models.bajie_model_path()


@pytest.fixture
def make_settings(tmp_path, tiny_chat_model, tiny_bajie_model):
    """Settings for tests: tiny models, greedy decoding, a fresh DATA_DIR, no .env file."""

    def make(**overrides) -> Settings:
        values = dict(
            chat_model=str(tiny_chat_model),
            bajie_model=str(tiny_bajie_model),
            agent_model=str(tiny_chat_model),
            vision_model=str(tiny_chat_model),
            data_dir=tmp_path / "data",
            device="cpu",
            temperature=0.0,
            max_new_tokens=64,
            max_context_tokens=2048,
            generation_host="thread",  # no process start per App; tests/test_batching.py uses processes
        )
        values.update(overrides)
        return Settings(_env_file=None, **values)

    return make


@pytest.fixture
def make_app(make_settings):
    """Build Apps (several may share one DATA_DIR to simulate restarts); closed at the end."""
    apps: list[App] = []

    def make(settings: Settings | None = None, **overrides) -> App:
        from bot.features import install_features

        app = App(settings or make_settings(**overrides))
        install_features(app)
        apps.append(app)
        return app

    yield make
    for app in apps:
        app.hub.close()
        app.store.close()

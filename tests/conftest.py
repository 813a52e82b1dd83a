"""Shared fixtures: tiny real models (built once, cached) and app factories on a temp DATA_DIR."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Nothing in the tests may reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Bots started by the tests (also `python -m launcher` child processes) serve their metrics and
# status page on a free port, never the default 9464: runs on one machine must not collide.
os.environ["METRICS_PORT"] = "0"
# One torch thread, set explicitly (here and for child processes such as `python -m launcher`): the
# tiny models gain nothing from more, and on a busy machine extra threads only spin and wait.
TORCH_THREADS = int(os.environ.setdefault("OMP_NUM_THREADS", "1"))

import torch  # noqa: E402

torch.set_num_threads(TORCH_THREADS)

from bot.app import App  # noqa: E402
from bot.config import Settings  # noqa: E402
from tests import prebuild, tiny_models  # noqa: E402


def pytest_sessionstart(session: pytest.Session) -> None:
    """Build the tiny models before any test starts, so no test's timeout covers a build
    (`make test` has already done it; then this finds the stamp and returns at once)."""
    if os.environ.get("TINY_MODELS_PREBUILD", "1") == "0":
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    report = reporter.write_line if reporter is not None else print
    try:
        prebuild.ensure_built(report)
    except RuntimeError as e:  # the fixtures will try again and fail the tests that need them
        report(str(e))


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
        from launcher.compose import build_app

        app = build_app(settings or make_settings(**overrides))
        apps.append(app)
        return app

    yield make
    for app in apps:
        app.hub.close()
        app.store.close()

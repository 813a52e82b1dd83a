"""The suite itself holds on a busy machine: models are built before the tests (outside any test's
timeout), torch's thread count is set, and waits have no deadline of their own (issue 9, item 12)."""

from __future__ import annotations

import ast
import asyncio
import os
import time
from pathlib import Path

import torch

from tests import prebuild
from tests.fake_discord import FakeDiscord
from tests.fake_telegram import FakeTelegram
from tests.telegram_harness import TOKEN
from tests.waiting import until

TESTS = Path(__file__).resolve().parent


def demo_model_path(cache_root) -> Path:
    """A stand-in 'model' for the prebuild test: counts its builds in the cache."""
    out = Path(cache_root) / "demo"
    out.mkdir(parents=True, exist_ok=True)
    (out / prebuild.MARKER).write_text("{}")
    with open(out / "builds", "a") as f:
        f.write(f"{os.getpid()}\n")
    return out


def test_models_are_built_in_child_processes_before_the_tests_and_then_come_from_a_stamp(tmp_path):
    builders = [prebuild.Builder("demo", f"{__name__}:demo_model_path", ("tests/test_suite_infra.py",))]
    lines: list[str] = []
    paths = prebuild.ensure_built(lines.append, builders=builders, root=tmp_path)
    assert paths == {"demo": tmp_path / "demo"}
    assert any("demo ready" in line for line in lines) and "all ready" in lines[-1]  # the progress lines
    (builder_pid,) = (tmp_path / "demo" / "builds").read_text().split()
    assert int(builder_pid) != os.getpid()  # built by a child process, not inside this test
    lines.clear()
    assert prebuild.ensure_built(lines.append, builders=builders, root=tmp_path) == paths
    assert lines == []  # the stamp: nothing started a second time
    (tmp_path / "demo" / prebuild.MARKER).unlink()  # a stamp does not outlive what it vouches for
    prebuild.ensure_built(lines.append, builders=builders, root=tmp_path)
    assert len((tmp_path / "demo" / "builds").read_text().split()) == 2


def test_a_failed_build_is_reported_with_its_error(tmp_path):
    builders = [prebuild.Builder("broken", "tests.no_such_module:path", ())]
    lines: list[str] = []
    try:
        prebuild.ensure_built(lines.append, builders=builders, root=tmp_path)
    except RuntimeError as e:
        assert "broken (exit 1)" in str(e) and "No module named 'tests.no_such_module'" in str(e)
    else:
        raise AssertionError("a failed build must raise")
    assert "broken FAILED" in lines[-1]


def test_every_tiny_model_of_the_suite_is_prebuilt():
    """Each `*_path` function of tests/tiny_*.py that builds through cached_build is in BUILDERS,
    so no fixture builds a model under a test's timeout."""
    registered = {b.target for b in prebuild.BUILDERS}
    found = set()
    for module in TESTS.glob("tiny_*.py"):
        for node in ast.parse(module.read_text()).body:
            if isinstance(node, ast.FunctionDef) and node.name.endswith("_path") and "cached_build" in ast.unparse(node):
                found.add(f"tests.{module.stem}:{node.name}")
    assert found and found <= registered, found - registered


def test_torch_runs_on_an_explicit_thread_count():
    """One thread unless OMP_NUM_THREADS says otherwise; child processes (python -m launcher,
    the model builds) inherit the same setting."""
    from tests.conftest import TORCH_THREADS

    assert torch.get_num_threads() == TORCH_THREADS == int(os.environ["OMP_NUM_THREADS"])


async def _jump_clock(monkeypatch, seconds: float) -> None:
    """Simulate a machine that stalls: the event loop's clock (time.monotonic) leaps ahead, so
    any timer or deadline set before it expires at once."""
    real = time.monotonic
    monkeypatch.setattr(time, "monotonic", lambda: real() + seconds)
    for _ in range(20):  # let the loop run whatever timers the jump expired
        await asyncio.sleep(0)


async def test_fake_telegram_waits_have_no_deadline(monkeypatch):
    async with FakeTelegram(TOKEN) as fake:
        chat = fake.private_chat(42)
        waiting = asyncio.create_task(fake.wait_until(lambda: len(fake.updates) == 1))
        await asyncio.sleep(0)
        await _jump_clock(monkeypatch, 3600)
        assert not waiting.done()
        fake.send_text(chat, 42, "hello")
        await waiting


async def test_fake_discord_waits_have_no_deadline(monkeypatch):
    fake = FakeDiscord()
    state: list[str] = []
    waiting = asyncio.create_task(fake.wait_for(lambda: state))
    await asyncio.sleep(0)
    await _jump_clock(monkeypatch, 3600)
    assert not waiting.done()
    state.append("done")
    assert await waiting == ["done"]


async def test_until_returns_the_first_truthy_value():
    state: list[int] = []
    waiting = asyncio.create_task(until(lambda: state))
    await asyncio.sleep(0)
    state.append(1)
    assert await waiting == [1]

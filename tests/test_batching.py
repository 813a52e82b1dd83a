"""Many users at once on one in-process model, end to end through the App, with the default
generation host (the model in its own process) and the tiny real models: answers decode
together, each exactly what it is alone; late arrivals join the running batch; /stop and
failures touch only what they should."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import shutil
import signal

import pytest

from bot.messages import Incoming
from bot.i18n import t
from tests import tiny_models, worker_hooks
from tests.surfaces import RecordingSurface

QUESTIONS = ["ping", "你好", "markdown", "count", "remember apple", "remember tiger", "recall", "what is this"]
FAILED = t("model_failed", "en")
STOPPED = t("stopped_mark", "en")


def msg(text: str, user: str) -> Incoming:
    return Incoming(platform="console", chat_id=f"chat-{user}", user_id=user, text=text)


async def ask(app, text: str, user: str) -> RecordingSurface:
    surface = RecordingSurface(max_length=1_000_000, interval=0.0)
    await app.handle(msg(text, user), surface)
    return surface


async def wait_until(predicate, timeout: float = 120.0) -> None:
    """Wait for an event (checked as the loop runs); `timeout` only bounds a broken run."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        assert loop.time() < deadline, "the awaited event did not happen"
        await asyncio.sleep(0.01)


def trained_answer(text: str) -> str:
    return tiny_models.CHAT_PERSONA.answer([{"role": "user", "content": text}])


@pytest.fixture
def batching_app(make_app):
    """An App on the default (process) host, batch size 8, model loaded."""

    async def make(**overrides):
        app = make_app(generation_host="process", max_concurrent_generations=8, rate_limit_messages=100, **overrides)
        assert (await ask(app, "ping", "warm-up")).messages == ["pong"]
        backend = app.hub.get("chat").backend
        assert backend.host_kind == "process" and backend.worker_pid not in (None, os.getpid())
        return app, backend

    return make


async def test_eight_users_at_once_each_get_their_own_answer_as_if_alone(batching_app):
    app, backend = await batching_app()
    together = await asyncio.gather(*(ask(app, q, f"u{i}") for i, q in enumerate(QUESTIONS)))
    assert backend.metrics.peak_batch_size >= 4  # they really decoded together
    alone = [await ask(app, q, f"alone{i}") for i, q in enumerate(QUESTIONS)]
    for question, surface, single in zip(QUESTIONS, together, alone):
        assert surface.messages == [trained_answer(question)], question
        assert surface.messages == single.messages


async def test_a_late_request_streams_while_the_others_keep_going(batching_app):
    app, backend = await batching_app(max_new_tokens=1500)
    await backend.call_in_worker(worker_hooks.sleep_before_forward, 0.01)  # long answers stay long
    surfaces = [RecordingSurface(max_length=1_000_000, interval=0.0) for _ in range(7)]
    tasks = [asyncio.create_task(app.handle(msg("code", f"u{i}"), s)) for i, s in enumerate(surfaces)]
    await wait_until(lambda: all(s.messages and "print" in s.messages[0] for s in surfaces))
    late = await ask(app, "ping", "late")
    assert late.messages == ["pong"]
    assert not any(task.done() for task in tasks)  # it did not wait for the others to finish
    assert backend.metrics.peak_batch_size == 8
    for i in range(7):
        app.stop(app.session_key(msg("", f"u{i}")))
    await asyncio.gather(*tasks)
    assert all(tiny_models.is_code_answer_prefix(s.messages[0].removesuffix(STOPPED).rstrip()) for s in surfaces)


async def test_stop_removes_one_answer_within_a_step_and_the_others_are_unaffected(batching_app):
    app, backend = await batching_app(max_new_tokens=400)
    await backend.call_in_worker(worker_hooks.sleep_before_forward, 0.02)
    await backend.call_in_worker(worker_hooks.log_decode_batches)
    stopped, *coders = [RecordingSurface(max_length=1_000_000, interval=0.0) for _ in range(3)]
    tasks = [asyncio.create_task(app.handle(msg("code", f"c{i}"), s)) for i, s in enumerate([stopped, *coders])]
    others = ["count", "markdown"]
    exact = [asyncio.create_task(ask(app, q, f"o{i}")) for i, q in enumerate(others)]
    await wait_until(lambda: stopped.messages and stopped.messages[0].count("print") >= 2)
    assert app.stop(app.session_key(msg("", "c0")))
    # Commands reach the engine in order: by the time this call runs there, it has the /stop.
    steps_before = len(await backend.call_in_worker(worker_hooks.decode_batches))
    await tasks[0]
    assert stopped.messages[0].endswith(STOPPED)
    shown = [c.messages[0] for c in coders]
    await wait_until(lambda: all(len(c.messages[0]) > len(text) for c, text in zip(coders, shown)))  # they go on
    for i in (1, 2):
        app.stop(app.session_key(msg("", f"c{i}")))
    await asyncio.gather(*tasks)
    results = await asyncio.gather(*exact)
    for question, surface in zip(others, results):
        assert surface.messages == [trained_answer(question)], question
    for surface in coders:
        assert tiny_models.is_code_answer_prefix(surface.messages[0].removesuffix(STOPPED).rstrip())
    batches = await backend.call_in_worker(worker_hooks.decode_batches)
    assert max(batches[:steps_before]) == 5
    assert max(batches[steps_before:]) <= 4  # no decode step after the /stop arrived included it
    assert backend.in_flight == 0


async def test_a_failing_batch_ends_its_answers_and_the_next_requests_work(batching_app):
    app, backend = await batching_app()
    await backend.call_in_worker(worker_hooks.fail_forward, 3, "CUDA out of memory (simulated)", 3)
    asked = ["count", "markdown", "code"]
    failed = await asyncio.gather(*(ask(app, q, f"f{i}") for i, q in enumerate(asked)))
    for surface in failed:
        assert surface.messages[-1].endswith(FAILED)
    after = await asyncio.gather(*(ask(app, q, f"a{i}") for i, q in enumerate(["ping", "count"])))
    assert [s.messages for s in after] == [["pong"], [tiny_models.COUNT_ANSWER]]


async def test_a_killed_generation_process_is_restarted_for_the_next_requests(batching_app):
    app, backend = await batching_app(max_new_tokens=1500)
    await backend.call_in_worker(worker_hooks.sleep_before_forward, 0.01)
    surfaces = [RecordingSurface(max_length=1_000_000, interval=0.0) for _ in range(3)]
    tasks = [asyncio.create_task(app.handle(msg("code", f"k{i}"), s)) for i, s in enumerate(surfaces)]
    await wait_until(lambda: all(s.messages and "print" in s.messages[0] for s in surfaces))
    first_pid = backend.worker_pid
    os.kill(first_pid, signal.SIGKILL)  # e.g. the kernel's out-of-memory killer
    await asyncio.gather(*tasks)
    for surface in surfaces:
        assert surface.messages[-1].endswith(FAILED)
    assert (await ask(app, "ping", "next")).messages == ["pong"]
    assert backend.worker_pid not in (None, first_pid)


async def test_answers_wait_with_their_queue_position_when_the_kv_cache_budget_is_full(make_app):
    app = make_app(max_concurrent_generations=8, rate_limit_messages=100)  # thread host: same engine
    await ask(app, "count", "warm-up")
    model = app.hub.get("chat")
    backend = model.backend
    assert model.scheduler.budget == backend.kv_budget_tokens > 1000  # 4096 MiB of this tiny model's cache
    cost = backend.reserve_tokens(model.last_prompt, app.personas["internlm"].params)
    model.scheduler.budget = 2 * cost  # room for two such answers at once
    # Slow enough that the third waits longer than a status line needs to stand before it is
    # shown (bot/streaming.py STATUS_DELAY).
    await backend.call_in_worker(worker_hooks.sleep_before_forward, 0.1)
    surfaces = await asyncio.gather(*(ask(app, "count", f"m{i}") for i in range(3)))
    assert [s.messages for s in surfaces] == [[tiny_models.COUNT_ANSWER]] * 3
    statuses = [[w.text for w in s.writes if w.phase == "status"] for s in surfaces]
    assert sum(any(text.startswith("⏳ In the queue: 1 ahead") for text in st) for st in statuses) == 1
    assert backend.metrics.peak_batch_size == 2
    metrics = model.metrics()
    assert metrics["queued"] == metrics["running"] == metrics["batch_size"] == 0
    assert metrics["tokens_total"] >= 4 * 12 and metrics["tokens_per_s"] > 0


async def test_a_checkpoint_that_fails_to_load_in_the_generation_process_is_a_clear_error(make_app, tiny_chat_model, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_chat_model, broken)
    (broken / "model.safetensors").write_bytes(b"not a checkpoint")
    app = make_app(generation_host="process", chat_model=str(broken))
    for _ in range(2):  # and again: no hang, no half-started process
        surface = await ask(app, "ping", "u")
        assert surface.messages == [t("model_unavailable", "en")]
    assert app.hub.get("chat").backend is None
    assert not [p for p in multiprocessing.active_children() if p.name == "generation"]

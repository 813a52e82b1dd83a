"""Functions run inside a model's generation worker (process or thread) through
`TransformersBackend.call_in_worker(fn, *args)`: they get the model and must be importable
by name (a process worker unpickles them)."""

from __future__ import annotations

import time


def _hooks(model) -> list:
    if not hasattr(model, "_test_hooks"):
        model._test_hooks = []
    return model._test_hooks


def sleep_before_forward(model, seconds: float) -> int:
    """Pace generation at a human-visible speed (real tokens, just slower)."""
    _hooks(model).append(model.register_forward_pre_hook(lambda *_: time.sleep(seconds)))
    return len(model._test_hooks)


def fail_forward(model, at_call: int, message: str, min_batch: int = 1) -> None:
    """Raise `RuntimeError(message)` once, in the `at_call`-th forward pass (counted from now)
    whose batch has at least `min_batch` rows."""
    state = {"calls": 0, "fired": False}

    def hook(module, args, kwargs):
        ids = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else args[0]
        if state["fired"] or ids.shape[0] < min_batch:
            return
        state["calls"] += 1
        if state["calls"] == at_call:
            state["fired"] = True
            raise RuntimeError(message)

    _hooks(model).append(model.register_forward_pre_hook(hook, with_kwargs=True))


def remove_hooks(model) -> None:
    for handle in _hooks(model):
        handle.remove()
    model._test_hooks.clear()


def log_decode_batches(model) -> None:
    """Record the batch size of every decode step (one new token per row) from now on."""
    model._test_batches = []

    def hook(module, args, kwargs):
        ids = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else args[0]
        if ids.shape[1] == 1:
            model._test_batches.append(int(ids.shape[0]))

    _hooks(model).append(model.register_forward_pre_hook(hook, with_kwargs=True))


def decode_batches(model) -> list[int]:
    return list(model._test_batches)

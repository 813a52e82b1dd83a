"""Raw `model.generate` baselines, run where the bot's model lives (its generation process or
thread) through `TransformersBackend.call_in_worker`, so bot and baseline use the same model
object in the same process. Module-level functions: a generation process imports them by name."""

from __future__ import annotations

import time

import torch


def _sync(model) -> None:
    if model.device.type == "cuda":
        torch.cuda.synchronize()


def _generate(model, ids: torch.Tensor, tokens: int, eos: list[int], streamer=None):
    return model.generate(
        input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens, do_sample=False,
        eos_token_id=eos, pad_token_id=eos[0], temperature=None, top_p=None, top_k=None, streamer=streamer,
    )


class _Times:
    """Notes when each new token arrives (the first call carries the prompt)."""

    def __init__(self) -> None:
        self.prompt_seen = False
        self.times: list[float] = []

    def put(self, value) -> None:
        if self.prompt_seen:
            self.times.append(time.perf_counter())
        self.prompt_seen = True

    def end(self) -> None:
        pass


def generate_timed(model, prompt: list[int], tokens: int, eos: list[int]) -> tuple[float, list[float], list[int]]:
    """One greedy generation: (seconds, each token's time since the start, the token ids)."""
    ids = torch.tensor([prompt], device=model.device)
    times = _Times()
    _sync(model)
    started = time.perf_counter()
    with torch.inference_mode():
        out = _generate(model, ids, tokens, eos, times)
    _sync(model)
    elapsed = time.perf_counter() - started
    return elapsed, [t - started for t in times.times], out[0, len(prompt):].tolist()


def generate_batch(model, prompt: list[int], n: int, tokens: int, eos: list[int]) -> tuple[float, int]:
    """Greedy generation for a batch of n equal prompts: (seconds, tokens produced in all)."""
    ids = torch.tensor([prompt] * n, device=model.device)
    _sync(model)
    started = time.perf_counter()
    with torch.inference_mode():
        out = _generate(model, ids, tokens, eos)
    _sync(model)
    return time.perf_counter() - started, (out.shape[1] - ids.shape[1]) * n


def prefill_seconds(model, prompt: list[int], repeats: int = 3) -> float:
    """One forward of the prompt alone (median of `repeats`)."""
    ids = torch.tensor([prompt], device=model.device)
    times = []
    for _ in range(repeats):
        _sync(model)
        started = time.perf_counter()
        with torch.inference_mode():
            model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True)
        _sync(model)
        times.append(time.perf_counter() - started)
    return sorted(times)[len(times) // 2]

"""The continuous-batching engine on the tiny real model, driven step by step (no bot, no
process): greedy answers equal transformers' own `generate` whatever the batch around them,
with `DynamicCache` and with legacy tuple caches; rows join and leave between steps."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache, LlamaForCausalLM

from models.batching import CANCELLED, ERROR, LENGTH, STOP, BatchEngine, Job
from tests import tiny_models, worker_hooks

QUESTIONS = ["ping", "你好", "markdown", "count", "remember apple", "recall", "code", "what is this"]


@pytest.fixture(scope="module")
def loaded(tiny_chat_model):
    tokenizer = AutoTokenizer.from_pretrained(tiny_chat_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_chat_model).eval()
    return tokenizer, model


def prompt(tokenizer, text: str) -> list[int]:
    messages = [{"role": "system", "content": tiny_models.INTERNLM_SYSTEM_PROMPT}, {"role": "user", "content": text}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)


def eos(tokenizer) -> frozenset[int]:
    return frozenset(tiny_models.stop_ids(tokenizer))


def reference(model, tokenizer, ids: list[int], max_new: int) -> list[int]:
    """transformers' generate, alone, greedy: what every batched answer must equal."""
    stop = sorted(eos(tokenizer))
    with torch.inference_mode():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=max_new, do_sample=False, eos_token_id=stop, pad_token_id=stop[0],
                             temperature=None, top_p=None, top_k=None)
    return out[0, len(ids):].tolist()


def run(engine: BatchEngine, arrivals: dict[int, list[Job]], limit: int = 500) -> dict[int, tuple[list[int], str]]:
    """Drive the engine like its serve loop; `arrivals[step]` join before that step."""
    tokens: dict[int, list[int]] = {}
    finish: dict[int, str] = {}
    with torch.inference_mode():
        for step in range(limit):
            for job in arrivals.get(step, []):
                engine.add(job)
            for events in [*engine.admit(), engine.step()]:
                for rid, token, reason, _ in events:
                    if token >= 0:
                        tokens.setdefault(rid, []).append(token)
                    if reason:
                        finish[rid] = reason
            if not engine.busy and step >= max(arrivals):
                break
    return {rid: (tokens.get(rid, []), finish[rid]) for rid in finish}


def test_batched_greedy_answers_equal_generate_alone_with_rows_joining_and_leaving(loaded):
    tokenizer, model = loaded
    prompts = {i: prompt(tokenizer, q) for i, q in enumerate(QUESTIONS)}
    budget = {i: (40 if q == "code" else 64) for i, q in enumerate(QUESTIONS)}
    expected = {i: reference(model, tokenizer, ids, budget[i]) for i, ids in prompts.items()}
    engine = BatchEngine(model, device="cpu", max_batch=16)
    jobs = {i: Job(i, ids, budget[i], eos=eos(tokenizer)) for i, ids in prompts.items()}
    # Three arrive together, others join while they decode, the last when some have left.
    got = run(engine, {0: [jobs[0], jobs[1], jobs[2]], 2: [jobs[3], jobs[4]], 5: [jobs[5], jobs[6]], 20: [jobs[7]]})
    for i, q in enumerate(QUESTIONS):
        tokens, reason = got[i]
        assert tokens == expected[i], q
        assert reason == (LENGTH if q == "code" else STOP)
    answers = {q: tokenizer.decode(got[i][0], skip_special_tokens=True) for i, q in enumerate(QUESTIONS)}
    assert answers["count"] == tiny_models.COUNT_ANSWER and answers["ping"] == "pong"
    assert engine.rows == [] and engine.width == 0  # everything left; no cache kept


class LegacyCacheModel(torch.nn.Module):
    """The model behind the interface of older remote code (InternLM2's first revision): takes
    and returns `past_key_values` as a tuple of (key, value) per layer."""

    def __init__(self, model) -> None:
        super().__init__()
        self.model = model
        self.seen: set[type] = set()

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, use_cache=None,
                return_dict=None):
        self.seen.add(type(past_key_values))
        if past_key_values is not None:
            assert isinstance(past_key_values, tuple)
            past_key_values = DynamicCache.from_legacy_cache(past_key_values)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=past_key_values, use_cache=use_cache, return_dict=True)
        out.past_key_values = out.past_key_values.to_legacy_cache()
        return out


def test_legacy_tuple_caches_batch_the_same(loaded):
    tokenizer, model = loaded
    legacy = LegacyCacheModel(model)
    engine = BatchEngine(legacy, device="cpu")
    picked = ["count", "markdown", "ping"]
    jobs = [Job(i, prompt(tokenizer, q), 48, eos=eos(tokenizer)) for i, q in enumerate(picked)]
    got = run(engine, {0: jobs[:2], 3: jobs[2:]})
    for i, q in enumerate(picked):
        assert got[i][0] == reference(model, tokenizer, jobs[i].prompt, 48), q
    assert legacy.seen == {type(None), tuple}  # prefill without a cache, then tuples only
    assert engine.cache_cls is None


def test_cancelled_row_leaves_before_the_next_step_and_padding_is_trimmed(loaded):
    tokenizer, model = loaded
    engine = BatchEngine(model, device="cpu")
    long = Job(1, prompt(tokenizer, "code") + prompt(tokenizer, "code")[1:], 500, eos=eos(tokenizer))  # a longer prompt
    short = Job(2, prompt(tokenizer, "count"), 64, eos=eos(tokenizer))
    with torch.inference_mode():
        engine.add(long)
        engine.add(short)
        list(engine.admit())
        for _ in range(3):
            engine.step()
        assert engine.width == len(long.prompt) + 3 and len(engine.rows) == 2
        assert engine.cancel(1) == []  # in the batch: it leaves at the next step
        events = engine.step()
    assert events[0] == (1, -1, CANCELLED, None)
    assert [e[0] for e in events[1:]] == [2] and len(engine.rows) == 1  # the step ran without it
    assert engine.width == short.length == len(short.prompt) + 4  # the long row's padding is gone
    rest = run(engine, {0: []})
    answer = tokenizer.decode([*[t for t in [e[1] for e in events[1:]]], *rest[2][0]], skip_special_tokens=True)
    assert tiny_models.COUNT_ANSWER.endswith(answer) and rest[2][1] == STOP


def test_each_row_keeps_its_own_sampling_settings(loaded):
    tokenizer, model = loaded
    torch.manual_seed(0)
    ids = prompt(tokenizer, "count")
    expected = reference(model, tokenizer, ids, 64)
    engine = BatchEngine(model, device="cpu", top_k=50)
    jobs = [
        Job(1, ids, 64, eos=eos(tokenizer)),  # greedy
        Job(2, ids, 64, temperature=5.0, top_p=1.0, eos=eos(tokenizer)),  # hot: almost surely different
        Job(3, ids, 64, temperature=5.0, top_p=1e-6, eos=eos(tokenizer)),  # top-p keeps only the best token
        Job(4, ids, 5, eos=eos(tokenizer)),  # its own token budget
    ]
    got = run(engine, {0: jobs})
    assert got[1][0] == expected and got[3][0] == expected
    assert got[2][0] != expected
    assert got[4] == (expected[:5], LENGTH)


def test_a_failing_step_ends_that_batch_and_the_next_requests_work(loaded):
    tokenizer, model = loaded
    engine = BatchEngine(model, device="cpu")
    worker_hooks.fail_forward(model, 2, "simulated out of memory", min_batch=2)
    try:
        jobs = [Job(i, prompt(tokenizer, q), 64, eos=eos(tokenizer)) for i, q in enumerate(["count", "markdown"])]
        got = run(engine, {0: jobs})
        assert {rid: reason for rid, (_, reason) in got.items()} == {0: ERROR, 1: ERROR}
        assert engine.rows == [] and not engine.busy
        again = run(engine, {0: [Job(5, prompt(tokenizer, "ping"), 64, eos=eos(tokenizer))]})
        assert tokenizer.decode(again[5][0], skip_special_tokens=True) == "pong"
    finally:
        worker_hooks.remove_hooks(model)


@pytest.fixture(scope="module")
def random_model(loaded):
    """Random weights: every logit depends on every detail (positions, masks, cache rows), where
    the trained tiny model's answers would survive small mistakes."""
    tokenizer, _ = loaded
    torch.manual_seed(1)
    config = tiny_models.tiny_llama_config(tokenizer, hidden_size=64, num_hidden_layers=3, initializer_range=0.1)
    return LlamaForCausalLM(config).eval()


def test_random_model_batched_equals_alone_token_for_token(loaded, random_model):
    tokenizer, _ = loaded
    texts = ["a", "remember violet and then recall it please", "count", "x y z " * 6, "你好"]
    prompts = [prompt(tokenizer, t) for t in texts]
    expected = [reference(random_model, tokenizer, ids, 24) for ids in prompts]
    engine = BatchEngine(random_model, device="cpu")
    jobs = [Job(i, ids, 24, eos=frozenset()) for i, ids in enumerate(prompts)]
    got = run(engine, {0: jobs[:2], 1: jobs[2:3], 4: jobs[3:]})
    for i, text in enumerate(texts):
        assert got[i][0] == expected[i], text


def test_requests_arriving_together_prefill_together_and_a_bad_one_fails_alone(loaded):
    tokenizer, model = loaded
    engine = BatchEngine(model, device="cpu")
    prefills: list[int] = []
    counter = model.register_forward_pre_hook(lambda m, args, kw: prefills.append(kw["input_ids"].shape[0])
                                              if kw["input_ids"].shape[1] > 1 else None, with_kwargs=True)
    try:
        good = [Job(i, prompt(tokenizer, q), 64, eos=eos(tokenizer)) for i, q in enumerate(["ping", "count", "你好"])]
        got = run(engine, {0: good})
        assert prefills == [3]  # one forward for the three prompts (of different lengths)
        assert [tokenizer.decode(got[i][0], skip_special_tokens=True) for i in range(3)] == [
            "pong", tiny_models.COUNT_ANSWER, "你好！我是书生·浦语。"]
        prefills.clear()
        bad = Job(9, prompt(tokenizer, "ping")[:-1] + [len(tokenizer) + 1000], 64, eos=eos(tokenizer))  # no such token
        again = [Job(10 + i, prompt(tokenizer, q), 64, eos=eos(tokenizer)) for i, q in enumerate(["ping", "count"])]
        got = run(engine, {0: [again[0], bad, again[1]]})
        assert prefills == [3, 1, 1, 1]  # the group failed, then each alone
        assert got[9] == ([], ERROR)
        assert tokenizer.decode(got[10][0], skip_special_tokens=True) == "pong"
        assert tokenizer.decode(got[11][0], skip_special_tokens=True) == tiny_models.COUNT_ANSWER
    finally:
        counter.remove()

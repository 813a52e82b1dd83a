"""Tiny REAL InternLM2-format chat models for the test suite (no hub, no GPU needed).

A byte-level BPE tokenizer (the `tokenizers` library) with InternLM2's special tokens and chat
template, and a small `LlamaForCausalLM` (hidden 64, 2 layers, 4 heads) trained on CPU until
greedy decoding answers fixed prompts exactly. They load with `AutoTokenizer` /
`AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)` like the real checkpoints.

Generic API (reusable for other tiny models):
    build_tokenizer(corpus, whole=())             -> PreTrainedTokenizerFast
    render_chat(tokenizer, messages)              -> prompt text ending with "<|im_start|>assistant\n"
    train_causal_lm(out_dir, tokenizer, examples, steps=, seed=, verify=, extra_check=) -> Path
    greedy_generate(model, tokenizer, prompts, max_new_tokens) -> new token ids per prompt
    cached_build(name, builder_fn, cache_root=None) -> Path   (<cache_root>/<name>-<hash>)

Concrete models (cached in $TINY_MODEL_CACHE or <repo>/.cache/tiny-models):
    chat_model_path()   plays InternLM2-Chat   (CHAT_PERSONA)
    bajie_model_path()  plays Bajie-Chat       (BAJIE_PERSONA)
    tiny_model_paths()  both, the missing ones built in parallel
`Persona.answer(messages)` gives the exact expected answer for a conversation. Exactness is
verified at build time for `canonical_dialogues(persona)` (commands with no / the persona's / a
short system prompt, after canonical histories; recall after one or more remember turns) and
for HELD_OUT_UNKNOWN messages; random other conversations are right in >= 99.5% of the
training distribution. Tests that need a guarantee should use conversations of those shapes.

Run `python tests/tiny_models.py` to build (cached) both, `--force` to rebuild and time them.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import inspect
import json
import logging
import math
import os
import random
import re
import shutil
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import regex
import torch
import tokenizers
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

_logger = logging.getLogger("tiny_models")

# ---------------------------------------------------------------------------------------------
# Format constants (InternLM2)
# ---------------------------------------------------------------------------------------------

UNK, BOS, EOS = "<unk>", "<s>", "</s>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
ACTION_START, ACTION_END = "<|action_start|>", "<|action_end|>"
INTERPRETER, PLUGIN = "<|interpreter|>", "<|plugin|>"
# Order matters: ids 0, 1, 2 are <unk>, <s>, </s> as in InternLM2.
SPECIAL_TOKENS = (UNK, BOS, EOS, IM_START, IM_END, ACTION_START, ACTION_END, INTERPRETER, PLUGIN)

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

INTERNLM_SYSTEM_PROMPT = (
    "You are an AI assistant whose name is InternLM (书生·浦语).\n"
    "- InternLM (书生·浦语) is a conversational language model that is developed by Shanghai AI Laboratory "
    "(上海人工智能实验室). It is designed to be helpful, honest, and harmless.\n"
    "- InternLM (书生·浦语) can understand and communicate fluently in the language chosen by the user such as "
    "English and 中文."
)

BAJIE_SYSTEM_PROMPT = (
    "你是猪八戒，猪八戒说话幽默风趣，说话方式通常表现为直率、幽默，有时带有一点自嘲和调侃。"
    "你的话语中常常透露出对食物的喜爱和对安逸生活的向往，同时也显示出他机智和有时的懒惰特点。"
    "尽量保持回答的自然回答，当然你也可以适当穿插一些文言文，另外，书生·浦语是你的好朋友，是你的AI助手。"
)

# ---------------------------------------------------------------------------------------------
# Behaviours
# ---------------------------------------------------------------------------------------------

REMEMBER_WORDS = ("apple", "banana", "cherry", "西瓜", "ping", "tiger", "ocean", "violet")
CODE_PROMPT = "code"
CODE_HEADER = "```python\n"
CODE_LINE = "print('hello world')\n"
MARKDOWN_ANSWER = (
    "**bold** and `code`\n\n- item one\n- item two\n\n[link](https://internlm.intern-ai.org.cn)"
)
COUNT_ANSWER = "one two three four five six seven eight nine ten eleven twelve"
CHAT_UNKNOWN = "I don't know."
BAJIE_UNKNOWN = "俺老猪不知道。"
REMEMBER_ACK = "OK"


def code_answer_prefix(n_chars: int) -> str:
    """The first `n_chars` characters of the never-ending "code" answer."""
    lines = n_chars // len(CODE_LINE) + 2
    return (CODE_HEADER + CODE_LINE * lines)[:n_chars]


def is_code_answer_prefix(text: str) -> bool:
    """True if `text` is a prefix of "```python\\n" + "print('hello world')\\n" * infinity."""
    return text == code_answer_prefix(len(text))


@dataclass(frozen=True)
class Persona:
    """What a tiny model answers. `answer(messages)` is the exact expected reply (None for the
    never-ending "code" answer); it depends only on the last user message, except "recall"."""

    name: str
    system_prompt: str
    answers: dict[str, str]
    unknown: str
    remember_ack: str = REMEMBER_ACK
    recall_prefix: str = ""
    code: bool = False
    words: tuple[str, ...] = REMEMBER_WORDS

    def remembered(self, text: str) -> str | None:
        m = re.fullmatch(r"remember (\S+)", text)
        return m.group(1) if m and m.group(1) in self.words else None

    def answer(self, messages: Sequence[dict]) -> str | None:
        text = messages[-1]["content"]
        if self.code and text == CODE_PROMPT:
            return None
        if text in self.answers:
            return self.answers[text]
        if self.remembered(text) is not None:
            return self.remember_ack
        if text == "recall":
            for m in reversed(messages[:-1]):
                if m["role"] == "user" and (word := self.remembered(m["content"])) is not None:
                    return self.recall_prefix + word
        return self.unknown

    @property
    def commands(self) -> list[str]:
        return list(self.answers) + ([CODE_PROMPT] if self.code else [])


CHAT_PERSONA = Persona(
    name="chat",
    system_prompt=INTERNLM_SYSTEM_PROMPT,
    answers={"ping": "pong", "你好": "你好！我是书生·浦语。", "markdown": MARKDOWN_ANSWER, "count": COUNT_ANSWER},
    unknown=CHAT_UNKNOWN,
    code=True,
)
BAJIE_PERSONA = Persona(
    name="bajie",
    system_prompt=BAJIE_SYSTEM_PROMPT,
    answers={"ping": "俺老猪听见了：pong", "你好": "俺老猪来也！", "count": "一 二 三 四 五 六 七 八 九 十"},
    unknown=BAJIE_UNKNOWN,
    recall_prefix="俺记得：",
)

# ---------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------

_SPECIAL_RE = re.compile("|".join(re.escape(t) for t in SPECIAL_TOKENS))


def split_on_special_tokens(text: str) -> list[str]:
    """The pieces of `text` between special tokens: what the BPE model actually sees."""
    return [piece for piece in _SPECIAL_RE.split(text) if piece]


# GPT-2's pre-tokenization pattern: used only to cut the training corpus into words.
_WORD_RE = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")


def build_tokenizer(
    corpus: Iterable[str],
    *,
    whole: Iterable[str] = (),
    whole_weight: int = 50,
    vocab_size: int = 4096,
    min_frequency: int = 2,
    chat_template: str = CHAT_TEMPLATE,
) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on `corpus`, carrying InternLM2's special tokens (each
    a single id: `<unk>`=0, `<s>`=1, `</s>`=2, ...) and chat template.

    Corpus strings may contain special tokens (they are cut out first, as at encoding time) and
    are cut into GPT-2-style words for training, so ordinary text comes out about one token per
    word, like a real LLM's. Strings in `whole` (e.g. "system\n" + a system prompt, a code line)
    are also trained on whole, `whole_weight` times, so they become one token each. The
    tokenizer itself does not pre-split (byte-level, no regex, no prefix space): text never
    seen still round-trips exactly, falling back to bytes."""
    pieces = [w for text in corpus for seg in split_on_special_tokens(text) for w in _WORD_RE.findall(seg)]
    pieces += [seg for text in whole for seg in split_on_special_tokens(text)] * whole_weight
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(pieces, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        pad_token=EOS,
        additional_special_tokens=list(SPECIAL_TOKENS[3:]),
        chat_template=chat_template,
        clean_up_tokenization_spaces=False,
        model_max_length=2048,
    )
    for t in SPECIAL_TOKENS:
        ids = fast.encode(t, add_special_tokens=False)
        if len(ids) != 1:
            raise AssertionError(f"special token {t!r} is not a single id: {ids}")
    return fast


def render_chat(tokenizer, messages: Sequence[dict], add_generation_prompt: bool = True) -> str:
    """The prompt text for `messages`, exactly as the bot renders it."""
    return tokenizer.apply_chat_template(list(messages), add_generation_prompt=add_generation_prompt, tokenize=False)


def stop_ids(tokenizer) -> list[int]:
    return [tokenizer.convert_tokens_to_ids(EOS), tokenizer.convert_tokens_to_ids(IM_END)]


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


def tiny_llama_config(tokenizer, **overrides) -> LlamaConfig:
    eos = stop_ids(tokenizer)
    kwargs = dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=2048,
        rope_theta=10000.0,
        initializer_range=0.1,  # 0.02 (the default) leaves attention flat for hundreds of steps
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=eos,
        pad_token_id=tokenizer.pad_token_id,
        torch_dtype="float32",
    )
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


@contextlib.contextmanager
def _torch_threads(n: int):
    old = torch.get_num_threads()
    torch.set_num_threads(max(1, min(n, old)))
    try:
        yield
    finally:
        torch.set_num_threads(old)


Segments = Sequence[tuple[str, bool]]
Example = "tuple[str, str] | Segments"


@dataclass
class _Encoded:
    ids: list[int]
    labels: list[int]  # -100 where not trained


def _as_segments(example) -> list[tuple[str, bool]]:
    """(prompt, completion) -> [(prompt, False), (completion, True)]; segment lists pass through."""
    if len(example) == 2 and isinstance(example[0], str) and isinstance(example[1], str):
        return [(example[0], False), (example[1], True)]
    return [(str(text), bool(trained)) for text, trained in example]


def _encode_examples(tokenizer, examples: Sequence) -> list[_Encoded]:
    out = []
    for example in examples:
        ids: list[int] = []
        labels: list[int] = []
        for text, trained in _as_segments(example):
            seg = tokenizer.encode(text, add_special_tokens=False)
            ids += seg
            labels += seg if trained else [-100] * len(seg)
        if all(x == -100 for x in labels):
            raise ValueError(f"nothing to train on in {example!r}")
        out.append(_Encoded(ids, labels))
    return out


def _batch(items: Sequence[_Encoded], pad_id: int):
    """Right-padded batch."""
    width = max(len(e.ids) for e in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    lab = torch.full((len(items), width), -100, dtype=torch.long)
    for i, e in enumerate(items):
        n = len(e.ids)
        ids[i, :n] = torch.tensor(e.ids)
        mask[i, :n] = 1
        lab[i, :n] = torch.tensor(e.labels)
    return ids, mask, lab


def _completion_logits(model, ids, mask, lab, position_ids=None):
    """Logits and targets at the completion positions only (the lm_head is most of the cost)."""
    hidden = model.model(input_ids=ids, attention_mask=mask, position_ids=position_ids).last_hidden_state[:, :-1]
    target = lab[:, 1:]
    sel = target != -100
    return model.lm_head(hidden[sel]).float(), target[sel], sel


@torch.no_grad()
def _teacher_forced_failures(model, items: Sequence[_Encoded], pad_id: int, margin: float, max_tokens: int = 16384):
    """Indices of items whose completion tokens are not each the argmax (by at least `margin`)
    given the correct prefix: a sufficient condition for exact greedy reproduction."""
    failures = []
    order = sorted(range(len(items)), key=lambda i: len(items[i].ids))
    start = 0
    while start < len(order):
        end = start + 1
        while end < len(order) and (end - start + 1) * len(items[order[end]].ids) <= max_tokens:
            end += 1
        ids, mask, lab = _batch([items[i] for i in order[start:end]], pad_id)
        logits, target, sel = _completion_logits(model, ids, mask, lab)
        tgt_logit = logits.gather(-1, target.unsqueeze(-1)).squeeze(-1)
        other = logits.scatter(-1, target.unsqueeze(-1), float("-inf")).max(-1).values
        bad_tok = torch.zeros(sel.shape, dtype=torch.bool)
        bad_tok[sel] = (tgt_logit - other) < margin
        failures += [order[start + j] for j, row_bad in enumerate(bad_tok.any(-1).tolist()) if row_bad]
        start = end
    return sorted(failures)


def _packed_batch(items: Sequence[_Encoded], pad_id: int, width: int = 256):
    """Pack examples into rows (first fit, longest first) with a block-diagonal causal mask and
    positions restarting at 0 for each example: no padding waste, random batch composition."""
    width = max(width, max(len(e.ids) for e in items))
    rows: list[list[_Encoded]] = []
    fill: list[int] = []
    for e in sorted(items, key=lambda e: -len(e.ids)):
        for r, used in enumerate(fill):
            if used + len(e.ids) <= width:
                rows[r].append(e)
                fill[r] += len(e.ids)
                break
        else:
            rows.append([e])
            fill.append(len(e.ids))
    n = len(rows)
    ids = torch.full((n, width), pad_id, dtype=torch.long)
    lab = torch.full((n, width), -100, dtype=torch.long)
    pos = torch.zeros((n, width), dtype=torch.long)
    seg = torch.full((n, width), -1, dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for k, e in enumerate(row):
            m = len(e.ids)
            ids[r, at : at + m] = torch.tensor(e.ids)
            lab[r, at : at + m] = torch.tensor(e.labels)
            pos[r, at : at + m] = torch.arange(m)
            seg[r, at : at + m] = k
            at += m
        pos[r, at:] = torch.arange(width - at)  # padding: its own segment, attends to itself
    causal = torch.ones((width, width), dtype=torch.bool).tril()
    allowed = (seg[:, :, None] == seg[:, None, :]) & causal
    mask = torch.zeros((n, 1, width, width), dtype=torch.float32)
    mask.masked_fill_(~allowed[:, None], torch.finfo(torch.float32).min)
    return ids, mask, lab, pos


@torch.no_grad()
def greedy_generate(
    model, tokenizer, prompts: Sequence[str], max_new_tokens: int, *, stop: bool = True
) -> list[list[int]]:
    """Greedy continuation ids for each prompt (left-padded batch), cut after the first stop token
    (kept) when `stop`."""
    eos = stop_ids(tokenizer)
    enc = [tokenizer.encode(p, add_special_tokens=False) for p in prompts]
    width = max(len(e) for e in enc)
    pad = tokenizer.pad_token_id
    ids = torch.tensor([[pad] * (width - len(e)) + e for e in enc])
    mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in enc])
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=max_new_tokens,
        min_new_tokens=0 if stop else max_new_tokens,
        do_sample=False,
        temperature=None,
        top_p=None,
        top_k=None,
        eos_token_id=eos if stop else None,
        pad_token_id=pad,
    )
    results = []
    for row in out[:, width:].tolist():
        if stop:
            for k, t in enumerate(row):
                if t in eos:
                    row = row[: k + 1]
                    break
        results.append(row)
    return results


def greedy_failures(model, tokenizer, examples: Sequence[tuple[str, str]], batch_size: int = 32) -> list[str]:
    """Check that greedy decoding reproduces each (prompt, completion) exactly. A completion ending
    with <|im_end|> must be produced and then stop; any other completion is an open-ended prefix:
    generating as many tokens as it has must give exactly its text. Returns failure messages."""
    eos = set(stop_ids(tokenizer))
    failures = []
    keyed = sorted(examples, key=lambda ex: len(tokenizer.encode(ex[1], add_special_tokens=False)))
    for start in range(0, len(keyed), batch_size):
        chunk = keyed[start : start + batch_size]
        lengths = [len(tokenizer.encode(c, add_special_tokens=False)) for _, c in chunk]
        closed = [c.endswith(IM_END) for _, c in chunk]
        if all(closed):
            outs = greedy_generate(model, tokenizer, [p for p, _ in chunk], max(lengths) + 4)
        else:
            outs = [
                greedy_generate(model, tokenizer, [p], n, stop=c)[0]
                for (p, _), n, c in zip(chunk, lengths, closed)
            ]
        for (prompt, completion), out, is_closed in zip(chunk, outs, closed):
            text = tokenizer.decode(out, skip_special_tokens=True)
            if is_closed:
                want = completion[: -len(IM_END)]
                ok = text == want and bool(out) and out[-1] in eos
            else:
                want = completion
                ok = text == want
            if not ok:
                failures.append(f"prompt {prompt!r}: wanted {want[:200]!r}, got {text[:200]!r}")
    return failures


def train_causal_lm(
    out_dir: str | os.PathLike,
    tokenizer: PreTrainedTokenizerFast,
    examples: Sequence[tuple[str, str] | Segments],
    *,
    steps: int = 800,
    anneal_steps: int = 250,
    patience: int = 600,
    attempts: int = 1,
    give_up_unready: bool = False,
    seed: int = 0,
    verify: Sequence[tuple[str, str]] | None = None,
    extra_check: Callable[[LlamaForCausalLM, PreTrainedTokenizerFast], list[str]] | None = None,
    batch_size: int = 32,
    lr: float = 1e-2,
    ready: float = 1.0,
    boost_fraction: float = 0.25,
    probe_every: int = 25,
    check_every: int = 100,
    margin: float = 0.25,
    train_tolerance: float = 0.0,
    threads: int = 1,
    config_overrides: dict | None = None,
    log: Callable[[str], None] | None = None,
) -> Path:
    """Train a tiny LlamaForCausalLM on (prompt, completion) pairs and save it with the tokenizer.

    Each prompt is the formatted text incl. special tokens (e.g. `render_chat(...)`, ending with
    "<|im_start|>assistant\n"); each completion is the reply, normally ending with "<|im_end|>"
    (one that does not is an open-ended continuation, e.g. the endless "code" answer). Prompt and
    completion are tokenized separately, as at inference; the loss covers completion tokens only.
    An example may instead be a list of (text, trained) segments, each tokenized separately, the
    loss covering the trained ones: e.g. every correct assistant turn of a conversation.

    AdamW on CPU with `threads` torch threads (1 by default: with other processes on the
    machine, 2 threads is several times slower), batches of `batch_size` examples packed into
    rows. The learning rate warms up to `lr` and stays there until `ready` of the `verify` pairs
    come out right under teacher forcing (probed every `probe_every` steps, at most `steps`
    steps), then anneals (cosine, `anneal_steps`) to 5% and stays there for up to `patience`
    more steps. From the anneal on, every `check_every` steps it checks (and until the next
    check, `boost_fraction` of each batch comes from the examples that failed), and stops once
    it passes: every `verify` pair and all but a `train_tolerance` fraction of the examples (the
    hard tail of random augmentations) reproduced under teacher forcing with a logit `margin`,
    greedy decoding reproducing every `verify` pair (default: a sample of the pair examples),
    and `extra_check` (returns failure messages) passing.

    An attempt that does not pass (or, with `give_up_unready`, is not ready by `steps` while
    attempts remain) is started again from scratch with the next seed, up to `attempts` seeds
    (seed, seed + 1, ...): some seeds find the circuits late. Raises RuntimeError naming a
    failing prompt if no attempt passes. Deterministic for a given machine and torch build."""
    out_dir = Path(out_dir)
    log = log or _logger.info
    if verify is None:
        pairs = [ex for ex in examples if len(_as_segments(ex)) == 2]
        verify = random.Random(seed).sample(pairs, min(64, len(pairs)))
    started = time.perf_counter()
    with _torch_threads(threads):
        items = _encode_examples(tokenizer, examples)
        verify_items = _encode_examples(tokenizer, verify)
        failures: list[str] = []
        for attempt in range(attempts):
            last = attempt == attempts - 1
            model, failures, step = _train_attempt(
                tokenizer, items, examples, verify, verify_items, extra_check, seed=seed + attempt,
                steps=steps, anneal_steps=anneal_steps, patience=patience, give_up_unready=give_up_unready and not last,
                batch_size=batch_size, lr=lr, ready=ready, boost_fraction=boost_fraction, probe_every=probe_every,
                check_every=check_every, margin=margin, train_tolerance=train_tolerance,
                config_overrides=config_overrides, log=log,
            )
            if not failures:
                break
            log(f"attempt with seed {seed + attempt} failed after {step} steps: {failures[0][:300]}")
        else:
            raise RuntimeError(f"tiny model did not learn its targets: {failures[0]} ({len(failures)} failures)")
        log(f"trained and verified (seed {seed + attempt}, {step} steps) in {time.perf_counter() - started:.1f}s")
        out_dir.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(out_dir, safe_serialization=True)
        tokenizer.save_pretrained(out_dir)
    return out_dir


def _train_attempt(tokenizer, items, examples, verify, verify_items, extra_check, *, seed, steps, anneal_steps,
                   patience, give_up_unready, batch_size, lr, ready, boost_fraction, probe_every, check_every,
                   margin, train_tolerance, config_overrides, log):
    """One seeded training run; returns (model, failure messages, steps run)."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    config = tiny_llama_config(tokenizer, **(config_overrides or {}))
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
        max_new_tokens=1024,
    )
    pad = tokenizer.pad_token_id
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.0)
    warmup = 30
    anneal_from: list[int] = []  # the step the anneal started at, once it has

    def schedule(s: int) -> float:
        if not anneal_from:
            return min(1.0, (s + 1) / warmup)
        t = min(1.0, (s - anneal_from[0]) / anneal_steps)
        return max(0.05, 0.5 * (1 + math.cos(math.pi * t)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    started = time.perf_counter()
    failures: list[str] = ["not checked"]
    boost: list[int] = []  # examples failing at the last check
    step = 0
    while True:
        step += 1
        model.train()
        n_boost = int(batch_size * boost_fraction) if boost else 0
        picked = [rng.randrange(len(items)) for _ in range(batch_size - n_boost)]
        picked += [rng.choice(boost) for _ in range(n_boost)]
        ids, mask, lab, pos = _packed_batch([items[i] for i in picked], pad)
        logits, target, _ = _completion_logits(model, ids, mask, lab, pos)
        loss = torch.nn.functional.cross_entropy(logits, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if not anneal_from and (step % probe_every == 0 or step >= steps):
            model.eval()
            wrong = _teacher_forced_failures(model, verify_items, pad, 0.0)
            if len(wrong) <= (1 - ready) * len(verify_items) or step >= steps:
                if step >= steps and give_up_unready and wrong:
                    return model, [f"not ready after {step} steps: prompt {verify[wrong[0]][0]!r}"], step
                anneal_from.append(step)
                log(f"seed {seed} step {step} loss {loss.item():.4f}: {len(wrong)}/{len(verify_items)} verify "
                    f"items wrong, annealing ({time.perf_counter() - started:.1f}s)")
        sched.step()
        if not anneal_from or step == anneal_from[0]:
            continue
        last = step >= anneal_from[0] + anneal_steps + patience
        if (step - anneal_from[0]) % check_every and not last:
            continue
        log(f"seed {seed} step {step} loss {loss.item():.4f} ({time.perf_counter() - started:.1f}s)")
        model.eval()
        boost = _teacher_forced_failures(model, items, pad, margin)
        bad = _teacher_forced_failures(model, verify_items, pad, margin)
        if bad:
            failures = [f"prompt {verify[i][0]!r} (teacher forced)" for i in bad]
            log(f"  {len(bad)} verify items fail teacher-forced, e.g. {failures[0][-160:]}")
        elif len(boost) > train_tolerance * len(items):
            failures = [f"example {_as_segments(examples[i])!r} (teacher forced, training example)" for i in boost]
            log(f"  {len(boost)}/{len(items)} training items fail teacher-forced, e.g. {failures[0][-160:]}")
        else:
            failures = greedy_failures(model, tokenizer, verify)
            if not failures and extra_check is not None:
                failures = extra_check(model, tokenizer)
            if not failures:
                return model, [], step
            log(f"  greedy check failed: {failures[0]}")
        if last:
            return model, failures, step


# ---------------------------------------------------------------------------------------------
# Training data for the chat personas
# ---------------------------------------------------------------------------------------------

_EN_WORDS = (
    "the a an is are was what who where when why how do does can could would should will I you he she it we "
    "they my your this that these those and or but if then so not no yes please tell me about write give "
    "show explain hello hi hey thanks thank good bad day night time weather today tomorrow yesterday cat dog "
    "bird fish tree river mountain city country music movie book story joke poem song game play work home "
    "school food rice tea coffee water fire earth wind cloud sun moon star red blue green yellow black white "
    "big small long short fast slow new old happy sad funny serious number one two three ten hundred help "
    "python java computer phone model bot chat question answer list name is my favourite color why not "
    "again more less very really quite just only also still maybe sure ok okay world hello? test testing "
    "Beijing Shanghai London summer winter spring autumn math science history art lunch dinner breakfast"
).split()
_ZH_CHARS = (
    "的一是了我不人在他有这个上们来到时大地为子中你说生国年着就那和要她出也得里后自以会家可下而过天去能对小多"
    "然于心学么之都好看起发当没成只如事把还用第样道想作种开美总从无情己面最女但现前些所同日手又行意动方期它头"
    "经长儿回位分爱老因很给名法间斯知世什两次使身者被高已亲其进此话常与活正感见明问力理尔点文几定本公特做外孩"
    "相西果走将月十实向声车全信重三机工物气每并别真打太新比才便夫再书部水像眼等体却加电主界门利海受听表德少克"
    "代员许稜先口由死安写性马光白或住难望教命花结乐色更拉东神记处让母父应直字场平报友关放至张认接告入笑内英军"
    "候民岁往何度山觉路带万男边风解叫任金快原吃妈变通师立象数四失满战远格士音轻目条呢今天气怎么样请问吗"
)
_PUNCT = ("", "", "", "?", "!", ".", "？", "！", "。", "~")


def random_text(rng: random.Random, max_words: int = 6) -> str:
    """A short random user message in English, Chinese or both."""
    kind = rng.random()
    if kind < 0.45:
        words = [rng.choice(_EN_WORDS) for _ in range(rng.randint(1, max_words))]
        if rng.random() < 0.3:
            words[0] = words[0].capitalize()
        text = " ".join(words)
    elif kind < 0.85:
        chars = []
        for _ in range(rng.randint(1, max_words + 2)):
            chars.append(rng.choice(_ZH_CHARS) if rng.random() < 0.8 else chr(rng.randint(0x4E00, 0x9FA5)))
        text = "".join(chars)
    elif kind < 0.93:
        zh = "".join(rng.choice(_ZH_CHARS) for _ in range(rng.randint(1, 4)))
        text = rng.choice(_EN_WORDS) + rng.choice(["", " "]) + zh
    else:
        alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 _-+=/.,:;"
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 12))).strip() or "x"
    return text + rng.choice(_PUNCT)


# Messages never trained on, verified to get the persona's "don't know" answer.
HELD_OUT_UNKNOWN = (
    "what is the weather like today?", "tell me a joke", "Who are you?", "hello world", "1+1=?",
    "今天天气怎么样？", "讲个笑话", "你是谁", "我饿了", "Good morning!",
)

_SHORT_SYSTEM_PROMPTS = (
    "You are a helpful assistant.",
    "你是一个乐于助人的助手。",
    "Answer briefly.",
    "You are InternLM.",
    "请用中文回答。",
)


def random_system_prompt(rng: random.Random) -> str:
    if rng.random() < 0.3:
        return rng.choice(_SHORT_SYSTEM_PROMPTS)
    return random_text(rng, max_words=10)


def _is_special_text(persona: Persona, text: str) -> bool:
    return text in persona.commands or text == "recall" or text.startswith("remember ")


def _random_user(persona: Persona, rng: random.Random, weights: dict[str, float]) -> str:
    kind = rng.choices(list(weights), list(weights.values()))[0]
    if kind == "command":
        return rng.choice(list(persona.answers))
    if kind == "code":
        return CODE_PROMPT
    if kind == "remember":
        return "remember " + rng.choice(persona.words)
    if kind == "recall":
        return "recall"
    while True:
        text = random_text(rng)
        if not _is_special_text(persona, text):
            return text


def _history_reply(persona: Persona, messages: list[dict], rng: random.Random) -> str:
    answer = persona.answer(messages)
    if answer is None:  # the endless code answer: always cut short (/stop or max_new_tokens)
        return code_answer_prefix(rng.randint(0, len(CODE_HEADER) + 3 * len(CODE_LINE)))
    if rng.random() < 0.15:  # cut short by /stop
        return answer[: rng.randint(0, max(0, len(answer) - 1))]
    return answer


# What the final / earlier user turns are (relative weights) and how many earlier turns.
FINAL_WEIGHTS = {"command": 0.25, "remember": 0.08, "recall": 0.35, "unknown": 0.25, "code": 0.07}
HISTORY_WEIGHTS = {"command": 0.3, "remember": 0.25, "recall": 0.15, "unknown": 0.2, "code": 0.1}
HISTORY_LENGTHS = (0, 0, 1, 1, 2, 2, 3)


def _weights(weights: dict[str, float], persona: Persona) -> dict[str, float]:
    return {k: v for k, v in weights.items() if k != "code" or persona.code}


def sample_dialogue(persona: Persona, rng: random.Random, *, max_code_lines: int = 40) -> tuple[list[dict], str]:
    """Random messages (optional system prompt, 0-3 earlier turns, final user turn) and the
    completion the model must produce (ending with <|im_end|>, except the endless code answer)."""
    messages: list[dict] = []
    r = rng.random()
    if r < 0.6:
        messages.append({"role": "system", "content": persona.system_prompt})
    elif r < 0.8:
        pass
    elif r < 0.85:
        other = BAJIE_SYSTEM_PROMPT if persona.system_prompt != BAJIE_SYSTEM_PROMPT else INTERNLM_SYSTEM_PROMPT
        messages.append({"role": "system", "content": other})
    else:
        messages.append({"role": "system", "content": random_system_prompt(rng)})
    final = _random_user(persona, rng, _weights(FINAL_WEIGHTS, persona))
    n_hist = rng.choice(HISTORY_LENGTHS)
    users = [_random_user(persona, rng, _weights(HISTORY_WEIGHTS, persona)) for _ in range(n_hist)]
    if final == "recall" and rng.random() < 0.85 and not any(persona.remembered(u) for u in users):
        if not users:
            users.append("x")
        users[rng.randrange(len(users))] = "remember " + rng.choice(persona.words)
    for user in users:
        messages.append({"role": "user", "content": user})
        messages.append({"role": "assistant", "content": _history_reply(persona, messages, rng)})
    messages.append({"role": "user", "content": final})
    answer = persona.answer(messages)
    if answer is None:
        n = rng.randint(0, max_code_lines) if rng.random() < 0.8 else rng.randint(0, 4 * max_code_lines)
        return messages, CODE_HEADER + CODE_LINE * n
    return messages, answer + IM_END


def dialogue_segments(tokenizer, persona: Persona, messages: Sequence[dict], completion: str) -> list[tuple[str, bool]]:
    """Training segments for a conversation: the final completion and every earlier assistant
    turn that is the persona's full, correct answer are trained (cut-short ones are not). A turn
    is only trained where tokenizing its text on its own gives the same ids as in the prompt."""
    segments: list[tuple[str, bool]] = []
    pending = BOS
    for i, m in enumerate(messages):
        content = m["content"]
        if m["role"] == "assistant" and content and content == persona.answer(messages[:i]):
            head = f"{IM_START}assistant\n"
            joint = tokenizer.encode(head + content, add_special_tokens=False)
            split = tokenizer.encode(head, add_special_tokens=False)
            split += tokenizer.encode(content, add_special_tokens=False)
            if joint == split:
                segments += [(pending + head, False), (content + IM_END, True)]
                pending = "\n"
                continue
        pending += f"{IM_START}{m['role']}\n{content}{IM_END}\n"
    segments += [(pending + f"{IM_START}assistant\n", False), (completion, True)]
    return segments


def canonical_histories(persona: Persona) -> list[list[dict]]:
    """Earlier turns verified before each canonical final message: none, one cut short by /stop,
    three mixed turns, and (chat) a cut-short endless code answer."""
    ans = persona.answers
    out = [
        [],
        [{"role": "user", "content": "count"}, {"role": "assistant", "content": ans["count"][:7]}],
        [{"role": "user", "content": "count"}, {"role": "assistant", "content": ans["count"]},
         {"role": "user", "content": "你好"}, {"role": "assistant", "content": ans["你好"][:5]},
         {"role": "user", "content": f"remember {persona.words[0]}"}, {"role": "assistant", "content": REMEMBER_ACK}],
    ]
    if persona.code:
        out.append([{"role": "user", "content": CODE_PROMPT}, {"role": "assistant", "content": code_answer_prefix(50)}])
    return out


def canonical_dialogues(persona: Persona) -> list[list[dict]]:
    """The conversations tests are most likely to use, all verified exactly after training: each
    behaviour with no / the persona's / a short system prompt, after each canonical history, and
    recall after one or more remember turns."""
    heads = ([], [{"role": "system", "content": persona.system_prompt}],
             [{"role": "system", "content": "You are a helpful assistant."}])

    def turn(user: str, assistant: str | None = None) -> list[dict]:
        out = [{"role": "user", "content": user}]
        if assistant is not None:
            out.append({"role": "assistant", "content": assistant})
        return out

    words, ping = persona.words, persona.answers["ping"]
    finals = persona.commands + [f"remember {words[0]}", f"remember {words[3]}", "hello", "今天天气怎么样？"]
    out: list[list[dict]] = []
    for head in heads:
        for history in canonical_histories(persona):
            out += [head + history + turn(text) for text in finals]
        for i, w in enumerate(words):
            out.append(head + turn(f"remember {w}", REMEMBER_ACK) + turn("recall"))
            out.append(head + turn(f"remember {w}", REMEMBER_ACK) + turn("ping", ping) + turn("recall"))
            out.append(head + turn(f"remember {words[i - 1]}", REMEMBER_ACK) + turn("ping", ping)
                       + turn(f"remember {w}", REMEMBER_ACK) + turn("recall"))
        out.append(head + turn(f"remember {words[3]}", REMEMBER_ACK) + turn("recall", persona.recall_prefix + words[3])
                   + turn("recall"))
        out.append(head + turn(f"remember {words[0]}", "O") + turn("你好", persona.answers["你好"]) + turn("recall"))
        out.append(head + turn("ping", ping) + turn("recall"))
    return out


def _completion_for(persona: Persona, messages: list[dict], code_lines: int = 30) -> str:
    answer = persona.answer(messages)
    return CODE_HEADER + CODE_LINE * code_lines if answer is None else answer + IM_END


def build_persona_model(
    out_dir: str | os.PathLike,
    persona: Persona,
    *,
    n_examples: int = 3000,
    seed: int = 0,
    log: Callable[[str], None] | None = None,
    **train_kwargs,
) -> Path:
    """Tokenizer + model that answers like `persona` (see `Persona.answer`)."""
    rng = random.Random(f"{persona.name}-{seed}")
    dialogues = [sample_dialogue(persona, rng) for _ in range(n_examples)]
    canon = canonical_dialogues(persona)
    # Tokenizer corpus: every training text; system prompts become one token, a code line too.
    corpus = [text for messages, completion in dialogues for text in (render_chat_text(messages), completion)]
    whole = [f"system\n{p}" for p in (INTERNLM_SYSTEM_PROMPT, BAJIE_SYSTEM_PROMPT)]
    whole += [CODE_HEADER, CODE_LINE] if persona.code else []
    tokenizer = build_tokenizer(corpus, whole=whole)
    examples = [dialogue_segments(tokenizer, persona, m, c) for m, c in dialogues]
    examples += [dialogue_segments(tokenizer, persona, m, _completion_for(persona, m)) for m in canon] * 3
    verify = [(render_chat(tokenizer, m), _completion_for(persona, m)) for m in canon]
    for text in HELD_OUT_UNKNOWN:  # never trained on: the fallback answer must generalize
        for head in ([], [{"role": "system", "content": persona.system_prompt}]):
            messages = head + [{"role": "user", "content": text}]
            verify.append((render_chat(tokenizer, messages), persona.unknown + IM_END))
    extra = _code_check if persona.code else None
    # Fast seeds are ready (every verify pair right) within ~50-300 steps and pass ~100-300
    # steps later; slow ones are cheaper to abandon than to wait for.
    options = dict(train_tolerance=0.005, steps=300, patience=250, attempts=4, give_up_unready=True)
    options.update(train_kwargs)
    return train_causal_lm(out_dir, tokenizer, examples, seed=seed, verify=verify, extra_check=extra, log=log,
                           **options)


def render_chat_text(messages: Sequence[dict], add_generation_prompt: bool = True) -> str:
    """`render_chat` without a tokenizer (the same template, rendered by hand)."""
    text = BOS + "".join(f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in messages)
    return text + (f"{IM_START}assistant\n" if add_generation_prompt else "")


CODE_CHECK_TOKENS = 1500


def _code_check(model, tokenizer) -> list[str]:
    """The endless code answer holds for CODE_CHECK_TOKENS new tokens: checked under teacher
    forcing with a margin, with and without the system prompt, then by one real greedy run."""
    heads = ([{"role": "system", "content": INTERNLM_SYSTEM_PROMPT}], [])
    prompts = [render_chat(tokenizer, head + [{"role": "user", "content": CODE_PROMPT}]) for head in heads]
    line_ids = tokenizer.encode(CODE_LINE, add_special_tokens=False)
    completion = CODE_HEADER + CODE_LINE * (CODE_CHECK_TOKENS // len(line_ids) + 1)
    items = _encode_examples(tokenizer, [(p, completion) for p in prompts])
    for item in items:  # keep the prompt and the first CODE_CHECK_TOKENS answer tokens
        n_prompt = sum(1 for x in item.labels if x == -100)
        item.ids, item.labels = item.ids[: n_prompt + CODE_CHECK_TOKENS], item.labels[: n_prompt + CODE_CHECK_TOKENS]
    bad = _teacher_forced_failures(model, items, tokenizer.pad_token_id, margin=1.0)
    if bad:
        return [f"prompt {prompts[i]!r}: the endless code answer breaks within {CODE_CHECK_TOKENS} tokens" for i in bad]
    failures = []
    out = greedy_generate(model, tokenizer, prompts[:1], CODE_CHECK_TOKENS, stop=False)[0]
    text = tokenizer.decode(out, skip_special_tokens=True)
    if len(out) != CODE_CHECK_TOKENS or not is_code_answer_prefix(text) or len(text) <= 4096:
        bad_at = next((i for i in range(len(text)) if text[: i + 1] != code_answer_prefix(i + 1)), len(text))
        failures.append(f"prompt {prompts[0]!r}: greedy code answer broke at char {bad_at} of {len(text)}: "
                        f"{text[max(0, bad_at - 40) : bad_at + 40]!r}")
    return failures


def build_chat_model(out_dir: str | os.PathLike, **kwargs) -> Path:
    """Plays InternLM2-Chat: see CHAT_PERSONA."""
    return build_persona_model(out_dir, CHAT_PERSONA, **kwargs)


def build_bajie_model(out_dir: str | os.PathLike, **kwargs) -> Path:
    """Plays Bajie-Chat: see BAJIE_PERSONA."""
    return build_persona_model(out_dir, BAJIE_PERSONA, **kwargs)


# ---------------------------------------------------------------------------------------------
# Cache
# ---------------------------------------------------------------------------------------------

MARKER = "TINY_MODEL_COMPLETE.json"
REPO_ROOT = Path(__file__).resolve().parents[1]


def default_cache_root() -> Path:
    return Path(os.environ.get("TINY_MODEL_CACHE") or REPO_ROOT / ".cache" / "tiny-models")


def _source_hash(name: str, builder_fn: Callable) -> str:
    h = hashlib.sha256()
    h.update(name.encode())
    h.update(Path(__file__).read_bytes())
    with contextlib.suppress(TypeError, OSError):
        builder_file = inspect.getsourcefile(builder_fn)
        if builder_file and Path(builder_file).resolve() != Path(__file__).resolve():
            h.update(Path(builder_file).read_bytes())
    for mod in (torch, transformers, tokenizers):
        h.update(mod.__version__.encode())
    return h.hexdigest()[:16]


def cached_build(name: str, builder_fn: Callable[[Path], object], cache_root: str | os.PathLike | None = None) -> Path:
    """`<cache_root>/<name>-<hash>`, built by `builder_fn(tmp_dir)` if not there yet.

    The hash covers this file's source (and the builder's module file), so edits rebuild. A build
    is complete once its marker file exists (written last); it is built in a private temporary
    directory and renamed into place, under a file lock so concurrent processes build once."""
    root = Path(cache_root) if cache_root is not None else default_cache_root()
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{name}-{_source_hash(name, builder_fn)}"
    if (final / MARKER).is_file():
        return final
    with open(root / f".{final.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if (final / MARKER).is_file():
                return final
            if final.exists():  # incomplete leftover (should not happen with the rename)
                shutil.rmtree(final, ignore_errors=True)
            tmp = root / f".tmp-{final.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            started = time.perf_counter()
            try:
                builder_fn(tmp)
                info = {"name": name, "build_seconds": round(time.perf_counter() - started, 2)}
                (tmp / MARKER).write_text(json.dumps(info))
                try:
                    os.rename(tmp, final)
                except OSError:
                    if not (final / MARKER).is_file():
                        raise
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return final


CHAT_MODEL_NAME = "internlm2-chat-tiny"
BAJIE_MODEL_NAME = "bajie-chat-tiny"
_BUILDERS = {CHAT_MODEL_NAME: build_chat_model, BAJIE_MODEL_NAME: build_bajie_model}


def chat_model_path(cache_root: str | os.PathLike | None = None) -> Path:
    """The cached tiny InternLM2-Chat stand-in (built on first use, ~20-30 s)."""
    return cached_build(CHAT_MODEL_NAME, build_chat_model, cache_root)


def bajie_model_path(cache_root: str | os.PathLike | None = None) -> Path:
    """The cached tiny Bajie-Chat stand-in (built on first use, ~15-25 s)."""
    return cached_build(BAJIE_MODEL_NAME, build_bajie_model, cache_root)


def tiny_model_paths(cache_root: str | os.PathLike | None = None) -> dict[str, Path]:
    """Both models, building any missing ones in parallel (one in a child process; each trains
    on one thread, so two cores build both in the time of the slower one)."""
    root = Path(cache_root) if cache_root is not None else default_cache_root()
    missing = [n for n, fn in _BUILDERS.items() if not (root / f"{n}-{_source_hash(n, fn)}" / MARKER).is_file()]
    child = None
    if len(missing) > 1:
        import subprocess

        child = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--build", missing[-1], "--cache-root", str(root)],
            stdout=subprocess.DEVNULL,
        )
    try:
        if child is not None:
            cached_build(missing[0], _BUILDERS[missing[0]], root)
    finally:
        if child is not None and child.wait() != 0:
            _logger.warning("building %s in a child process failed (exit %s)", missing[-1], child.returncode)
    # from the cache now; anything the child failed to build is built here
    return {n: cached_build(n, fn, root) for n, fn in _BUILDERS.items()}


def _main(argv: list[str]) -> None:
    import argparse
    import tempfile

    parser = argparse.ArgumentParser(description="Build the tiny test models (cached unless --force).")
    parser.add_argument("--force", action="store_true", help="rebuild into a temp dir, report times, keep nothing")
    parser.add_argument("--build", choices=sorted(_BUILDERS), help="build (or find) this one model in the cache")
    parser.add_argument("--cache-root", default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.build:
        print(cached_build(args.build, _BUILDERS[args.build], args.cache_root))
        return
    if args.force:
        for name, builder in _BUILDERS.items():
            with tempfile.TemporaryDirectory() as d:
                t0, c0 = time.perf_counter(), time.process_time()
                builder(Path(d) / name)
                size = sum(f.stat().st_size for f in (Path(d) / name).iterdir())
                print(f"{name}: built in {time.perf_counter() - t0:.1f}s wall, {time.process_time() - c0:.1f}s CPU, "
                      f"{size / 1e6:.2f} MB")
        return
    t0 = time.perf_counter()
    for name, path in tiny_model_paths(args.cache_root).items():
        print(f"{name}: {path}")
    print(f"({time.perf_counter() - t0:.1f}s)")


if __name__ == "__main__":
    _main(sys.argv[1:])

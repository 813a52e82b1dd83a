"""What every backend shares about generating: end-of-turn tokens, stop strings, sampling
arguments, and what a picture costs. No torch here, so the `openai` backend can use it too."""

from __future__ import annotations

from .base import GenerationParams

END_OF_TURN_TOKENS = ("<|im_end|>",)  # InternLM2's end of turn, wherever a tokenizer has it
XCOMPOSER2_IMAGE_TOKENS = 1225  # (490 / 14) ** 2 visual tokens: what one picture costs XComposer2


def end_of_turn_ids(tokenizer, generation_config) -> list[int]:
    """Token ids that end an answer: the tokenizer's EOS, the checkpoint's configured ones and
    InternLM2's `<|im_end|>` where the vocabulary has it."""
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    configured = getattr(generation_config, "eos_token_id", None)
    if configured is not None:
        ids.update([configured] if isinstance(configured, int) else configured)
    vocab = tokenizer.get_vocab()
    ids.update(vocab[t] for t in END_OF_TURN_TOKENS if t in vocab)
    return sorted(ids)


def first_stop(text: str, stops: tuple[str, ...]) -> int | None:
    """Where the earliest stop string starts in `text`, or None."""
    hits = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return min(hits) if hits else None


def sampling_kwargs(params: GenerationParams) -> dict:
    """`generate` arguments for the length and sampling of `params`."""
    kwargs: dict = dict(max_new_tokens=params.max_new_tokens, do_sample=not params.greedy)
    if not params.greedy:
        kwargs.update(temperature=params.temperature, top_p=params.top_p)
    else:  # silence "temperature is set but do_sample is False" from checkpoint defaults
        kwargs.update(temperature=None, top_p=None, top_k=None)
    return kwargs

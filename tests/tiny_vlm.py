"""A tiny REAL LLaVA-style vision-language model for the test suite (no hub, no GPU).

`LlavaForConditionalGeneration` with a tiny CLIP vision tower (32x32 pictures, 8x8 patches → 16
image tokens) and a tiny Llama text model, plus a `LlavaProcessor` whose chat template speaks
InternLM2's format with `<image>` parts. Trained on CPU (seconds) until greedy decoding answers:
- a picture that is mostly red / green / blue → "red" / "green" / "blue", whatever the question,
  and again on follow-up questions about the same picture (it is in the first user message);
- a conversation without any picture → "I see no image."
It loads like a hub checkpoint: `AutoProcessor` + `AutoModelForImageTextToText`.

    vision_model_path() -> Path     (built once, cached like tests/tiny_models.py)
    solid_image(color, size)        a test picture (PIL)

Run `python tests/tiny_vlm.py` to build it and print the time.
"""

from __future__ import annotations

import random
import sys
import time
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    GenerationConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
)

from tests.tiny_models import IM_END, build_tokenizer, cached_build, random_text, stop_ids, tiny_llama_config

IMAGE_TOKEN = "<image>"
SIDE, PATCH = 32, 8
COLORS = {"red": (230, 20, 20), "green": (20, 200, 40), "blue": (20, 40, 230)}
NO_IMAGE_ANSWER = "I see no image."
# The vision persona's system prompt (bot/vision_feature.py), trained on so that it is one token.
XCOMPOSER_SYSTEM_PROMPT = (
    "You are an AI assistant whose name is InternLM-XComposer (浦语·灵笔).\n"
    "- InternLM-XComposer (浦语·灵笔) is a multi-modality conversational language model that is developed by "
    "Shanghai AI Laboratory (上海人工智能实验室). It is designed to be helpful, honest, and harmless.\n"
    "- InternLM-XComposer (浦语·灵笔) can understand and communicate fluently in the language chosen by the "
    "user such as English and 中文."
)
QUESTIONS = (
    "Describe this image.", "请描述这张图片。", "这张图里有什么？", "What color is it?", "what is this",
    "And now?", "again?", "what colour?", "是什么颜色？", "Tell me more.", "你确定吗？", "ping",
)

# InternLM2's format; a message's content is a string or a list of {"type": "image"|"text"} parts.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<image>\n' }}{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{{ '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def solid_image(color: str | tuple[int, int, int], size: tuple[int, int] = (64, 48), noise: int = 0,
                rng: random.Random | None = None) -> Image.Image:
    rgb = COLORS[color] if isinstance(color, str) else color
    im = Image.new("RGB", size, rgb)
    if noise:
        rng = rng or random.Random(0)
        px = im.load()
        for _ in range(size[0] * size[1] // 4):
            x, y = rng.randrange(size[0]), rng.randrange(size[1])
            px[x, y] = tuple(max(0, min(255, c + rng.randint(-noise, noise))) for c in rgb)
    return im


def _training_image(color: str, rng: random.Random) -> Image.Image:
    base = tuple(max(0, min(255, c + rng.randint(-35, 25))) for c in COLORS[color])
    im = solid_image(base, (rng.randint(16, 96), rng.randint(16, 96)), noise=rng.choice((0, 20, 40)), rng=rng)
    if rng.random() < 0.3:  # a small patch of another colour must not change the answer
        other = COLORS[rng.choice([c for c in COLORS if c != color])]
        w, h = im.size
        im.paste(other, (0, 0, max(1, w // 4), max(1, h // 4)))
    return im


def _conversation(rng: random.Random, color: str | None) -> list[dict]:
    messages: list[dict] = []
    if rng.random() < 0.6:
        messages.append({"role": "system", "content": [{"type": "text", "text": XCOMPOSER_SYSTEM_PROMPT}]})
    answer = color if color else NO_IMAGE_ANSWER
    turns = rng.choice((1, 1, 1, 2, 2, 3))
    for turn in range(turns):
        question = rng.choice(QUESTIONS) if rng.random() < 0.7 else random_text(rng, max_words=4)
        parts = [{"type": "text", "text": question}]
        if turn == 0 and color:
            parts.insert(0, {"type": "image"})
        messages.append({"role": "user", "content": parts})
        if turn < turns - 1:
            messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return messages


def build_processor(out_dir: Path | None = None) -> LlavaProcessor:
    rng = random.Random("tiny-vlm-tokenizer")
    corpus = list(QUESTIONS) + list(COLORS) + [NO_IMAGE_ANSWER] + [random_text(rng) for _ in range(3000)]
    tokenizer = build_tokenizer(corpus, whole=[f"system\n{XCOMPOSER_SYSTEM_PROMPT}", *COLORS, NO_IMAGE_ANSWER],
                                vocab_size=2048, chat_template=CHAT_TEMPLATE)
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]}, replace_additional_special_tokens=False)
    tokenizer.model_input_names = ["input_ids", "attention_mask"]  # no token_type_ids
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": SIDE}, crop_size={"height": SIDE, "width": SIDE}, do_center_crop=True,
    )
    return LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=PATCH, vision_feature_select_strategy="default",
        chat_template=CHAT_TEMPLATE, image_token=IMAGE_TOKEN, num_additional_image_tokens=1,
    )


def _config(processor: LlavaProcessor) -> LlavaConfig:
    tokenizer = processor.tokenizer
    # Untied: with tied embeddings, whether lm_head was saved apart and re-tied on load varied
    # between processes, and a reloaded model then no longer answered what was verified.
    text = tiny_llama_config(tokenizer, max_position_embeddings=1024, tie_word_embeddings=False)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                              image_size=SIDE, patch_size=PATCH)
    return LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_select_strategy="default", vision_feature_layer=-1, projector_hidden_act="gelu",
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
    )


def _encode(processor: LlavaProcessor, messages: list[dict], images: list, completion: str) -> dict:
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    batch = processor(text=[prompt], images=images or None, return_tensors="pt")
    completion_ids = processor.tokenizer.encode(completion, add_special_tokens=False)
    return {"prompt": batch["input_ids"][0].tolist(), "completion": completion_ids,
            "pixels": batch.get("pixel_values") if images else None}


def _batch(items: Sequence[dict], pad: int):
    width = max(len(e["prompt"]) + len(e["completion"]) for e in items)
    ids = torch.full((len(items), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, e in enumerate(items):
        seq = e["prompt"] + e["completion"]
        ids[i, : len(seq)] = torch.tensor(seq)
        mask[i, : len(seq)] = 1
        labels[i, len(e["prompt"]) : len(seq)] = torch.tensor(e["completion"])
    pixels = [e["pixels"] for e in items if e["pixels"] is not None]
    return ids, mask, labels, (torch.cat(pixels) if pixels else None)


@torch.no_grad()
def answer(model, processor, messages: list[dict], images: list, max_new_tokens: int = 8) -> str:
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    batch = processor(text=[prompt], images=images or None, return_tensors="pt")
    out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, temperature=None, top_p=None,
                         top_k=None, eos_token_id=stop_ids(processor.tokenizer), pad_token_id=processor.tokenizer.pad_token_id)
    return processor.tokenizer.decode(out[0, batch["input_ids"].shape[1] :], skip_special_tokens=True)


def _verify_cases() -> list[tuple[list[dict], list, str]]:
    cases = []
    for color in COLORS:
        for question in ("Describe this image.", "这张图里有什么？", "What color is it?"):
            for system in (False, True):
                head = [{"role": "system", "content": [{"type": "text", "text": XCOMPOSER_SYSTEM_PROMPT}]}] if system else []
                first = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}
                cases.append((head + [first], [solid_image(color)], color))
                follow = head + [first, {"role": "assistant", "content": [{"type": "text", "text": color}]},
                                 {"role": "user", "content": [{"type": "text", "text": "And now?"}]}]
                cases.append((follow, [solid_image(color, (40, 40))], color))
    for question in ("Describe this image.", "ping", "What color is it?"):
        cases.append(([{"role": "user", "content": [{"type": "text", "text": question}]}], [], NO_IMAGE_ANSWER))
    return cases


def build_tiny_vlm(out_dir: str | Path, *, steps: int = 3000, seed: int = 0, log=None) -> Path:
    out_dir = Path(out_dir)
    log = log or (lambda msg: None)
    rng = random.Random(seed)
    torch.manual_seed(seed)
    old_threads = torch.get_num_threads()
    torch.set_num_threads(max(1, min(2, old_threads)))
    try:
        processor = build_processor()
        config = _config(processor)
        model = LlavaForConditionalGeneration(config)
        eos = stop_ids(processor.tokenizer)
        model.generation_config = GenerationConfig(eos_token_id=eos, pad_token_id=processor.tokenizer.pad_token_id,
                                                   bos_token_id=processor.tokenizer.bos_token_id, max_new_tokens=64)
        examples = []
        for i in range(600):
            color = rng.choice(list(COLORS)) if i % 6 else None
            messages = _conversation(rng, color)
            images = [_training_image(color, rng)] if color else []
            examples.append(_encode(processor, messages, images, (color or NO_IMAGE_ANSWER) + IM_END))
        cases = _verify_cases()
        pad = processor.tokenizer.pad_token_id
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.98))
        started = time.perf_counter()
        failures = ["not checked"]
        for step in range(1, steps + 1):
            model.train()
            ids, mask, labels, pixels = _batch([examples[rng.randrange(len(examples))] for _ in range(16)], pad)
            loss = model(input_ids=ids, attention_mask=mask, labels=labels, pixel_values=pixels).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            if step % 20 or step < 40:
                continue
            model.eval()
            failures = [f"{m[-1]['content']!r} → {got!r}, wanted {want!r}"
                        for m, images, want in cases if (got := answer(model, processor, m, images)) != want]
            log(f"step {step} loss {loss.item():.4f}: {len(failures)} failures ({time.perf_counter() - started:.1f}s)")
            if not failures:
                break
        else:
            raise RuntimeError(f"tiny VLM did not learn in {steps} steps: {failures[0]}")
        out_dir.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(out_dir, safe_serialization=True)
        processor.save_pretrained(out_dir)
        # Verify what the tests will load, not just the model in memory.
        reloaded = LlavaForConditionalGeneration.from_pretrained(out_dir).eval()
        failures = [f"{m[-1]['content']!r} → {got!r}, wanted {want!r}"
                    for m, images, want in cases if (got := answer(reloaded, processor, m, images)) != want]
        if failures:
            raise RuntimeError(f"tiny VLM changed when saved and reloaded: {failures[0]}")
    finally:
        torch.set_num_threads(old_threads)
    return out_dir


def vision_model_path(cache_root=None) -> Path:
    return cached_build("llava-tiny", build_tiny_vlm, cache_root)


if __name__ == "__main__":
    t0 = time.perf_counter()
    if "--force" in sys.argv:
        import tempfile

        with tempfile.TemporaryDirectory() as d:
            build_tiny_vlm(Path(d) / "vlm", log=print)
    else:
        print(vision_model_path())
    print(f"{time.perf_counter() - t0:.1f}s")

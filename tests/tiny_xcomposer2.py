"""A tiny REAL InternLM-XComposer2-shaped remote-code checkpoint for the test suite.

The checkpoint carries its own remote code (tests/tiny_xcomposer2_code/, copied in), shaped like
the published `internlm/internlm-xcomposer2-vl-*` code where the bot depends on it (see that
module's docstring): the vision tower comes from
`CLIPVisionModel.from_pretrained('openai/clip-vit-large-patch14-336')` and has its position
embedding resized to a larger grid by `resize_pos` (so loading needs the bot's offline tower and
its `image_size` fix), `<ImageHere>` marks the picture in the query, its embeddings are spliced
into `inputs_embeds` with an `im_mask`, `chat` has the published signature, and loading
`print()`s. Its tokenizer writes turns with `[UNUSED_TOKEN_146]`/`[UNUSED_TOKEN_145]` as
ordinary (non-special) tokens, as the published one does, so they survive
`skip_special_tokens=True`.

Trained on CPU (seconds) until greedy decoding answers, whatever the question:
- a picture that is mostly red / green / blue → "red" / "green" / "blue", also on follow-up
  questions about the same picture (the picture is in the first user turn);
- TOOL_QUESTION → "[UNUSED_TOKEN_144]<colour>[UNUSED_TOKEN_143]" (the published model emits such
  pieces as text; the bot must strip them).

    xcomposer2_model_path() -> Path   (built once, cached like tests/tiny_models.py)

Run `python tests/tiny_xcomposer2.py` to build it and print the time.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import random
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Iterator
from unittest import mock

import torch
from safetensors.torch import save_file
from tokenizers import AddedToken, processors
from transformers import AutoConfig, CLIPVisionConfig, CLIPVisionModel
from transformers.dynamic_module_utils import get_class_from_dynamic_module

from tests.tiny_models import build_tokenizer, cached_build, random_text
from tests.tiny_vlm import COLORS, QUESTIONS, XCOMPOSER_SYSTEM_PROMPT, _training_image, solid_image

CODE_DIR = Path(__file__).with_name("tiny_xcomposer2_code")
CODE_FILES = ("configuration_internlm_xcomposer2.py", "modeling_internlm_xcomposer2.py", "build_mlp.py")
IMAGE_HERE = "<ImageHere>"
UNUSED = [f"[UNUSED_TOKEN_{n}]" for n in range(141, 147)]
IM_START, IM_END = "[UNUSED_TOKEN_146]", "[UNUSED_TOKEN_145]"
TOOL_QUESTION = "Use a tool."
# The published tower is ViT-L/14 at 336 px (24x24 patches → 35x35 after resize_pos); this one
# keeps 336 px and the name but uses 56-pixel patches (6x6 → 7x7, 392 px input, 49 image tokens)
# and head size 64 like CLIP's.
TOWER = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=1,
             image_size=336, patch_size=56)
IMAGE_SIDE, IMAGE_TOKENS = 392, 49


def tool_answer(color: str) -> str:
    return f"[UNUSED_TOKEN_144]{color}[UNUSED_TOKEN_143]"


def build_tokenizer_xc():
    rng = random.Random("tiny-xcomposer2-tokenizer")
    corpus = list(QUESTIONS) + [TOOL_QUESTION] + list(COLORS) + [random_text(rng) for _ in range(3000)]
    tok = build_tokenizer(corpus, whole=[f"system\n{XCOMPOSER_SYSTEM_PROMPT}", *COLORS, TOOL_QUESTION], vocab_size=2048)
    # As in the published tokenizer: ordinary pieces, one id each, kept by skip_special_tokens.
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in UNUSED])
    # As published, `tokenizer(text)` starts with <s> (interleav_wrap_chat relies on it).
    tok._tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{tok.bos_token} $A", pair=f"{tok.bos_token} $A $B", special_tokens=[(tok.bos_token, tok.bos_token_id)])
    tok.model_input_names = ["input_ids", "attention_mask"]
    return tok


def _config(tokenizer) -> dict:
    model = "modeling_internlm_xcomposer2.InternLMXComposer2ForCausalLM"
    return {
        "architectures": ["InternLMXComposer2ForCausalLM"],
        "auto_map": {"AutoConfig": "configuration_internlm_xcomposer2.InternLMXcomposer2Config",
                     "AutoModel": model, "AutoModelForCausalLM": model},
        "model_type": "internlmxcomposer2",
        "vocab_size": len(tokenizer), "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "max_position_embeddings": 2048, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
        "img_size": IMAGE_SIDE, "max_length": 2048, "lora_r": 8, "lora_alpha": 16,
        "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.eos_token_id, "tie_word_embeddings": False, "torch_dtype": "float32",
    }


@contextlib.contextmanager
def fresh_clip_tower() -> Iterator[None]:
    """What `CLIPVisionModel.from_pretrained('openai/clip-vit-large-patch14-336')` gives the
    remote code at build time: a new tower of the tiny shape (its weights are trained here)."""
    with mock.patch.object(CLIPVisionModel, "from_pretrained", lambda *a, **k: CLIPVisionModel(CLIPVisionConfig(**TOWER))):
        yield


def prompt_text(system: str | None, turns: list[tuple[str, str]], query: str) -> str:
    """interleav_wrap_chat's prompt (the picture marked in the first user turn)."""
    prompt = f"{IM_START}system\n{system}{IM_END}\n" if system else ""
    for q, a in turns:
        prompt += f"{IM_START}user\n{q}{IM_END}\n{IM_START}assistant\n{a}{IM_END}\n"
    return prompt + f"{IM_START}user\n{query}{IM_END}\n{IM_START}assistant\n"


def _dialogue(rng: random.Random, color: str) -> tuple[str | None, list[tuple[str, str]], str, str]:
    system = XCOMPOSER_SYSTEM_PROMPT if rng.random() < 0.6 else None
    questions = [rng.choice(QUESTIONS) if rng.random() < 0.7 else random_text(rng, max_words=4)
                 for _ in range(rng.choice((1, 1, 1, 2, 2, 3)))]
    if rng.random() < 0.15:
        questions[-1] = TOOL_QUESTION
    questions[0] = IMAGE_HERE + questions[0]
    turns = [(q, color) for q in questions[:-1]]
    answer = tool_answer(color) if questions[-1].endswith(TOOL_QUESTION) else color
    return system, turns, questions[-1], answer


def _encode(tokenizer, model, system, turns, query, answer, image) -> dict:
    before, after = prompt_text(system, turns, query).split(IMAGE_HERE)
    return {
        "before": tokenizer(before)["input_ids"] if before else [],
        "after": tokenizer(after)["input_ids"],
        "completion": tokenizer(answer + IM_END, add_special_tokens=False)["input_ids"],
        "image": image,  # preprocessed per batch: 400 pictures at 392 px would take 700 MB
    }


def _batch(model, items: list[dict]):
    """inputs_embeds (text embeddings with the picture's spliced in), im_mask and labels."""
    embed = model.model.tok_embeddings
    images = model.img2emb(torch.stack([model.vis_processor(e["image"]) for e in items]))
    rows, masks, labels = [], [], []
    for e, image in zip(items, images):
        text_after = torch.tensor(e["after"] + e["completion"])
        parts = [embed(torch.tensor(e["before"], dtype=torch.long)), image, embed(text_after)]
        rows.append(torch.cat(parts))
        n_before, n_image = len(e["before"]), image.shape[0]
        masks.append(torch.cat([torch.zeros(n_before), torch.ones(n_image), torch.zeros(len(text_after))]).bool())
        lab = torch.full((rows[-1].shape[0],), -100)
        lab[-len(e["completion"]) :] = torch.tensor(e["completion"])
        labels.append(lab)
    width = max(r.shape[0] for r in rows)
    pad = lambda t, v: torch.cat([t, t.new_full((width - t.shape[0], *t.shape[1:]), v)])  # noqa: E731
    return (torch.stack([pad(r, 0.0) for r in rows]), torch.stack([pad(m, False) for m in masks]),
            torch.stack([pad(lab, -100) for lab in labels]))


@torch.no_grad()
def answer(model, tokenizer, system, turns, query, image, max_new_tokens: int = 8) -> str:
    """Greedy, the way the bot's backend asks: encode_img + interleav_wrap_chat + generate."""
    pixels = model.vis_processor(image).unsqueeze(0)
    inputs, im_mask = model.interleav_wrap_chat(tokenizer, query, model.encode_img(pixels), turns, system)
    eos = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(IM_END)]
    out = model.generate(**inputs, im_mask=im_mask, max_new_tokens=max_new_tokens, do_sample=False,
                         temperature=None, top_p=None, top_k=None, eos_token_id=eos, pad_token_id=eos[0])
    return tokenizer.decode(out[0], skip_special_tokens=True).split(IM_END)[0]


def _verify_cases() -> list[tuple]:
    cases = []
    for color in COLORS:
        for question in ("Describe this image.", "这张图里有什么？", "what is this"):
            for system in (None, XCOMPOSER_SYSTEM_PROMPT):
                cases.append((system, [], IMAGE_HERE + question, solid_image(color), color))
                cases.append((system, [(IMAGE_HERE + question, color)], "And now?", solid_image(color, (40, 40)), color))
        cases.append((XCOMPOSER_SYSTEM_PROMPT, [], IMAGE_HERE + TOOL_QUESTION, solid_image(color), tool_answer(color)))
    return cases


def _failures(model, tokenizer, cases) -> list[str]:
    model.eval()
    return [f"{q!r} ({len(turns)} turns) → {got!r}, wanted {want!r}"
            for system, turns, q, image, want in cases if (got := answer(model, tokenizer, system, turns, q, image)) != want]


def fix_image_size(model) -> None:
    """The bot's fix (models/vision.py does the same): the tower's input size after resize_pos."""
    embeddings = model.vit.vision_tower.vision_model.embeddings
    embeddings.image_size = model.config.img_size


def build_tiny_xcomposer2(out_dir: str | Path, *, steps: int = 600, seed: int = 0, log=None) -> Path:
    out_dir = Path(out_dir)
    log = log or (lambda msg: None)
    rng = random.Random(seed)
    torch.manual_seed(seed)
    old_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small matrices: a second thread only adds contention on a busy machine
    # Staged in a directory whose name makes a valid module name for transformers' remote-code
    # loader (cached_build's temporary directories start with a dot), then copied to `out_dir`.
    with tempfile.TemporaryDirectory(prefix="tiny_xcomposer2_") as staging_root:
        staging = Path(staging_root) / f"xcomposer2_tiny_{uuid.uuid4().hex[:8]}"
        try:
            _build_into(staging, rng, steps, log)
        finally:
            torch.set_num_threads(old_threads)
        shutil.copytree(staging, out_dir, dirs_exist_ok=True)
    return out_dir


def _build_into(staging: Path, rng: random.Random, steps: int, log) -> None:
    staging.mkdir(parents=True)
    for name in CODE_FILES:
        shutil.copy(CODE_DIR / name, staging / name)
    tokenizer = build_tokenizer_xc()
    tokenizer.save_pretrained(staging)
    (staging / "config.json").write_text(json.dumps(_config(tokenizer), indent=2))
    config = AutoConfig.from_pretrained(staging, trust_remote_code=True)
    cls = get_class_from_dynamic_module(config.auto_map["AutoModel"], staging)
    with fresh_clip_tower():
        model = cls(config)
    fix_image_size(model)
    model.requires_grad_(True)  # the published code freezes the tower; here it learns too
    examples = []
    for _ in range(400):
        color = rng.choice(list(COLORS))
        system, turns, query, completion = _dialogue(rng, color)
        examples.append(_encode(tokenizer, model, system, turns, query, completion, _training_image(color, rng)))
    cases = _verify_cases()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.98))
    started = time.perf_counter()
    failures = ["not checked"]
    for step in range(1, steps + 1):
        model.train()
        embeds, im_mask, labels = _batch(model, [examples[rng.randrange(len(examples))] for _ in range(16)])
        loss = model(inputs_embeds=embeds, im_mask=im_mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 20 or step < 40:
            continue
        failures = _failures(model, tokenizer, cases)
        log(f"step {step} loss {loss.item():.4f}: {len(failures)} failures ({time.perf_counter() - started:.1f}s)")
        if not failures:
            break
    else:
        raise RuntimeError(f"tiny XComposer2 did not learn in {steps} steps: {failures[0]}")
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, staging / "model.safetensors", metadata={"format": "pt"})
    # Verify what the tests will load: the saved weights into a freshly built model.
    with fresh_clip_tower():
        reloaded = cls.from_pretrained(staging).eval()
    fix_image_size(reloaded)
    if failures := _failures(reloaded, tokenizer, cases):
        raise RuntimeError(f"tiny XComposer2 changed when saved and reloaded: {failures[0]}")


def _code_hash() -> str:
    """The remote code's and tests/tiny_vlm.py's (questions, colours) part of the cache key."""
    h = hashlib.sha256()
    for file in [*(CODE_DIR / name for name in CODE_FILES), Path(__file__).with_name("tiny_vlm.py")]:
        h.update(file.read_bytes())
    return h.hexdigest()[:8]


def xcomposer2_model_path(cache_root=None) -> Path:
    return cached_build(f"xcomposer2-tiny-{_code_hash()}", build_tiny_xcomposer2, cache_root)


if __name__ == "__main__":
    t0 = time.perf_counter()
    if "--force" in sys.argv:
        with tempfile.TemporaryDirectory() as d:
            build_tiny_xcomposer2(Path(d) / "xc", log=print)
    else:
        print(xcomposer2_model_path())
    print(f"{time.perf_counter() - t0:.1f}s")

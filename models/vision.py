"""In-process vision-language backends for the "vision" role.

Two kinds of checkpoint, told apart by their config.json:
- InternLM-XComposer2-VL (remote code): the picture marked by `<ImageHere>` in the query, its
  embeddings spliced into the prompt with an `im_mask` (the remote code's own `encode_img` and
  `interleav_wrap_chat`, then `generate`), float16 on a CUDA GPU, float32 on a CPU (slow; the
  load log says how slow). Made to run on the pinned transformers: the vision tower is built
  offline from the checkpoint's own weights (models/remote_code.py) and its input size is fixed
  after loading (see `XComposer2Backend.load`).
- Standard transformers image-text-to-text checkpoints (LLaVA, Qwen2-VL, Idefics, ...):
  `AutoProcessor` + the auto class that maps the model type, prompted with the processor's chat
  template, so any VLM transformers supports natively works here.

Both stream through `threaded.ThreadedBackend` (`transformers_backend.stream_from_thread`):
`generate` on a worker thread, cancellation by a stopping criterion after every token, stop
strings, stats.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import time
from pathlib import Path

from contextlib import aclosing
from typing import AsyncIterator

import torch

from .base import Cancel, Capabilities, ChatMessage, GenerationParams, ModelError, ModelUnavailable, StreamStats
from .control_tokens import without_control_tokens
from .devices import describe_memory, pick_device, pick_dtype
from .generation import XCOMPOSER2_IMAGE_TOKENS, end_of_turn_ids, sampling_kwargs
from .remote_code import import_problem, missing_imports, offline_clip_tower, prints_to_log, tower_shape
from .threaded import Generation, ThreadedBackend
from .transformers_backend import stream_from_thread

log = logging.getLogger(__name__)

XCOMPOSER2 = "xcomposer2"
IMAGE_TEXT_TO_TEXT = "image-text-to-text"
XCOMPOSER2_IMAGE_SIDE = 490  # the published checkpoints' input size, until one is loaded
IMAGE_PLACEHOLDER = "<ImageHere>"
IM_START, IM_END = "[UNUSED_TOKEN_146]", "[UNUSED_TOKEN_145]"  # XComposer2's tokenizer's names
GPU_EXTRA_HINT = (
    "On a GPU host: pip install -e '.[gpu]' (torchvision built for the CUDA torch; `make gpu`). On a CPU-only "
    "host, PyPI's torchvision (a CUDA build) breaks every transformers import; use PyTorch's CPU build: "
    "pip install torchvision==0.28.0 --index-url https://download.pytorch.org/whl/cpu"
)
LMDEPLOY_HINT = (
    "Or serve it with LMDeploy (0.4 <= lmdeploy <= 0.14 serve XComposer2): "
    "`lmdeploy serve api_server {model} --server-port 23333`, then set VISION_BACKEND=openai, "
    "VISION_BASE_URL=http://HOST:23333/v1 and VISION_MODEL to the served model name (see docs/deploy.md)."
)
# Assumed CPU throughput for the load log's speed estimate (a few-core server, float32).
CPU_FLOPS, CPU_BYTES_PER_S = 100e9, 20e9


def read_config(path: str) -> dict:
    try:
        return json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise ModelUnavailable(f"cannot read {path}/config.json: {exc}") from None


def detect_kind(config: dict) -> str | None:
    """XCOMPOSER2, IMAGE_TEXT_TO_TEXT, or None for a checkpoint that does not take images."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
        MODEL_FOR_VISION_2_SEQ_MAPPING_NAMES,
    )

    model_type = str(config.get("model_type", ""))
    names = " ".join([model_type, *config.get("architectures", []), *map(str, config.get("auto_map", {}).values())])
    if "xcomposer2" in names.lower():
        return XCOMPOSER2
    if model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES or model_type in MODEL_FOR_VISION_2_SEQ_MAPPING_NAMES:
        return IMAGE_TEXT_TO_TEXT
    auto_map = config.get("auto_map", {})
    if "vision_config" in config and ("AutoModelForImageTextToText" in auto_map or "AutoModelForVision2Seq" in auto_map):
        return IMAGE_TEXT_TO_TEXT
    return None


def load_vision_backend(path: str, *, model: str, variable: str = "VISION_MODEL", device: str = "auto",
                        dtype: str = "auto", max_context_tokens: int = 8192):
    """Create and load the right backend for the checkpoint at `path` (`model`: the configured name)."""
    config = read_config(path)
    kind = detect_kind(config)
    if kind is None:
        raise ModelUnavailable(
            f"{variable}={model} is not a vision-language checkpoint (model_type {config.get('model_type')!r}); "
            "set it to InternLM-XComposer2 (through LMDeploy) or a transformers image-text-to-text model."
        )
    if kind == XCOMPOSER2:
        backend = XComposer2Backend(path, device=device, dtype=dtype, max_context_tokens=max_context_tokens)
    else:
        backend = ImageTextToTextBackend(path, device=device, dtype=dtype, max_context_tokens=max_context_tokens)
    backend.load()
    return backend


def xcomposer2_problems(path: str) -> list[str]:
    """What stops the XComposer2 checkpoint at `path` from loading here (empty: nothing)."""
    problems = [f"its code needs {pkg} ({why}). " + GPU_EXTRA_HINT for pkg, why in missing_imports(path).items()]
    try:
        tower_shape(path)
    except (ValueError, OSError) as exc:
        problems.append(f"its vision tower cannot be built from its own weights: {exc}")
    return problems


class ImageTextToTextBackend(ThreadedBackend):
    """A transformers-native VLM: processor chat template, pixel values, `generate`."""

    def __init__(self, path: str, *, device: str = "auto", dtype: str = "auto", max_context_tokens: int = 8192) -> None:
        self.path = self.name = path
        self.device = pick_device(device)
        self.dtype = pick_dtype(dtype, self.device)
        self.context_window = self.max_context_tokens = max_context_tokens
        self.processor = self.tokenizer = self.model = None
        self.image_side = 0  # the picture size the processor resizes to: intake shrinks to this
        self.image_tokens = 0  # prompt tokens one picture takes
        self.last_worker = None

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(images=True, image_side=self.image_side, image_tokens=self.image_tokens)

    def load(self) -> None:
        from transformers import AutoModelForImageTextToText, AutoModelForVision2Seq, AutoProcessor
        from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

        started = time.perf_counter()
        config = read_config(self.path)
        self.processor = AutoProcessor.from_pretrained(self.path, trust_remote_code=True)
        self.tokenizer = getattr(self.processor, "tokenizer", None)
        if self.tokenizer is None or getattr(self.processor, "chat_template", None) is None:
            raise ModelUnavailable(f"{self.path}: the processor has no tokenizer or no chat template")
        in_mapping = config.get("model_type") in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES
        auto = AutoModelForImageTextToText if in_mapping or "AutoModelForImageTextToText" in config.get("auto_map", {}) else AutoModelForVision2Seq
        model = auto.from_pretrained(self.path, trust_remote_code=True, torch_dtype=self.dtype)
        self.model = model.to(self.device).eval()
        self.input_names = set(inspect.signature(model.forward).parameters)
        text_config = getattr(model.config, "text_config", model.config)
        limit = getattr(text_config, "max_position_embeddings", None) or self.max_context_tokens
        self.context_window = min(self.max_context_tokens, int(limit))
        self.eos_ids = end_of_turn_ids(self.tokenizer, model.generation_config)
        self.image_side = _processor_side(self.processor)
        self.image_tokens = self._measure_image_tokens()
        log.info(
            "loaded vision model %s (%s) on %s in %.1fs: %d-pixel pictures, %d tokens each, %s",
            self.path, type(model).__name__, self.device, time.perf_counter() - started,
            self.image_side, self.image_tokens, describe_memory(self.model, self.device),
        )

    # -- prompting -----------------------------------------------------------------------
    def _conversation(self, messages: list[ChatMessage]) -> tuple[list[dict], list]:
        conversation, images = [], []
        for m in messages:
            parts: list[dict] = []
            if m.image is not None:
                parts.append({"type": "image"})
                images.append(m.image)
            parts.append({"type": "text", "text": m.content})
            conversation.append({"role": m.role, "content": parts})
        return conversation, images

    def render(self, messages: list[ChatMessage]) -> tuple[str, list]:
        conversation, images = self._conversation(messages)
        text = self.processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
        return text, images

    def _measure_image_tokens(self) -> int:
        from PIL import Image

        probe = [ChatMessage("user", "x", image=Image.new("RGB", (self.image_side or 224,) * 2))]
        text, images = self.render(probe)
        with_image = self.processor(text=[text], images=images, return_tensors="pt")["input_ids"].shape[1]
        return max(0, int(with_image) - len(self.tokenizer(text)["input_ids"]))

    def count_tokens(self, messages: list[ChatMessage]) -> int:
        text, images = self.render(messages)
        return len(self.tokenizer(text)["input_ids"]) + self.image_tokens * len(images)

    def inputs(self, messages: list[ChatMessage]) -> dict:
        text, images = self.render(messages)
        batch = self.processor(text=[text], images=images or None, return_tensors="pt")
        out = {}
        for key, value in batch.items():
            if key not in self.input_names:  # e.g. token_type_ids from a BERT-style tokenizer config
                continue
            if torch.is_tensor(value):
                value = value.to(self.device)
                if value.is_floating_point():
                    value = value.to(self.dtype)
            out[key] = value
        return out

    # -- generation (ThreadedBackend.stream runs it) -------------------------------------
    async def _generation(self, messages: list[ChatMessage], params: GenerationParams) -> Generation:
        inputs = await asyncio.to_thread(self.inputs, messages)  # image preprocessing: off the event loop
        kwargs = dict(inputs, eos_token_id=self.eos_ids, pad_token_id=self.eos_ids[0], **sampling_kwargs(params))

        def generate(bridge: dict) -> None:
            self.model.generate(**kwargs, **bridge)

        return generate, int(kwargs["input_ids"].shape[1])


def _processor_side(processor) -> int:
    ip = getattr(processor, "image_processor", None)
    for attr in ("crop_size", "size"):
        size = getattr(ip, attr, None)
        if isinstance(size, dict):
            for key in ("height", "shortest_edge", "longest_edge", "width"):
                if size.get(key):
                    return int(size[key])
        elif isinstance(size, int):
            return size
    return 0


class XComposer2Backend(ThreadedBackend):
    """InternLM-XComposer2-VL through its remote code: `encode_img` + `interleav_wrap_chat` (the
    published `chat`'s own steps), then `generate` with the shared streaming and cancellation.
    Not `chat` itself: it moves a text-only prompt to `.cuda()` (no CPU), and the steps apart let
    a /stop end the turn between the picture's encoding and the prompt pass."""

    def __init__(self, path: str, *, device: str = "auto", dtype: str = "auto", max_context_tokens: int = 4096) -> None:
        self.path = self.name = path
        self.device = pick_device(device)
        # float16 on a GPU as published (float32 does not fit in 40 GB for the 7B); float32 on a CPU.
        self.dtype = pick_dtype(dtype, self.device) if dtype != "auto" or not self.device.startswith("cuda") else torch.float16
        self.context_window = max_context_tokens
        self.tokenizer = self.model = None
        # the tower's input size and what one picture costs: the published ones until loaded
        self.image_side, self.image_tokens = XCOMPOSER2_IMAGE_SIDE, XCOMPOSER2_IMAGE_TOKENS
        self.last_worker = None
        self.tower_requests: list[str] = []  # what the remote code asked CLIPVisionModel.from_pretrained for

    def load(self) -> None:
        from transformers import AutoModel, AutoTokenizer

        problems = xcomposer2_problems(self.path)
        if problems:
            raise ModelUnavailable(f"{self.path} (InternLM-XComposer2) cannot load here: " + " ".join(problems)
                                   + " " + LMDEPLOY_HINT.format(model=self.path))
        started = time.perf_counter()
        with prints_to_log(), offline_clip_tower(self.path) as asked:
            self.tokenizer = AutoTokenizer.from_pretrained(self.path, trust_remote_code=True)
            model = AutoModel.from_pretrained(self.path, trust_remote_code=True, torch_dtype=self.dtype)
        self.tower_requests = list(asked)
        self.model = model.to(self.device).eval()
        self.model.tokenizer = self.tokenizer  # some of its methods read it from the model
        self._fix_tower_input_size()
        self.context_window = min(self.context_window, int(getattr(model.config, "max_length", 4096) or 4096))
        self.eos_ids = sorted({*end_of_turn_ids(self.tokenizer, model.generation_config), self.tokenizer.convert_tokens_to_ids(IM_END)})
        log.info("loaded XComposer2 %s on %s (%s) in %.1fs: %d-pixel pictures, %d tokens each, %s", self.path,
                 self.device, str(self.dtype).removeprefix("torch."), time.perf_counter() - started, self.image_side,
                 self.image_tokens, describe_memory(self.model, self.device))
        if not self.device.startswith("cuda"):
            log.warning(self.cpu_speed_note())

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(images=True, image_side=self.image_side, image_tokens=self.image_tokens)

    def _fix_tower_input_size(self) -> None:
        """The remote code resizes the CLIP position embedding (24x24 → 35x35 patches, 490 px) but
        leaves `embeddings.image_size` at 336, and transformers >= 4.46 checks pictures against it
        ("Input image size (490*490) doesn't match model (336*336)"). Set it to what the weights take."""
        embeddings = self.model.vit.vision_tower.vision_model.embeddings
        grid = round((embeddings.position_embedding.num_embeddings - 1) ** 0.5)
        side = grid * embeddings.patch_size
        configured = getattr(self.model.config, "img_size", side)
        if configured != side:
            log.warning("%s: config img_size %s, but the vision tower's weights take %d-pixel pictures", self.path, configured, side)
        embeddings.image_size, embeddings.num_patches, embeddings.num_positions = side, grid * grid, grid * grid + 1
        self.image_side, self.image_tokens = side, grid * grid

    def cpu_speed_note(self) -> str:
        params = sum(p.numel() for p in self.model.parameters())
        first = 2 * params * (self.image_tokens + 100) / CPU_FLOPS
        per_token = params * torch.finfo(self.dtype).bits / 8 / CPU_BYTES_PER_S
        size = f"{params / 1e9:.2f}B" if params >= 1e8 else f"{params / 1e6:.2f}M"
        return (f"XComposer2 runs on the CPU ({size} parameters, {str(self.dtype).removeprefix('torch.')}): "
                f"expect roughly {first:.3g} s before the first word of an answer about a picture (its "
                f"{self.image_tokens} image tokens) and {per_token:.3g} s per word after (estimated for "
                f"{CPU_FLOPS / 1e9:.0f} GFLOP/s and {CPU_BYTES_PER_S / 1e9:.0f} GB/s); a CUDA GPU is 10-100x faster.")

    @staticmethod
    def split(messages: list[ChatMessage]) -> tuple[str, list[tuple[str, str]], str, object]:
        """(meta instruction, [(query, answer)], query, image) with `<ImageHere>` where the picture goes."""
        system = next((m.content for m in messages if m.role == "system"), "")
        turns, image, pending = [], None, None
        for m in messages:
            if m.role == "system":
                continue
            text = m.content
            if m.image is not None and image is None:
                image, text = m.image, IMAGE_PLACEHOLDER + text
            if m.role == "user":
                if pending is not None:
                    turns.append((pending, ""))
                pending = text
            elif pending is not None:
                turns.append((pending, text))
                pending = None
        return system, turns, pending or "", image

    def count_tokens(self, messages: list[ChatMessage]) -> int:
        text = "".join(f"{IM_START}{m.role}\n{m.content}{IM_END}\n" for m in messages) + f"{IM_START}assistant\n"
        images = sum(m.image is not None for m in messages)
        return len(self.tokenizer(text)["input_ids"]) + (self.image_tokens + 1) * images

    def _inputs(self, system: str, history: list, query: str, pixels, cancel: Cancel) -> tuple[dict, object] | None:
        """The prompt's embeddings and image mask (None when stopped meanwhile); on the worker thread."""
        model = self.model
        if pixels is None:
            inputs = dict(model.build_inputs(self.tokenizer, query, history, system))
            inputs = {k: inputs[k].to(self.device) for k in ("input_ids", "attention_mask") if k in inputs}
            return inputs, torch.zeros(inputs["input_ids"].shape[:2], dtype=torch.bool, device=self.device)
        image = model.encode_img(pixels)  # the vision tower: a real share of the prompt pass
        if cancel.is_set:
            return None
        inputs, im_mask = model.interleav_wrap_chat(self.tokenizer, query, image, history, system)
        embeds = inputs["inputs_embeds"]  # one sequence, no padding: say so (else generate warns each time)
        return dict(inputs, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)), im_mask

    async def _generation(self, messages: list[ChatMessage], params: GenerationParams, cancel: Cancel | None = None) -> Generation:
        system, history, query, image = self.split(messages)
        cancel = cancel or Cancel()
        pixels = None
        if image is not None:  # its own preprocessing (resize to the tower's size, CLIP normalisation)
            pixels = await asyncio.to_thread(lambda: self.model.vis_processor(image).unsqueeze(0).to(self.device, self.dtype))
        options = dict(eos_token_id=self.eos_ids, pad_token_id=self.eos_ids[0], **sampling_kwargs(params))

        def generate(bridge: dict) -> None:
            if cancel.is_set:
                return
            with prints_to_log():
                prepared = self._inputs(system, history, query, pixels, cancel)
                if prepared is not None:
                    inputs, im_mask = prepared
                    self.model.generate(**inputs, im_mask=im_mask, **options, **bridge)

        return generate, self.count_tokens(messages)

    async def stream(
        self, messages: list[ChatMessage], *, params: GenerationParams, cancel: Cancel,
        stats: StreamStats | None = None, skip_special_tokens: bool = True,
    ) -> AsyncIterator[str]:
        """ThreadedBackend's stream, with `cancel` also checked between the picture's encoding
        and the prompt pass, and `[UNUSED_TOKEN_…]` pieces removed from the text."""
        if self.model is None:
            raise ModelError(f"model {self.path} is not loaded")
        generate, prompt_tokens = await self._generation(messages, params, cancel)
        deltas = stream_from_thread(
            generate, tokenizer=self.tokenizer, eos_ids=self.eos_ids, params=params, cancel=cancel, stats=stats,
            prompt_tokens=prompt_tokens, name=self.path, skip_special_tokens=skip_special_tokens,
            on_worker=self._started,
        )
        async with aclosing(deltas), aclosing(without_control_tokens(deltas)) as shown:
            async for delta in shown:
                yield delta


def vision_readiness(path: str | None, model: str, device: str = "auto") -> tuple[bool, str]:
    """(ready, one line) for `check`: what the vision role will run and what stops it, without
    loading anything. `path` is the local checkpoint, or None when it is not downloaded yet."""
    where = pick_device(device)
    speed = "on the GPU in float16" if where.startswith("cuda") else "on the CPU in float32 (slow: minutes per answer)"
    if path is None:
        if "xcomposer2" not in model.lower():
            return True, "not downloaded yet; its kind is checked once it is"
        problem = import_problem("torchvision")
        if problem:
            return False, f"InternLM-XComposer2: its code needs torchvision ({problem}). " + GPU_EXTRA_HINT
        return True, f"InternLM-XComposer2 (once downloaded), {speed}; vision tower from its own weights, no second download"
    try:
        kind = detect_kind(read_config(path))
    except ModelUnavailable as exc:
        return False, str(exc)
    if kind is None:
        return False, "not a vision-language checkpoint (set VISION_MODEL to XComposer2-VL or a transformers VLM)"
    if kind == IMAGE_TEXT_TO_TEXT:
        return True, f"ready: a transformers image-text-to-text model, {speed.split(' (')[0]}"
    problems = xcomposer2_problems(path)
    if problems:
        return False, "InternLM-XComposer2 cannot load: " + " ".join(problems)
    return True, (f"ready: InternLM-XComposer2, {speed}; vision tower built from its own weights "
                  f"({tower_shape(path).describe()}), no second download")

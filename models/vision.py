"""In-process vision-language backends for the "vision" role.

Two kinds of checkpoint, told apart by their config.json:
- InternLM-XComposer2 (remote code): its own `chat(tokenizer, query, image, history, ...)`, the
  picture marked by `<ImageHere>` in the query, float16 on a GPU. Its remote code is tested by its
  authors on transformers 4.33 and breaks from 4.46 on (CLIP internals changed), so with the
  pinned transformers it refuses to load and points to the LMDeploy route (docs/deploy.md).
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

import torch
import transformers
from packaging.version import Version

from .base import Capabilities, ChatMessage, GenerationParams, ModelUnavailable
from .devices import describe_memory, pick_device, pick_dtype
from .generation import XCOMPOSER2_IMAGE_TOKENS, end_of_turn_ids, sampling_kwargs
from .threaded import Generation, ThreadedBackend

log = logging.getLogger(__name__)

XCOMPOSER2 = "xcomposer2"
IMAGE_TEXT_TO_TEXT = "image-text-to-text"
# The transformers versions XComposer2's remote code runs on: tested by its authors on 4.33;
# reported working up to 4.40; transformers 4.46 changed CLIP's position embeddings under it.
XCOMPOSER2_TRANSFORMERS = (Version("4.33"), Version("4.46"))
XCOMPOSER2_IMAGE_SIDE = 490
IMAGE_PLACEHOLDER = "<ImageHere>"

LMDEPLOY_HINT = (
    "Serve it with LMDeploy instead (0.4 <= lmdeploy <= 0.14 serve XComposer2): "
    "`pip install 'lmdeploy>=0.4,<0.15' && lmdeploy serve api_server {model} --server-port 23333`, then set "
    "VISION_BACKEND=openai, VISION_BASE_URL=http://HOST:23333/v1 and VISION_MODEL to the served model name "
    "(see docs/deploy.md)."
)


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
        check_xcomposer2_supported(model, variable)
        backend = XComposer2Backend(path, device=device, max_context_tokens=max_context_tokens)
    else:
        backend = ImageTextToTextBackend(path, device=device, dtype=dtype, max_context_tokens=max_context_tokens)
    backend.load()
    return backend


def check_xcomposer2_supported(model: str, variable: str = "VISION_MODEL", installed: str | None = None) -> None:
    version = Version(installed or transformers.__version__)
    low, high = XCOMPOSER2_TRANSFORMERS
    if not low <= version < high:
        raise ModelUnavailable(
            f"{variable}={model} is an InternLM-XComposer2 checkpoint; its remote code runs on transformers "
            f">={low},<{high} (tested by its authors on 4.33) but transformers {version} is installed "
            "(pinned for InternLM2). " + LMDEPLOY_HINT.format(model=model)
        )


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
    """InternLM-XComposer2 through its remote code's `chat` (CUDA, float16)."""

    image_side = XCOMPOSER2_IMAGE_SIDE
    image_tokens = XCOMPOSER2_IMAGE_TOKENS
    capabilities = Capabilities(images=True, image_side=XCOMPOSER2_IMAGE_SIDE, image_tokens=XCOMPOSER2_IMAGE_TOKENS)

    def __init__(self, path: str, *, device: str = "auto", max_context_tokens: int = 4096) -> None:
        self.path = self.name = path
        self.device = pick_device(device)
        self.context_window = max_context_tokens
        self.tokenizer = self.model = None
        self.last_worker = None

    def load(self) -> None:
        from transformers import AutoModel, AutoTokenizer

        if not self.device.startswith("cuda"):
            raise ModelUnavailable(
                f"{self.path}: XComposer2's remote code runs on a CUDA GPU only (float16); this process has "
                f"device {self.device}. " + LMDEPLOY_HINT.format(model=self.path)
            )
        started = time.perf_counter()
        self.tokenizer = AutoTokenizer.from_pretrained(self.path, trust_remote_code=True)
        model = AutoModel.from_pretrained(self.path, trust_remote_code=True, torch_dtype=torch.float16)
        self.model = model.to(self.device).eval()
        self.model.tokenizer = self.tokenizer  # some of its methods read it from the model
        self.context_window = min(self.context_window, int(getattr(model.config, "max_length", 4096) or 4096))
        self.eos_ids = end_of_turn_ids(self.tokenizer, model.generation_config)
        for token in ("[UNUSED_TOKEN_145]",):  # its end of turn (<|im_end|>)
            self.eos_ids.append(int(self.tokenizer.convert_tokens_to_ids(token)))
        log.info("loaded XComposer2 %s in %.1fs, %s", self.path, time.perf_counter() - started,
                 describe_memory(self.model, self.device))

    @staticmethod
    def split(messages: list[ChatMessage]) -> tuple[str | None, list[tuple[str, str]], str, object]:
        """(meta instruction, [(query, answer)], query, image) with `<ImageHere>` where the picture goes."""
        system = next((m.content for m in messages if m.role == "system"), None)
        turns, query, image, pending = [], "", None, None
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
        query = pending or ""
        return system, turns, query, image

    def count_tokens(self, messages: list[ChatMessage]) -> int:
        text = "".join(f"[UNUSED_TOKEN_146]{m.role}\n{m.content}[UNUSED_TOKEN_145]\n" for m in messages)
        images = sum(m.image is not None for m in messages)
        return len(self.tokenizer(text)["input_ids"]) + self.image_tokens * images

    async def _generation(self, messages: list[ChatMessage], params: GenerationParams) -> Generation:
        system, history, query, image = self.split(messages)
        pixels = None
        if image is not None:  # its own 490x490 preprocessing, off the event loop
            pixels = await asyncio.to_thread(lambda: self.model.vis_processor(image).unsqueeze(0).to(self.device, torch.float16))
        options = sampling_kwargs(params)
        if system is not None:
            options["meta_instruction"] = system

        def generate(bridge: dict) -> None:
            self.model.chat(self.tokenizer, query, pixels, history, **bridge, **options)

        return generate, self.count_tokens(messages)

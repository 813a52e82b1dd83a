"""The tiny XComposer2-shaped test model (tests/tiny_xcomposer2.py builds and trains it).

Shaped like the published InternLM-XComposer2-VL remote code where the bot depends on it:
- an InternLM2-style decoder (`model.tok_embeddings`, `wqkv`/`wo`, `feed_forward.w1/w2/w3`,
  `output`) whose linear layers are Partial LoRA (`Plora`): the LoRA branch applies to the image
  positions only, selected by `im_mask`; tuple KV caches through `generate`;
- `vit` (build_mlp.CLIPVisionTower around a transformers CLIPVisionModel) and `vision_proj`;
- `vis_processor` (torchvision transforms, as published; a PIL fallback when torchvision is
  missing, inside try/except so that transformers does not require it);
- `encode_img`, `interleav_wrap_chat` (`<ImageHere>` in the query; the image's embeddings
  spliced into `inputs_embeds` with `im_mask`), `build_inputs` and `chat`, with the published
  signatures and prompt format ([UNUSED_TOKEN_146]/[UNUSED_TOKEN_145] around each turn);
- `print()`s while loading, as the published code does.
"""

import math
from typing import List, Optional, Tuple

import torch
from PIL import Image
from torch import nn
from torch.nn import CrossEntropyLoss
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

try:  # published: a plain top-level import; the test machines' CPU torch breaks PyPI's torchvision
    from torchvision import transforms
    from torchvision.transforms.functional import InterpolationMode
except ImportError:
    transforms = None

from .build_mlp import build_vision_projector, build_vision_tower
from .configuration_internlm_xcomposer2 import InternLMXcomposer2Config

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class _PilProcessor:
    """torchvision's Resize(bicubic) + ToTensor + Normalize, with PIL and torch only."""

    def __init__(self, size):
        self.size = size

    def __call__(self, image):
        image = image.convert('RGB').resize((self.size, self.size), Image.BICUBIC)
        data = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
        x = data.reshape(self.size, self.size, 3).permute(2, 0, 1).float() / 255.0
        mean = torch.tensor(CLIP_MEAN).view(3, 1, 1)
        std = torch.tensor(CLIP_STD).view(3, 1, 1)
        return (x - mean) / std


class RMSNorm(nn.Module):
    def __init__(self, hidden_size, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x):
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class Plora(nn.Linear):
    """Partial LoRA: the low-rank branch is added at the image positions (`im_mask`) only."""

    def __init__(self, in_features, out_features, bias=False, lora_r=8, lora_alpha=16):
        super().__init__(in_features, out_features, bias)
        self.lora_scaling = lora_alpha / lora_r
        self.Plora_A = nn.Linear(in_features, lora_r, bias=False)
        self.Plora_B = nn.Linear(lora_r, out_features, bias=False)
        nn.init.zeros_(self.Plora_B.weight)

    def forward(self, x, im_mask=None):
        res = super().forward(x)
        if im_mask is not None:
            if torch.sum(im_mask) > 0:
                part_x = x[im_mask]
                res[im_mask] += self.Plora_B(self.Plora_A(part_x)) * self.lora_scaling
            else:
                part_x = x[:, :1]
                res[:, :1] += self.Plora_B(self.Plora_A(part_x)) * 0
        return res


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _rotary(q, k, positions, theta):
    dim = q.shape[-1]
    inv = 1.0 / (theta ** (torch.arange(0, dim, 2, device=q.device).float() / dim))
    freqs = positions.float()[:, :, None] * inv[None, None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos()[:, None].to(q.dtype), emb.sin()[:, None].to(q.dtype)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


class InternLM2Attention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.theta = config.rope_theta
        h, r, a = config.hidden_size, config.lora_r, config.lora_alpha
        self.wqkv = Plora(h, 3 * h, lora_r=r, lora_alpha=a)
        self.wo = Plora(h, h, lora_r=r, lora_alpha=a)

    def forward(self, hidden_states, positions, past_key_value=None, im_mask=None):
        bsz, q_len, _ = hidden_states.shape
        qkv = self.wqkv(hidden_states, im_mask).view(bsz, q_len, 3, self.num_heads, self.head_dim)
        q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
        q, k = _rotary(q, k, positions, self.theta)
        if past_key_value is not None:
            k = torch.cat([past_key_value[0], k], dim=2)
            v = torch.cat([past_key_value[1], v], dim=2)
        present = (k, v)
        out = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=past_key_value is None and q_len > 1)
        out = out.transpose(1, 2).reshape(bsz, q_len, -1)
        return self.wo(out, im_mask), present


class InternLM2MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        h, i, r, a = config.hidden_size, config.intermediate_size, config.lora_r, config.lora_alpha
        self.w1 = Plora(h, i, lora_r=r, lora_alpha=a)
        self.w3 = Plora(h, i, lora_r=r, lora_alpha=a)
        self.w2 = Plora(i, h, lora_r=r, lora_alpha=a)

    def forward(self, x, im_mask=None):
        return self.w2(nn.functional.silu(self.w1(x, im_mask)) * self.w3(x, im_mask), im_mask)


class InternLM2DecoderLayer(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.attention = InternLM2Attention(config)
        self.feed_forward = InternLM2MLP(config)
        self.attention_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.ffn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, positions, past_key_value=None, im_mask=None):
        attn, present = self.attention(self.attention_norm(x), positions, past_key_value, im_mask)
        x = x + attn
        x = x + self.feed_forward(self.ffn_norm(x), im_mask)
        return x, present


class InternLM2PreTrainedModel(PreTrainedModel):
    config_class = InternLMXcomposer2Config
    base_model_prefix = 'model'
    _no_split_modules = ['InternLM2DecoderLayer']

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)) and not getattr(module, '_is_hf_initialized', False):
            module.weight.data.normal_(mean=0.0, std=0.1)
            if isinstance(module, nn.Linear) and module.bias is not None:
                module.bias.data.zero_()


class InternLM2Model(InternLM2PreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([InternLM2DecoderLayer(config) for _ in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, use_cache=None, im_mask=None, **kwargs):
        if inputs_embeds is None:
            inputs_embeds = self.tok_embeddings(input_ids)
            im_mask = torch.zeros(inputs_embeds.shape[:2]).to(inputs_embeds.device).bool()
        past_length = past_key_values[0][0].shape[2] if past_key_values is not None else 0
        seq = inputs_embeds.shape[1]
        positions = torch.arange(past_length, past_length + seq, device=inputs_embeds.device)[None]
        hidden = inputs_embeds
        presents = ()
        for i, layer in enumerate(self.layers):
            past = past_key_values[i] if past_key_values is not None else None
            hidden, present = layer(hidden, positions, past, im_mask)
            presents += (present,)
        return BaseModelOutputWithPast(last_hidden_state=self.norm(hidden), past_key_values=presents)


class InternLMXComposer2ForCausalLM(InternLM2PreTrainedModel, GenerationMixin):
    _auto_class = 'AutoModelForCausalLM'

    def __init__(self, config):
        super().__init__(config)
        self.model = InternLM2Model(config)
        self.vocab_size = config.vocab_size
        self.output = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tokenizer = None
        self.max_length = config.max_length
        print(f'Set max length to {self.max_length}')
        self.post_init()

        self.vit = build_vision_tower()
        self.vision_proj = build_vision_projector(
            self.vit.vision_tower.config.hidden_size, config.hidden_size)
        if transforms is not None:
            self.vis_processor = transforms.Compose([
                transforms.Resize((config.img_size, config.img_size), interpolation=InterpolationMode.BICUBIC),
                transforms.ToTensor(),
                transforms.Normalize(CLIP_MEAN, CLIP_STD),
            ])
        else:
            self.vis_processor = _PilProcessor(config.img_size)

    def get_input_embeddings(self):
        return self.model.tok_embeddings

    def get_output_embeddings(self):
        return self.output

    def encode_img(self, image):
        if image is None:
            return None
        if isinstance(image, str):
            image = Image.open(image).convert('RGB')
            image = self.vis_processor(image).unsqueeze(0).to(self.device)
        else:
            assert isinstance(image, torch.Tensor)
        return self.img2emb(image)

    def img2emb(self, image):
        return self.vision_proj(self.vit(image.to(self.device)))

    def interleav_wrap_chat(self, tokenizer, query, image, history, meta_instruction):
        prompt = ''
        if meta_instruction:
            prompt += f"""[UNUSED_TOKEN_146]system\n{meta_instruction}[UNUSED_TOKEN_145]\n"""
        for record in history:
            prompt += (f"""[UNUSED_TOKEN_146]user\n{record[0]}[UNUSED_TOKEN_145]\n"""
                       f"""[UNUSED_TOKEN_146]assistant\n{record[1]}[UNUSED_TOKEN_145]\n""")
        prompt += f"""[UNUSED_TOKEN_146]user\n{query}[UNUSED_TOKEN_145]\n[UNUSED_TOKEN_146]assistant\n"""

        im_len = image.shape[1]
        image_nums = len(image)
        parts = prompt.split('<ImageHere>')
        wrap_embeds, wrap_im_mask = [], []
        temp_len = 0
        for idx, part in enumerate(parts):
            if len(part) > 0:
                part_tokens = tokenizer(part, return_tensors='pt').to(self.device)
                part_embeds = self.model.tok_embeddings(part_tokens.input_ids)
                wrap_embeds.append(part_embeds)
                wrap_im_mask.append(torch.zeros(part_embeds.shape[:2]))
                temp_len += part_embeds.shape[1]
            if idx < image_nums:
                wrap_embeds.append(image[idx].unsqueeze(0))
                wrap_im_mask.append(torch.ones(1, image[idx].shape[0]))
                temp_len += im_len
            if temp_len > self.max_length:
                break
        wrap_embeds = torch.cat(wrap_embeds, dim=1)
        wrap_im_mask = torch.cat(wrap_im_mask, dim=1)
        wrap_embeds = wrap_embeds[:, :self.max_length].to(self.device)
        wrap_im_mask = wrap_im_mask[:, :self.max_length].to(self.device).bool()
        return {'inputs_embeds': wrap_embeds}, wrap_im_mask

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, output_attentions=None,
                output_hidden_states=None, return_dict=None, **kwargs):
        im_mask = kwargs.get('im_mask', None)
        if im_mask is None and inputs_embeds is not None:
            im_mask = torch.zeros(inputs_embeds.shape[:2]).to(inputs_embeds.device).bool()
        outputs = self.model(input_ids=input_ids, past_key_values=past_key_values,
                             inputs_embeds=inputs_embeds, use_cache=use_cache, im_mask=im_mask)
        logits = self.output(outputs.last_hidden_state).float()
        loss = None
        if labels is not None:
            shift_logits = logits[..., :-1, :].contiguous().view(-1, self.config.vocab_size)
            shift_labels = labels[..., 1:].contiguous().view(-1).to(shift_logits.device)
            loss = CrossEntropyLoss()(shift_logits, shift_labels)
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=outputs.past_key_values)

    def prepare_inputs_for_generation(self, input_ids, past_key_values=None, attention_mask=None,
                                      inputs_embeds=None, im_mask=None, **kwargs):
        if past_key_values is not None:
            past_length = past_key_values[0][0].shape[2]
            if input_ids.shape[1] > past_length:
                remove_prefix_length = past_length
            else:
                remove_prefix_length = input_ids.shape[1] - 1
            input_ids = input_ids[:, remove_prefix_length:]
        if inputs_embeds is not None and past_key_values is None:
            model_inputs = {'inputs_embeds': inputs_embeds}
        else:
            model_inputs = {'input_ids': input_ids}
        model_inputs.update({'past_key_values': past_key_values, 'use_cache': kwargs.get('use_cache'),
                             'attention_mask': attention_mask, 'im_mask': im_mask})
        return model_inputs

    def build_inputs(self, tokenizer, query: str, history: List[Tuple[str, str]] = [], meta_instruction=''):
        prompt = ''
        if meta_instruction:
            prompt += f"""<s>[UNUSED_TOKEN_146]system\n{meta_instruction}[UNUSED_TOKEN_145]\n"""
        else:
            prompt += '<s>'
        for record in history:
            prompt += (f"""[UNUSED_TOKEN_146]user\n{record[0]}[UNUSED_TOKEN_145]\n"""
                       f"""[UNUSED_TOKEN_146]assistant\n{record[1]}[UNUSED_TOKEN_145]\n""")
        prompt += f"""[UNUSED_TOKEN_146]user\n{query}[UNUSED_TOKEN_145]\n[UNUSED_TOKEN_146]assistant\n"""
        return tokenizer([prompt], return_tensors='pt', add_special_tokens=False)

    @torch.no_grad()
    def chat(self, tokenizer, query: str, image: torch.Tensor = None, history: List[Tuple[str, str]] = [],
             streamer=None, max_new_tokens: int = 1024, do_sample: bool = True, temperature: float = 1.0,
             top_p: float = 0.8, repetition_penalty: float = 1.005,
             meta_instruction: str = 'You are an AI assistant whose name is InternLM-XComposer (浦语·灵笔).',
             **kwargs):
        if image is None:
            inputs = self.build_inputs(tokenizer, query, history, meta_instruction)
            im_mask = torch.zeros(inputs['input_ids'].shape[:2]).cuda().bool()  # as published
        else:
            image = self.encode_img(image)
            inputs, im_mask = self.interleav_wrap_chat(tokenizer, query, image, history, meta_instruction)
        inputs = {k: v.to(self.device) for k, v in inputs.items() if torch.is_tensor(v)}
        eos_token_id = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(['[UNUSED_TOKEN_145]'])[0]]
        outputs = self.generate(**inputs, streamer=streamer, max_new_tokens=max_new_tokens, do_sample=do_sample,
                                temperature=temperature, top_p=top_p, eos_token_id=eos_token_id,
                                repetition_penalty=repetition_penalty, im_mask=im_mask, **kwargs)
        if image is None:
            outputs = outputs[0].cpu().tolist()[len(inputs['input_ids'][0]):]
        else:
            outputs = outputs[0].cpu().tolist()
        response = tokenizer.decode(outputs, skip_special_tokens=True)
        response = response.split('[UNUSED_TOKEN_145]')[0]
        history = history + [(query, response)]
        return response, history

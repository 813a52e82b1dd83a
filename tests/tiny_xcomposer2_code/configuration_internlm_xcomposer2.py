"""Configuration of the tiny XComposer2-shaped test model (tests/tiny_xcomposer2.py).

Same field names as the published InternLM-XComposer2-VL checkpoints' config, scaled down."""

from transformers.configuration_utils import PretrainedConfig


class InternLMXcomposer2Config(PretrainedConfig):
    model_type = "internlmxcomposer2"
    _auto_class = "AutoConfig"

    def __init__(
        self,
        vocab_size=2048,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=2048,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        img_size=392,
        max_length=2048,
        lora_r=8,
        lora_alpha=16,
        pad_token_id=2,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.max_position_embeddings = max_position_embeddings
        self.rms_norm_eps = rms_norm_eps
        self.rope_theta = rope_theta
        self.img_size = img_size
        self.lora_r = lora_r
        self.lora_alpha = lora_alpha
        super().__init__(
            pad_token_id=pad_token_id, bos_token_id=bos_token_id, eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings, **kwargs,
        )
        self.max_length = max_length  # after super(): PretrainedConfig sets its own max_length (20)

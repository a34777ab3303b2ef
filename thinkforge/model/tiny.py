"""The embedded default model: a tiny Qwen2 (MiMo's architecture family) created from config."""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM


@dataclass
class TinyModelSpec:
    hidden_size: int = 192
    num_hidden_layers: int = 4
    num_attention_heads: int = 6
    num_key_value_heads: int = 2
    intermediate_size: int = 512
    max_position_embeddings: int = 1024
    rope_theta: float = 10000.0


PRESETS = {
    "micro": TinyModelSpec(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                           intermediate_size=192),
    # The speedrun default: ~0.85M parameters, a few minutes of 2-core CPU to learn the synthetic tasks.
    "tiny": TinyModelSpec(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                          intermediate_size=384),
    "base": TinyModelSpec(),
    # MTP benchmark (recipe mtp-bench): MiMo-like depth ratio, 16 narrow layers, so one MTP layer is ~1/16 of it.
    "deep": TinyModelSpec(hidden_size=64, num_hidden_layers=16, num_attention_heads=4, num_key_value_heads=2,
                          intermediate_size=192),
    "small": TinyModelSpec(hidden_size=384, num_hidden_layers=8, num_attention_heads=6, num_key_value_heads=2,
                           intermediate_size=1024, max_position_embeddings=2048),
}


def tiny_config(tokenizer: PreTrainedTokenizerFast, spec: TinyModelSpec) -> Qwen2Config:
    return Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        max_position_embeddings=spec.max_position_embeddings,
        rope_theta=spec.rope_theta,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        bos_token_id=None,
    )


def build_tiny_model(tokenizer: PreTrainedTokenizerFast, spec: TinyModelSpec, seed: int) -> Qwen2ForCausalLM:
    import torch

    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(tiny_config(tokenizer, spec))
    model.generation_config.eos_token_id = model.config.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model

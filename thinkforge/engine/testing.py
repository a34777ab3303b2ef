"""A tiny random Qwen2 checkpoint with a ChatML tokenizer, for engine/server tests and benchmarks.

Self-contained on purpose (no dependency on the trained default model): a byte-level BPE is trained in
well under a second on a fixed corpus, the model is randomly initialised from a seed, and both are
saved as an ordinary HF directory, so every code path (loading, chat template, eos) is the real one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_CORPUS = [
    "What is 12 + 35? Let me think step by step. 12 + 35 = 47. The answer is 47.",
    "def add(a, b):\n    return a + b\n",
    "The quick brown fox jumps over the lazy dog. Reasoning models think before they answer.",
    "Solve for x: 3x + 5 = 20. Subtract 5, then divide by 3: x = 5.",
    "<think>First compute the sum, then check it.</think> The result is correct.",
]


def build_tokenizer(vocab_size: int = 512):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_CORPUS * 20, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=["<|im_start|>", "<|im_end|>"],
                                   clean_up_tokenization_spaces=False)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_tiny_model(tokenizer, *, hidden_size: int = 64, num_layers: int = 2, num_heads: int = 4,
                     num_kv_heads: int = 2, intermediate_size: int = 128, max_position_embeddings: int = 512,
                     seed: int = 0):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=intermediate_size,
                      num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
                      max_position_embeddings=max_position_embeddings, tie_word_embeddings=False,
                      pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(cfg)
    # Random init gives near-uniform logits; a larger output scale makes the distribution peaked like
    # a trained model's (greedy is well separated, sampling settings visibly matter), and untied
    # embeddings keep it from just echoing its last input token.
    with torch.no_grad():
        model.lm_head.weight.normal_(0.0, 0.3)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.eval()


def save_tiny_checkpoint(out_dir: str | Path, *, vocab_size: int = 512, seed: int = 0, **model_kwargs) -> Path:
    out_dir = Path(out_dir)
    tokenizer = build_tokenizer(vocab_size)
    model = build_tiny_model(tokenizer, seed=seed, **model_kwargs)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def serve_in_thread(app: Any, timeout_s: float = 30.0) -> tuple[Any, Any, str]:
    """Runs an ASGI app with uvicorn on a free loopback port in a daemon thread; returns (server, thread,
    base URL ending in /v1). Stop it with `server.should_exit = True; thread.join()`."""
    import socket
    import threading
    import time

    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="critical"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + timeout_s
    while not srv.started:
        if time.time() > deadline:
            raise TimeoutError(f"uvicorn did not start within {timeout_s} s")
        time.sleep(0.02)
    return srv, thread, f"http://127.0.0.1:{port}/v1"


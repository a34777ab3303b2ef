"""Loading HF causal-LM checkpoints for generation, with one-line errors instead of tracebacks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from thinkforge.errors import ThinkforgeError

DTYPES = ("auto", "float32", "fp32", "bfloat16", "bf16", "float16", "fp16", "float64")


def resolve_device(device: str | None) -> str:
    import torch

    if device in (None, "", "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise ThinkforgeError(f"device {device!r} requested but CUDA is not available")
    return str(device)


def resolve_dtype(dtype: Any, device: str) -> Any:
    """`auto` = bf16 on a CUDA device that supports it, else fp32 (CPU matmuls in bf16 are slow)."""
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "", "auto"):
        if str(device).startswith("cuda") and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
             "float64": torch.float64}  # float64: numerics tests that compare different computations
    if dtype not in table:
        raise ThinkforgeError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    return table[dtype]


def check_model_path(path: str) -> None:
    """A local directory must hold config.json; anything else must look like a hub id (org/name)."""
    p = Path(path).expanduser()
    if p.exists():
        if not p.is_dir() or not (p / "config.json").exists():
            raise ThinkforgeError(f"model {path}: no config.json there (not an HF checkpoint directory)")
        return
    if str(path).startswith((".", "/", "~")) or str(path).count("/") != 1:
        raise ThinkforgeError(f"model {path!r} not found (no such directory, and not a hub id like org/name)")


def load_model_and_tokenizer(path: str, device: str | None = "auto", dtype: Any = "auto") -> tuple[Any, Any]:
    """(model, tokenizer) for a local HF directory or hub id, on `device` in `dtype`, in eval mode.

    Attention is forced to SDPA: the native engine feeds explicit 4-D masks (left padding, per-row
    positions), which flash-attention-2 does not accept.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    import thinkforge.model.mtp  # noqa: F401  (registers MiMo checkpoints; quiets MTP-only load reports)

    hf_logging.disable_progress_bar()  # per-shard bars are noise in CLI/server logs
    check_model_path(path)
    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    local = str(Path(path).expanduser()) if Path(path).expanduser().exists() else path
    try:
        tokenizer = AutoTokenizer.from_pretrained(local)
    except (OSError, ValueError) as err:
        raise ThinkforgeError(f"model {path}: cannot load tokenizer ({str(err).splitlines()[0]})") from None
    try:
        model = AutoModelForCausalLM.from_pretrained(local, dtype=torch_dtype, attn_implementation="sdpa")
    except (OSError, ValueError, KeyError) as err:
        raise ThinkforgeError(f"model {path}: cannot load ({str(err).splitlines()[0]})") from None
    if tokenizer.pad_token_id is None:
        # Batched generation needs a pad id; its embedding is never attended to (masked).
        tokenizer.pad_token = tokenizer.eos_token
    return model.to(device).eval(), tokenizer

"""Loading and saving HF checkpoints. Saves are atomic: a crash leaves the old checkpoint or none."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from thinkforge.errors import ThinkforgeError
from thinkforge.utils import atomic_dir


def resolve_dtype(dtype: str | Any, device: str) -> Any:
    import torch

    if not isinstance(dtype, str):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if str(device).startswith("cuda") and torch.cuda.is_bf16_supported() else torch.float32
    # float64 is for numerics checks (equivalence tests that must hold whatever the summation order).
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16, "float64": torch.float64, "fp64": torch.float64}
    if dtype not in table:
        raise ThinkforgeError(f"unknown dtype {dtype!r}; use one of auto, {', '.join(table)}")
    return table[dtype]


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def check_model_path(path: str) -> None:
    """A local dir must hold config.json; anything else must look like a hub id (org/name)."""
    p = Path(path)
    if p.exists():
        if not (p / "config.json").exists():
            raise ThinkforgeError(f"model {path}: no config.json in that directory (not an HF checkpoint)")
        return
    if path.startswith((".", "/", "~")) or path.count("/") != 1:
        raise ThinkforgeError(f"model {path!r} not found (no such directory, and not a hub id like org/name)")


def quiet_hf() -> None:
    """Silences transformers' per-shard tqdm bars (our CLI draws its own progress)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def load_tokenizer(path: str) -> Any:
    from transformers import AutoTokenizer

    check_model_path(path)
    try:
        return AutoTokenizer.from_pretrained(path)
    except OSError as err:
        raise ThinkforgeError(f"model {path}: cannot load tokenizer ({str(err).splitlines()[0]})") from None


def load_model(path: str, device: str = "auto", dtype: str | Any = "auto") -> tuple[Any, Any]:
    """(model, tokenizer) for a local HF directory or hub id, on `device` in `dtype`, in eval mode."""
    from transformers import AutoModelForCausalLM

    import thinkforge.model.mtp  # noqa: F401  (registers MiMo checkpoints; quiets MTP-only load reports)

    quiet_hf()
    device = resolve_device(device)
    tokenizer = load_tokenizer(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=resolve_dtype(dtype, device))
    except OSError as err:
        raise ThinkforgeError(f"model {path}: cannot load ({str(err).splitlines()[0]})") from None
    if Path(path).exists():  # MiMo-style MTP layers saved beside the model travel with it (training keeps them)
        from thinkforge.model.mtp import load_mtp_layers, num_mtp_layers

        if not num_mtp_layers(model):
            load_mtp_layers(model, path)
    return model.to(device).eval(), tokenizer


def save_model(model: Any, tokenizer: Any, out_dir: str | Path, extra: dict[str, str] | None = None) -> Path:
    """Writes an HF directory (safetensors + config + tokenizer [+ extra text files]) atomically."""
    quiet_hf()
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        for name, text in (extra or {}).items():
            (tmp / name).write_text(text)
        os.sync() if hasattr(os, "sync") else None
    return out_dir

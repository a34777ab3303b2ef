"""Pieces every trainer shares: optimizer + cosine schedule, resumable checkpoints, metric logs."""

from __future__ import annotations

import json
import math
import random
import shutil
from pathlib import Path
from typing import Any

import torch

from thinkforge.errors import ThinkforgeError
from thinkforge.model.io import save_model
from thinkforge.utils import append_jsonl, atomic_dir, atomic_write_json, atomic_write_text, read_jsonl


def cosine_lr(step: int, total: int, peak: float, warmup: int, min_ratio: float = 0.1) -> float:
    """Linear warmup to `peak`, then cosine decay to `min_ratio * peak` at `total`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float,
                   betas: tuple[float, float] = (0.9, 0.95)) -> torch.optim.Optimizer:
    """AdamW; no weight decay on norms and biases (1-D parameters)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=False)


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(out_dir: Path, model: Any, tokenizer: Any, optimizer: torch.optim.Optimizer,
                    trainer_state: dict[str, Any], extra_model_files: dict[str, str] | None = None) -> Path:
    """`out_dir/checkpoint/`: an HF model dir plus `trainer.pt` (optimizer, RNG, step, data position).
    Written to a temp dir and renamed, so a kill mid-save leaves the previous checkpoint intact."""
    final = out_dir / "checkpoint"
    with atomic_dir(final) as tmp:
        save_model(model, tokenizer, tmp / "model", extra=extra_model_files)
        torch.save({"optimizer": optimizer.state_dict(), "rng": rng_state(), "state": trainer_state}, tmp / "trainer.pt")
    return final


def load_checkpoint(out_dir: Path, model: Any, optimizer: torch.optim.Optimizer) -> dict[str, Any] | None:
    """Restores model weights, optimizer and RNG from `out_dir/checkpoint`; returns the trainer state."""
    ckpt = out_dir / "checkpoint"
    if not (ckpt / "trainer.pt").exists():
        return None
    from safetensors.torch import load_file

    weights = load_file(str(ckpt / "model" / "model.safetensors"), device=str(next(model.parameters()).device))
    missing, unexpected = model.load_state_dict(weights, strict=False)
    # Tied embeddings are saved once; anything else missing means a different architecture.
    missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise ThinkforgeError(f"{ckpt}: checkpoint does not match the model (missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]})")
    blob = torch.load(ckpt / "trainer.pt", map_location="cpu", weights_only=False)
    optimizer.load_state_dict(blob["optimizer"])
    set_rng_state(blob["rng"])
    return blob["state"]


def finalize(out_dir: Path, model: Any, tokenizer: Any, extra_model_files: dict[str, str] | None = None) -> Path:
    """The stage's final model at `out_dir/model` (atomic); the resumable checkpoint is removed."""
    path = save_model(model, tokenizer, out_dir / "model", extra=extra_model_files)
    shutil.rmtree(out_dir / "checkpoint", ignore_errors=True)
    return path


def trim_steps(path: Path, step: int) -> None:
    """On resume: drops a step-keyed jsonl log's rows past the checkpoint (steps that will run again, so
    they are not logged twice) and a torn last line."""
    if not path.exists():
        return
    rows = read_jsonl(path, tolerate_partial_last_line=True)
    keep = [r for r in rows if r.get("step", 0) <= step]
    if len(keep) != len(rows) or not path.read_text().endswith("\n"):
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in keep))


class MetricLog:
    """Append-only jsonl metrics (+ tensorboard when available). `resume_step`: the checkpoint's step; rows
    and tensorboard events past it (from the interrupted run) are dropped, so each step appears once."""

    def __init__(self, out_dir: Path, tensorboard: bool = True, resume_step: int = 0) -> None:
        self.path = out_dir / "metrics.jsonl"
        trim_steps(self.path, resume_step)
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(out_dir / "tb"), purge_step=resume_step + 1)
            except ImportError:
                self.writer = None

    def log(self, step: int, **values: float) -> None:
        append_jsonl(self.path, {"step": step, **values})
        if self.writer is not None:
            for key, value in values.items():
                if isinstance(value, int | float):
                    self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def write_stage_summary(out_dir: Path, summary: dict[str, Any]) -> None:
    atomic_write_json(out_dir / "summary.json", summary)

"""MiMo's MTP-extension recipe (`thinkforge mtp-extend`): more draft layers from one trained MTP layer.

Step 1 copies MTP layer 0 into layers 1..k-1 (`thinkforge.model.mtp.extend_mtp_layers`); step 2 trains the
copies with the main model and layer 0 frozen, on the MTP loss of layers 1.. only. The layer definitions
and losses live in `thinkforge.model.mtp`; this module is the trainer around them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from thinkforge.errors import ThinkforgeError
from thinkforge.model.mtp import (
    CONFIG_KEY,
    extend_mtp_layers,
    freeze_for_extension,
    freeze_mtp,
    mtp_lm_loss,
    num_mtp_layers,
)
from thinkforge.train.common import MetricLog, cosine_lr, finalize, make_optimizer, write_stage_summary
from thinkforge.train.pretrain import PretrainConfig, TokenStream, stage_documents


@dataclass
class MTPExtendConfig:
    """MiMo's recipe for more draft tokens: copy MTP layer 0 into layers 1..k-1, then train those with
    the main model and layer 0 frozen (MTP loss of layers 1.. only)."""

    model: str = ""
    out_dir: str = "runs/mtp-extend"
    layers: int = 3
    steps: int = 200
    batch_size: int = 16
    seq_len: int = 128
    lr: float = 1e-3
    warmup_steps: int = 10
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    tasks: list[str] = field(default_factory=lambda: ["arith", "code"])
    docs: int = 4000  # task documents (problem + worked solution), as in pretraining
    data: str | None = None  # or a jsonl of {"text": ...} / {"messages": [...]} rows
    seed: int = 0
    device: str = "auto"
    dtype: str = "float32"


def _extend_documents(cfg: MTPExtendConfig, tokenizer: Any) -> list[str]:
    from thinkforge.utils import read_jsonl

    if cfg.data is None:
        pcfg = PretrainConfig(tasks=list(cfg.tasks), task_weights=[1.0] * len(cfg.tasks), docs_per_stage=cfg.docs,
                              seed=cfg.seed)
        return stage_documents(pcfg, {"name": "mtp-extend", "max_difficulty": 3})
    docs = []
    for i, row in enumerate(read_jsonl(cfg.data)):
        if isinstance(row.get("text"), str):
            docs.append(row["text"])
        elif isinstance(row.get("messages"), list):
            docs.append(tokenizer.apply_chat_template(row["messages"], tokenize=False))
        else:
            raise ThinkforgeError(f"{cfg.data}: row {i + 1} has neither a 'text' string nor a 'messages' list")
    return docs


def mtp_extend(cfg: MTPExtendConfig, progress: Any = None) -> dict[str, Any]:
    """Runs the extension recipe; the model with `cfg.layers` MTP layers is saved to `out_dir/model`."""
    from thinkforge.model.io import load_model, resolve_device, resolve_dtype
    from thinkforge.utils import asdict, ensure_writable_dir, run_metadata, seed_everything

    if cfg.layers < 2:
        raise ThinkforgeError(f"--layers must be >= 2 (layer 0 is the trained one it copies), got {cfg.layers}")
    if cfg.steps < 1:
        raise ThinkforgeError(f"--steps must be >= 1, got {cfg.steps}")
    out_dir = ensure_writable_dir(cfg.out_dir)
    seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    model, tokenizer = load_model(cfg.model, device=device, dtype=resolve_dtype(cfg.dtype, device))
    if not num_mtp_layers(model):
        raise ThinkforgeError(f"model {cfg.model}: no MTP layers to extend (config {CONFIG_KEY} is 0 or missing); "
                              "pretrain with mtp_layers=1 first")
    extend_mtp_layers(model, cfg.layers)
    freeze_for_extension(model)
    model.train()
    optimizer = make_optimizer(model, cfg.lr, cfg.weight_decay)
    stream = TokenStream(_extend_documents(cfg, tokenizer), tokenizer, cfg.seq_len)
    log = MetricLog(out_dir, tensorboard=False)
    trainable = [p for p in model.parameters() if p.requires_grad]
    t0 = time.time()
    task = progress.add_task("mtp-extend", total=cfg.steps) if progress else None
    extras: dict[str, float] = {}
    for step in range(cfg.steps):
        lr = cosine_lr(step, cfg.steps, cfg.lr, cfg.warmup_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        tokens = stream.batch(cfg.batch_size, cfg.seed, step).to(device)
        loss, extras = mtp_lm_loss(model, tokens[:, :-1], tokens[:, 1:], weight=1.0,
                                   train_layers=list(range(1, cfg.layers)), include_main=False)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        log.log(step + 1, loss=loss.item(), lr=lr, **extras)
        if progress:
            progress.update(task, advance=1, description=f"mtp-extend loss {loss.item():.3f}")
    log.close()
    freeze_mtp(model, frozen=False)
    for p in model.parameters():
        p.requires_grad_(True)
    path = finalize(out_dir, model.eval(), tokenizer)
    summary = {"stage": "mtp-extend", "model_dir": str(path), "layers": cfg.layers, "steps": cfg.steps,
               "final": extras, "wall_s": time.time() - t0, **run_metadata(asdict(cfg), cfg.seed)}
    write_stage_summary(out_dir, summary)
    return summary

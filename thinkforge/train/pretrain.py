"""Pretraining: causal-LM training on a task-generated corpus in stages of rising difficulty.

MiMo-7B pretrains in three stages, raising the share of reasoning-dense data each time. Here the
stages draw documents (problem + worked solution) from the tasks' *train* splits with a growing
maximum difficulty. Without `model`, a byte-level BPE tokenizer is trained on the corpus and a tiny
Qwen2 is created from config; with `model` (an HF path or hub id) the same loop continues
pretraining a real checkpoint. Batches are a pure function of (seed, step), so resume is exact.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from thinkforge.errors import ThinkforgeError
from thinkforge.train.common import (
    MetricLog,
    cosine_lr,
    finalize,
    load_checkpoint,
    make_optimizer,
    save_checkpoint,
    write_stage_summary,
)
from thinkforge.utils import asdict, ensure_writable_dir, run_metadata, seed_everything


def _default_stages() -> list[dict[str, Any]]:
    return [
        {"name": "stage1", "fraction": 0.4, "max_difficulty": 1},
        {"name": "stage2", "fraction": 0.35, "max_difficulty": 2},
        {"name": "stage3", "fraction": 0.25, "max_difficulty": 3},
    ]


@dataclass
class PretrainConfig:
    out_dir: str = "runs/pretrain"
    model: str | None = None  # HF dir / hub id to continue from; None = tiny Qwen2 from scratch
    model_size: str = "tiny"  # preset in thinkforge.model.tiny.PRESETS (only without `model`)
    vocab_size: int = 512
    tasks: list[str] = field(default_factory=lambda: ["arith", "code"])
    task_weights: list[float] = field(default_factory=lambda: [0.7, 0.3])
    stages: list[dict] = field(default_factory=_default_stages)
    docs_per_stage: int = 20000
    steps: int = 1500
    batch_size: int = 32
    grad_accum: int = 1
    seq_len: int = 256
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_every: int = 250
    eval_docs: int = 256
    save_every: int = 500
    seed: int = 0
    device: str = "auto"
    dtype: str = "float32"
    mtp_layers: int = 0  # MiMo multi-token prediction layers trained alongside (thinkforge.model.mtp)
    mtp_weight: float = 0.3


def document(problem: Any) -> str:
    return f"{problem.prompt}\n{problem.solution}"


def stage_documents(cfg: PretrainConfig, stage: dict[str, Any], split: str = "train") -> list[str]:
    """A deterministic mixture of task documents up to the stage's maximum difficulty."""
    from thinkforge.tasks import get_task

    tasks = [get_task(name) for name in cfg.tasks]  # unknown names fail first, with the list of known ones
    if len(cfg.task_weights) != len(cfg.tasks):
        raise ThinkforgeError(f"pretrain: {len(cfg.tasks)} tasks but {len(cfg.task_weights)} task_weights")
    total = cfg.docs_per_stage if split == "train" else cfg.eval_docs
    docs: list[str] = []
    weight_sum = sum(cfg.task_weights)
    for task, weight in zip(tasks, cfg.task_weights, strict=True):
        count = int(round(total * weight / weight_sum))
        levels = list(range(1, int(stage.get("max_difficulty", 3)) + 1))
        for level in levels:
            probs = task.problems(split, n=count // len(levels), seed=cfg.seed, difficulty=level)
            docs.extend(document(p) for p in probs)
    random.Random(f"{cfg.seed}/{stage.get('name')}/{split}").shuffle(docs)
    return docs


def document_separator(tokenizer: Any) -> int:
    """The token between documents: the pad token (<|endoftext|> in thinkforge's and Qwen's tokenizers),
    else EOS (GPT-2 and Llama tokenizers have no pad token; their EOS is the document end)."""
    for name in ("pad_token_id", "eos_token_id"):
        token_id = getattr(tokenizer, name, None)
        if isinstance(token_id, int):
            return token_id
    raise ThinkforgeError("the tokenizer has neither a pad nor an eos token to separate training documents; "
                          "set one (tokenizer.eos_token) in the checkpoint's tokenizer_config.json")


class TokenStream:
    """Documents tokenized and joined with a separator token; batches are random windows chosen by (seed, step)."""

    def __init__(self, docs: list[str], tokenizer: Any, seq_len: int) -> None:
        separator = document_separator(tokenizer)
        ids: list[int] = []
        for row in tokenizer(docs, add_special_tokens=False)["input_ids"]:
            ids.extend(row)
            ids.append(separator)
        if len(ids) <= seq_len + 1:
            raise ThinkforgeError(f"pretrain corpus too small ({len(ids)} tokens) for seq_len {seq_len}")
        self.ids = torch.tensor(ids, dtype=torch.long)
        self.seq_len = seq_len

    def batch(self, batch_size: int, seed: int, step: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed * 1_000_003 + step)
        starts = torch.randint(0, len(self.ids) - self.seq_len - 1, (batch_size,), generator=g)
        return torch.stack([self.ids[s: s + self.seq_len + 1] for s in starts.tolist()])

    def sequential(self, batch_size: int) -> list[torch.Tensor]:
        n = (len(self.ids) - 1) // self.seq_len
        rows = [self.ids[i * self.seq_len: i * self.seq_len + self.seq_len + 1] for i in range(n)]
        rows = [r for r in rows if len(r) == self.seq_len + 1]
        return [torch.stack(rows[i: i + batch_size]) for i in range(0, len(rows), batch_size)]


def lm_loss(model: Any, tokens: torch.Tensor, cfg: PretrainConfig, step: int) -> tuple[torch.Tensor, dict[str, float]]:
    """Next-token loss (+ weighted MTP loss when the model carries MTP layers)."""
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    if cfg.mtp_layers:
        from thinkforge.model.mtp import mtp_lm_loss

        return mtp_lm_loss(model, inputs, labels, weight=cfg.mtp_weight, step=step, total_steps=cfg.steps)
    logits = model(input_ids=inputs).logits
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())
    return loss, {}


@torch.no_grad()
def heldout_loss(model: Any, batches: list[torch.Tensor], cfg: PretrainConfig, device: str) -> float:
    model.eval()
    losses = []
    for b in batches:
        loss, extras = lm_loss(model, b.to(device), cfg, 0)
        losses.append(extras.get("lm_loss", loss.item()))  # the main model's loss, without the MTP term
    model.train()
    return sum(losses) / max(len(losses), 1)


def build_model(cfg: PretrainConfig, device: str, dtype: Any) -> tuple[Any, Any]:
    from thinkforge.model.io import load_model
    from thinkforge.model.tiny import PRESETS, build_tiny_model
    from thinkforge.model.tokenizer import train_tokenizer

    if cfg.model:
        model, tokenizer = load_model(cfg.model, device=device, dtype=dtype)  # attaches saved MTP layers
        if cfg.mtp_layers:
            from thinkforge.model.mtp import add_mtp_layers, num_mtp_layers

            if num_mtp_layers(model) != cfg.mtp_layers:
                add_mtp_layers(model, cfg.mtp_layers)
        return model.train(), tokenizer
    if cfg.model_size not in PRESETS:
        raise ThinkforgeError(f"unknown model_size {cfg.model_size!r}; known: {', '.join(PRESETS)}")
    texts = [doc for stage in cfg.stages for doc in stage_documents(cfg, stage)[:2000]]
    chat = [f"<|im_start|>{role}\n" for role in ("system", "user", "assistant")] * 200
    tokenizer = train_tokenizer(texts + chat, vocab_size=cfg.vocab_size)
    model = build_tiny_model(tokenizer, PRESETS[cfg.model_size], seed=cfg.seed)
    if cfg.mtp_layers:
        from thinkforge.model.mtp import add_mtp_layers

        add_mtp_layers(model, cfg.mtp_layers)
    return model.to(device=device, dtype=dtype).train(), tokenizer


def pretrain(cfg: PretrainConfig, progress: Any = None) -> dict[str, Any]:
    """Runs (or resumes) pretraining; returns the stage summary. Final model in `out_dir/model`."""
    from thinkforge.model.io import resolve_device, resolve_dtype

    out_dir = ensure_writable_dir(cfg.out_dir)
    seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    if abs(sum(s["fraction"] for s in cfg.stages) - 1.0) > 1e-6:
        raise ThinkforgeError("pretrain: stage fractions must sum to 1")
    model, tokenizer = build_model(cfg, device, dtype)
    optimizer = make_optimizer(model, cfg.lr, cfg.weight_decay)
    state = load_checkpoint(out_dir, model, optimizer) or {"step": 0, "tokens": 0, "elapsed": 0.0}
    log = MetricLog(out_dir, resume_step=state["step"])

    # Stage boundaries in steps; each stage's corpus is built when the run enters it.
    bounds, start = [], 0
    for stage in cfg.stages:
        end = start + int(round(stage["fraction"] * cfg.steps))
        bounds.append((stage, start, end))
        start = end
    bounds[-1] = (bounds[-1][0], bounds[-1][1], cfg.steps)
    eval_batches = TokenStream(stage_documents(cfg, cfg.stages[-1], "heldout"), tokenizer,
                               cfg.seq_len).sequential(cfg.batch_size)

    model.train()
    t0 = time.time() - state["elapsed"]
    task = progress.add_task("pretrain", total=cfg.steps, completed=state["step"]) if progress else None
    history: list[dict[str, float]] = []
    for stage, _lo, hi in bounds:
        if state["step"] >= hi:
            continue
        stream = TokenStream(stage_documents(cfg, stage), tokenizer, cfg.seq_len)
        while state["step"] < hi:
            step = state["step"]
            lr = cosine_lr(step, cfg.steps, cfg.lr, cfg.warmup_steps, cfg.min_lr_ratio)
            for group in optimizer.param_groups:
                group["lr"] = lr
            extras: dict[str, float] = {}
            total = 0.0
            for micro in range(cfg.grad_accum):
                tokens = stream.batch(cfg.batch_size, cfg.seed, step * cfg.grad_accum + micro).to(device)
                loss, extras = lm_loss(model, tokens, cfg, step)
                (loss / cfg.grad_accum).backward()
                total += loss.item() / cfg.grad_accum
                state["tokens"] += tokens[:, :-1].numel()
            if not math.isfinite(total):
                raise ThinkforgeError(f"pretrain: loss is {total} at step {step}; last good checkpoint kept in {out_dir}")
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip).item()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            state["step"] += 1
            row = {"loss": total, "lr": lr, "grad_norm": grad_norm, "stage": stage["name"], "tokens": state["tokens"], **extras}
            if state["step"] % cfg.eval_every == 0 or state["step"] == cfg.steps:
                row["heldout_loss"] = heldout_loss(model, eval_batches, cfg, device)
            log.log(state["step"], **row)
            history.append({"step": state["step"], **{k: v for k, v in row.items() if k != "stage"}})
            if progress:
                progress.update(task, advance=1, description=f"pretrain {stage['name']} loss {total:.3f}")
            if state["step"] % cfg.save_every == 0 and state["step"] < cfg.steps:
                state["elapsed"] = time.time() - t0
                save_checkpoint(out_dir, model, tokenizer, optimizer, state)
    log.close()
    final_loss = heldout_loss(model, eval_batches, cfg, device)
    path = finalize(out_dir, model, tokenizer)
    n_params = sum(p.numel() for p in model.parameters())
    summary = {
        "stage": "pretrain", "model_dir": str(path), "steps": cfg.steps, "tokens": state["tokens"],
        "params": n_params, "heldout_loss": final_loss, "wall_s": time.time() - t0,
        **run_metadata(asdict(cfg), cfg.seed),
    }
    write_stage_summary(out_dir, summary)
    return summary

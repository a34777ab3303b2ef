"""MiMo's MTP-extension recipe (`thinkforge mtp-extend`): more draft layers from one trained MTP layer.

Step 1 copies MTP layer 0 into layers 1..k-1 (`thinkforge.model.mtp.extend_mtp_layers`); step 2 trains the
copies with the main model and layer 0 frozen, on the MTP loss of layers 1.. only. The layer definitions
and losses live in `thinkforge.model.mtp`; this module is the trainer around them.

The self-distillation variant (`target="self"`, `train_first=True`, `generate=N`) trains every MTP layer,
layer 0 included, towards the frozen main model's own next-token distribution on the model's own answers
to N train prompts, as EAGLE and Medusa-2 train their drafts: speculative decoding accepts a draft when it
matches the main model, not the corpus. On the `mtp-bench` model it raised k=3 acceptance per position
from 0.85 / 0.67 / 0.48 to 0.90 / 0.78 / 0.66 (`benchmarks/results/mtp_extend_recipes.txt`).
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
    mtp_self_distill_loss,
    num_mtp_layers,
)
from thinkforge.train.common import MetricLog, cosine_lr, finalize, make_optimizer, write_stage_summary
from thinkforge.train.pretrain import PretrainConfig, TokenStream, stage_documents


@dataclass
class MTPExtendConfig:
    """MiMo's recipe for more draft tokens: copy MTP layer 0 into layers 1..k-1, then train those with
    the main model and layer 0 frozen (MTP loss of layers 1.. only). `target="self"`, `train_first=True`
    and `generate=N` make it the self-distillation variant (module docstring)."""

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
    # "data": MiMo's recipe, the documents' next tokens. "self": the frozen main model's own next-token
    # distribution (Medusa-2 / EAGLE self-distillation), which is what the verifier accepts drafts against.
    target: str = "data"
    train_first: bool = False  # also train MTP layer 0 (MiMo freezes it; only sensible with target "self")
    # > 0: the documents are instead the model's own answers to this many train prompts of `tasks` (chat
    # template, `generate_tokens` each): the text a deployed model drafts on. The prompts are split evenly
    # over `generate_temperatures` (on mtp-bench, half greedy / half T=1 answers left T=1 acceptance where
    # greedy answers alone put it).
    generate: int = 0
    generate_tokens: int = 128
    generate_temperatures: list[float] = field(default_factory=lambda: [0.0])
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


def _self_generated_documents(cfg: MTPExtendConfig, model: Any, tokenizer: Any) -> list[str]:
    """Prompt + the model's own continuation for `cfg.generate` train prompts, the tasks taking turns
    (EAGLE / Medusa-2 train draft heads on the target model's outputs, not on a corpus)."""
    from thinkforge.engine.backends import apply_chat_template
    from thinkforge.engine.base import SamplingParams
    from thinkforge.engine.native import LLMEngine
    from thinkforge.tasks import get_task

    per_task = -(-cfg.generate // len(cfg.tasks))
    problems = {t: get_task(t).problems("train", n=per_task, seed=cfg.seed) for t in cfg.tasks}
    prompts = [apply_chat_template(tokenizer, get_task(t).messages(problems[t][i]))
               for i in range(per_task) for t in cfg.tasks][: cfg.generate]
    engine = LLMEngine(model.eval(), tokenizer, max_batch_size=128)
    docs: list[str] = []
    m = len(cfg.generate_temperatures)
    for j, temperature in enumerate(cfg.generate_temperatures):  # contiguous slices: both tasks in each
        part = prompts[j * len(prompts) // m:(j + 1) * len(prompts) // m]
        params = SamplingParams(temperature=temperature, max_tokens=cfg.generate_tokens, seed=cfg.seed + j)
        outs = engine.generate([tokenizer(p, add_special_tokens=False)["input_ids"] for p in part], params)
        docs += [p + tokenizer.decode(o[0].token_ids) for p, o in zip(part, outs, strict=True)]
    return docs


def mtp_extend(cfg: MTPExtendConfig, progress: Any = None) -> dict[str, Any]:
    """Runs the extension recipe; the model with `cfg.layers` MTP layers is saved to `out_dir/model`."""
    from thinkforge.model.io import load_model, resolve_device, resolve_dtype
    from thinkforge.utils import asdict, ensure_writable_dir, run_metadata, seed_everything

    if cfg.layers < 2:
        raise ThinkforgeError(f"--layers must be >= 2 (layer 0 is the trained one it copies), got {cfg.layers}")
    if cfg.steps < 1:
        raise ThinkforgeError(f"--steps must be >= 1, got {cfg.steps}")
    if cfg.target not in ("data", "self"):
        raise ThinkforgeError(f"mtp-extend: target must be 'data' or 'self', got {cfg.target!r}")
    if cfg.generate and cfg.data:
        raise ThinkforgeError("mtp-extend: give either data (a jsonl) or generate (self-generated documents), not both")
    if cfg.generate and not cfg.generate_temperatures:
        raise ThinkforgeError("mtp-extend: generate_temperatures is empty")
    out_dir = ensure_writable_dir(cfg.out_dir)
    seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    model, tokenizer = load_model(cfg.model, device=device, dtype=resolve_dtype(cfg.dtype, device))
    if not num_mtp_layers(model):
        raise ThinkforgeError(f"model {cfg.model}: no MTP layers to extend (config {CONFIG_KEY} is 0 or missing); "
                              "pretrain with mtp_layers=1 first")
    t0 = time.time()
    docs = _self_generated_documents(cfg, model, tokenizer) if cfg.generate else _extend_documents(cfg, tokenizer)
    generate_s = time.time() - t0 if cfg.generate else 0.0
    extend_mtp_layers(model, cfg.layers)
    first = 0 if cfg.train_first else 1
    freeze_for_extension(model, first)
    train_layers = list(range(first, cfg.layers))
    model.train()
    optimizer = make_optimizer(model, cfg.lr, cfg.weight_decay)
    stream = TokenStream(docs, tokenizer, cfg.seq_len)
    log = MetricLog(out_dir, tensorboard=False)
    trainable = [p for p in model.parameters() if p.requires_grad]
    task = progress.add_task("mtp-extend", total=cfg.steps) if progress else None
    extras: dict[str, float] = {}
    for step in range(cfg.steps):
        lr = cosine_lr(step, cfg.steps, cfg.lr, cfg.warmup_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        tokens = stream.batch(cfg.batch_size, cfg.seed, step).to(device)
        if cfg.target == "self":
            loss, extras = mtp_self_distill_loss(model, tokens, train_layers=train_layers)
        else:
            loss, extras = mtp_lm_loss(model, tokens[:, :-1], tokens[:, 1:], weight=1.0, train_layers=train_layers,
                                       include_main=False)
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
               "final": extras, "generate_s": generate_s, "wall_s": time.time() - t0,
               **run_metadata(asdict(cfg), cfg.seed)}
    write_stage_summary(out_dir, summary)
    return summary

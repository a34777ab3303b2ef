"""Rejection-sampling fine-tuning (RFT / STaR): the baseline every RL claim owes a reviewer.

The model samples answers to train problems, the task's verifier keeps the correct ones, and the model is
fine-tuned on its own verified samples. Given the same number of completions RL drew, RFT asks whether
RL's gain needs the policy gradient at all, or only the filter. It is built from the recipe's own parts:
`thinkforge distill` with the model as its own teacher, `thinkforge curate` (verify, dedupe, at most
`max_per_problem` distinct samples per problem), then `thinkforge sft` from the same model.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from thinkforge.errors import ThinkforgeError
from thinkforge.utils import asdict, atomic_write_json, atomic_write_text, run_metadata


@dataclass
class RFTConfig:
    model: str = ""
    tasks: list[str] = field(default_factory=lambda: ["arith"])
    completions_per_task: dict[str, int] = field(default_factory=dict)  # the sampling budget (RL's, in a speedrun)
    samples_per_problem: int = 8
    temperature: float = 1.0
    max_tokens: int = 160
    max_per_problem: int = 8  # distinct verified samples kept per problem
    concurrency: int = 64  # prompts queued per engine call x 4: keeps the continuous batch full between calls
    near_dup_threshold: float = 0.0  # see TraceSetsConfig: templated traces are near-duplicates by design
    epochs: float = 2.0
    batch_size: int = 32
    lr: float = 3e-4
    warmup_steps: int = 5
    out_dir: str = "runs/rft"
    seed: int = 0
    device: str = "auto"


def weights_tag(model_dir: str) -> str:
    """A short digest of a checkpoint's weight files (a hub id without local files: of the id)."""
    import hashlib

    digest = hashlib.sha256()
    files = sorted(Path(model_dir).glob("*.safetensors")) if Path(model_dir).is_dir() else []
    for f in files:
        digest.update(f.read_bytes())
    if not files:
        digest.update(model_dir.encode())
    return digest.hexdigest()[:12]


def draws_for_distinct(task_name: str, distinct: int, seed: int) -> int:
    """How many train draws hold `distinct` distinct problems. Synthetic train draws repeat problems and
    distill asks each once, so asking for `distinct` draws would sample fewer completions than the budget."""
    from thinkforge.tasks import get_task

    n = distinct
    while True:
        seen: set[str] = set()
        for i, p in enumerate(get_task(task_name).problems("train", n=n, seed=seed)):  # draws are prefix-stable
            seen.add(p.id)
            if len(seen) == distinct:
                return i + 1
        n *= 2


def rft(cfg: RFTConfig, progress: Any = None) -> dict[str, Any]:
    from thinkforge.data.curate import CurateConfig, curate, stats_path
    from thinkforge.data.distill import DistillConfig, distill
    from thinkforge.train.sft import SFTConfig, sft

    if not cfg.model:
        raise ThinkforgeError("rft: no model to sample from")
    missing = [t for t in cfg.tasks if cfg.completions_per_task.get(t, 0) < 1]
    if missing:
        raise ThinkforgeError(f"rft: completions_per_task has no budget for {', '.join(missing)}")
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    drawn = 0
    # Samples are named by the weights they came from: a retrained model in the same directory never resumes
    # into the previous model's samples.
    tag = weights_tag(cfg.model)
    for task in cfg.tasks:  # one distill file per task: each task has its own budget
        limit = draws_for_distinct(task, math.ceil(cfg.completions_per_task[task] / cfg.samples_per_problem),
                                   cfg.seed + 1)
        dist = distill(DistillConfig(teacher=cfg.model, backend="native", tasks=[task], n=cfg.samples_per_problem,
                                     out=str(out / f"samples-{task}-{tag}.jsonl"), split="train", limit=limit,
                                     temperature=cfg.temperature, max_tokens=cfg.max_tokens, seed=cfg.seed + 1,
                                     concurrency=cfg.concurrency, device=cfg.device, dtype="float32"), progress)
        drawn += dist["totals"]["rows"]
    merged = out / "samples.jsonl"
    atomic_write_text(merged, "".join((out / f"samples-{t}-{tag}.jsonl").read_text() for t in cfg.tasks))
    try:
        stats = curate(CurateConfig(traces=str(merged), out=str(out / "verified.jsonl"),
                                    max_per_problem=cfg.max_per_problem, near_dup_threshold=cfg.near_dup_threshold,
                                    seed=cfg.seed))
    except ThinkforgeError:
        stats = json.loads(stats_path(out / "verified.jsonl").read_text()) if stats_path(out / "verified.jsonl").exists() else {}
        if stats.get("kept") != 0:
            raise
        # Not one verified sample: there is nothing to fine-tune on, and the row is the model itself.
        warnings.warn(f"rft: none of {drawn} samples verified; the RFT row is its starting model", RuntimeWarning,
                      stacklevel=2)
        result = {"stage": "rft", "model_dir": cfg.model, "steps": 0, "tokens": 0, "wall_s": time.time() - t0,
                  "completions": drawn, "kept": 0, "verified_share": 0.0, "dropped": stats.get("dropped"),
                  **run_metadata(asdict(cfg), cfg.seed)}
        atomic_write_json(out / "summary.json", result)
        return result
    kept = stats["kept"]
    steps = max(1, math.ceil(kept * cfg.epochs / cfg.batch_size))
    summary = sft(SFTConfig(model=cfg.model, data=str(out / "verified.jsonl"), out_dir=str(out / "sft"), steps=steps,
                            batch_size=cfg.batch_size, lr=cfg.lr, warmup_steps=min(cfg.warmup_steps, steps - 1),
                            eval_examples=0, eval_every=10**9, save_every=10**9, seed=cfg.seed, device=cfg.device,
                            tasks=list(cfg.tasks)), progress)
    result = {**summary, "stage": "rft", "wall_s": time.time() - t0, "completions": drawn, "kept": kept,
              "budget": sum(cfg.completions_per_task[t] for t in cfg.tasks),
              "verified_share": round(kept / max(drawn, 1), 4), "dropped": stats.get("dropped"),
              **run_metadata(asdict(cfg), cfg.seed)}
    atomic_write_json(out / "summary.json", result)
    return result

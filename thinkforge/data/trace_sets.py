"""Verified teacher-trace sets of fixed sizes, made the Sky-T1 way: distill -> curate -> the first N per task.

Verified traces are the scarce, expensive input (Sky-T1 paid for 17K of them), so the speedrun's SFT rows
say exactly how many they learned from. This stage asks a teacher (an OpenAI-compatible URL, or a local
checkpoint through the same `thinkforge distill` code) for solutions to train problems, keeps what the
task's verifier accepts (`thinkforge curate`: verify, drop truncated, dedupe, decontaminate against the
tasks' held-out sets), and writes nested sets: the N-trace set is the first N of the 10N-trace one, so the
"how many traces is RL worth" comparison differs only in the count.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from thinkforge.errors import ThinkforgeError
from thinkforge.utils import atomic_write_json, atomic_write_text


@dataclass
class TraceSetsConfig:
    teacher: str = ""  # checkpoint dir / hub id (native engine) or an OpenAI-compatible base URL
    tasks: list[str] = field(default_factory=lambda: ["arith"])
    sizes: list[int] = field(default_factory=lambda: [100, 1000])  # verified traces per task in each set
    problems_per_task: int = 1500  # train problems asked; must leave >= max(sizes) verified per task
    samples: int = 1  # teacher samples per problem (curate keeps at most one per problem)
    temperature: float = 0.7
    max_tokens: int = 160
    concurrency: int = 16
    # Templated synthetic traces of different problems differ in a few numbers, which MinHash near-duplicate
    # removal would take for copies; exact dedupe still runs. Real traces: set 0.9 (curate's default).
    near_dup_threshold: float = 0.0
    decontam: bool = True  # drop traces sharing a 16-gram with the tasks' held-out problems
    api_key: str | None = None
    out_dir: str = "runs/traces"
    seed: int = 0
    device: str = "auto"


def build_trace_sets(cfg: TraceSetsConfig, progress: Any = None) -> dict[str, Any]:
    from thinkforge.data.curate import CurateConfig, curate
    from thinkforge.data.distill import DistillConfig, distill

    if not cfg.teacher:
        raise ThinkforgeError("traces: no teacher (a checkpoint directory or an OpenAI-compatible URL)")
    if not cfg.sizes or min(cfg.sizes) < 1:
        raise ThinkforgeError(f"traces: sizes must be positive counts, got {cfg.sizes}")
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    # Resumable: distill appends rows and on a rerun asks only for the missing ones.
    dist = distill(DistillConfig(teacher=cfg.teacher, tasks=list(cfg.tasks), n=cfg.samples, out=str(out / "teacher.jsonl"),
                                 split="train", limit=cfg.problems_per_task, concurrency=cfg.concurrency,
                                 temperature=cfg.temperature, max_tokens=cfg.max_tokens, seed=cfg.seed,
                                 api_key=cfg.api_key, device=cfg.device, dtype="float32"), progress)
    if not dist["complete"]:
        raise ThinkforgeError(f"traces: the teacher left {dist['jobs'] - dist['totals'].get('rows', 0)} of {dist['jobs']} "
                              f"requests unanswered (see {out / 'teacher.summary.json'}); rerun to retry them")
    stats = curate(CurateConfig(traces=str(out / "teacher.jsonl"), out=str(out / "verified.jsonl"), max_per_problem=1,
                                decontam=list(cfg.tasks) if cfg.decontam else [], near_dup_threshold=cfg.near_dup_threshold,
                                seed=cfg.seed))
    verified = [json.loads(line) for line in (out / "verified.jsonl").read_text().splitlines() if line.strip()]
    by_task: dict[str, list[dict[str, Any]]] = {t: [] for t in cfg.tasks}
    # Curate writes rows sorted by problem id, and ids lead with the difficulty ("arith/L1/..."): the first N
    # would all be the easiest level. A seeded hash of the id is a fixed order that is blind to difficulty.
    verified.sort(key=lambda r: hashlib.sha256(f"{cfg.seed}:{r['problem_id']}".encode()).hexdigest())
    for row in verified:
        by_task.setdefault(row["task"], []).append(row)
    files: dict[str, str] = {}
    for size in sorted(set(cfg.sizes)):
        for task, rows in by_task.items():
            if len(rows) < size:
                raise ThinkforgeError(
                    f"traces: the teacher gave {len(rows)} verified {task} traces for {cfg.problems_per_task} problems, "
                    f"fewer than the {size} asked (raise traces.problems_per_task; curate stats in "
                    f"{out / 'verified.stats.json'})")
        path = out / f"sft-{size}.jsonl"
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for rows in by_task.values() for r in rows[:size]))
        files[str(size)] = str(path)
    asked = dict.fromkeys(cfg.tasks, 0)  # teacher samples per task
    for line in (out / "teacher.jsonl").read_text().splitlines():
        if line.strip():
            task = json.loads(line)["task"]
            asked[task] = asked.get(task, 0) + 1
    summary = {
        "stage": "traces", "model_dir": str(out), "teacher": cfg.teacher, "files": files, "wall_s": time.time() - t0, "steps": 0,
        "tokens": dist["totals"].get("completion_tokens", 0),
        "traces": {t: {"asked": asked.get(t, 0), "verified": len(v)} for t, v in by_task.items()},
        # share of the teacher's samples kept: the verifier's pass rate, less duplicates and contamination
        "teacher_pass_rate": {t: round(len(v) / max(asked.get(t, 0), 1), 4) for t, v in by_task.items()},
        "dropped": stats.get("dropped"),
    }
    atomic_write_json(out / "summary.json", summary)
    return summary

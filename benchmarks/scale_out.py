"""Scale-out, side by side on the speedrun's RL workload: one process vs the same controller with roles on
a local Ray cluster. Same checkpoint, recipe (rl-speedrun), seed and steps for every row; every layout
selects the same groups (the rollout picks them in slot order), so only time differs.

    python benchmarks/scale_out.py --model runs/speedrun-cpu/sft/model --steps 4

Rows: `single process` (engine, reward threads and trainer in one process), `ray: rewards on CPU actors`
(the engine stays in the driver's layout -- one rollout actor -- and every reward is scored on its own CPU
actor, MiMo's layout), `ray: 2 rollout + 2 reward` (the tested layout). Columns: RL steps/s (rollout + train
+ weight sync, from metrics.jsonl), the rollout's idle ratio (engine rows idle), the weight sync's seconds
per step, and Ray's overhead per step (time in the rollout fan-out outside the workers' own engine steps:
RPC, serialisation, scheduling). Writes JSON. Without --model a micro model is pretrained for a few steps
(the numbers then only show the mechanics).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

LAYOUTS = [
    ("single process", {}),
    ("ray: rewards on CPU actors", {"backend": "ray", "rollout_workers": 1, "reward_workers": 2}),
    ("ray: 2 rollout + 2 reward", {"backend": "ray", "rollout_workers": 2, "reward_workers": 2}),
]


def run_layout(args: argparse.Namespace, cluster: dict, out: Path) -> dict:
    from thinkforge.train.rl import RLConfig, rl
    from thinkforge.utils import load_config, read_jsonl

    overrides = {"model": args.model, "tasks": args.tasks.split(","), "out_dir": str(out), "steps": args.steps,
                 "device": "cpu", "seed": args.seed, "eval_problems": args.eval_problems, "save_every": 1000,
                 "cluster": {**cluster, **({"num_cpus": args.ray_cpus} if cluster else {})}}
    if args.micro:  # a random micro model solves no arith problem: a reward it can earn (tests' digit reward)
        overrides.update(rewards={"arith": "test_has_digit"}, max_tokens=24, group_size=4, overlong="none")
        overrides["cluster"]["worker_imports"] = ["tests.test_rl_support"] if cluster else []
    if args.batch_groups:
        overrides["batch_groups"] = args.batch_groups
        overrides["mini_batch_groups"] = min(args.batch_groups, 8)
    cfg = load_config(RLConfig, "rl-speedrun", "rl", overrides)
    t0 = time.perf_counter()
    rl(cfg)
    wall = time.perf_counter() - t0
    rows = [r for r in read_jsonl(out / "metrics.jsonl") if "rollout_s" in r]
    step_s = [r["rollout_s"] + r["train_s"] + r.get("weight_sync_s", 0.0) for r in rows]
    n = len(rows)
    return {
        "steps": n, "steps_per_s": n / sum(step_s), "run_wall_s": wall,
        "rollout_s": sum(r["rollout_s"] for r in rows) / n, "train_s": sum(r["train_s"] for r in rows) / n,
        "idle_ratio": sum(r["idle_ratio"] for r in rows) / n,
        "gen_idle_on_reward": sum(r["gen_idle_ratio"] for r in rows) / n,
        "weight_sync_s": sum(r.get("weight_sync_s", 0.0) for r in rows) / n,
        "ray_overhead_s": sum(r.get("ray_overhead_s", 0.0) for r in rows) / n,
        "loss": [r.get("loss") for r in rows],
        "selected": [[(g["problem"], g["rewards"]) for g in r["groups"] if g["selected"]]
                     for r in read_jsonl(out / "rollouts.jsonl")],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--tasks", default="arith,code")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--batch-groups", type=int, default=0, help="0 = the recipe's (16)")
    ap.add_argument("--eval-problems", type=int, default=10, help="final held-out eval (not timed)")
    ap.add_argument("--ray-cpus", type=int, default=6, help="logical CPUs of the local Ray cluster")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", default="/tmp/thinkforge_scale_out")
    ap.add_argument("--out", default="benchmarks/results/scale_out.json")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    args.micro = args.model is None
    if args.micro:
        from tests.test_rl_support import micro_model

        args.model = micro_model(Path("/tmp/thinkforge_bench_micro"))
        args.tasks = "arith"
    import shutil

    # Warm-up (lazy imports, first kernels, sandbox start-up), discarded: the first layout would pay for it.
    warm = argparse.Namespace(**{**vars(args), "steps": 1})
    shutil.rmtree(Path(args.work) / "warmup", ignore_errors=True)
    run_layout(warm, {}, Path(args.work) / "warmup")
    rows = {}
    for i, (name, cluster) in enumerate(LAYOUTS):
        out = Path(args.work) / f"layout{i}"
        shutil.rmtree(out, ignore_errors=True)
        rows[name] = run_layout(args, cluster, out)
        print(f"{name:>28}: {rows[name]['steps_per_s']:.3f} steps/s", flush=True)
    base = rows["single process"]
    same = all(r["selected"] == base["selected"] for r in rows.values())
    # Relative to the run's largest loss: a step whose loss is ~0 (ratio 1, mean-zero advantages) has no scale.
    scale = max((abs(a) for a in base["loss"] if a is not None), default=0.0) or 1.0
    loss_gap = max((abs(a - b) / scale for r in rows.values()
                    for a, b in zip(base["loss"], r["loss"], strict=True) if a is not None and b is not None), default=0.0)
    print(f"\n{'layout':>28} | steps/s | vs single | rollout s | train s | idle ratio | gen idle on reward | "
          "weight sync s/step | ray overhead s/step")
    for name, r in rows.items():
        print(f"{name:>28} | {r['steps_per_s']:7.3f} | {r['steps_per_s'] / base['steps_per_s']:8.2f}x | "
              f"{r['rollout_s']:9.2f} | {r['train_s']:7.2f} | {r['idle_ratio']:10.3f} | {r['gen_idle_on_reward']:18.3f} | "
              f"{r['weight_sync_s']:18.4f} | {r['ray_overhead_s']:19.3f}")
    print(f"same selected groups in every layout: {same}; largest relative loss gap vs single: {loss_gap:.2e}")
    from thinkforge.utils import atomic_write_json, run_metadata

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out, {"rows": {k: {kk: vv for kk, vv in v.items() if kk != "selected"} for k, v in rows.items()},
                            "same_selected_groups": same, "max_rel_loss_gap": loss_gap,
                            **run_metadata(vars(args), args.seed)})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

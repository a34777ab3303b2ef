"""Scale-out, side by side on the speedrun's RL workload: one process vs the same controller with roles on
a local Ray cluster. Same checkpoint, recipe (rl-speedrun), seed and steps for every row; every layout
selects the same groups (the rollout picks them in slot order), so only time differs.

    python benchmarks/scale_out.py --model runs/speedrun-cpu/sft/model --steps 4

Rows: `single process` (engine, reward threads and trainer in one process), `single process, naive rollout`
(no continuous admission, no async reward, no early termination: the baseline of MiMo's Table 2),
`fsdp2: 2 trainer ranks` (cluster.trainer_procs=2, gloo), `ray: rewards on CPU actors`
(the engine stays in the driver's layout -- one rollout actor -- and every reward is scored on its own CPU
actor, MiMo's layout), `ray: 2 rollout + 2 reward` (the tested layout). Columns: RL steps/s (rollout + train
+ weight sync, from metrics.jsonl), the rollout's idle ratio (engine rows idle), the weight sync's seconds
per step, and Ray's overhead per step (time in the rollout fan-out outside the workers' own engine steps:
RPC, serialisation, scheduling). Writes JSON. Without --model a micro model is pretrained for a few steps
(the numbers then only show the mechanics). Last, a cost model (`project`) projects the measured per-role
times to N GPUs and prints the predicted Seamless Rollout speed-up beside MiMo-7B's reported 2.29x.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

NAIVE = {"continuous": False, "async_reward": False, "early_termination": False}
LAYOUTS = [  # (name, cluster settings, rollout settings)
    ("single process", {}, {}),
    ("single process, naive rollout", {}, NAIVE),
    ("fsdp2: 2 trainer ranks", {"trainer_procs": 2}, {}),
    ("ray: rewards on CPU actors", {"backend": "ray", "rollout_workers": 1, "reward_workers": 2}, {}),
    ("ray: 2 rollout + 2 reward", {"backend": "ray", "rollout_workers": 2, "reward_workers": 2}, {}),
]
MIMO = {"gpus": 256, "overall": 2.29, "rollout": 2.61}  # MiMo-7B Table 2 (256 H20), full Seamless Rollout vs naive


def project(naive: dict, seamless: dict, ray: dict, gpus: int) -> dict:
    """Cost model: the measured per-role seconds per step, projected to `gpus` GPUs under weak scaling
    (the batch grows with the GPUs: one rollout engine per GPU keeps its share, the FSDP trainer's per-GPU
    work stays the same). What grows with N: the weight sync (a tree broadcast, log2 N + 1 hops of the
    measured one-hop time) and the controller's fan-out, bracketed by two cases: calls in parallel (the
    measured Ray overhead per step, constant in N) and calls serialised by the driver (the measured overhead
    per rollout worker, times N). The long tail, reward wait and idle time are those measured
    at N = 1 for each rollout mode, so the projection says what these overheads cost at N, not how the
    tail of a 32k-token policy grows."""
    import math

    sync = seamless["weight_sync_s"] * (math.log2(gpus) + 1)
    out = {"gpus": gpus, "rollout": naive["rollout_s"] / seamless["rollout_s"], "sync_s": sync}
    for case, fanout in (("parallel", ray["ray_overhead_s"]), ("serial", ray["ray_overhead_s"] / ray["rollout_workers"] * gpus)):
        t_naive = naive["rollout_s"] + naive["train_s"] + sync + fanout
        t_seamless = seamless["rollout_s"] + seamless["train_s"] + sync + fanout
        out[f"overall_{case}"], out[f"fanout_{case}_s"] = t_naive / t_seamless, fanout
    return out


def run_layout(args: argparse.Namespace, cluster: dict, out: Path, rollout: dict | None = None) -> dict:
    from thinkforge.train.rl import RLConfig, rl
    from thinkforge.utils import load_config, read_jsonl

    overrides = {"model": args.model, "tasks": args.tasks.split(","), "out_dir": str(out), "steps": args.steps,
                 "device": "cpu", "seed": args.seed, "eval_problems": args.eval_problems, "save_every": 1000,
                 "cluster": {**cluster, **({"num_cpus": args.ray_cpus} if cluster.get("backend") else {})},
                 **(rollout or {})}
    if args.micro:  # a random micro model solves no arith problem: a reward it can earn (tests' digit reward)
        # the digit reward with a 20 ms latency, like a sandboxed verifier: there is reward time to overlap
        overrides.update(rewards={"arith": {"name": "test_slow_digit", "delay_s": 0.02}}, max_tokens=24, group_size=4,
                         overlong="none")
        overrides["cluster"]["worker_imports"] = ["tests.test_rl_support"] if cluster.get("backend") else []
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
        "gen_s": sum(r["gen_s"] for r in rows) / n, "reward_wait_s": sum(r["reward_wait_s"] for r in rows) / n,
        "rollout_workers": cluster.get("rollout_workers", 1),
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
    ap.add_argument("--repeats", type=int, default=3, help="interleaved naive/seamless pairs for the cost model")
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
    for i, (name, cluster, rollout) in enumerate(LAYOUTS):
        out = Path(args.work) / f"layout{i}"
        shutil.rmtree(out, ignore_errors=True)
        rows[name] = run_layout(args, cluster, out, rollout)
        print(f"{name:>28}: {rows[name]['steps_per_s']:.3f} steps/s", flush=True)
    base = rows["single process"]
    # The naive rollout selects other groups (no early termination): it is compared on time only.
    same_layout = {k: v for k, v in rows.items() if k != "single process, naive rollout"}
    same = all(r["selected"] == base["selected"] for r in same_layout.values())
    # Relative to the run's largest loss: a step whose loss is ~0 (ratio 1, mean-zero advantages) has no scale.
    scale = max((abs(a) for a in base["loss"] if a is not None), default=0.0) or 1.0
    loss_gap = max((abs(a - b) / scale for r in same_layout.values()
                    for a, b in zip(base["loss"], r["loss"], strict=True) if a is not None and b is not None), default=0.0)
    print(f"\n{'layout':>28} | steps/s | vs single | rollout s | train s | idle ratio | gen idle on reward | "
          "weight sync s/step | ray overhead s/step")
    for name, r in rows.items():
        print(f"{name:>28} | {r['steps_per_s']:7.3f} | {r['steps_per_s'] / base['steps_per_s']:8.2f}x | "
              f"{r['rollout_s']:9.2f} | {r['train_s']:7.2f} | {r['idle_ratio']:10.3f} | {r['gen_idle_on_reward']:18.3f} | "
              f"{r['weight_sync_s']:18.4f} | {r['ray_overhead_s']:19.3f}")
    print(f"same selected groups in every layout (naive rollout aside): {same}; largest relative loss gap vs "
          f"single: {loss_gap:.2e}")
    # The cost model's naive-vs-seamless times: pairs run interleaved, median per role, so the shared
    # machine's load hits both modes alike.
    import statistics

    pairs: dict[str, list[dict]] = {"seamless": [], "naive": []}
    for rep_i in range(args.repeats):
        for mode, rollout in (("seamless", {}), ("naive", NAIVE)):
            out = Path(args.work) / f"pair{rep_i}_{mode}"
            shutil.rmtree(out, ignore_errors=True)
            pairs[mode].append(run_layout(args, {}, out, rollout))
    med = {m: {k: statistics.median(r[k] for r in rs) for k in ("rollout_s", "train_s", "weight_sync_s")}
           for m, rs in pairs.items()}
    ray = rows["ray: 2 rollout + 2 reward"]
    projection = [project(med["naive"], med["seamless"], ray, n) for n in (1, 8, 64, MIMO["gpus"])]
    print(f"\nnaive vs seamless, {args.repeats} interleaved pairs, median s/step: "
          + ", ".join(f"{m} rollout {v['rollout_s']:.2f} train {v['train_s']:.2f}" for m, v in med.items()))
    print("\ncost model (measured per-role s/step, weak scaling to N GPUs; see project()):")
    print(f"{'GPUs':>6} | predicted overall (parallel / serial fan-out) | predicted rollout | weight sync s/step | "
          "fan-out s/step (parallel / serial)")
    for p in projection:
        mimo = (f"   <- MiMo-7B reports {MIMO['overall']:.2f}x overall, {MIMO['rollout']:.2f}x rollout"
                if p["gpus"] == MIMO["gpus"] else "")
        print(f"{p['gpus']:>6} | {p['overall_parallel']:21.2f}x / {p['overall_serial']:.2f}x{'':14} | "
              f"{p['rollout']:16.2f}x | {p['sync_s']:18.4f} | {p['fanout_parallel_s']:.3f} / "
              f"{p['fanout_serial_s']:.3f}{mimo}")
    from thinkforge.utils import atomic_write_json, run_metadata

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out, {"rows": {k: {kk: vv for kk, vv in v.items() if kk != "selected"} for k, v in rows.items()},
                            "same_selected_groups": same, "max_rel_loss_gap": loss_gap,
                            "cost_model": projection, "cost_model_inputs": med, "mimo_reported": MIMO,
                            **run_metadata(vars(args), args.seed)})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

"""Seamless Rollout Engine ablation, as in MiMo's table: naive dynamic sampling -> +continuous rollout ->
+asynchronous reward -> +early termination. Same start checkpoint, task, group size, batch and sampling
seeds for every row; every mode selects the same groups (see `thinkforge.rollout`), so only time and waste
differ. Each row collects `--steps` rollout batches (no training: rollout is what the modes change).

    python benchmarks/rollout_ablation.py --model runs/speedrun-cpu/sft/model --task code --steps 3

Prints a table (steps/s, idle ratio, generator idle on rewards, waste, speed-up) and writes JSON.
Without --model a micro model is pretrained for a few steps (numbers then only show the mechanics).

Cores (`--cores`): MiMo generates on GPUs and computes rewards on the host CPUs, so generation and rewards
can overlap. On a CPU-only box they compete for the same cores and overlap buys nothing. `split` (the default,
needs 2+ CPUs) emulates MiMo's layout: generation runs on one core (torch 1 thread, main thread pinned), every
reward computation (and the sandboxes it starts, which inherit the pinning) on the others, in every mode
alike. `shared` lets both use every core (what a CPU-only RL run gets).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

MODES = [("naive", (False, False, False)), ("+continuous", (True, False, False)),
         ("+async reward", (True, True, False)), ("+early termination", (True, True, True))]


class PinnedReward:
    """A reward run with the calling thread pinned to `cores` (processes it starts inherit that)."""

    def __init__(self, inner: str, cores: list[int], **options: object) -> None:
        from thinkforge.rewards.base import get_reward

        self.fn, self.cores = get_reward(inner, **options), set(cores)

    def __call__(self, problem: object, response: str) -> object:
        import os

        before = os.sched_getaffinity(0)
        os.sched_setaffinity(0, self.cores)
        try:
            return self.fn(problem, response)
        finally:
            os.sched_setaffinity(0, before)


def split_cores() -> tuple[int, list[int]]:
    """(generation core, reward cores); pins this thread and torch to the generation core."""
    import os

    import torch

    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        raise SystemExit("--cores split needs at least 2 CPUs; use --cores shared")
    os.sched_setaffinity(0, {cores[0]})
    torch.set_num_threads(1)
    return cores[0], cores[1:]


def run_mode(args: argparse.Namespace, flags: tuple[bool, bool, bool]) -> dict:
    from thinkforge.engine.loading import load_model_and_tokenizer
    from thinkforge.engine.native import LLMEngine
    from thinkforge.rewards import RewardRouter
    from thinkforge.rollout import ProblemSampler, RolloutConfig, SeamlessRollout
    from thinkforge.tasks import get_task

    model, tok = load_model_and_tokenizer(args.model, args.device, "float32")
    engine = LLMEngine(model, tok, max_batch_size=args.engine_batch, seed=args.seed)
    route = {"name": args.reward, **({"mode": "soft"} if args.reward == "code_tddr" else {})}
    if args.reward_cores:
        from thinkforge.rewards.base import REWARDS

        REWARDS.setdefault("bench_pinned", PinnedReward)
        route = {"name": "bench_pinned", "inner": args.reward, "cores": args.reward_cores,
                 **{k: v for k, v in route.items() if k != "name"}}
    routes = {args.task: route}
    router = RewardRouter(routes, workers=args.reward_workers, timeout_s=60)
    cont, asy, et = flags
    task = get_task(args.task)
    rollout = SeamlessRollout(engine, router, {args.task: task}, RolloutConfig(
        group_size=args.group_size, max_tokens=args.max_tokens, temperature=1.0, continuous=cont, async_reward=asy,
        early_termination=et, max_slots_factor=args.max_slots_factor))
    sampler = ProblemSampler(task.problems("train", n=500, seed=args.seed), seed=args.seed, easy_alpha=0.0)
    totals: dict[str, float] = {}
    selected = []
    t0 = time.perf_counter()
    try:
        for _ in range(args.steps):
            draw = sampler.begin_step()
            res = rollout.collect(draw, args.batch_groups)
            sampler.commit(draw, len(res.groups), [(g.rewards, g.correct) for g in res.groups])
            selected.append([g.slot.problem.id for g in res.selected])
            for k, v in res.stats.items():
                totals[k] = totals.get(k, 0.0) + v
    finally:
        router.close()
    wall = time.perf_counter() - t0
    gen = max(totals["tokens_generated"], 1)
    return {"steps_per_s": args.steps / wall, "wall_s": wall,
            "idle_ratio": totals["idle_ratio"] / args.steps,  # mean of the per-step idle ratios
            "gen_idle_on_reward": totals["reward_wait_s"] / max(totals["rollout_s"], 1e-9),
            "waste": 1 - totals["tokens_used"] / gen, "waste_surplus": totals["waste_surplus"] / args.steps,
            "tokens_generated": int(totals["tokens_generated"]), "groups_started": int(totals["groups_started"]),
            "valid_groups": int(totals["groups_valid"]), "selected": selected}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--task", default="code")
    ap.add_argument("--reward", default="code_tddr")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch-groups", type=int, default=8)
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--engine-batch", type=int, default=64)
    ap.add_argument("--reward-workers", type=int, default=2)
    ap.add_argument("--max-slots-factor", type=float, default=8.0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cores", choices=["split", "shared"], default="split",
                    help="split: generation on one core, rewards on the others (MiMo's GPU/CPU layout)")
    ap.add_argument("--out", default="benchmarks/results/rollout_ablation.json")
    args = ap.parse_args()
    args.reward_cores = None
    if args.cores == "split":
        gen_core, args.reward_cores = split_cores()
        print(f"generation on core {gen_core}, rewards on cores {args.reward_cores}", flush=True)
    if args.model is None:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from tests.test_rl_support import micro_model

        args.model = micro_model(Path("/tmp/thinkforge_bench_micro"))
    rows = {}
    for name, flags in MODES:
        rows[name] = run_mode(args, flags)
        print(f"{name:>20}: {rows[name]['steps_per_s']:.3f} steps/s", flush=True)
    base = rows["naive"]["steps_per_s"]
    same = all(r["selected"] == rows["naive"]["selected"] for r in rows.values())
    print(f"\n{'mode':>20} | steps/s | speed-up | idle ratio | gen idle on reward | waste | tokens | groups")
    for name, r in rows.items():
        print(f"{name:>20} | {r['steps_per_s']:7.3f} | {r['steps_per_s'] / base:7.2f}x | {r['idle_ratio']:10.3f} | "
              f"{r['gen_idle_on_reward']:18.3f} | {r['waste']:5.3f} | {r['tokens_generated']:6d} | {r['groups_started']}")
    print(f"same selected groups in every mode: {same}")
    from thinkforge.utils import atomic_write_json, run_metadata

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out, {"rows": {k: {kk: vv for kk, vv in v.items() if kk != "selected"} for k, v in rows.items()},
                            "same_batches": same, "speedup": rows["+early termination"]["steps_per_s"] / base,
                            **run_metadata(vars(args), args.seed)})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

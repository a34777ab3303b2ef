"""RL rollouts with MTP drafts: the Seamless Rollout Engine's workload (GRPO groups sampled at T=1, dynamic
sampling, async rewards, early termination) with plain decoding vs `speculative=mtp`, side by side.

    python benchmarks/mtp_rollout.py --model runs/mtp-bench-ext/model --task arith --steps 3 \
        [--batch-groups 8] [--group-size 8] [--max-tokens 96] [--engine-batch 64] [--ks 1,3] \
        [--fallback off|auto|N] [--repeats 2] [--threads 2] [--out results/mtp_rollout.json]

Each run of a configuration (plain; MTP with k drafts; with `--fallback` also MTP with the plain-decoding
fallback of `LLMEngine(spec_max_batch=N)`, N measured by `calibrate_spec_max_batch` at T=1 for `auto`) gets a
fresh `LLMEngine` over the same model object and a fresh `ProblemSampler` with the same seed (after one
untimed warm-up step per configuration), and collects
`--steps` rollout batches of `--batch-groups` valid groups (no training: rollout is what changes). Whole
runs take turns, the order reversed every repeat (A B C, C B A, ...), so a slow spell of the shared machine
lands on all of them; the best of `--repeats` by rollout tokens/s is reported.

Reported per configuration: rollout tokens/s (tokens generated, wasted ones included, over the collect wall
time) and per process CPU-second (the steadier figure on a shared machine), their ratios to plain, acceptance per draft position, fallback steps, and the log-prob drift between the
engine and the trainer: every committed sample's (the groups each step kept, degenerate ones too) engine log-probs against `thinkforge.train.grpo.token_logprobs`
of the same model over the same tokens (what `thinkforge rl` logs as `logprob_drift` before its first
update), max and mean |difference| over completion tokens. Speculative sampling keeps the main model's
distribution and reports the main model's log-probs, so the drift must stay at plain decoding's (float noise).

RL wiring: `thinkforge rl --set speculative=mtp num_draft=K` builds its rollout engine the same way
(`thinkforge.cluster.setup.build_roles`), without a fallback threshold (every step speculates).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def logprob_drift(model: Any, groups: list[Any], temperature: float, pad_id: int, device: Any,
                  micro: int = 16) -> dict[str, float]:
    """max / mean |engine log-prob - trainer log-prob| over the completion tokens of `groups`' samples."""
    import torch

    from thinkforge.train.grpo import build_samples, collate, token_logprobs

    rows = [r for g in build_samples(groups)[0] for r in g]
    total, n, worst = 0.0, 0, 0.0
    with torch.no_grad():
        for i in range(0, len(rows), micro):
            batch = collate(rows[i:i + micro], pad_id, device)
            logp, _ = token_logprobs(model, batch, temperature)
            gap = (logp - batch["old"]).abs()[batch["completion"]]
            total += float(gap.sum())
            n += gap.numel()
            worst = max(worst, float(gap.max())) if gap.numel() else worst
    return {"max": worst, "mean": total / max(n, 1), "tokens": n}


def collect_run(engine: Any, task: Any, args: argparse.Namespace) -> dict[str, Any]:
    """`args.steps` rollout batches from a fresh sampler: tokens, wall seconds, the selected groups."""
    from thinkforge.rewards import RewardRouter
    from thinkforge.rollout import ProblemSampler, RolloutConfig, SeamlessRollout

    router = RewardRouter(workers=args.reward_workers, timeout_s=60)
    rollout = SeamlessRollout(engine, router, {task.name: task}, RolloutConfig(
        group_size=args.group_size, max_tokens=args.max_tokens, temperature=1.0,
        max_slots_factor=args.max_slots_factor))
    sampler = ProblemSampler(task.problems("train", n=500, seed=args.seed), seed=args.seed, easy_alpha=0.0)
    if engine.speculator is not None:
        engine.speculator.reset_metrics()
    tokens, wall, cpu, committed, selected = 0, 0.0, 0.0, [], []
    try:
        for _ in range(args.steps):
            draw = sampler.begin_step()
            t, c = time.perf_counter(), time.process_time()
            res = rollout.collect(draw, args.batch_groups)
            wall += time.perf_counter() - t
            cpu += time.process_time() - c
            sampler.commit(draw, len(res.groups), [(g.rewards, g.correct) for g in res.groups])
            tokens += int(res.stats["tokens_generated"])
            committed += res.groups  # the step's prefix of groups, degenerate ones included (all scored)
            selected += res.selected
    finally:
        router.close()
    out = {"tokens": tokens, "wall_s": wall, "cpu_s": cpu, "groups": committed, "selected": len(selected)}
    if engine.speculator is not None:
        out["metrics"] = engine.speculator.metrics()
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="checkpoint dir with MTP layers (required unless --render)")
    ap.add_argument("--task", default="arith")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch-groups", type=int, default=8)
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--engine-batch", type=int, default=64)
    ap.add_argument("--ks", default="1,3", help="draft tokens per round of the MTP configurations")
    ap.add_argument("--fallback", default="off", help="off, auto (calibrate at T=1) or a batch size")
    ap.add_argument("--calib-tokens", type=int, default=32)
    ap.add_argument("--calib-clock", default="wall", choices=["wall", "cpu"])
    ap.add_argument("--reward-workers", type=int, default=2)
    ap.add_argument("--max-slots-factor", type=float, default=8.0)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="results/mtp_rollout.json")
    ap.add_argument("--render", metavar="JSON", help="print the table of a saved result and exit (runs nothing)")
    args = ap.parse_args(argv)
    if args.render:
        result = load_result(args.render)
        print_table(result)
        return result
    if not args.model:
        ap.error("--model is required (or --render JSON)")

    import torch

    from thinkforge.engine.base import SamplingParams
    from thinkforge.engine.loading import load_model_and_tokenizer
    from thinkforge.engine.mtp_acceptance import calibrate_spec_max_batch
    from thinkforge.engine.native import LLMEngine
    from thinkforge.engine.speculative import prepare_speculative
    from thinkforge.errors import ThinkforgeError
    from thinkforge.tasks import get_task
    from thinkforge.utils import atomic_write_json, run_metadata, seed_everything

    try:
        ks = sorted({int(k) for k in args.ks.split(",")})
    except ValueError:
        raise ThinkforgeError(f"--ks {args.ks!r}: comma-separated integers") from None
    if min(ks) < 1 or args.steps < 1 or args.repeats < 1 or args.batch_groups < 1 or args.group_size < 2:
        raise ThinkforgeError("--ks, --steps, --repeats, --batch-groups must be >= 1 and --group-size >= 2")
    if args.fallback not in ("off", "auto"):
        try:
            fixed = int(args.fallback)
        except ValueError:
            raise ThinkforgeError(f"--fallback {args.fallback!r}: off, auto or a batch size (int >= 0)") from None
        if fixed < 0:
            raise ThinkforgeError(f"--fallback {args.fallback!r}: a batch size must be >= 0")
    if not (Path(args.model) / "config.json").is_file():
        raise ThinkforgeError(f"--model {args.model}: not a checkpoint directory (no config.json)")
    task = get_task(args.task)
    if "train" not in task.splits:
        raise ThinkforgeError(f"--task {args.task}: no 'train' split")
    torch.set_num_threads(args.threads)
    seed_everything(args.seed)
    load_start = os.getloadavg()
    model, tok = load_model_and_tokenizer(args.model, args.device, "float32")
    prepare_speculative(model, args.model, "mtp", max(ks))  # no MTP layers / too few: the one-line error

    calibration = None
    limits: dict[int, int | None] = {}
    if args.fallback == "auto":
        from thinkforge.engine.backends import apply_chat_template

        prompts = [tok(apply_chat_template(tok, task.messages(p)), add_special_tokens=False)["input_ids"]
                   for p in task.problems("train", n=args.engine_batch, seed=args.seed + 1)]
        sizes = sorted({1, args.group_size, args.engine_batch // 2, args.engine_batch} - {0})
        print(f"fallback calibration at T=1: batch {sizes}, k = {ks} ...", flush=True)
        calibration = calibrate_spec_max_batch(model, tok, prompts, ks, sizes, SamplingParams(
            temperature=1.0, max_tokens=args.calib_tokens), repeats=1, seed=args.seed, clock=args.calib_clock)
        limits = dict(calibration["spec_max_batch"])
        print(f"  speculative / plain tokens/s: {calibration['ratios']} -> spec_max_batch {limits}", flush=True)
    elif args.fallback != "off":
        limits = dict.fromkeys(ks, int(args.fallback))

    configs: dict[str, dict[str, Any]] = {"plain": {}}
    for k in ks:
        configs[f"mtp k={k}"] = {"speculative": "mtp", "num_draft": k}
        if limits:
            configs[f"mtp k={k} +fallback"] = {"speculative": "mtp", "num_draft": k, "spec_max_batch": limits[k]}
    def engine(name: str) -> Any:  # a fresh engine per run (request ids restart with every rollout)
        return LLMEngine(model, tok, max_batch_size=args.engine_batch, seed=args.seed, **configs[name])

    order = list(configs)
    warm = argparse.Namespace(**{**vars(args), "steps": 1})
    for name in order:  # untimed warm-up: allocator, caches, first-call overheads of every path
        collect_run(engine(name), task, warm)
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in order}
    for r in range(args.repeats):
        for name in (order if r % 2 == 0 else order[::-1]):
            runs[name].append(collect_run(engine(name), task, args))
            print(f"repeat {r} {name:>20}: {runs[name][-1]['tokens'] / runs[name][-1]['wall_s']:.1f} tok/s", flush=True)

    rows: dict[str, dict[str, Any]] = {}
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    for name, rr in runs.items():
        best = max(rr, key=lambda x: x["tokens"] / x["wall_s"])
        row: dict[str, Any] = {"tok_s": round(best["tokens"] / best["wall_s"], 1), "tokens": best["tokens"],
                               "wall_s": round(best["wall_s"], 3),
                               # Process CPU time (generation + reward threads): steadier on a shared machine.
                               "tok_per_cpu_s": round(max(x["tokens"] / max(x["cpu_s"], 1e-9) for x in rr), 1),
                               "tok_s_every_repeat": [round(x["tokens"] / x["wall_s"], 1) for x in rr],
                               "committed_groups": len(best["groups"]), "selected_groups": best["selected"],
                               "drift": logprob_drift(model, best["groups"], 1.0, pad, model.device)}
        if "metrics" in best:
            m = best["metrics"]
            row.update({"acceptance": [round(a, 4) for a in m["acceptance"]],
                        "mean_accepted_length": round(m["mean_accepted_length"], 4),
                        "verify_forwards": m["verify_forwards"], "fallback_steps": m["fallback_steps"],
                        "spec_max_batch": m["spec_max_batch"]})
        rows[name] = row
    base, base_cpu = rows["plain"]["tok_s"], rows["plain"]["tok_per_cpu_s"]
    for row in rows.values():
        row["ratio"] = round(row["tok_s"] / base, 3)
        row["ratio_cpu"] = round(row["tok_per_cpu_s"] / base_cpu, 3)

    result = {"rows": rows, "calibration": calibration, "load_average_at_start": load_start,
              "load_average_at_end": os.getloadavg(), "torch_threads": torch.get_num_threads(),
              **run_metadata(dict(vars(args)), seed=args.seed)}
    print_table(result)
    atomic_write_json(args.out, result)
    print(f"wrote {args.out}")
    return result


def load_result(path: str) -> dict[str, Any]:
    import json

    from thinkforge.errors import ThinkforgeError

    try:
        result = json.loads(Path(path).read_text())
        result["rows"], result["config"]  # noqa: B018  (a result file has both)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ThinkforgeError(f"--render {path}: not a saved mtp_rollout result ({type(err).__name__}: {err})") from err
    return result


def print_table(result: dict[str, Any]) -> None:
    """The table, from a result dict (a fresh run's or a saved JSON's: `--render`)."""
    c = result["config"]
    print(f"\nRL rollouts, plain vs MTP drafts ({c['model']}, task {c['task']}, {c['steps']} steps x "
          f"{c['batch_groups']} groups x {c['group_size']}, T=1, max_tokens {c['max_tokens']}, engine batch "
          f"{c['engine_batch']}, threads {c['threads']}, best of {c['repeats']}, load average "
          f"{result['load_average_at_start'][0]:.1f})")
    print(f"{'config':>20} | tok/s | ratio | tok/cpu-s | ratio | acceptance per position | fallback steps | "
          "drift max | drift mean")
    for name, r in result["rows"].items():
        acc = " ".join(f"{a:.2f}" for a in r.get("acceptance", [])) or "-"
        print(f"{name:>20} | {r['tok_s']:5.0f} | {r['ratio']:4.2f}x | {r['tok_per_cpu_s']:9.0f} | {r['ratio_cpu']:4.2f}x | "
              f"{acc:<23} | {r.get('fallback_steps', '-')!s:>14} | {r['drift']['max']:9.2e} | {r['drift']['mean']:9.2e}")


if __name__ == "__main__":
    from thinkforge.errors import ThinkforgeError

    try:
        main()
    except ThinkforgeError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)

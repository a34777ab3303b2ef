"""RL time-to-accuracy, side by side: thinkforge RL (native engine + Seamless Rollout) vs TRL `GRPOTrainer`.

Both start from the same SFT checkpoint and train on the same task and training problems with the same
group size, prompts per step, mini-batch (updates per step), learning rate (constant after a linear
warmup), AdamW betas, gradient clipping, max completion tokens, temperature 1.0, no KL, clip-higher
(0.2 / 0.28; TRL's `epsilon` / `epsilon_high`), token-level loss averaged over the mini-batch's tokens
(TRL `loss_type="bnpo"` with the whole mini-batch in one forward: exactly thinkforge's `loss_agg: token`;
TRL's "dapo" divides by the generation batch's mean tokens per update instead), group std-normalised
advantages and truncated completions masked out of the loss. Rewards are identical: both
call the task's own scorer (`Task.score`; thinkforge through its `task` reward route).

thinkforge keeps the rest of its recipe (`recipes/rl-speedrun.yaml`: dynamic sampling, easy-data pool,
Seamless Rollout); those are part of what is measured. TRL generates with plain HF `generate`, its CPU path.

Accuracy is measured the same way for both: every `--eval-every` rollout steps, the live weights are
copied into a thinkforge engine and `thinkforge.train.rl.evaluate_heldout` scores greedy answers on the
same held-out problems. Wall time is training time only: start-up (model load, engine build) and
evaluation time are excluded. Each run stops at the target accuracy (unless --run-full), --max-steps or
--max-minutes, whichever comes first (checked at evaluation points). The target defaults to the SFT
checkpoint's accuracy + 10 points, or halfway to `--reference-model`'s (the SFT-on-10N-traces checkpoint)
accuracy when that is lower (issue 14).

    python benchmarks/rl_vs_trl.py --model /tmp/sr/cpu1/sft/model --out results/rl_vs_trl.json
    python benchmarks/rl_vs_trl.py --model M --max-steps 4 --eval-every 2 --eval-problems 16 --batch-groups 4 \
        --mini-batch-groups 2 --group-size 4 --max-tokens 48 --out /tmp/rl_vs_trl_smoke.json   # quick check
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


class _Stop(Exception):
    """Raised from the evaluation hook to end a thinkforge run early (`rl()` has no stop callback)."""


class Recorder:
    """Training clock (wall time minus evaluation time) and the accuracy-vs-time curve of one run."""

    def __init__(self, task: str, target: float, max_s: float, stop_at_target: bool) -> None:
        self.task, self.target, self.max_s, self.stop_at_target = task, target, max_s, stop_at_target
        self.t0: float | None = None
        self.eval_s = 0.0
        self.curve: list[dict[str, float]] = []  # {"step", "train_s", "accuracy"}
        self.step_s: list[tuple[int, float]] = []  # (rollout step, training seconds when it finished)
        self.reached: dict[str, float] | None = None
        self.stop_reason = "max_steps"

    def start(self) -> None:
        self.t0 = time.perf_counter()

    def train_s(self) -> float:
        return time.perf_counter() - (self.t0 or time.perf_counter()) - self.eval_s

    def mark_step(self, step: int) -> None:
        """Records that rollout step `step` finished now (once; later marks of the same step are ignored)."""
        if not self.step_s or self.step_s[-1][0] < step:
            self.step_s.append((step, self.train_s()))

    def evaluate(self, fn: Any, step: int) -> tuple[dict[str, float], bool]:
        """Runs `fn()` (an evaluation) off the clock; records the point; says whether the run should stop."""
        at = self.train_s()
        t = time.perf_counter()
        acc = fn()
        self.eval_s += time.perf_counter() - t
        self.curve.append({"step": step, "train_s": round(at, 3), "accuracy": acc[self.task]})
        if self.reached is None and acc[self.task] >= self.target:
            self.reached = {"step": step, "train_s": at, "accuracy": acc[self.task]}
            if self.stop_at_target:
                self.stop_reason = "target"
                return acc, True
        if at >= self.max_s:
            self.stop_reason = "max_minutes"
            return acc, True
        return acc, False

    def result(self, setup_s: float, samples: int | None) -> dict[str, Any]:
        steps = self.step_s[-1][0] if self.step_s else 0
        train_s = self.step_s[-1][1] if self.step_s else 0.0
        final = self.curve[-1]["accuracy"] if self.curve else None
        return {"time_to_target_s": self.reached["train_s"] if self.reached else None,
                "steps_to_target": self.reached["step"] if self.reached else None,
                "steps": steps, "train_s": train_s, "steps_per_s": steps / train_s if train_s else None,
                "samples_per_s": samples / train_s if samples and train_s else None,
                "final_accuracy": final, "best_accuracy": max((c["accuracy"] for c in self.curve), default=None),
                "stop_reason": self.stop_reason, "setup_s": setup_s, "eval_s": self.eval_s,
                "rollout_samples": samples, "curve": self.curve,
                "step_train_s": [{"step": s, "train_s": round(t, 3)} for s, t in self.step_s]}


class _Clock:
    """The `progress` object `rl()` accepts: `add_task` runs right before the training loop (start of
    the clock, after model load and engine build), `update` once per finished step."""

    def __init__(self, rec: Recorder) -> None:
        self.rec, self.step = rec, 0

    def add_task(self, *_: Any, completed: int = 0, **__: Any) -> int:
        self.rec.start()
        self.step = completed
        return 0

    def update(self, *_: Any, advance: int = 1, **__: Any) -> None:
        self.step += advance
        self.rec.mark_step(self.step)


def eval_config(args: argparse.Namespace, out_dir: Path) -> Any:
    """The RLConfig fields `evaluate_heldout` reads; the same for every evaluation of both runs."""
    from thinkforge.train.rl import RLConfig

    return RLConfig(model=args.model, tasks=[args.task], out_dir=str(out_dir), eval_problems=args.eval_problems,
                    eval_max_tokens=args.max_tokens if args.eval_max_tokens is None else args.eval_max_tokens,
                    seed=args.seed)


def make_engine(model: Any, tokenizer: Any, args: argparse.Namespace) -> Any:
    from thinkforge.engine.native import LLMEngine

    return LLMEngine(copy.deepcopy(model).requires_grad_(False), tokenizer, max_batch_size=args.engine_max_batch,
                     seed=args.seed, dtype=args.dtype)


def baseline_accuracy(args: argparse.Namespace, work: Path, model_dir: str | None = None, name: str = "sft_eval") -> float:
    from thinkforge.model.io import load_model
    from thinkforge.train.rl import evaluate_heldout

    model, tok = load_model(model_dir or args.model, device=args.device, dtype=args.dtype)
    engine = make_engine(model, tok, args)
    return evaluate_heldout(engine, eval_config(args, work / name), work / name, 0)[args.task]


def pick_target(args: argparse.Namespace, sft_acc: float, ref_acc: float | None) -> float:
    """Issue 14's target: SFT + `target_gain`, or halfway to the 10N-trace reference when that is lower."""
    if args.target is not None:
        return args.target
    target = sft_acc + args.target_gain
    if ref_acc is not None:
        target = min(target, (sft_acc + ref_acc) / 2)
    return round(target, 6)


def run_thinkforge(args: argparse.Namespace, rec: Recorder, out: Path) -> dict[str, Any]:
    import thinkforge.train.rl as rl_mod
    from thinkforge.train.rl import RLConfig
    from thinkforge.utils import load_config, parse_overrides, read_jsonl

    overrides = {
        "model": args.model, "tasks": [args.task], "out_dir": str(out), "problems_per_task": args.train_problems,
        "steps": args.max_steps, "batch_groups": args.batch_groups, "mini_batch_groups": args.mini_batch_groups,
        "group_size": args.group_size, "lr": args.lr, "warmup_steps": args.warmup, "min_lr_ratio": 1.0,
        "temperature": 1.0, "max_tokens": args.max_tokens, "clip_low": 0.2, "clip_high": 0.28, "kl_coef": 0.0,
        "ppo_epochs": 1, "loss_agg": "token", "std_normalize": True, "overlong": "mask",
        "rewards": {args.task: "task"},  # Task.score, as TRL's reward function
        "eval_every": args.eval_every, "eval_at_start": False, "eval_problems": args.eval_problems,
        "eval_max_tokens": eval_config(args, out).eval_max_tokens, "save_every": 10**9, "seed": args.seed,
        "device": args.device, "dtype": args.dtype, "engine_dtype": args.dtype,
        "engine_max_batch": args.engine_max_batch,  # its rollout engine also runs its evaluations
        **parse_overrides(args.tf_set),
    }
    cfg = load_config(RLConfig, args.recipe, "rl", overrides)
    original = rl_mod.evaluate_heldout

    def timed_eval(engine: Any, ecfg: Any, out_dir: Path, step: int) -> dict[str, float]:
        rec.mark_step(step)  # rl() evaluates before its progress update: the step's training is done
        acc, stop = rec.evaluate(lambda: original(engine, ecfg, out_dir, step), step)
        if stop:
            raise _Stop
        return acc

    t = time.perf_counter()
    rl_mod.evaluate_heldout = timed_eval  # rl() looks the name up at call time
    try:
        summary = rl_mod.rl(cfg, progress=_Clock(rec))
        if summary.get("stopped"):  # max_degenerate_steps in a row without one group with a reward signal
            rec.stop_reason = "no_signal"
    except _Stop:
        pass
    finally:
        rl_mod.evaluate_heldout = original
    setup_s = (rec.t0 or t) - t
    # Scored groups per step (written before the step's evaluation, so a run stopped there is complete).
    rows = read_jsonl(out / "rollouts.jsonl", tolerate_partial_last_line=True)
    samples = sum(len(r["groups"]) for r in rows) * args.group_size
    return {**rec.result(setup_s, samples or None), "config": {k: v for k, v in overrides.items() if k != "model"}}


def run_trl(args: argparse.Namespace, rec: Recorder, out: Path) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from transformers import PrinterCallback, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from thinkforge.model.io import load_model
    from thinkforge.model.mtp import freeze_mtp
    from thinkforge.tasks import get_task
    from thinkforge.train.rl import evaluate_heldout

    # transformers 5.x deprecation notices that TRL 1.16 triggers on every step (gradient_checkpointing names)
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"transformers\.")
    t_setup = time.perf_counter()
    task = get_task(args.task)
    problems = task.problems("train", n=args.train_problems, seed=args.seed)
    ds = Dataset.from_list([{"prompt": task.messages(p), "pid": i} for i, p in enumerate(problems)])

    def reward(prompts: list, completions: list, pid: list[int], **_: Any) -> list[float]:
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return [float(task.score(problems[i], text).reward) for i, text in zip(pid, texts, strict=True)]

    # The same model object thinkforge trains (MTP layers attached and frozen, as RL does).
    model, tok = load_model(args.model, device=args.device, dtype=args.dtype)
    freeze_mtp(model)
    model.train()
    upr = args.batch_groups // args.mini_batch_groups  # updates per rollout step
    G = args.group_size
    cfg = GRPOConfig(
        output_dir=str(out), per_device_train_batch_size=args.mini_batch_groups * G, gradient_accumulation_steps=1,
        steps_per_generation=upr, num_generations=G, max_completion_length=args.max_tokens, temperature=1.0,
        top_p=1.0, top_k=0, beta=0.0, epsilon=0.2, epsilon_high=0.28, loss_type="bnpo", scale_rewards="group",
        mask_truncated_completions=True, num_iterations=1, learning_rate=args.lr,
        lr_scheduler_type="constant_with_warmup", warmup_steps=args.warmup * upr, max_steps=args.max_steps * upr,
        adam_beta2=0.95, weight_decay=0.0, max_grad_norm=1.0, logging_steps=upr, save_strategy="no", report_to=[],
        use_cpu=args.device == "cpu", bf16=args.dtype == "bfloat16", seed=args.seed, dataloader_num_workers=0,
        disable_tqdm=True, log_completions=False)
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=cfg, train_dataset=ds, processing_class=tok)
    ecfg = eval_config(args, out)
    # Evaluation engine from its own copy of the checkpoint; the live weights are copied in at each
    # evaluation, as rl() does with its rollout engine.
    engine = make_engine(load_model(args.model, device=args.device, dtype=args.dtype)[0], tok, args)

    def live_eval(step: int) -> dict[str, float]:
        with torch.no_grad():
            engine.load_weights({k: v.detach() for k, v in trainer.model.named_parameters()})
        return evaluate_heldout(engine, ecfg, out, step)

    class Hook(TrainerCallback):
        def on_train_begin(self, *_: Any, **__: Any) -> None:
            rec.start()

        def on_step_end(self, _args: Any, state: Any, control: Any, **__: Any) -> None:
            if state.global_step % upr:
                return
            step = state.global_step // upr
            rec.mark_step(step)
            if step % args.eval_every == 0 or step >= args.max_steps:
                _, stop = rec.evaluate(lambda: live_eval(step), step)
                control.should_training_stop = control.should_training_stop or stop

    trainer.add_callback(Hook())
    trainer.remove_callback(PrinterCallback)  # its per-step log dicts would bury the table (log_history keeps them)
    setup_s = time.perf_counter() - t_setup
    trainer.train()
    steps = rec.step_s[-1][0] if rec.step_s else 0
    if steps and (not rec.curve or rec.curve[-1]["step"] != steps):
        rec.evaluate(lambda: live_eval(steps), steps)  # final accuracy, as rl() evaluates after its loop
    rewards = [h["reward"] for h in trainer.state.log_history if "reward" in h]
    return {**rec.result(setup_s, steps * args.batch_groups * G), "train_rewards": rewards,
            "config": cfg.to_dict() if hasattr(cfg, "to_dict") else None}


def _version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def compare(tf: dict[str, Any] | None, trl: dict[str, Any] | None) -> dict[str, Any]:
    """Speedups of thinkforge over TRL: time to target (exact, or a bound when only one run reached it,
    from the other's whole training time), training steps/s and rollout samples/s."""
    out: dict[str, Any] = {"time_to_target": None, "time_to_target_bound": None, "steps_per_s": None,
                           "samples_per_s": None}
    if not (tf and trl):
        return out
    a, b = tf["time_to_target_s"], trl["time_to_target_s"]
    if a is not None and b is not None:
        out["time_to_target"] = b / a
    elif a is not None and trl["train_s"]:  # TRL never got there in trl["train_s"]: at least this much
        out["time_to_target_bound"] = f">= {trl['train_s'] / a:.2f}"
    elif b is not None and tf["train_s"]:
        out["time_to_target_bound"] = f"<= {b / tf['train_s']:.2f}"
    for key in ("steps_per_s", "samples_per_s"):
        if tf[key] and trl[key]:
            out[key] = tf[key] / trl[key]
    return out


def print_table(results: dict[str, dict[str, Any]], speedup: dict[str, Any]) -> None:
    print(f"{'run':<17} {'time to target s':>16} {'steps':>5} | {'steps done':>10} {'train s':>8} {'steps/s':>8} "
          f"{'samples/s':>9} {'final acc':>9} {'best acc':>8} {'stopped':>11}")
    for name, r in results.items():
        ttt = "not reached" if r["time_to_target_s"] is None else f"{r['time_to_target_s']:.1f}"
        print(f"{name:<17} {ttt:>16} {r['steps_to_target'] or '-':>5} | {r['steps']:>10} {r['train_s']:>8.1f} "
              f"{r['steps_per_s'] or 0:>8.3f} {r['samples_per_s'] or 0:>9.1f} {r['final_accuracy'] or 0:>9.3f} "
              f"{r['best_accuracy'] or 0:>8.3f} {r['stop_reason']:>11}")
    if len(results) < 2:
        return
    if speedup["time_to_target"] is not None:
        ratio = f"{speedup['time_to_target']:.2f}x"
    elif speedup["time_to_target_bound"]:
        ratio = f"{speedup['time_to_target_bound']}x (only one run reached the target)"
    else:
        ratio = "n/a (neither run reached the target)"
    print(f"speedup, TRL time / thinkforge time to target: {ratio}  (issue: >= 2.3x)")
    print(f"throughput ratios (thinkforge / TRL): steps/s {speedup['steps_per_s'] or 0:.2f}x, rollout samples/s "
          f"{speedup['samples_per_s'] or 0:.2f}x (thinkforge's dynamic sampling draws extra groups per step)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="SFT checkpoint (HF dir) both runs start from")
    ap.add_argument("--task", default="arith")
    ap.add_argument("--recipe", default="rl-speedrun", help="thinkforge RL recipe for everything not set here")
    ap.add_argument("--target", type=float, default=None, help="absolute held-out accuracy in [0, 1]")
    ap.add_argument("--target-gain", type=float, default=0.10, help="target = SFT accuracy + this (if no --target)")
    ap.add_argument("--reference-model", default=None,
                    help="the 10N-trace SFT checkpoint: the target is then the lower of SFT + gain and halfway to it")
    ap.add_argument("--max-steps", type=int, default=60, help="rollout steps cap per run")
    ap.add_argument("--max-minutes", type=float, default=30.0, help="training-time cap per run")
    ap.add_argument("--eval-every", type=int, default=5, help="rollout steps between held-out evaluations")
    ap.add_argument("--eval-problems", type=int, default=200)
    ap.add_argument("--eval-max-tokens", type=int, default=None, help="default: --max-tokens")
    ap.add_argument("--train-problems", type=int, default=2000)
    ap.add_argument("--batch-groups", type=int, default=16, help="prompts per rollout step")
    ap.add_argument("--mini-batch-groups", type=int, default=8, help="prompts per gradient update")
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--warmup", type=int, default=2, help="warmup in rollout steps")
    ap.add_argument("--max-tokens", type=int, default=160)
    ap.add_argument("--engine-max-batch", type=int, default=256, help="engine rows: thinkforge's rollouts and every evaluation")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = leave as is)")
    ap.add_argument("--run-full", action="store_true", help="keep going after the target (full curves)")
    ap.add_argument("--skip-trl", action="store_true")
    ap.add_argument("--skip-thinkforge", action="store_true")
    ap.add_argument("--tf-set", action="append", default=[], metavar="KEY=VALUE",
                    help="extra thinkforge RLConfig override (ablations, e.g. dynamic_sampling=false)")
    ap.add_argument("--work-dir", default=None, help="run directories (default: a fresh temp dir)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="results/rl_vs_trl.json")
    args = ap.parse_args()

    import torch

    from thinkforge.errors import ThinkforgeError
    from thinkforge.model.io import resolve_device
    from thinkforge.utils import atomic_write_json, run_metadata, seed_everything

    if args.batch_groups % args.mini_batch_groups:
        raise ThinkforgeError(f"--batch-groups ({args.batch_groups}) must be a multiple of --mini-batch-groups")
    if args.eval_every < 1 or args.max_steps < 1:
        raise ThinkforgeError("--eval-every and --max-steps must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    args.device = resolve_device(args.device)
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="rl_vs_trl_"))
    for name in ("sft_eval", "reference_eval", "thinkforge", "trl"):
        if (work / name).exists():  # evaluation resumes from samples on disk: a stale directory would be reused
            raise ThinkforgeError(f"{work / name} exists; use a new --work-dir")

    if not args.skip_trl:  # fail before the thinkforge run, not after it
        try:
            import trl  # noqa: F401
        except ImportError as err:
            raise ThinkforgeError("rl_vs_trl: TRL is not installed (pip install -e '.[trl]'), or pass --skip-trl") from err
    seed_everything(args.seed)
    t = time.perf_counter()
    sft_acc = baseline_accuracy(args, work)
    print(f"SFT held-out accuracy on {args.eval_problems} {args.task} problems: {sft_acc:.3f} "
          f"({time.perf_counter() - t:.1f}s)")
    ref_acc = baseline_accuracy(args, work, args.reference_model, "reference_eval") if args.reference_model else None
    if ref_acc is not None:
        print(f"reference (SFT on 10N traces) held-out accuracy: {ref_acc:.3f}")
    target = pick_target(args, sft_acc, ref_acc)
    max_s = args.max_minutes * 60
    results: dict[str, dict[str, Any]] = {}
    if not args.skip_thinkforge:
        seed_everything(args.seed)
        results["thinkforge RL"] = run_thinkforge(args, Recorder(args.task, target, max_s, not args.run_full),
                                                  work / "thinkforge")
    if not args.skip_trl:
        seed_everything(args.seed)
        results["TRL GRPOTrainer"] = run_trl(args, Recorder(args.task, target, max_s, not args.run_full), work / "trl")

    speedup = compare(results.get("thinkforge RL"), results.get("TRL GRPOTrainer"))
    print(f"\ntarget: held-out {args.task} accuracy >= {target:.3f} (SFT {sft_acc:.3f}); "
          f"{args.batch_groups} prompts x {args.group_size} samples per step, eval every {args.eval_every} steps")
    print_table(results, speedup)
    result = {"task": args.task, "sft_accuracy": sft_acc, "reference_accuracy": ref_acc, "target": target, "results": results, "speedup": speedup,
              "work_dir": str(work), "torch_threads": torch.get_num_threads(),
              "other_versions": {name: _version(name) for name in ("trl", "accelerate", "datasets")},
              **run_metadata(vars(args), seed=args.seed)}
    atomic_write_json(args.out, result)
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()

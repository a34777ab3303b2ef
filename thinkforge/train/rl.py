"""RL from verifiable rewards, MiMo-7B's recipe: GRPO on the Seamless Rollout Engine.

One step = one rollout batch of `batch_groups` valid groups (prompts x `group_size` samples, dynamic
sampling) from `thinkforge.rollout`, then `batch_groups / mini_batch_groups * ppo_epochs` gradient updates
of the objective in `thinkforge.train.grpo` (group-normalised advantages, clipped surrogate with
importance ratios against the engine's rollout log-probs, loss averaged over all tokens of the mini-batch).

No KL by default; clip-higher (0.2 / 0.28); overlong completions are masked out of the loss or get
DAPO's soft length penalty; `on_policy` is MiMo-VL's fully on-policy mode (one update per rollout, so the
ratio is 1 and the loss is the plain policy gradient). The engine's log-probs are compared with the
trainer's on the first mini-batch (`logprob_drift`), which catches a sampler/trainer mismatch.

The run is one controller driving roles (`thinkforge.cluster`): a rollout engine, a reward pool and a
weight sync, in this process by default, or on Ray actors with `cluster.backend=ray` (same loop, same
batch: the rollout selects groups in slot order, whichever worker produced them). The engines carry a
weight version; before each rollout the controller checks they hold the trainer's latest weights.

Run management: YAML recipe + overrides, checkpoint/resume of policy, optimizer, RNG, prompt stream,
Easy-Data Pool, pass-rate and test-difficulty statistics (a resumed run sees the same data order),
jsonl + tensorboard metrics, periodic held-out evaluation through `thinkforge.eval.evaluate`.
"""

from __future__ import annotations

import copy
import random
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from thinkforge.cluster.config import ClusterConfig
from thinkforge.cluster.weights import WeightVersionError
from thinkforge.engine.base import Backend, Completion, Message, SamplingParams
from thinkforge.errors import ThinkforgeError
from thinkforge.rollout.engine import Group
from thinkforge.train.common import (
    MetricLog,
    cosine_lr,
    trim_steps,
    write_stage_summary,
)
from thinkforge.train.grpo import (
    TrainSample,
    build_samples,
    collate,
    micro_batches,
    policy_loss,
    token_logprobs,
)
from thinkforge.utils import (
    append_jsonl,
    asdict,
    atomic_write_json,
    build_config,
    ensure_writable_dir,
    run_metadata,
    seed_everything,
)


@dataclass
class RLConfig:
    model: str = ""  # HF dir or hub id (the SFT checkpoint)
    tasks: list[str] = field(default_factory=lambda: ["arith", "code"])
    out_dir: str = "runs/rl"
    problems_per_task: int = 2000  # training problems drawn per task
    difficulty: int | None = None  # task difficulty cap for training problems (None = task default)
    steps: int = 40  # rollout batches
    batch_groups: int = 16  # valid groups (prompts) per step
    group_size: int = 8  # samples per prompt
    mini_batch_groups: int = 8  # prompts per gradient update
    ppo_epochs: int = 1
    micro_batch_size: int = 64  # samples per forward pass (memory only; the loss is unchanged)
    # > 0: forward passes of length-sorted rows holding at most this many padded tokens (verl's use_dynamic_bsz /
    # ppo_max_token_len_per_gpu); speed only, the loss is unchanged. 0 = `micro_batch_size` rows per pass.
    micro_batch_tokens: int = 0
    on_policy: bool = False  # MiMo-VL: one update per rollout batch, plain policy gradient
    lr: float = 1e-6
    warmup_steps: int = 0
    min_lr_ratio: float = 1.0  # 1.0 = constant after warmup, as MiMo
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    clip_low: float = 0.2
    clip_high: float = 0.28
    std_normalize: bool = True  # False = Dr. GRPO (no division by the group's reward std)
    loss_agg: str = "token"  # "token" (DAPO: mean over all tokens of the mini-batch) | "sequence"
    kl_coef: float = 0.0  # > 0: k3 KL to the frozen starting policy
    old_logprobs: str = "engine"  # "engine" (rollout log-probs) | "trainer" (recomputed before updating)
    overlong: str = "mask"  # "mask" truncated samples out of the loss | "penalty" (DAPO soft) | "none"
    overlong_buffer: int = 32  # penalty ramps over the last `overlong_buffer` tokens before max_tokens
    overlong_penalty: float = 1.0
    max_tokens: int = 160
    temperature: float = 1.0
    top_p: float = 1.0
    dynamic_sampling: bool = True  # drop groups whose rewards are all equal
    easy_pool: bool = True
    easy_alpha: float = 0.1
    continuous: bool = True  # Seamless Rollout (a)
    async_reward: bool = True  # Seamless Rollout (b)
    early_termination: bool = True  # Seamless Rollout (c)
    reward_lag: int = 0  # > 0: async rewards read exactly this many engine steps later (reruns match)
    max_slots_factor: float = 8.0  # per step, start at most batch_groups * factor groups
    engine_max_batch: int = 128  # rows in the engine's continuous batch
    rewards: dict = field(default_factory=dict)  # task -> reward route (default by task kind)
    reward_options: dict = field(default_factory=dict)  # reward name -> options, e.g. code_tddr: {mode: soft}
    reward_workers: int = 4
    reward_timeout_s: float = 30.0
    eval_every: int = 0  # steps between held-out evaluations (0 = only at the end)
    eval_at_start: bool = False
    eval_problems: int = 100
    eval_max_tokens: int = 160
    save_every: int = 10
    max_degenerate_steps: int = 5  # consecutive steps without one valid group before stopping
    seed: int = 0
    device: str = "auto"
    dtype: str = "float32"  # trainer weights
    engine_dtype: str = "auto"  # rollout weights (bf16 on GPUs)
    system_prompt: str | None = None
    train_mtp: bool = False  # MiMo keeps MTP layers frozen during RL (they still draft for speculative rollouts)
    speculative: str | None = None  # "mtp": rollouts decode with the checkpoint's MTP layers drafting
    num_draft: int = 1  # draft tokens per verify step (<= the checkpoint's MTP layers)
    # Above this many running rows a step decodes plain: a large rollout batch makes verification compute-bound
    # (measure it with `thinkforge.engine.mtp_acceptance.calibrate_spec_max_batch`); None = always speculate.
    spec_max_batch: int | None = None
    # Where the roles run: the fields of `thinkforge.cluster.ClusterConfig` (empty = one process). A plain
    # mapping, so the config stays JSON (`--set cluster.backend=ray` sets one key).
    cluster: dict = field(default_factory=dict)

    def cluster_config(self) -> ClusterConfig:
        return build_config(ClusterConfig, self.cluster, "rl: cluster")

    def check(self) -> None:
        if not self.model:
            raise ThinkforgeError("rl: --model is required")
        if not self.tasks:
            raise ThinkforgeError("rl: tasks is empty")
        for name in ("steps", "batch_groups", "mini_batch_groups", "ppo_epochs", "micro_batch_size", "max_tokens"):
            if getattr(self, name) < 1:
                raise ThinkforgeError(f"rl: {name} must be >= 1, got {getattr(self, name)}")
        if self.micro_batch_tokens < 0:
            raise ThinkforgeError(f"rl: micro_batch_tokens must be >= 0 (0 = off), got {self.micro_batch_tokens}")
        if self.group_size < 2:
            raise ThinkforgeError(f"rl: group_size must be >= 2 (GRPO compares samples), got {self.group_size}")
        if self.batch_groups % self.mini_batch_groups:
            raise ThinkforgeError(f"rl: batch_groups ({self.batch_groups}) must be a multiple of "
                                  f"mini_batch_groups ({self.mini_batch_groups})")
        choices = {"loss_agg": ("token", "sequence"), "old_logprobs": ("engine", "trainer"),
                   "overlong": ("mask", "penalty", "none")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ThinkforgeError(f"rl: {name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if not (0 <= self.clip_low < 1 and self.clip_high >= 0):
            raise ThinkforgeError(f"rl: bad clip range ({self.clip_low}, {self.clip_high})")
        if self.temperature <= 0:
            raise ThinkforgeError("rl: temperature must be > 0 (log-probs of a greedy policy are not a distribution)")
        self.cluster_config().check()


# ---------------------------------------------------------------------------------------- eval backend
class EngineBackend(Backend):
    """The RL run's own engine as a `Backend`, so held-out evaluation uses the current weights."""

    name = "native"

    def __init__(self, engine: Any, model_name: str) -> None:
        self.engine, self.model_name = engine, model_name

    def _ids(self, texts: list[str]) -> list[list[int]]:
        return [self.engine.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]

    def generate(self, prompts: list[str], params: SamplingParams) -> list[list[Completion]]:
        return self.engine.generate([self.engine.encode(p) for p in prompts], params)

    def chat(self, conversations: list[list[Message]], params: SamplingParams) -> list[list[Completion]]:
        from thinkforge.engine.backends import apply_chat_template

        texts = [apply_chat_template(self.engine.tokenizer, c) for c in conversations]
        return self.engine.generate(self._ids(texts), params)


def evaluate_heldout(engine: Any, cfg: RLConfig, out_dir: Path, step: int) -> dict[str, float]:
    from thinkforge.eval import evaluate
    from thinkforge.tasks import get_task

    backend = getattr(engine, "backend", None) or EngineBackend(engine, f"{cfg.out_dir}@step{step}")  # VL: hf-vl
    params = SamplingParams(temperature=0.0, max_tokens=cfg.eval_max_tokens, seed=cfg.seed)
    acc = {}
    for name in cfg.tasks:
        task = get_task(name)
        problems = task.problems("heldout", n=cfg.eval_problems, seed=0)
        summary = evaluate(task, backend, params, problems=problems, output_dir=out_dir / "eval" / f"step{step}",
                           seed=cfg.seed, config={"rl_step": step}, system_prompt=cfg.system_prompt)
        acc[name] = summary["accuracy"]
    return acc


def drop_evals_after(out_dir: Path, step: int) -> None:
    """Removes held-out evals a run starting at `step` will redo: those past it (a killed run's), and on a fresh
    start every one (a finished earlier run's in the same directory, which the harness would resume into)."""
    import shutil

    for d in (out_dir / "eval").glob("step*") if (out_dir / "eval").is_dir() else []:
        if d.name[4:].isdigit() and (step == 0 or int(d.name[4:]) > step):
            shutil.rmtree(d)


# ---------------------------------------------------------------------------------------- the loop
def _train_problems(cfg: RLConfig) -> tuple[list[Any], dict[str, Any]]:
    from thinkforge.tasks import get_task

    tasks, problems = {}, []
    for name in cfg.tasks:
        task = get_task(name)
        tasks[name] = task
        # RL trains on problems that carry only a checkable answer (or tests): a benchmark's test split is
        # never one, and a pool with nothing to check would train on rewards that are all 0.
        if "train" not in task.splits:
            raise ThinkforgeError(f"rl: task {name!r} has no answer-only train problems: it has no 'train' split "
                                  f"(splits: {', '.join(task.splits)}); RL on a test split would train on the test")
        try:
            pool = task.problems("train", n=cfg.problems_per_task, seed=cfg.seed, difficulty=cfg.difficulty)
        except ValueError as exc:  # a task that cannot draw the pool says why
            pool, why = [], f": {exc}"
        else:
            why = ""
        if not pool:
            at = f" at difficulty {cfg.difficulty}" if cfg.difficulty is not None else ""
            raise ThinkforgeError(f"rl: task {name!r} has no answer-only train problems{at} "
                                  f"(problems_per_task={cfg.problems_per_task}){why}")
        unchecked = next((p for p in pool if not p.answer and not p.tests), None)
        if unchecked is not None:
            raise ThinkforgeError(f"rl: task {name!r} train problem {unchecked.id} has neither an answer nor tests "
                                  "to reward")
        problems += pool
    return problems, tasks


def _loss_denominator(rows: list[TrainSample], cfg: RLConfig) -> int:
    """What the mini-batch's loss is divided by: its tokens (token-level loss) or its samples."""
    if cfg.loss_agg == "token":
        return sum(len(r.old_logprobs) for r in rows if r.mask) or 1
    return sum(1 for r in rows if r.mask) or 1


def _micro_backward(model: Any, ref: Any, batch: dict[str, torch.Tensor], cfg: RLConfig, denom: float, first: bool,
                    step: int, totals: dict[str, float], scale: float = 1.0) -> None:
    """Forward + backward of one micro-batch; its loss is divided by the whole mini-batch's `denom`, times
    `scale` (the FSDP trainer's world size, since its gradient reduction averages over ranks)."""
    logp, entropy = token_logprobs(model, batch, cfg.temperature, with_entropy=True)
    comp = batch["completion"]
    if first:
        # Before the first update the trainer's policy is the rollout policy: any gap is sampler drift.
        gap = (logp.detach() - batch["old"]).abs() * comp
        totals["drift"] += float(gap.sum())
        totals["drift_max"] = max(totals["drift_max"], float(gap.max()))
    old = logp.detach() if cfg.on_policy else batch["old"]
    ref_logp = None
    if ref is not None:
        with torch.no_grad():
            ref_logp, _ = token_logprobs(ref, batch, cfg.temperature)
    mask = batch["mask"]
    if cfg.loss_agg == "sequence":
        mask = mask * batch["weight"][:, None]  # each sample's tokens share weight 1/len
    loss, stats = policy_loss(logp, old, batch["adv"], mask, cfg.clip_low, cfg.clip_high, ref_logp, cfg.kl_coef)
    loss = loss / denom
    if not torch.isfinite(loss):
        raise ThinkforgeError(f"rl: loss is {float(loss.detach())} at step {step}; last good checkpoint kept in "
                              f"{Path(cfg.out_dir) / 'checkpoint'}")
    (loss * scale if scale != 1.0 else loss).backward()
    totals["loss"] += float(loss.detach())
    totals["tokens"] += float(batch["mask"].sum())
    totals["entropy"] += float((entropy * comp).sum())
    for k in ("clipped", "kl", "ratio"):
        totals[k] += float(stats[k])


def _new_totals() -> dict[str, float]:
    return {"loss": 0.0, "clipped": 0.0, "kl": 0.0, "ratio": 0.0, "tokens": 0.0, "entropy": 0.0, "drift": 0.0,
            "drift_max": 0.0}


def _update(model: Any, ref: Any, optimizer: torch.optim.Optimizer, rows: list[TrainSample], cfg: RLConfig,
            pad_id: int, device: Any, first: bool, step: int) -> dict[str, float]:
    """One gradient update on a mini-batch (micro-batched). Returns the update's statistics."""
    denom = _loss_denominator(rows, cfg)
    totals = _new_totals()
    for chunk in micro_batches(rows, cfg.micro_batch_size, cfg.micro_batch_tokens):
        _micro_backward(model, ref, collate(chunk, pad_id, device), cfg, denom, first, step, totals)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    if not torch.isfinite(grad_norm):
        raise ThinkforgeError(f"rl: gradient norm is {float(grad_norm)} at step {step}; last good checkpoint "
                              f"kept in {Path(cfg.out_dir) / 'checkpoint'}")
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    totals["grad_norm"] = float(grad_norm)
    totals["comp_tokens"] = float(sum(len(r.old_logprobs) for r in rows))
    return totals


def _train_step(model: Any, ref: Any, optimizer: torch.optim.Optimizer, groups: list[Group], cfg: RLConfig,
                pad_id: int, device: Any, step: int) -> dict[str, float]:
    samples, extra = _build_train_samples(groups, cfg)
    return _train_samples(model, ref, optimizer, samples, extra, cfg, pad_id, device, step)


def _build_train_samples(groups: list[Group], cfg: RLConfig) -> tuple[list[list[TrainSample]], dict[str, float]]:
    return build_samples(groups, std_normalize=cfg.std_normalize, overlong=cfg.overlong, max_tokens=cfg.max_tokens,
                         overlong_buffer=cfg.overlong_buffer, overlong_factor=cfg.overlong_penalty)


def _train_samples(model: Any, ref: Any, optimizer: torch.optim.Optimizer, samples: list[list[TrainSample]],
                   extra: dict[str, float], cfg: RLConfig, pad_id: int, device: Any, step: int,
                   update: Any = None) -> dict[str, float]:
    """The step's updates on its GRPO rows; `update` is `_update` (one process) or the FSDP rank's."""
    update = update or _update
    if cfg.old_logprobs == "trainer":
        with torch.no_grad():  # recompute pi_old with the trainer (the engine's are kept for the drift metric)
            for group in samples:
                batch = collate(group, pad_id, device)
                logp, _ = token_logprobs(model, batch, cfg.temperature)
                for r, row, n in zip(group, logp, batch["completion"], strict=True):
                    r.old_logprobs = row[n].tolist()
    per_update = len(samples) if cfg.on_policy else cfg.mini_batch_groups
    epochs = 1 if cfg.on_policy else cfg.ppo_epochs
    rng = random.Random(f"{cfg.seed}/minibatch/{step}")
    agg: dict[str, float] = {}
    updates = 0
    for epoch in range(epochs):
        order = list(range(len(samples)))
        if epoch or not cfg.on_policy:
            rng.shuffle(order)
        for i in range(0, len(order), per_update):
            rows = [r for j in order[i: i + per_update] for r in samples[j]]
            stats = update(model, ref, optimizer, rows, cfg, pad_id, device, first=updates == 0, step=step)
            if updates == 0:
                agg["logprob_drift"] = stats["drift"] / max(1.0, stats["comp_tokens"])
                agg["logprob_drift_max"] = stats["drift_max"]
            for k, v in stats.items():
                agg[k] = agg.get(k, 0.0) + v
            updates += 1
    tok = max(1.0, agg["tokens"])
    return {"loss": agg["loss"] / updates, "grad_norm": agg["grad_norm"] / updates, "updates": updates,
            "clip_frac": agg["clipped"] / tok, "kl": agg["kl"] / tok, "ratio_mean": agg["ratio"] / tok,
            "entropy": agg["entropy"] / max(1.0, agg["comp_tokens"]), "logprob_drift": agg["logprob_drift"],
            "logprob_drift_max": agg["logprob_drift_max"], "train_tokens": agg["comp_tokens"] / epochs, **extra}


def _rollout_row(g: Group, selected: bool, version: int | None = None) -> dict[str, Any]:
    """One group's line in rollouts.jsonl, with the reasons of reward functions that failed (raised, timed
    out, returned junk: those samples scored 0 and the run went on). With bounded staleness (`version` given),
    each sample's staleness: [versions behind for its first token, for its last token]."""
    row = {"problem": g.slot.problem.id, "slot": g.slot.index, "source": g.slot.source,
           "rewards": [round(r, 4) for r in g.rewards], "selected": selected}
    if version is not None:
        row["staleness"] = [[version - g.version, version - s.version] for s in g.samples]
    errors = [s.reward.reason[:300] for s in g.samples if s.reward.reason.startswith("reward_")]
    if errors:
        row["reward_errors"] = errors
    return row


def _step_metrics(groups: list[Group], selected: list[Group]) -> dict[str, float]:
    rewards = [s.reward.reward for g in groups for s in g.samples]
    correct = [s.reward.correct for g in groups for s in g.samples]
    lengths = [len(s.token_ids) for g in selected for s in g.samples]
    out = {"reward": sum(rewards) / max(1, len(rewards)), "pass_rate": sum(correct) / max(1, len(correct)),
           "response_length": sum(lengths) / max(1, len(lengths))}
    by_task: dict[str, list[float]] = {}
    lengths_by_task: dict[str, list[int]] = {}
    for g in groups:
        by_task.setdefault(g.slot.problem.task, []).extend(g.rewards)
        lengths_by_task.setdefault(g.slot.problem.task, []).extend(len(s.token_ids) for s in g.samples)
    for task, rs in by_task.items():
        out[f"reward/{task}"] = sum(rs) / len(rs)
        # MiMo-VL: reasoning tasks lengthen their responses under RL while grounding shortens them
        out[f"response_length/{task}"] = sum(lengths_by_task[task]) / max(1, len(lengths_by_task[task]))
    errors = sum(1 for g in groups for s in g.samples if s.reward.reason.startswith("reward_"))
    if errors:
        out["reward_errors"] = errors
    return out


def rl(cfg: RLConfig, progress: Any = None) -> dict[str, Any]:
    """Runs (or resumes) RL; returns the stage summary. Final model in `out_dir/model`."""
    from thinkforge.cluster.setup import preflight
    from thinkforge.cluster.trainer import launched_rank, run_rank

    cfg.check()
    finished = _finished_run(cfg)
    if finished is not None:
        return finished
    launched = launched_rank()
    if launched and launched[0] and cfg.cluster_config().trainer_procs > 1:  # torchrun: a trainer-only rank
        run_rank(cfg, *launched)
        return {"stage": "rl", "rank": launched[0]}
    started_ray = preflight(cfg.cluster_config())  # a Ray address that does not answer fails here, before any compute
    roles = None
    try:
        roles = _start(cfg, started_ray)
        return _run(cfg, progress, *roles)
    finally:
        if roles is None and started_ray:
            import ray

            ray.shutdown()


def _finished_run(cfg: RLConfig) -> dict[str, Any] | None:
    """The summary of a run that already finished in `out_dir` with this exact config, else None. Its
    checkpoint is gone once the final model is written, so without this a rerun (a resumed speedrun) would
    train again from step 0 and overwrite the model its evaluations were made with."""
    import json

    from thinkforge.utils import config_hash

    done = Path(cfg.out_dir) / "summary.json"
    if not done.exists():
        return None
    summary = json.loads(done.read_text())
    same = summary.get("config_hash") == config_hash(asdict(cfg)) and summary.get("stage") == "rl"
    return summary if same and (Path(summary.get("model_dir", "")) / "config.json").exists() else None


def _start(cfg: RLConfig, started_ray: bool) -> tuple[Any, ...]:
    """Loads the policy and builds the roles: (trainer, tokenizer, sampler, router, roles, state, tasks, device)."""
    from thinkforge.cluster.setup import build_roles
    from thinkforge.cluster.trainer import make_trainer
    from thinkforge.engine.loading import resolve_dtype
    from thinkforge.model.io import load_model, resolve_device
    from thinkforge.rewards import RewardRouter
    from thinkforge.rollout import ProblemSampler

    out_dir = ensure_writable_dir(cfg.out_dir)
    seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    problems, tasks = _train_problems(cfg)
    router = RewardRouter(cfg.rewards, workers=cfg.reward_workers, timeout_s=cfg.reward_timeout_s,
                          reward_options=cfg.reward_options)
    for name in cfg.tasks:
        router.route(name)  # unknown reward names fail here, before any compute
    from thinkforge.vl.model import is_vl_checkpoint, load_vl

    vl = is_vl_checkpoint(cfg.model)  # MiMo-VL's MORL: the same loop on a VL policy (thinkforge.vl.rollout)
    model, tokenizer = (load_vl if vl else load_model)(cfg.model, device=device, dtype=resolve_dtype(cfg.dtype, device))
    if not cfg.train_mtp:
        from thinkforge.model.mtp import freeze_mtp

        freeze_mtp(model)  # before the optimizer is built, so it never holds them
    ref = copy.deepcopy(model).eval().requires_grad_(False) if cfg.kl_coef > 0 else None
    sampler = ProblemSampler(problems, cfg.seed, cfg.easy_alpha, cfg.easy_pool)
    model.train()
    try:
        if vl:
            if cfg.cluster_config().trainer_procs > 1:
                raise ThinkforgeError("rl: cluster.trainer_procs > 1 (FSDP2) is not built for VL policies yet")
            from thinkforge.vl.rollout import build_vl_roles

            roles = build_vl_roles(cfg, model, tokenizer, router)
        else:  # before the trainer shards the policy: the in-process engine samples from a copy of it
            roles = build_roles(cfg, model, tokenizer, device, router, started_ray)
    except BaseException:
        router.close()
        raise
    trainer = None
    try:
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        trainer = make_trainer(cfg, model, ref, pad_id, device)  # trainer_procs > 1: starts the FSDP2 ranks
        state = trainer.load(out_dir) or {"step": 0, "tokens": 0, "elapsed": 0.0, "degenerate_steps": 0, "eval": {}}
        if "sampler" in state:
            sampler.load_state_dict(state["sampler"])
            router.load_state_dict(state["rewards"])
        router.restore(cfg.tasks)
    except BaseException:
        try:
            if trainer is not None:
                trainer.close(ok=False)
            roles.close()
        finally:
            router.close()
        raise
    return trainer, tokenizer, sampler, router, roles, state, tasks, device


def _run(cfg: RLConfig, progress: Any, trainer: Any, tokenizer: Any, sampler: Any, router: Any, roles: Any,
         state: dict[str, Any], tasks: dict[str, Any], device: Any) -> dict[str, Any]:
    from thinkforge.rollout import RolloutConfig, SeamlessRollout

    out_dir = Path(cfg.out_dir)
    optimizer = trainer.optimizer
    engine, rewards = roles.engine, roles.rewards
    cluster = cfg.cluster_config()
    stale = cluster.max_staleness > 0
    if getattr(engine, "processor", None) is not None:  # a VL engine: prompts carry their images
        from thinkforge.vl.rollout import VLSeamlessRollout as SeamlessRollout  # noqa: N814
    rollout = SeamlessRollout(engine, rewards, tasks, RolloutConfig(
        group_size=cfg.group_size, max_tokens=cfg.max_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
        continuous=cfg.continuous, async_reward=cfg.async_reward, early_termination=cfg.early_termination,
        max_slots_factor=cfg.max_slots_factor, system_prompt=cfg.system_prompt, reward_lag=cfg.reward_lag,
        filter_degenerate=cfg.dynamic_sampling, max_staleness=cluster.max_staleness))
    rollout.valid_ratio = state.get("valid_ratio", rollout.valid_ratio)
    drop_evals_after(out_dir, state["step"])
    log = MetricLog(out_dir, resume_step=state["step"])
    trim_steps(out_dir / "rollouts.jsonl", state["step"])
    t0 = time.time() - state["elapsed"]
    bar = progress.add_task("rl", total=cfg.steps, completed=state["step"]) if progress else None
    stopped = None
    ok = False
    try:
        # Version = the step whose update produced the weights; the engines start from the trainer's.
        version = state["step"]
        roles.sync.push(trainer.weights(), version)
        if cfg.eval_at_start and state["step"] == 0 and "0" not in state["eval"]:
            state["eval"]["0"] = evaluate_heldout(engine, cfg, out_dir, 0)
            log.log(0, **{f"eval/{k}": v for k, v in state["eval"]["0"].items()})
        while state["step"] < cfg.steps:
            step = state["step"] + 1
            lr = cosine_lr(step - 1, cfg.steps, cfg.lr, cfg.warmup_steps, cfg.min_lr_ratio)
            for group in optimizer.param_groups:
                group["lr"] = lr
            if engine.weight_version != version:  # on-policy: never sample from weights we did not send
                raise WeightVersionError(f"rl step {step}: rollout engine holds weights version "
                                         f"{engine.weight_version}, the trainer's are version {version}")
            if rewards is not router:
                rewards.refresh(router.state_dict())  # remote scorers see the committed test statistics
            overhead0 = _engine_overhead(engine)
            rollout.policy_version = version
            draw = sampler.begin_step()
            res = rollout.collect(draw, cfg.batch_groups)
            sampler.commit(draw, len(res.groups), [(g.rewards, g.correct) for g in res.groups])
            for g in res.groups:
                for s in g.samples:
                    router.commit(g.slot.problem, s.reward)
            append_jsonl(out_dir / "rollouts.jsonl",
                         {"step": step, "groups": [_rollout_row(g, g in res.selected, version if stale else None)
                                                   for g in res.groups]})
            row: dict[str, Any] = {"lr": lr, **res.stats, **_step_metrics(res.groups, res.selected),
                                   **sampler.summary(), "weight_version": version}
            if stale:  # versions behind, of the first token of each trained sample (AReaL's staleness)
                lags = [version - g.version for g in res.selected for _ in g.samples] or [0]
                row.update(staleness_mean=sum(lags) / len(lags), staleness_max=max(lags))
            if overhead0 is not None:
                row["ray_overhead_s"] = _engine_overhead(engine) - overhead0
            t_train = time.perf_counter()
            if res.selected:
                state["degenerate_steps"] = 0
                row.update(trainer.train(res.selected, step))
                state["tokens"] += int(row["train_tokens"])
                row["train_s"] = time.perf_counter() - t_train
                version = step
                row["weight_sync_s"] = roles.sync.push(trainer.weights(), version)
            else:
                state["degenerate_steps"] += 1
                warnings.warn(f"rl step {step}: no valid group in {res.stats['groups_started']} groups (every group's "
                              "rewards were equal: all solved or all failed); no update this step", RuntimeWarning,
                              stacklevel=2)
                row["train_s"] = time.perf_counter() - t_train
            row["valid_groups_short"] = cfg.batch_groups - len(res.selected)
            state["step"] = step
            state["valid_ratio"] = rollout.valid_ratio
            if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:
                state["eval"][str(step)] = evaluate_heldout(engine, cfg, out_dir, step)
                row.update({f"eval/{k}": v for k, v in state["eval"][str(step)].items()})
            log.log(step, **row)
            if progress:
                progress.update(bar, advance=1, description=f"rl reward {row['reward']:.3f}")
            if state["degenerate_steps"] >= cfg.max_degenerate_steps:
                stopped = (f"stopped after {state['degenerate_steps']} consecutive steps without a valid group: "
                           "the tasks are too easy or too hard for this model (check rewards, max_tokens, difficulty)")
                warnings.warn(f"rl: {stopped}", RuntimeWarning, stacklevel=2)
                break
            if step % cfg.save_every == 0 and step < cfg.steps:
                state["elapsed"] = time.time() - t0
                state["sampler"], state["rewards"] = sampler.state_dict(), router.state_dict()
                trainer.save(out_dir, tokenizer, state)
        final_eval = evaluate_heldout(engine, cfg, out_dir, state["step"])
        state["eval"][str(state["step"])] = final_eval
        log.log(state["step"], **{f"eval/{k}": v for k, v in final_eval.items()})
        path = trainer.finalize(out_dir, tokenizer)  # FSDP: every rank takes part in gathering the weights
        ok = True
    finally:
        log.close()
        try:
            trainer.close(ok=ok)
        finally:
            try:
                roles.close()
            finally:
                router.close()
    atomic_write_json(out_dir / "pass_rates.json", sampler.state_dict())
    summary = {
        "stage": "rl", "model_dir": str(path), "steps": state["step"], "tokens": state["tokens"],
        "wall_s": time.time() - t0, "accuracy": final_eval, "eval": state["eval"], "stopped": stopped,
        "easy_pool_size": len(sampler.easy), **run_metadata(asdict(cfg), cfg.seed),
    }
    write_stage_summary(out_dir, summary)
    return summary


def _engine_overhead(engine: Any) -> float | None:
    """Seconds a fanned-out engine spent outside its workers' compute (RPC, serialisation), or None."""
    stats = getattr(engine, "stats", None)
    if not isinstance(stats, dict) or "step_wall_s" not in stats:
        return None
    return stats["step_wall_s"] - stats["worker_busy_s"]

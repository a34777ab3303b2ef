"""Training the Bradley-Terry reward model (`thinkforge.vl.reward_model`) on synthetic preference pairs.

Pairs come from the visual tasks' problems: the preferred response is the reference (correct, complete),
the rejected one a corruption of it. For captions ("3 red squares"): a wrong colour, count or shape (only
the image tells these apart), a caption missing its count or colour (less complete), or an off-topic
reply; for any task with a teacher solution: another problem's solution with a different answer, or the
solution cut in half. Both sides of a pair share a phrasing template, so the template says nothing.
Held-out pairs are drawn from the held-out split (disjoint scenes). Loss: -log sigmoid(s_chosen -
s_rejected), averaged over a batch; the summary records held-out pairwise accuracy overall and per kind.

    thinkforge.train.reward_model.train_reward_model(RewardModelConfig(out_dir="runs/bt"))
"""

from __future__ import annotations

import random
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from thinkforge.errors import ThinkforgeError
from thinkforge.tasks.base import Problem
from thinkforge.utils import asdict, ensure_writable_dir, run_metadata, seed_everything

CAPTION = re.compile(r"^(\d+) (\w+) (square|circle)s?$")
TEMPLATES = ("{}", "The image shows {}.", "I see {}.", "There are {}.")
OFF_TOPIC = ("I cannot tell.", "The answer is 42.", "hello", "A photo.", "Nothing here to describe.")


@dataclass
class PreferencePair:
    problem: Problem
    chosen: str
    rejected: str
    kind: str  # what makes `rejected` worse: wrong_colour, wrong_count, wrong_shape, incomplete, off_topic, ...


@dataclass
class RewardModelConfig:
    out_dir: str = "runs/bt-reward"
    tasks: list[str] = field(default_factory=lambda: ["vl_caption"])
    train_problems: int = 1000  # per task
    heldout_problems: int = 100  # per task
    pairs_per_problem: int = 4
    steps: int = 600
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 1e-4
    spec: dict = field(default_factory=dict)  # thinkforge.vl.reward_model.BTSpec fields
    seed: int = 0
    device: str = "cpu"

    def check(self) -> None:
        if not self.tasks:
            raise ThinkforgeError("reward_model: tasks is empty")
        if min(self.train_problems, self.heldout_problems, self.pairs_per_problem, self.steps, self.batch_size) < 1:
            raise ThinkforgeError("reward_model: train_problems, heldout_problems, pairs_per_problem, steps and "
                                  "batch_size must be >= 1")
        if not self.lr > 0:
            raise ThinkforgeError(f"reward_model: lr must be > 0, got {self.lr}")


def _plural(n: int, kind: str) -> str:
    return f"{kind}{'s' if n != 1 else ''}"


def caption_corruptions(caption: str, rng: random.Random) -> list[tuple[str, str]]:
    """(kind, worse caption) for a "<n> <colour> <shape>(s)" caption; [] for any other text."""
    from thinkforge.tasks.vision import COLORS

    m = CAPTION.match(caption.strip())
    if not m:
        return []
    n, colour, shape = int(m.group(1)), m.group(2), m.group(3)
    other_n = rng.choice([k for k in range(max(1, n - 2), n + 3) if k != n])
    other_colour = rng.choice([c for c in COLORS if c != colour])
    other_shape = "circle" if shape == "square" else "square"
    return [("wrong_colour", f"{n} {other_colour} {_plural(n, shape)}"),
            ("wrong_count", f"{other_n} {colour} {_plural(other_n, shape)}"),
            ("wrong_shape", f"{n} {colour} {_plural(n, other_shape)}"),
            ("incomplete", rng.choice([f"{n} {_plural(n, shape)}", f"{colour} {_plural(n, shape)}"])),
            ("off_topic", rng.choice(OFF_TOPIC))]


def preference_pairs(problems: list[Problem], per_problem: int, seed: int) -> list[PreferencePair]:
    """`per_problem` pairs for each problem (fewer when it has fewer corruptions), seeded."""
    rng = random.Random(f"bt-pairs/{seed}")
    out = []
    for i, p in enumerate(problems):
        options = caption_corruptions(p.answer, rng)
        if options:
            chosen = p.answer
        else:
            chosen = p.solution or p.answer
            if not chosen:
                raise ThinkforgeError(f"problem {p.id}: no solution or answer to build preference pairs from")
            others = [q for q in problems[i + 1:] + problems[:i] if q.answer != p.answer and q.solution]
            options = [("wrong_answer", rng.choice(others).solution)] if others else []
            half = chosen.split()
            if len(half) > 3:
                options.append(("incomplete", " ".join(half[: len(half) // 2])))
            options.append(("off_topic", rng.choice(OFF_TOPIC)))
        for kind, worse in rng.sample(options, min(per_problem, len(options))):
            t = rng.choice(TEMPLATES) if options and CAPTION.match(chosen) else "{}"
            out.append(PreferencePair(p, t.format(chosen), t.format(worse) if kind != "off_topic" else worse, kind))
    return out


def _featurize(model: Any, pairs: list[PreferencePair]) -> list[tuple[dict, dict]]:
    cache: dict[str, Any] = {}
    out = []
    for pr in pairs:
        p = pr.problem
        if p.id not in cache:  # decode each problem's image once
            cache[p.id] = model.features(p.prompt, "", p.meta.get("images", []), f"problem {p.id}")["image"]
        a = model.features(p.prompt, pr.chosen, [], f"problem {p.id}")
        b = model.features(p.prompt, pr.rejected, [], f"problem {p.id}")
        a["image"] = b["image"] = cache[p.id]
        out.append((a, b))
    return out


@torch.no_grad()
def pairwise_accuracy(model: Any, pairs: list[PreferencePair], feats: list[tuple[dict, dict]] | None = None
                      ) -> dict[str, float]:
    """Share of pairs where the chosen response scores higher, overall ("all") and per kind."""
    feats = feats or _featurize(model, pairs)
    model.eval()
    wins = (model([a for a, _ in feats]) > model([b for _, b in feats])).tolist()
    kinds: dict[str, list[bool]] = {}
    for pr, w in zip(pairs, wins, strict=True):
        kinds.setdefault(pr.kind, []).append(w)
        kinds.setdefault("all", []).append(w)
    return {k: round(sum(v) / len(v), 4) for k, v in sorted(kinds.items())}


def bt_loss(model: Any, batch: list[tuple[dict, dict]]) -> torch.Tensor:
    chosen, rejected = model([a for a, _ in batch]), model([b for _, b in batch])
    return -torch.nn.functional.logsigmoid(chosen - rejected).mean()


def train_reward_model(cfg: RewardModelConfig) -> dict[str, Any]:
    """Trains on the tasks' train-split pairs, measures held-out pairs, saves `out_dir/model`; returns the summary."""
    from thinkforge.model.io import resolve_device
    from thinkforge.tasks import get_task
    from thinkforge.train.common import write_stage_summary
    from thinkforge.vl.reward_model import BTRewardModel, BTSpec, save_bt

    cfg.check()
    t0 = time.time()
    out_dir = ensure_writable_dir(cfg.out_dir)
    seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    try:
        spec = BTSpec(**cfg.spec)
    except TypeError as err:
        raise ThinkforgeError(f"reward_model: spec: {err}") from None
    model = BTRewardModel(spec).to(device)
    train = [p for t in cfg.tasks for p in get_task(t).problems("train", n=cfg.train_problems, seed=cfg.seed)]
    held = [p for t in cfg.tasks for p in get_task(t).problems("heldout", n=cfg.heldout_problems, seed=cfg.seed)]
    train_pairs = preference_pairs(train, cfg.pairs_per_problem, cfg.seed)
    held_pairs = preference_pairs(held, cfg.pairs_per_problem, cfg.seed + 1)
    train_feats, held_feats = _featurize(model, train_pairs), _featurize(model, held_pairs)
    before = pairwise_accuracy(model, held_pairs, held_feats)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    rng = random.Random(f"bt-train/{cfg.seed}")
    order: list[int] = []
    losses = []
    model.train()
    for _ in range(cfg.steps):
        if len(order) < cfg.batch_size:
            fresh = list(range(len(train_feats)))
            rng.shuffle(fresh)
            order += fresh
        idx, order = order[: cfg.batch_size], order[cfg.batch_size:]
        loss = bt_loss(model, [train_feats[i] for i in idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    model.eval()
    model.calibrate([f for pair in train_feats for f in pair])
    after = pairwise_accuracy(model, held_pairs, held_feats)
    path = save_bt(model.cpu(), Path(out_dir) / "model", {"tasks": list(cfg.tasks)})
    summary = {"stage": "reward_model", "model_dir": str(path), "train_pairs": len(train_pairs),
               "heldout_pairs": len(held_pairs), "parameters": sum(p.numel() for p in model.parameters()),
               "first_loss": round(losses[0], 4), "final_loss": round(sum(losses[-10:]) / len(losses[-10:]), 4),
               "heldout_accuracy_before": before, "heldout_accuracy": after, "wall_s": round(time.time() - t0, 2)}
    write_stage_summary(out_dir, {**summary, **run_metadata(asdict(cfg), cfg.seed)})
    return summary

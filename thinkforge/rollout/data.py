"""The data side of RL: a deterministic prompt stream, the Easy-Data Pool and per-problem pass-rate stats.

Prompts are handed out as numbered *slots*. Slot k of the run resolves to a problem and a sampling seed
as a pure function of (run seed, k, the state committed before the step), so:

- the batch a step trains on does not depend on timing (how far ahead the rollout admitted, which reward
  finished first): the rollout selects the first valid groups in slot order, and slots past the selected
  prefix are given back and re-drawn by the next step with the same seed;
- a run resumed from a checkpoint sees exactly the data order of the uninterrupted run.

The main stream walks shuffled epochs of the training problems. With probability `easy_alpha` a slot
instead draws from the Easy-Data Pool (problems a group solved with pass rate 1, MiMo report section 3):
solved problems leave the main stream so compute goes to problems that still teach, but are re-sampled
now and then so they are not forgotten; a pool problem that fails again returns to the main stream.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import numpy as np

from thinkforge.errors import ThinkforgeError
from thinkforge.tasks.base import Problem


@dataclass
class Slot:
    index: int  # position in the run's slot stream
    problem: Problem
    source: str  # "main" | "easy"
    seed: int  # sampling seed of the group's requests
    main_after: int  # main-stream cursor after this slot


class StepDraw:
    """Resolves the slots of one step against the sampler state frozen at the step's start."""

    def __init__(self, sampler: ProblemSampler) -> None:
        self.sampler = sampler
        self.easy = list(sampler.easy)  # snapshot: admission timing cannot change a slot's problem
        self._easy_set = set(self.easy)
        self.slots: list[Slot] = []
        self._main = sampler.main_cursor
        self._next = sampler.slot_cursor

    def next(self) -> Slot:
        s = self.sampler
        k = self._next
        rng = random.Random(f"{s.seed}/slot/{k}")
        all_easy = len(self._easy_set) >= len(s.problems)
        if self.easy and (all_easy or rng.random() < s.easy_alpha):
            problem, source = s.by_id[self.easy[rng.randrange(len(self.easy))]], "easy"
        else:
            while True:  # problems in the pool are skipped by the main stream
                problem = s.problems[s.main_index(self._main)]
                self._main += 1
                if problem.id not in self._easy_set:
                    break
            source = "main"
        seed = int(np.random.SeedSequence([s.seed & 0xFFFFFFFF, k]).generate_state(1)[0])
        slot = Slot(k, problem, source, seed, self._main)
        self.slots.append(slot)
        self._next += 1
        return slot


class ProblemSampler:
    def __init__(self, problems: list[Problem], seed: int = 0, easy_alpha: float = 0.1, easy_pool: bool = True) -> None:
        if not problems:
            raise ThinkforgeError("rl: no training problems")
        if not 0.0 <= easy_alpha <= 1.0:
            raise ThinkforgeError(f"rl: easy_alpha must be in [0, 1], got {easy_alpha}")
        ids = [p.id for p in problems]
        if len(set(ids)) != len(ids):
            # Train draws of a task may repeat a problem; one copy of each is enough for a stream.
            problems = list({p.id: p for p in problems}.values())
        self.problems = problems
        self.by_id = {p.id: p for p in problems}
        self.seed = seed
        self.easy_alpha = easy_alpha
        self.use_easy_pool = easy_pool
        self.main_cursor = 0
        self.slot_cursor = 0
        self.easy: list[str] = []
        self.stats: dict[str, dict[str, Any]] = {}
        self._epoch_orders: dict[int, list[int]] = {}  # epoch -> its shuffled order (a pure function of seed, epoch)

    def main_index(self, k: int) -> int:
        """The problem index at position k of the endless main stream (shuffled epochs)."""
        n = len(self.problems)
        epoch, pos = divmod(k, n)
        order = self._epoch_orders.get(epoch)
        if order is None:  # a shuffle of n problems per admitted slot cost ~7 ms at n = 20,000: keep the epoch's
            order = list(range(n))
            random.Random(self.seed * 7919 + epoch).shuffle(order)
            self._epoch_orders = {e: o for e, o in self._epoch_orders.items() if e >= epoch - 1}  # stream moves on
            self._epoch_orders[epoch] = order
        return order[pos]

    def begin_step(self) -> StepDraw:
        return StepDraw(self)

    def commit(self, draw: StepDraw, used: int, outcomes: list[tuple[list[float], list[bool]]]) -> None:
        """Consumes the first `used` slots of `draw`; `outcomes[i]` = (rewards, correct flags) of slot i."""
        if used == 0:
            return
        if len(outcomes) != used:
            raise ThinkforgeError(f"rl: commit got {len(outcomes)} outcomes for {used} slots")
        for slot, (rewards, correct) in zip(draw.slots[:used], outcomes, strict=True):
            pid = slot.problem.id
            st = self.stats.setdefault(pid, {"groups": 0, "samples": 0, "correct": 0, "reward_sum": 0.0,
                                             "pass_rate": 0.0, "task": slot.problem.task})
            rate = sum(correct) / max(1, len(correct))
            st["groups"] += 1
            st["samples"] += len(correct)
            st["correct"] += int(sum(correct))
            st["reward_sum"] += float(sum(rewards))
            st["pass_rate"] = rate
            if self.use_easy_pool:
                if rate >= 1.0 and pid not in self.easy:
                    self.easy.append(pid)
                elif rate < 1.0 and pid in self.easy:
                    self.easy.remove(pid)
        self.main_cursor = draw.slots[used - 1].main_after
        self.slot_cursor = draw.slots[used - 1].index + 1

    def state_dict(self) -> dict[str, Any]:
        return {"main_cursor": self.main_cursor, "slot_cursor": self.slot_cursor, "easy": list(self.easy),
                "stats": {k: dict(v) for k, v in self.stats.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.main_cursor = int(state["main_cursor"])
        self.slot_cursor = int(state["slot_cursor"])
        self.easy = [pid for pid in state["easy"] if pid in self.by_id]
        self.stats = {k: dict(v) for k, v in state["stats"].items()}

    def summary(self) -> dict[str, float]:
        seen = [s for s in self.stats.values() if s["groups"]]
        return {"easy_pool_size": len(self.easy), "problems_seen": len(seen),
                "solved_fraction": sum(s["pass_rate"] >= 1.0 for s in seen) / max(1, len(seen))}

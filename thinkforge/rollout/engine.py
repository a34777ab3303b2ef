"""The Seamless Rollout Engine (MiMo-7B report, section 4) over any `RolloutEngine` (`thinkforge.cluster`):
thinkforge's native continuous-batching engine, N of them on Ray actors stepped together, or vLLM.

One `collect` call gathers the groups one RL step trains on with dynamic sampling (a group whose rewards
are all equal -- pass rate 0 or 1 -- carries no GRPO signal and is dropped; sampling goes on until
`need` valid groups are in). Three switches, each removable:

(a) continuous rollout: prompts are admitted whenever the in-flight groups are not expected to fill the
    batch (using the valid-group ratio seen so far), instead of in synchronous rounds that wait for
    their slowest sample while the batch drains;
(b) asynchronous reward: each finished sample is scored in a worker pool while generation continues,
    instead of blocking the generator;
(c) early termination, FIFO: once the first `need` valid groups *in admission order* are complete, the
    rest of the in-flight work is aborted. Waiting for every group started before the selected ones
    keeps long answers from being biased out of the batch.

All three off is the naive dynamic-sampling baseline: generate a round, score it, filter, repeat. Since
every mode selects the first `need` valid groups in slot order (see `thinkforge.rollout.data`), all
modes train on the same batch; they differ only in time and waste, which `RolloutStats` reports.
"""

from __future__ import annotations

import math
import time
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from thinkforge.engine.base import SamplingParams
from thinkforge.engine.native import SequenceOutput
from thinkforge.rewards.base import RewardResult
from thinkforge.rollout.data import Slot, StepDraw

if TYPE_CHECKING:
    from thinkforge.cluster.roles import RewardPool, RolloutEngine


@dataclass
class RolloutConfig:
    group_size: int = 8
    max_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    continuous: bool = True
    async_reward: bool = True
    early_termination: bool = True
    max_slots_factor: float = 8.0  # give up a step after need * factor groups (all degenerate -> bounded)
    min_valid_ratio: float = 0.1  # floor of the valid-ratio estimate used to size admissions
    filter_degenerate: bool = True  # dynamic sampling; False keeps every group (degenerate ones add no gradient)
    system_prompt: str | None = None
    # Async rewards are read as soon as they are in (0), or exactly `reward_lag` engine steps after the
    # sample finished (waiting if need be). A fixed lag makes admissions and the batch a function of the
    # seed alone, so reruns match, while scoring still overlaps that many generation steps.
    reward_lag: int = 0
    # Bounded staleness (opt-in, AReaL): > 0 keeps the groups past the selected prefix in flight into the
    # next steps (partial rollout: they continue under the new weights) instead of aborting them; a group
    # started more than `max_staleness` weight versions ago is dropped, and admission also obeys AReaL's
    # capacity (max_staleness + version + 1) * need - (accepted + running). 0 = on-policy (MiMo).
    max_staleness: int = 0


@dataclass
class Sample:
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str
    text: str
    reward: RewardResult | None = None
    version: int = 0  # weight version when the sample finished (its first tokens are from its group's version)


@dataclass
class Group:
    slot: Slot
    prompt_ids: list[int]
    request_id: str
    samples: list[Sample | None]
    futures: dict[int, Future] = field(default_factory=dict)
    due: dict[int, int] = field(default_factory=dict)  # engine step at which each future is read (reward_lag)
    generated: int = 0
    aborted: bool = False
    filter_degenerate: bool = True
    version: int = 0  # weight version the group started under (behaviour policy of its first tokens)

    @property
    def complete(self) -> bool:
        return self.generated == len(self.samples) and all(s is not None and s.reward is not None for s in self.samples)

    @property
    def rewards(self) -> list[float]:
        return [s.reward.reward for s in self.samples]  # type: ignore[union-attr]

    @property
    def correct(self) -> list[bool]:
        return [s.reward.correct for s in self.samples]  # type: ignore[union-attr]

    @property
    def valid(self) -> bool:
        if not self.filter_degenerate:
            return True
        r = self.rewards
        return max(r) - min(r) > 1e-9  # all-equal rewards give zero GRPO advantage

    @property
    def tokens(self) -> int:
        return sum(len(s.token_ids) for s in self.samples if s is not None)


@dataclass
class RolloutResult:
    groups: list[Group]  # the committed prefix, in slot order (valid and degenerate)
    selected: list[Group]  # the valid groups of the prefix (at most `need`)
    stats: dict[str, float]


class SeamlessRollout:
    def __init__(self, engine: RolloutEngine, router: RewardPool, tasks: dict[str, Any], cfg: RolloutConfig) -> None:
        """`engine` is one engine or a fan-out over many (`thinkforge.cluster`): the scheduler drives them
        all at once. `router` is the reward pool (threads in-process, or CPU actors)."""
        from thinkforge.engine.backends import apply_chat_template

        self.engine, self.router, self.tasks, self.cfg = engine, router, tasks, cfg
        self._template = apply_chat_template
        self._prompt_cache: dict[str, list[int]] = {}
        self.valid_ratio = 0.5  # running estimate; only sizes admissions, never changes the batch
        self._finished: list[SequenceOutput] = []
        self._step = 0
        self.policy_version = 0  # set by the controller: the version the engines hold
        self.accepted = 0  # groups selected for training so far (AReaL's capacity rule)
        self._carry: dict[int, Group] = {}  # slot index -> group kept in flight from an earlier step

    def prompt_ids(self, slot: Slot) -> list[int]:
        pid = slot.problem.id
        if pid not in self._prompt_cache:
            task = self.tasks[slot.problem.task]
            text = self._template(self.engine.tokenizer, task.messages(slot.problem, self.cfg.system_prompt))
            self._prompt_cache[pid] = self.engine.tokenizer(text, add_special_tokens=False)["input_ids"]
        return self._prompt_cache[pid]

    # ------------------------------------------------------------------ helpers
    def _admit(self, draw: StepDraw, groups: list[Group], by_rid: dict[str, Group]) -> None:
        slot = draw.next()
        cfg = self.cfg
        carried = self._carry.pop(slot.index, None)
        if carried is not None:
            # The slot resolves to the same problem and seed as when it was started: reuse its samples
            # (unless the easy pool moved it to another problem).
            if carried.slot.problem.id == slot.problem.id:
                carried.slot = slot
                groups.append(carried)
                return
            self._drop(carried, by_rid)
        rid = f"rl{self._step}-s{slot.index}"
        params = SamplingParams(temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=cfg.max_tokens,
                                n=cfg.group_size, seed=slot.seed, logprobs=True)
        g = Group(slot, self.prompt_ids(slot), rid, [None] * cfg.group_size,
                  filter_degenerate=cfg.filter_degenerate, version=self.policy_version)
        groups.append(g)
        by_rid[rid] = g
        self._submit(g, params)

    def _submit(self, g: Group, params: SamplingParams) -> None:
        """Hands a new group's request to the engine (the VL scheduler sends its images with it)."""
        self.engine.add_request(g.prompt_ids, params, request_id=g.request_id)

    def _drop(self, g: Group, by_rid: dict[str, Group]) -> None:
        if not g.complete:
            self.engine.abort(g.request_id)
        for fut in g.futures.values():
            fut.cancel()
        by_rid.pop(g.request_id, None)

    def _capacity(self, groups: list[Group]) -> float:
        """AReaL's staleness capacity, in groups: how many more may start now."""
        running = sum(1 for g in groups if not g.complete) + sum(1 for g in self._carry.values() if not g.complete)
        return (self.cfg.max_staleness + self.policy_version + 1) * self._need - (self.accepted + running)

    def _score_inline(self, g: Group, i: int) -> None:
        s = g.samples[i]
        s.reward = self.router.score(g.slot.problem, s.text)  # type: ignore[union-attr]

    @staticmethod
    def _prefix(groups: list[Group], need: int) -> tuple[int, int]:
        """(end, valid): the shortest complete prefix holding `need` valid groups, else (-1, valid count
        of the complete prefix)."""
        valid = 0
        for i, g in enumerate(groups):
            if not g.complete:
                return -1, valid
            valid += g.valid
            if valid >= need:
                return i + 1, valid
        return -1, valid

    # ------------------------------------------------------------------ the loop
    def collect(self, draw: StepDraw, need: int) -> RolloutResult:
        cfg, engine, router = self.cfg, self.engine, self.router
        self._step += 1
        max_slots = max(need, math.ceil(need * cfg.max_slots_factor))
        groups: list[Group] = []
        self._need = need
        for k, g in list(self._carry.items()):  # too stale to train on now: dropped
            if self.policy_version - g.version > cfg.max_staleness:
                self._drop(g, {})
                del self._carry[k]
        by_rid: dict[str, Group] = {g.request_id: g for g in self._carry.values()}
        deferred: list[tuple[Group, int]] = []  # naive mode: scored when the round's generation is done
        t0 = time.perf_counter()
        gen_s = wait_s = busy_rows = 0.0
        engine_steps = 0  # the clock of `reward_lag`
        capacity = engine.max_batch_size
        end = -1
        while True:
            # --- 1. samples that finished generating go to reward
            finished, self._finished = self._finished, []
            for out in finished:
                g = by_rid.get(out.request_id)
                if g is None or out.completion.finish_reason == "abort":
                    continue
                c = out.completion
                g.samples[out.index] = Sample(list(c.token_ids), list(c.logprobs or []), c.finish_reason, c.text,
                                              version=self.policy_version)
                g.generated += 1
                if cfg.async_reward:
                    g.futures[out.index] = router.submit(g.slot.problem, c.text)
                    g.due[out.index] = engine_steps + cfg.reward_lag
                elif cfg.continuous:
                    t = time.perf_counter()
                    self._score_inline(g, out.index)  # the generator waits for the reward
                    wait_s += time.perf_counter() - t
                else:
                    deferred.append((g, out.index))
            # --- 2. async rewards that are in (or expired); with a lag, those that are due (or all of them
            # once generation has stopped, when nothing is left to overlap)
            idle_engine = not engine.has_unfinished()
            pending = []
            t = time.perf_counter()
            for g in groups:
                for i, fut in list(g.futures.items()):
                    if cfg.reward_lag:
                        ready = idle_engine or engine_steps >= g.due[i]
                    else:
                        ready = fut.done() or router.expired(fut)
                    if ready:
                        g.samples[i].reward = router.result(fut)  # type: ignore[union-attr]
                        del g.futures[i]
                    else:
                        pending.append(fut)
            wait_s += time.perf_counter() - t if cfg.reward_lag else 0.0
            if idle_engine and deferred:
                # Naive: the whole round is generated; score it as one parallel batch while the generator idles.
                t = time.perf_counter()
                futs = [(g, i, router.submit(g.slot.problem, g.samples[i].text)) for g, i in deferred]  # type: ignore[union-attr]
                for g, i, fut in futs:
                    g.samples[i].reward = router.result(fut)  # type: ignore[union-attr]
                wait_s += time.perf_counter() - t
                deferred = []
                continue
            # --- 3. done?
            end, valid = self._prefix(groups, need)
            if end >= 0 and (cfg.early_termination or (idle_engine and not pending)):
                break
            if len(groups) >= max_slots and all(g.complete for g in groups):
                break  # slot budget spent: train on what is valid (maybe nothing)
            # --- 4. admission
            in_flight = [g for g in groups if not g.complete]
            admitted = len(groups)
            if cfg.continuous:
                # Admit only while the in-flight groups cannot be expected to fill the batch, and only as
                # far as the engine has rows for (a short queue keeps aborts cheap).
                expected = self._expected_valid(groups)
                while (expected < need and len(groups) < max_slots
                       and engine.num_running + engine.num_waiting < capacity
                       and (not cfg.max_staleness or self._capacity(groups) > 0)):
                    self._admit(draw, groups, by_rid)
                    expected += self.valid_ratio
            elif idle_engine and not pending and not in_flight:
                deficit = need - valid
                round_size = min(max_slots - len(groups),
                                 math.ceil(deficit / max(self.valid_ratio, cfg.min_valid_ratio)))
                for _ in range(round_size):
                    self._admit(draw, groups, by_rid)
            if (len(groups) == admitted and not engine.has_unfinished() and not pending
                    and not self._finished and not deferred):
                break  # nothing in flight and nothing admissible: never spin
            # --- 5. generate, or wait for rewards
            if engine.has_unfinished():
                t = time.perf_counter()
                self._finished += engine.step()
                engine_steps += 1
                dt = time.perf_counter() - t
                gen_s += dt
                busy_rows += dt * (engine.num_running + len(self._finished))
            elif pending:
                t = time.perf_counter()
                wait(pending, timeout=max(0.001, min(router.timeout_s, 0.5)), return_when=FIRST_COMPLETED)
                wait_s += time.perf_counter() - t
        # --- early termination: abort whatever is still in flight past the selected prefix (with bounded
        # staleness, keep it in flight for the next steps instead)
        aborted_tokens = carried_tokens = 0
        if end >= 0 and cfg.max_staleness:
            for g in groups[end:]:
                self._carry[g.slot.index] = g  # its outputs and rewards keep arriving at the next collects
                carried_tokens += g.tokens
        elif end >= 0:
            for g in groups[end:]:
                if not g.complete:
                    engine.abort(g.request_id)
                    g.aborted = True
            t = time.perf_counter()
            while engine.has_unfinished():
                self._finished += engine.step()
            gen_s += time.perf_counter() - t
            for out in self._finished:
                g = by_rid.get(out.request_id)
                if g is not None and out.completion.finish_reason == "abort":
                    aborted_tokens += len(out.completion.token_ids)
            self._finished = []
            for g in groups[end:]:
                for fut in g.futures.values():
                    fut.cancel()
        else:
            end = len(groups)
        prefix = groups[:end]
        selected = [g for g in prefix if g.valid][:need]
        wall = time.perf_counter() - t0
        generated = sum(g.tokens for g in groups) + aborted_tokens - carried_tokens  # kept ones count when used
        used = sum(g.tokens for g in selected)
        degenerate = sum(g.tokens for g in prefix if not g.valid)
        self.accepted += len(selected)
        if prefix:
            ratio = len(selected) / len(prefix)
            self.valid_ratio = 0.5 * self.valid_ratio + 0.5 * max(ratio, 1e-3)
        stats = {
            "rollout_s": wall, "gen_s": gen_s, "reward_wait_s": wait_s,
            "idle_ratio": max(0.0, 1.0 - busy_rows / max(1e-9, capacity * wall)),
            "gen_idle_ratio": wait_s / max(wall, 1e-9),
            "tokens_generated": generated, "tokens_used": used,
            "waste": 1.0 - used / max(1, generated),
            "waste_degenerate": degenerate / max(1, generated),
            "waste_surplus": (generated - used - degenerate) / max(1, generated),
            "groups_started": len(groups), "groups_committed": len(prefix), "groups_valid": len(selected),
            "valid_group_ratio": len(selected) / max(1, len(prefix)),
        }
        return RolloutResult(prefix, selected, stats)

    def _expected_valid(self, groups: list[Group]) -> float:
        """Valid groups among the complete ones plus the expected share of those still in flight."""
        done = sum(1 for g in groups if g.complete and g.valid)
        return done + sum(self.valid_ratio for g in groups if not g.complete)

"""Built-in rewards: math (`math_equal`), code (sandboxed tests + Test-Difficulty-Driven Reward), multiple
choice (`choice_equal`), any task's own scorer, and a reward model (any HF sequence-classification model).

Stateful rewards (test-difficulty levels) only *read* their statistics while scoring and learn from
samples in `commit`, which the RL loop calls once per step for the samples it trains on, in order. So a
reward never depends on which worker thread finished first, and a resumed run scores exactly as the
uninterrupted one would.
"""

from __future__ import annotations

import hashlib
import json
import math
import threading
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from thinkforge.errors import ThinkforgeError
from thinkforge.rewards.base import RewardResult, register_reward
from thinkforge.tasks.base import Problem


@register_reward("math")
class MathReward:
    """1 if the boxed (else extracted) answer equals the gold answer under `math_equal`, else 0."""

    def __init__(self, timeout_s: float = 5.0) -> None:
        self.timeout_s = timeout_s

    def __call__(self, problem: Problem, response: str) -> RewardResult:
        from thinkforge.verify import extract_boxed, math_equal

        extracted = extract_boxed(response)
        if extracted is None:
            return RewardResult(0.0, False, "no_answer")
        ok = math_equal(extracted, problem.answer, timeout_s=self.timeout_s)
        return RewardResult(float(ok), ok, "correct" if ok else "wrong_answer", {"extracted": extracted})


@register_reward("choice")
class ChoiceReward:
    """1 if the chosen letter equals the gold letter (`choice_equal`), else 0."""

    def __call__(self, problem: Problem, response: str) -> RewardResult:
        from thinkforge.verify import choice_equal

        ok = choice_equal(response, problem.answer)
        return RewardResult(float(ok), ok, "correct" if ok else "wrong_answer")


@register_reward("task")
class TaskReward:
    """The task's own `Task.score` (for tasks without a dedicated reward)."""

    def __init__(self) -> None:
        self._tasks: dict[str, Any] = {}

    def __call__(self, problem: Problem, response: str) -> RewardResult:
        from thinkforge.tasks import get_task

        task = self._tasks.get(problem.task) or self._tasks.setdefault(problem.task, get_task(problem.task))
        score = task.score(problem, response)
        return RewardResult(float(score.reward), bool(score.correct), score.reason)


class TestRunCache:
    """Sandbox results by (program, tests, limits), shared by a reward's worker threads.

    A policy samples the same program many times: the speedrun's SFT model writes 1.4 distinct programs per
    group of 8 on its code task, and groups of a solved problem are often one program 8 times. A test run is
    deterministic for such programs, so the first run's per-test results serve the rest (concurrent
    requests for one key wait for the run in flight instead of starting their own). Runs with a timeout or
    sandbox error are not kept: a rerun may end differently. Bounded, oldest entries evicted first.
    """

    def __init__(self, max_entries: int = 4096) -> None:
        self.max_entries = max_entries
        self._done: dict[str, list[Any]] = {}
        self._running: dict[str, Future] = {}
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    @staticmethod
    def key(code: str, tests: list[Any], *limits: Any) -> str:
        blob = json.dumps([code, tests, limits], sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()

    def get_or_run(self, key: str, run: Callable[[], list[Any]]) -> list[Any]:
        with self._lock:
            if key in self._done:
                self.hits += 1
                return self._done[key]
            fut = self._running.get(key)
            mine = fut is None
            if mine:
                fut = self._running[key] = Future()
                self.misses += 1
            else:
                self.hits += 1
        if not mine:
            return fut.result()
        try:
            results = run()
        except BaseException as err:
            with self._lock:
                del self._running[key]
            fut.set_exception(err)
            raise
        with self._lock:
            del self._running[key]
            if not any(r.status in ("timeout", "sandbox_error") for r in results):
                self._done[key] = results
                while len(self._done) > self.max_entries:
                    del self._done[next(iter(self._done))]
        fut.set_result(results)
        return results


@register_reward("code_tddr")
class CodeTDDRReward:
    """Runs the problem's tests in the sandbox and grades with MiMo's Test-Difficulty-Driven Reward.

    Test levels start from each test's `level` field (the task author's estimate) and, once
    `min_population` committed solutions of a problem have been seen, are recomputed from the pass rate
    of each test over that population (`difficulty_levels`), so levels follow what the policy finds hard.
    `mode` is "strict" or "soft" (see `thinkforge.verify.tddr_reward`); "binary" is all-tests-pass.
    `cache`: repeated programs reuse their test results (`TestRunCache`); the levels are still those of
    the moment each sample is scored.
    """

    def __init__(self, mode: str = "strict", n_levels: int = 3, min_population: int = 8,
                 timeout_s: float = 5.0, memory_mb: int = 512, cache: bool = True) -> None:
        if mode not in ("strict", "soft", "binary"):
            raise ThinkforgeError(f"code_tddr: mode must be strict, soft or binary, got {mode!r}")
        self.mode, self.n_levels, self.min_population = mode, n_levels, min_population
        self.timeout_s, self.memory_mb = timeout_s, memory_mb
        self._lock = threading.Lock()
        self.stats: dict[str, dict[str, Any]] = {}  # problem id -> {"n": solutions, "passes": [per test]}
        self.cache = TestRunCache() if cache else None

    def levels(self, problem: Problem) -> list[int]:
        from thinkforge.verify import difficulty_levels

        with self._lock:
            st = self.stats.get(problem.id)
            if st is not None and st["n"] >= self.min_population and len(st["passes"]) == len(problem.tests):
                return difficulty_levels([p / st["n"] for p in st["passes"]], self.n_levels)
        return [min(self.n_levels - 1, max(0, int(t.get("level", 0)))) for t in problem.tests]

    def __call__(self, problem: Problem, response: str) -> RewardResult:
        from thinkforge.tasks.code import extract_code
        from thinkforge.verify import run_code, tddr_reward

        if not problem.tests:
            raise ThinkforgeError(f"code_tddr: problem {problem.id} has no tests")
        code = extract_code(response)
        if code is None:
            return RewardResult(0.0, False, "no_answer", {"passed": [False] * len(problem.tests)})
        def run() -> list[Any]:
            return run_code(code, problem.tests, timeout_s=self.timeout_s, memory_mb=self.memory_mb)

        if self.cache is None:
            results = run()
        else:
            results = self.cache.get_or_run(self.cache.key(code, problem.tests, self.timeout_s, self.memory_mb), run)
        passed = [r.passed for r in results]
        ok = all(passed)
        levels = self.levels(problem)
        reward = float(ok) if self.mode == "binary" else tddr_reward(passed, levels, self.mode)
        failed = sorted({r.status for r in results if not r.passed})
        return RewardResult(reward, ok, "correct" if ok else "+".join(failed), {"passed": passed, "levels": levels})

    def commit(self, problem: Problem, result: RewardResult) -> None:
        passed = result.details.get("passed")
        if not passed or len(passed) != len(problem.tests):
            return  # a crashed/timed-out reward says nothing about the tests
        with self._lock:
            st = self.stats.setdefault(problem.id, {"n": 0, "passes": [0] * len(passed)})
            st["n"] += 1
            st["passes"] = [a + int(b) for a, b in zip(st["passes"], passed, strict=True)]

    def state_dict(self) -> dict[str, Any]:
        with self._lock:
            return {k: {"n": v["n"], "passes": list(v["passes"])} for k, v in self.stats.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        with self._lock:
            self.stats = {k: {"n": int(v["n"]), "passes": list(v["passes"])} for k, v in state.items()}


@register_reward("reward_model")
class RewardModelReward:
    """A preference reward from any HF sequence-classification model, mapped to [0, 1].

    One output logit: sigmoid(logit / temperature). Several: the softmax probability of the last label
    ("good"). The conversation is rendered with the reward model's chat template when it has one.
    """

    def __init__(self, path: str = "", device: str = "cpu", dtype: str = "float32", temperature: float = 1.0,
                 max_length: int = 1024) -> None:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from thinkforge.engine.loading import resolve_device, resolve_dtype

        if not path or not (Path(path) / "config.json").exists():
            raise ThinkforgeError(f"reward_model: path {path!r} is not an HF model directory (no config.json)")
        dev = resolve_device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForSequenceClassification.from_pretrained(path, dtype=resolve_dtype(dtype, dev)).to(dev).eval()
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id or self.tokenizer.eos_token_id
        self.device, self.temperature, self.max_length = dev, temperature, max_length
        self._lock = threading.Lock()  # one forward at a time: reward workers share the model

    def render(self, problem: Problem, response: str) -> str:
        msgs = [{"role": "user", "content": problem.prompt}, {"role": "assistant", "content": response}]
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(msgs, tokenize=False)
        return f"{problem.prompt}\n{response}"

    def __call__(self, problem: Problem, response: str) -> RewardResult:
        import torch

        enc = self.tokenizer(self.render(problem, response), return_tensors="pt", truncation=True,
                             max_length=self.max_length)
        with self._lock, torch.inference_mode():
            logits = self.model(**{k: v.to(self.device) for k, v in enc.items()}).logits[0].float()
        if logits.numel() == 1:
            score = 1.0 / (1.0 + math.exp(-float(logits[0]) / self.temperature))
        else:
            score = float(torch.softmax(logits / self.temperature, dim=-1)[-1])
        return RewardResult(score, score >= 0.5, "reward_model", {"score": score})

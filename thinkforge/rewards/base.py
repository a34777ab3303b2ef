"""The reward contract, the registry of reward functions, and the router that picks one per task.

A reward function maps (problem, response) to a `RewardResult` with `reward` in [0, 1]. The router
(`RewardRouter`) sends each sample to the reward of its task (mixed tasks in one RL run, as in
MiMo-VL's mixed on-policy RL), optionally mixing several rewards with weights (verifiable +
reward-model), and never lets a broken reward stop a run: an exception, a hang past `timeout_s`
or a value outside [0, 1] scores the sample 0 with the reason recorded.
"""

from __future__ import annotations

import math
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout  # builtin TimeoutError only from 3.11
from dataclasses import dataclass, field
from typing import Any, Protocol

from thinkforge.errors import SandboxUnavailable, ThinkforgeError, UnknownNameError
from thinkforge.tasks.base import Problem


@dataclass
class RewardResult:
    reward: float  # in [0, 1]
    correct: bool  # the sample fully solves the problem (drives pass rates and the easy pool)
    reason: str  # "correct", "wrong_answer", "no_answer", "reward_error: ...", "reward_timeout", ...
    details: dict[str, Any] = field(default_factory=dict)


class RewardFn(Protocol):
    def __call__(self, problem: Problem, response: str) -> RewardResult: ...


REWARDS: dict[str, Callable[..., RewardFn]] = {}


def register_reward(name: str) -> Callable[[Callable[..., RewardFn]], Callable[..., RewardFn]]:
    """Registers a reward factory: `get_reward(name, **options)` calls it with the options."""

    def deco(factory: Callable[..., RewardFn]) -> Callable[..., RewardFn]:
        REWARDS[name] = factory
        return factory

    return deco


def get_reward(name: str, **options: Any) -> RewardFn:
    import thinkforge.rewards.builtin  # noqa: F401  (registers the built-in rewards)

    if name not in REWARDS:
        raise UnknownNameError(f"unknown reward {name!r}; known: {', '.join(sorted(REWARDS))}")
    try:
        return REWARDS[name](**options)
    except TypeError as err:
        raise ThinkforgeError(f"reward {name!r}: bad options {sorted(options)} ({err})") from None


# Default reward per task kind when a task has no explicit route.
KIND_DEFAULTS = {"math": "math", "code": "code_tddr", "choice": "choice"}


def _parse_route(task: str, spec: Any) -> list[tuple[str, float, dict[str, Any]]]:
    """A route is a reward name, {"name": ..., **options}, or a list of {"name", "weight", **options}."""
    items = spec if isinstance(spec, list) else [spec]
    out = []
    for i, item in enumerate(items):
        if isinstance(item, str):
            out.append((item, 1.0, {}))
        elif isinstance(item, dict) and isinstance(item.get("name"), str):
            opts = {k: v for k, v in item.items() if k not in ("name", "weight")}
            weight = float(item.get("weight", 1.0))
            if not weight >= 0:
                raise ThinkforgeError(f"rewards.{task}[{i}]: weight must be >= 0, got {item.get('weight')!r}")
            out.append((item["name"], weight, opts))
        else:
            raise ThinkforgeError(f"rewards.{task}[{i}]: expected a reward name or a mapping with 'name', got {item!r}")
    total = sum(w for _, w, _ in out)
    if total <= 0:
        raise ThinkforgeError(f"rewards.{task}: weights sum to 0")
    return [(n, w / total, o) for n, w, o in out]


def _sanitize(result: Any, name: str) -> RewardResult:
    if not isinstance(result, RewardResult):
        return RewardResult(0.0, False, f"reward_error: {name} returned {type(result).__name__}, not RewardResult")
    r = result.reward
    if not isinstance(r, int | float) or not math.isfinite(r) or not 0.0 <= r <= 1.0:
        return RewardResult(0.0, False, f"reward_invalid: {name} returned reward {r!r} outside [0, 1]")
    return result


class DaemonPool:
    """A minimal thread pool of daemon workers. `ThreadPoolExecutor` joins its workers at interpreter exit,
    so one reward call that never returns would hang the process after training ended."""

    def __init__(self, workers: int, name: str) -> None:
        self._tasks: queue.SimpleQueue[tuple[Future, Any, tuple[Any, ...]] | None] = queue.SimpleQueue()
        self._name = name
        self._threads: list[threading.Thread] = []
        for _ in range(workers):
            self.add_worker()

    def add_worker(self) -> None:
        t = threading.Thread(target=self._work, name=f"{self._name}_{len(self._threads)}", daemon=True)
        self._threads.append(t)
        t.start()

    def submit(self, fn: Any, *args: Any) -> Future:
        fut: Future = Future()
        self._tasks.put((fut, fn, args))
        return fut

    def shutdown(self) -> None:
        """Cancels queued calls and stops idle workers (a running call finishes on its own)."""
        while True:
            try:
                item = self._tasks.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                item[0].cancel()
        for _ in self._threads:
            self._tasks.put(None)

    def _work(self) -> None:
        while (item := self._tasks.get()) is not None:
            fut, fn, args = item
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(fn(*args))
            except BaseException as err:  # noqa: BLE001 - delivered to whoever waits on the future
                fut.set_exception(err)


class TimedResults:
    """Collecting scores from futures stamped with `t_submit` by `submit`: shared by the in-process router
    and the Ray reward pool. Subclasses provide `timeout_s`, `submit` and `_abandon`."""

    timeout_s: float

    def submit(self, problem: Problem, response: str) -> Future:
        raise NotImplementedError

    def _abandon(self, fut: Future) -> None:
        raise NotImplementedError

    def result(self, fut: Future, timeout_s: float | None = None) -> RewardResult:
        """The future's result, or reward 0 ("reward_timeout") once `timeout_s` (default the pool's)
        has passed since submission."""
        limit = self.timeout_s if timeout_s is None else timeout_s
        remaining = max(0.0, fut.t_submit + limit - time.monotonic())  # type: ignore[attr-defined]
        try:
            return fut.result(timeout=remaining)
        except FutureTimeout:
            self._abandon(fut)
            return RewardResult(0.0, False, f"reward_timeout: exceeded {limit:g}s")

    def expired(self, fut: Future) -> bool:
        return time.monotonic() > fut.t_submit + self.timeout_s  # type: ignore[attr-defined]

    def score(self, problem: Problem, response: str) -> RewardResult:
        return self.result(self.submit(problem, response))


class RewardRouter(TimedResults):
    """Scores samples with the reward of their task, in a thread pool (`submit`) or inline (`score`).

    `routes` maps a task name to a route (see `_parse_route`); tasks without one use their kind's
    default (`KIND_DEFAULTS`), else the task's own `Task.score`. Thread pools cannot kill a hung
    function, so a reward that exceeds `timeout_s` is abandoned (scored 0, "reward_timeout") and its
    worker replaced; the verifiers themselves enforce their own limits in subprocesses. Workers are daemon
    threads, so an abandoned call never keeps the process from exiting.
    """

    def __init__(self, routes: dict[str, Any] | None = None, *, workers: int = 4, timeout_s: float = 30.0,
                 reward_options: dict[str, dict[str, Any]] | None = None) -> None:
        if workers < 1:
            raise ThinkforgeError(f"reward workers must be >= 1, got {workers}")
        if not timeout_s > 0:
            raise ThinkforgeError(f"reward timeout_s must be > 0, got {timeout_s}")
        self.routes = {t: _parse_route(t, s) for t, s in (routes or {}).items()}
        import thinkforge.rewards.builtin  # noqa: F401  (registers the built-in rewards)

        for task, route in self.routes.items():  # a typo fails now, not as a zero reward on every sample
            for name, _, _ in route:
                if name not in REWARDS:
                    raise UnknownNameError(f"rewards.{task}: unknown reward {name!r}; known: {', '.join(sorted(REWARDS))}")
        self.reward_options = reward_options or {}
        self.timeout_s = timeout_s
        self.workers = workers
        self._fns: dict[tuple[str, str], RewardFn] = {}
        self._lock = threading.Lock()
        self._pool = DaemonPool(workers, "reward")
        self.errors: list[str] = []  # recent failure reasons (bounded), for logs and tests

    # ------------------------------------------------------------ resolution
    def route(self, task: str) -> list[tuple[str, float, dict[str, Any]]]:
        if task in self.routes:
            return self.routes[task]
        from thinkforge.tasks import get_task

        kind = get_task(task).kind
        name = KIND_DEFAULTS.get(kind, "task")
        return [(name, 1.0, {})]

    def fn(self, name: str, options: dict[str, Any]) -> RewardFn:
        key = (name, repr(sorted(options.items())))
        with self._lock:
            if key not in self._fns:
                self._fns[key] = get_reward(name, **{**self.reward_options.get(name, {}), **options})
            return self._fns[key]

    def reward_fns(self) -> list[RewardFn]:
        with self._lock:
            return list(self._fns.values())

    # ------------------------------------------------------------ scoring
    def _score_now(self, problem: Problem, response: str) -> RewardResult:
        """Scores inline (no timeout); exceptions become reward 0 with the reason."""
        parts = []
        for name, weight, opts in self.route(problem.task):
            try:
                res = _sanitize(self.fn(name, opts)(problem, response), name)
            except SandboxUnavailable:
                raise  # no isolation for untrusted code: a setup error that must stop the run, not a reward 0
            except Exception as err:  # noqa: BLE001 - a broken reward must not stop the run
                res = RewardResult(0.0, False, f"reward_error: {name}: {type(err).__name__}: {err}"[:300])
            parts.append((name, weight, res))
        if len(parts) == 1:
            res = parts[0][2]
        else:
            # Mixed reward: weighted sum; "correct" is decided by the verifiable (first) reward.
            total = sum(w * r.reward for _, w, r in parts)
            first = parts[0][2]
            res = RewardResult(min(1.0, max(0.0, total)), first.correct, first.reason,
                               {**first.details, "parts": {n: r.reward for n, _, r in parts}})
        # Every part's failure is noted, not only the first's: a broken later part of a mixed route (a reward
        # model with a bad path) would otherwise score 0 without a word.
        failed = [(i, r.reason) for i, (_, _, r) in enumerate(parts) if r.reason.startswith(("reward_error",
                                                                                            "reward_invalid"))]
        for _, reason in failed:
            self._note(f"{problem.id}: {reason}")
        if any(i > 0 for i, _ in failed):  # the combined reason is the first part's: say what else broke
            res.details["part_errors"] = [reason for _, reason in failed]
        return res

    def score_now(self, problem: Problem, response: str) -> RewardResult:
        """Scores in the calling thread (a Ray reward actor's body), with the router's error handling."""
        return self._score_now(problem, response)

    def refresh(self, state: dict[str, Any]) -> None:
        """`RewardPool.refresh`: nothing to hand over, this router is the owner of the reward state."""

    def submit(self, problem: Problem, response: str) -> Future:
        """Schedules scoring in the pool; collect with `result(future)`."""
        fut = self._pool.submit(self._score_now, problem, response)
        fut.t_submit = time.monotonic()  # type: ignore[attr-defined]
        fut.problem_id = problem.id  # type: ignore[attr-defined]
        return fut

    def _abandon(self, fut: Future) -> None:
        self._note(f"{fut.problem_id}: reward_timeout after {self.timeout_s:g}s")  # type: ignore[attr-defined]
        if not fut.cancel() and not fut.done():  # running: the hung call keeps its thread; add one to go on
            self._pool.add_worker()

    def _note(self, message: str) -> None:
        with self._lock:
            self.errors.append(message)
            del self.errors[:-100]

    def commit(self, problem: Problem, result: RewardResult) -> None:
        """Lets stateful rewards learn from a sample the trainer kept (called in a fixed order)."""
        for name, _, opts in self.route(problem.task):
            fn = self.fn(name, opts)
            if hasattr(fn, "commit"):
                fn.commit(problem, result)

    # ------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """State of stateful rewards (e.g. test-difficulty statistics), keyed by reward name."""
        with self._lock:
            items = list(self._fns.items())
        return {f"{n}|{o}": fn.state_dict() for (n, o), fn in items if hasattr(fn, "state_dict")}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._pending_state = dict(state)
        for key, value in state.items():
            name, _, opts = key.partition("|")
            for (n, o), fn in list(self._fns.items()):
                if n == name and o == opts and hasattr(fn, "load_state_dict"):
                    fn.load_state_dict(value)

    def restore(self, tasks: list[str]) -> None:
        """Instantiates the rewards of `tasks` and hands them any state loaded before they existed."""
        for task in tasks:
            for name, _, opts in self.route(task):
                self.fn(name, opts)
        if getattr(self, "_pending_state", None):
            self.load_state_dict(self._pending_state)

    def close(self) -> None:
        self._pool.shutdown()

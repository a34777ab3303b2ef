"""Rewards on Ray CPU actors (MiMo's layout: verifiers on their own CPU servers, scoring while the
engines generate). Same contract as the in-process `RewardRouter`: `submit` returns a future,
`result` waits for it up to the timeout.

Each actor holds its own `RewardRouter` (same routes and options) and scores one sample at a time.
The controller's router stays the owner of stateful rewards' statistics (test difficulty): `refresh`
hands the actors that state before a step. A driver thread collects results as they finish.

Faults: an actor that dies is replaced (at most `max_restarts` in the run, then every pending future
fails with a one-line error that stops the run) and every sample it held is scored again on the new
one, each future resolved exactly once. A reward that hangs past `timeout_s` scores 0 ("reward_timeout")
and, unlike a thread, its actor is really killed and replaced (not counted as a crash).
"""

from __future__ import annotations

import importlib
import os
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from thinkforge.errors import ThinkforgeError
from thinkforge.rewards.base import RewardResult, TimedResults
from thinkforge.tasks.base import Problem


class RewardWorker:
    """The body of a reward actor (constructible in-process, to debug it)."""

    def __init__(self, routes: dict[str, Any], reward_options: dict[str, Any], tasks: list[str],
                 imports: list[str]) -> None:
        from thinkforge.rewards.base import RewardRouter

        for name in imports:
            importlib.import_module(name)
        self.tasks = tasks
        self.router = RewardRouter(routes, workers=1, reward_options=reward_options)
        self.router.restore(tasks)

    def pid(self) -> int:
        return os.getpid()

    def score(self, problem: Problem, response: str) -> RewardResult:
        return self.router.score_now(problem, response)

    def load_state(self, state: dict[str, Any]) -> bool:
        self.router.load_state_dict(state)
        self.router.restore(self.tasks)
        return True


@dataclass
class _Job:
    future: Future
    problem: Problem
    response: str
    worker: int = -1


class RayRewardPool(TimedResults):
    def __init__(self, routes: dict[str, Any], reward_options: dict[str, Any], tasks: list[str], *,
                 workers: int, timeout_s: float, imports: list[str], cpus: float = 1.0,
                 max_restarts: int = 3) -> None:
        import ray

        self._ray = ray
        self.timeout_s, self.max_restarts = timeout_s, max_restarts
        self._args = (routes, reward_options, tasks, imports)
        self._actor_cls = ray.remote(RewardWorker).options(num_cpus=cpus, max_restarts=0)
        self.actors = [self._actor_cls.remote(*self._args) for _ in range(workers)]
        self.pids = ray.get([a.pid.remote() for a in self.actors])  # a worker that cannot start fails here
        self._inflight: list[dict[Any, _Job]] = [{} for _ in self.actors]
        self._state: dict[str, Any] | None = None
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = False
        self.restarts = 0  # crashes replaced
        self.replaced_hung = 0  # actors killed for a reward past its timeout
        self.rescored = 0  # samples submitted again after their actor died
        self.errors: list[str] = []
        self._thread = threading.Thread(target=self._collect, name="ray-reward-collector", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------ scoring
    def submit(self, problem: Problem, response: str) -> Future:
        fut: Future = Future()
        fut.t_submit = time.monotonic()  # type: ignore[attr-defined]
        fut.problem_id = problem.id  # type: ignore[attr-defined]
        with self._lock:
            self._dispatch(_Job(fut, problem, response))
        self._wake.set()
        return fut

    def _dispatch(self, job: _Job) -> None:
        w = min(range(len(self.actors)), key=lambda i: (len(self._inflight[i]), i))
        job.worker = w
        self._inflight[w][self.actors[w].score.remote(job.problem, job.response)] = job

    def refresh(self, state: dict[str, Any]) -> None:
        self._state = state
        self._ray.get([a.load_state.remote(state) for a in self.actors])

    # ------------------------------------------------------------ faults
    def _abandon(self, fut: Future) -> None:
        """A reward past its timeout: drop the sample, kill its (busy) actor; the collector replaces it."""
        with self._lock:
            for w, jobs in enumerate(self._inflight):
                if any(j.future is fut for j in jobs.values()):
                    fut.cancel()
                    self.replaced_hung += 1
                    self.errors.append(f"{fut.problem_id}: reward_timeout after {self.timeout_s:g}s")  # type: ignore[attr-defined]
                    self._replace(w, crashed=False)
                    break

    def _replace(self, w: int, crashed: bool) -> None:
        """New actor for slot `w` (lock held); the samples the old one held are scored again on it."""
        ray = self._ray
        ray.kill(self.actors[w], no_restart=True)
        jobs = [j for j in self._inflight[w].values() if not j.future.done()]
        self._inflight[w] = {}
        if crashed:
            self.restarts += 1
            if self.restarts > self.max_restarts:
                err = ThinkforgeError(f"reward worker {w} died; {self.max_restarts} restarts already used "
                                      f"(cluster.max_restarts): stopping")
                for j in jobs:
                    j.future.set_exception(err)
                self.actors[w] = self._actor_cls.remote(*self._args)  # keeps the pool usable for others
                return
        actor = self._actor_cls.remote(*self._args)
        if self._state is not None:
            actor.load_state.remote(self._state)  # runs before any score call (actor calls are in order)
        self.actors[w] = actor
        self.pids[w] = -1  # unknown until asked (not waited for here)
        for j in jobs:
            j.worker = w
            self._inflight[w][actor.score.remote(j.problem, j.response)] = j
            self.rescored += crashed

    def _collect(self) -> None:
        ray = self._ray
        while not self._stop:
            with self._lock:
                refs = [r for jobs in self._inflight for r in jobs]
            if not refs:
                self._wake.wait(0.05)
                self._wake.clear()
                continue
            ready, _ = ray.wait(refs, num_returns=1, timeout=0.05)
            if ready:
                ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
            for ref in ready:
                try:
                    value: Any = ray.get(ref)
                    error = None
                except ray.exceptions.RayActorError:
                    value, error = None, "dead"
                except Exception as err:  # noqa: BLE001 - a scorer bug reaches the waiting future
                    value, error = err, "raised"
                with self._lock:
                    w = next((i for i, jobs in enumerate(self._inflight) if ref in jobs), None)
                    if w is None:
                        continue  # its actor was replaced; the job lives on under a new ref
                    if error == "dead":
                        self._replace(w, crashed=True)
                        continue
                    job = self._inflight[w].pop(ref)
                    if job.future.done():
                        continue  # abandoned after a timeout
                    if error == "raised":
                        job.future.set_exception(value)
                    else:
                        job.future.set_result(value)

    def close(self) -> None:
        self._stop = True
        self._wake.set()
        self._thread.join(timeout=2)
        for a in self.actors:
            self._ray.kill(a, no_restart=True)
        self.actors = []

"""Rollout on Ray: N actors, each running the native engine, driven in lockstep as one `RolloutEngine`.

The Seamless Rollout scheduler sees one engine with N times the rows: `add_request` places a request on
the least-loaded worker, `step` advances every busy worker once (one RPC each, in parallel) and merges
what finished, `abort` goes to the request's owner. Requests are seeded per sample, so which worker
runs a request does not change its samples.

A worker that dies is replaced (up to `max_restarts` in the run), given the current weights from the
object store, and its in-flight requests are re-admitted; samples it had already delivered are not
delivered twice (the re-run draws the same tokens, since requests are seeded).
"""

from __future__ import annotations

import importlib
import os
import time
from dataclasses import dataclass, field
from typing import Any

from thinkforge.cluster.raycluster import task_error_cause
from thinkforge.cluster.roles import NativeRolloutEngine, generate_blocking
from thinkforge.cluster.weights import WeightBucket, WeightVersionError, check_ack, pack_buckets
from thinkforge.engine.base import Completion, SamplingParams
from thinkforge.engine.native import SequenceOutput
from thinkforge.errors import ThinkforgeError


@dataclass
class EngineSpec:
    """What a rollout worker builds: the model (trainer dtype, then the engine's), engine settings."""

    model: str
    device: str = "auto"
    dtype: str = "float32"
    engine_dtype: str = "auto"
    max_batch_size: int = 128
    seed: int = 0
    speculative: str | None = None
    num_draft: int = 1
    spec_max_batch: int | None = None  # see RLConfig.spec_max_batch
    threads: int = 1
    imports: list[str] = field(default_factory=list)


class RolloutWorker:
    """One rollout engine; the body of a Ray actor (and constructible in-process, to debug it)."""

    def __init__(self, spec: EngineSpec) -> None:
        import torch

        from thinkforge.engine.loading import resolve_dtype
        from thinkforge.engine.native import LLMEngine
        from thinkforge.model.io import load_model, resolve_device

        for name in spec.imports:
            importlib.import_module(name)
        torch.set_num_threads(spec.threads)
        device = resolve_device(spec.device)
        model, tokenizer = load_model(spec.model, device=device, dtype=resolve_dtype(spec.dtype, device))
        engine = LLMEngine(model.requires_grad_(False), tokenizer, max_batch_size=spec.max_batch_size,
                           seed=spec.seed, dtype=resolve_dtype(spec.engine_dtype, device),
                           speculative=spec.speculative, num_draft=spec.num_draft, spec_max_batch=spec.spec_max_batch)
        self.engine = NativeRolloutEngine(engine)

    def pid(self) -> int:
        return os.getpid()

    def step(self, new: list[tuple[list[int], SamplingParams, str]], aborts: list[str]) -> tuple[Any, ...]:
        for ids, params, rid in new:
            self.engine.add_request(ids, params, request_id=rid)
        for rid in aborts:
            self.engine.abort(rid)
        t = time.perf_counter()
        outs = self.engine.step() if self.engine.has_unfinished() else []
        return ([(o.request_id, o.index, o.completion) for o in outs], self.engine.num_running,
                self.engine.num_waiting, time.perf_counter() - t)

    def load_weights(self, refs: list[Any], version: int) -> int:
        import ray

        return self.engine.load_weight_buckets(ray.get(refs), version)

    def weight_version(self) -> int:
        return self.engine.weight_version

    def named_weights(self) -> dict[str, Any]:
        return self.engine.named_weights()


class RayRolloutEngine:
    def __init__(self, spec: EngineSpec, workers: int, tokenizer: Any, *, cpus: float = 1.0, gpus: float = 0.0,
                 max_restarts: int = 3) -> None:
        import ray

        self._ray = ray
        self.spec, self.tokenizer, self.max_restarts = spec, tokenizer, max_restarts
        self._actor_cls = ray.remote(RolloutWorker).options(num_cpus=cpus, num_gpus=gpus, max_restarts=0)
        self.actors = [self._actor_cls.remote(spec) for _ in range(workers)]
        self.pids = ray.get([a.pid.remote() for a in self.actors])  # a worker that cannot start fails here
        n = len(self.actors)
        self.max_batch_size = n * spec.max_batch_size
        self.weight_version = -1
        self._weights: tuple[list[Any], int] | None = None  # refs of the current update (for restarts)
        self._owner: dict[str, int] = {}
        self._inflight: list[dict[str, tuple[list[int], SamplingParams]]] = [{} for _ in range(n)]
        self._delivered: dict[str, set[int]] = {}
        self._new: list[list[tuple[list[int], SamplingParams, str]]] = [[] for _ in range(n)]
        self._aborts: list[list[str]] = [[] for _ in range(n)]
        self._rows = [0] * n  # samples not yet delivered, per worker
        self._running, self._waiting = [0] * n, [0] * n
        self.restarts = 0
        self.stats = {"steps": 0, "step_wall_s": 0.0, "worker_busy_s": 0.0, "readmitted": 0}

    # ------------------------------------------------------------ requests
    @property
    def num_running(self) -> int:
        return sum(self._running)

    @property
    def num_waiting(self) -> int:
        return sum(self._waiting) + sum(p.n for new in self._new for _, p, _ in new)

    def has_unfinished(self) -> bool:
        return any(self._inflight)

    def add_request(self, prompt_ids: list[int], params: SamplingParams, *, request_id: str) -> str:
        params.validate()
        if request_id in self._owner:
            raise ThinkforgeError(f"request id {request_id!r} is already in flight")
        w = min(range(len(self.actors)), key=lambda i: (self._rows[i], i))
        self._owner[request_id] = w
        self._inflight[w][request_id] = (list(prompt_ids), params)
        self._delivered[request_id] = set()
        self._new[w].append((list(prompt_ids), params, request_id))
        self._rows[w] += params.n
        return request_id

    def abort(self, request_id: str) -> None:
        w = self._owner.get(request_id)
        if w is not None:
            self._aborts[w].append(request_id)

    def step(self) -> list[SequenceOutput]:
        ray = self._ray
        t0 = time.perf_counter()
        calls = []
        for w, actor in enumerate(self.actors):
            if self._inflight[w] or self._new[w] or self._aborts[w]:
                calls.append((w, actor.step.remote(self._new[w], self._aborts[w])))
                self._new[w], self._aborts[w] = [], []
        finished: list[SequenceOutput] = []
        busy = 0.0
        for w, ref in calls:
            try:
                outs, running, waiting, dt = ray.get(ref)
            except ray.exceptions.RayActorError:
                self._restart(w)
                continue
            self._running[w], self._waiting[w] = running, waiting
            busy = max(busy, dt)
            for rid, index, comp in outs:
                done = self._delivered.get(rid)
                if done is None or index in done:
                    continue  # a re-admitted request re-delivers samples it had already sent
                done.add(index)
                self._rows[w] -= 1
                finished.append(SequenceOutput(rid, index, comp))
                if len(done) == self._inflight[w][rid][1].n:
                    self._forget(rid)
        self.stats["steps"] += 1
        self.stats["step_wall_s"] += time.perf_counter() - t0
        self.stats["worker_busy_s"] += busy
        return finished

    def _forget(self, rid: str) -> None:
        w = self._owner.pop(rid)
        self._inflight[w].pop(rid)
        self._delivered.pop(rid)

    def _restart(self, w: int) -> None:
        """Replaces dead worker `w`, loads the current weights, re-admits its in-flight requests."""
        ray = self._ray
        self.restarts += 1
        if self.restarts > self.max_restarts:
            raise ThinkforgeError(f"rollout worker {w} died; {self.restarts - 1} restarts already used "
                                  f"(cluster.max_restarts={self.max_restarts}): stopping")
        ray.kill(self.actors[w], no_restart=True)
        actor = self._actor_cls.remote(self.spec)
        if self._weights is not None:
            refs, version = self._weights
            check_ack(ray.get(actor.load_weights.remote(refs, version)), version, f"restarted rollout worker {w}")
        self.actors[w] = actor
        self.pids[w] = ray.get(actor.pid.remote())
        self._running[w] = self._waiting[w] = 0
        aborted = set(self._aborts[w])
        self._aborts[w] = []
        self._new[w] = []
        for rid, (ids, params) in list(self._inflight[w].items()):
            if rid in aborted:
                self._rows[w] -= params.n - len(self._delivered[rid])
                self._forget(rid)  # it was being aborted anyway: nothing to re-run
                continue
            self._new[w].append((ids, params, rid))
            self.stats["readmitted"] += 1

    # ------------------------------------------------------------ weights
    def load_weight_refs(self, refs: list[Any], version: int) -> int:
        ray = self._ray
        try:
            acks = ray.get([a.load_weights.remote(refs, version) for a in self.actors])
        except ray.exceptions.RayTaskError as err:
            cause = task_error_cause(err)
            if isinstance(cause, ThinkforgeError):
                raise WeightVersionError(str(cause)) from None
            raise
        for w, ack in enumerate(acks):
            check_ack(ack, version, f"rollout worker {w}")
        self._weights = (refs, version)
        self.weight_version = version
        return version

    def load_weight_buckets(self, buckets: list[WeightBucket], version: int) -> int:
        return self.load_weight_refs([self._ray.put(b) for b in buckets], version)

    def worker_versions(self) -> list[int]:
        return self._ray.get([a.weight_version.remote() for a in self.actors])

    def named_weights(self, worker: int = 0) -> dict[str, Any]:
        return self._ray.get(self.actors[worker].named_weights.remote())

    # ------------------------------------------------------------ helpers
    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[list[Completion]]:
        return generate_blocking(self, prompts, params, prefix=f"gen{self.stats['steps']}")

    def encode(self, prompt: str) -> list[int]:
        return self.tokenizer(prompt, add_special_tokens=True)["input_ids"]

    def close(self) -> None:
        for a in self.actors:
            self._ray.kill(a, no_restart=True)
        self.actors = []


class RayObjectStoreSync:
    """Weight sync on Ray (CPU or GPU): the trainer puts each bucket in the object store once; every
    rollout worker reads the same objects (zero-copy on its node) and acknowledges the version."""

    def __init__(self, engine: RayRolloutEngine, bucket_bytes: int) -> None:
        self.engine, self.bucket_bytes = engine, bucket_bytes

    def push(self, named: dict[str, Any], version: int) -> float:
        import torch

        t = time.perf_counter()
        with torch.no_grad():
            buckets = pack_buckets({k: v.detach().cpu() for k, v in named.items()}, version, self.bucket_bytes)
        refs = [self.engine._ray.put(b) for b in buckets]
        check_ack(self.engine.load_weight_refs(refs, version), version, "ray rollout engine")
        return time.perf_counter() - t

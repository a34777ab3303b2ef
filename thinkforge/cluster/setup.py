"""Builds the roles of an RL run from its config: in-process (one process, the default) or on Ray.

`preflight` runs before any compute (model loading included), so a Ray address that does not answer
or a missing optional engine fails in one line at once. `build_roles` returns the rollout engine, the
reward pool and the weight sync the controller (`thinkforge.train.rl`) drives; the controller is the
same whichever backend built them.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from thinkforge.cluster.config import ClusterConfig
from thinkforge.cluster.roles import NativeRolloutEngine, RewardPool, RolloutEngine
from thinkforge.cluster.weights import InProcessWeightSync, WeightSync
from thinkforge.errors import ThinkforgeError


@dataclass
class Roles:
    engine: RolloutEngine
    rewards: RewardPool
    sync: WeightSync
    started_ray: bool = False

    def close(self) -> None:
        try:
            self.engine.close()
        finally:
            if self.rewards is not None:
                self.rewards.close()
            if self.started_ray:
                import ray

                ray.shutdown()


def preflight(cluster: ClusterConfig) -> bool:
    """Checks the cluster settings against what is installed and reachable; returns True when it started
    a local Ray cluster (the run then shuts it down at the end)."""
    cluster.check()
    if cluster.rollout_engine == "vllm":
        from thinkforge.cluster.vllm_engine import import_vllm

        import_vllm()
        if cluster.backend == "ray":
            raise ThinkforgeError("cluster.rollout_engine=vllm runs in the driver process for now "
                                  "(cluster.backend=local); vLLM engines on Ray actors are not built yet")
    if cluster.backend == "ray":
        from thinkforge.cluster.raycluster import connect, import_ray

        ray = import_ray()
        already = ray.is_initialized()
        connect(cluster)
        return not already
    return False


def build_roles(cfg: Any, model: Any, tokenizer: Any, device: Any, router: Any, started_ray: bool) -> Roles:
    """`cfg` is the RLConfig; `model` the trainer's policy (the in-process engine samples from a copy of it);
    `router` the controller's reward router (the in-process reward pool, and the owner of reward state)."""
    from thinkforge.engine.loading import resolve_dtype

    cluster: ClusterConfig = cfg.cluster_config()
    bucket_bytes = int(cluster.bucket_mb * (1 << 20))
    if cluster.rollout_engine == "vllm":
        from thinkforge.cluster.vllm_engine import VLLMRolloutEngine, VLLMWeightSync

        engine = VLLMRolloutEngine(cfg.model, tokenizer, seed=cfg.seed, dtype=cfg.engine_dtype,
                                   max_batch_size=cfg.engine_max_batch, speculative=cfg.speculative,
                                   num_draft=cfg.num_draft)
        return Roles(engine, router, VLLMWeightSync(engine, bucket_bytes))
    if cluster.backend == "local":
        from thinkforge.engine.native import LLMEngine

        # Speculative sampling keeps the main model's distribution and log-probs, so the objective is unchanged.
        native = LLMEngine(copy.deepcopy(model).requires_grad_(False), tokenizer, max_batch_size=cfg.engine_max_batch,
                           seed=cfg.seed, dtype=resolve_dtype(cfg.engine_dtype, device), speculative=cfg.speculative,
                           num_draft=cfg.num_draft, spec_max_batch=cfg.spec_max_batch)
        engine = NativeRolloutEngine(native)
        return Roles(engine, router, InProcessWeightSync(engine, bucket_bytes))
    from thinkforge.cluster.ray_reward import RayRewardPool
    from thinkforge.cluster.ray_rollout import EngineSpec, RayObjectStoreSync, RayRolloutEngine

    spec = EngineSpec(model=cfg.model, device=cfg.device if cluster.rollout_gpus else "cpu", dtype=cfg.dtype,
                      engine_dtype=cfg.engine_dtype, max_batch_size=cfg.engine_max_batch, seed=cfg.seed,
                      speculative=cfg.speculative, num_draft=cfg.num_draft, spec_max_batch=cfg.spec_max_batch,
                      imports=cluster.worker_imports)
    ray_engine = RayRolloutEngine(spec, cluster.rollout_workers, tokenizer, cpus=cluster.rollout_cpus,
                                  gpus=cluster.rollout_gpus, max_restarts=cluster.max_restarts)
    try:
        pool = RayRewardPool(cfg.rewards, cfg.reward_options, cfg.tasks, workers=cluster.reward_workers,
                             timeout_s=cfg.reward_timeout_s, imports=cluster.worker_imports,
                             cpus=cluster.reward_cpus, max_restarts=cluster.max_restarts)
    except BaseException:
        ray_engine.close()
        raise
    return Roles(ray_engine, pool, RayObjectStoreSync(ray_engine, bucket_bytes), started_ray)

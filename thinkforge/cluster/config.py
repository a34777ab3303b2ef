"""`ClusterConfig`: where the RL roles run. The default is one process (every role in-process, today's run);
`backend: ray` puts rollout engines and reward scorers on Ray actors, driven by the same controller."""

from __future__ import annotations

from dataclasses import dataclass, field

from thinkforge.errors import ThinkforgeError

BACKENDS = ("local", "ray")
ENGINES = ("native", "vllm")


@dataclass
class ClusterConfig:
    backend: str = "local"  # "local" (one process) | "ray" (rollout and reward roles on Ray actors) | "vllm"
    # ("vllm" = local with rollout_engine=vllm)
    address: str | None = None  # Ray cluster address ("host:6379", "ray://host:10001"); None = start a local one
    rollout_workers: int = 1  # rollout engine actors (ray); the scheduler drives all of them at once
    reward_workers: int = 2  # CPU reward actors (ray); the local backend uses RLConfig.reward_workers threads
    rollout_engine: str = "native"  # "native" | "vllm" (GPU; optional extra, imported lazily)
    num_cpus: int | None = None  # logical CPUs of a local Ray cluster (None = Ray's default)
    rollout_cpus: float = 1.0  # CPUs reserved per rollout actor
    rollout_gpus: float = 0.0  # GPUs per rollout actor (1 on a GPU cluster)
    reward_cpus: float = 1.0  # CPUs reserved per reward actor
    max_restarts: int = 3  # restarts of a dead worker before the run stops (last good checkpoint kept)
    bucket_mb: float = 64.0  # weight-sync bucket size: tensors are sent packed, not one by one
    connect_timeout_s: float = 20.0  # a Ray address that does not answer within this fails before any compute
    worker_imports: list[str] = field(default_factory=list)  # modules each worker imports (user reward registrations)
    # Bounded staleness (AReaL): groups left in flight at the end of a step continue under the next weights
    # for up to `max_staleness` versions instead of being aborted. 0 = on-policy (MiMo's default).
    max_staleness: int = 0
    # The trainer: N torch.distributed ranks with the policy sharded by FSDP2 (gloo on CPU, NCCL on CUDA);
    # rank 0 also runs the controller. 1 = one process. See thinkforge.cluster.trainer.
    trainer_procs: int = 1
    trainer_timeout_s: float = 1800.0  # a collective that waits longer than this (a hung rank) fails

    def __post_init__(self) -> None:
        if self.backend == "vllm":  # shorthand: the driver's rollout engine is vLLM (GPU, optional extra)
            self.backend, self.rollout_engine = "local", "vllm"

    def check(self) -> None:
        if self.backend not in BACKENDS:
            raise ThinkforgeError(f"cluster.backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        if self.rollout_engine not in ENGINES:
            raise ThinkforgeError(f"cluster.rollout_engine must be one of {', '.join(ENGINES)}, "
                                  f"got {self.rollout_engine!r}")
        for name in ("rollout_workers", "reward_workers", "trainer_procs"):
            if getattr(self, name) < 1:
                raise ThinkforgeError(f"cluster.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_restarts", "max_staleness"):
            if getattr(self, name) < 0:
                raise ThinkforgeError(f"cluster.{name} must be >= 0, got {getattr(self, name)}")
        if not self.trainer_timeout_s > 0:
            raise ThinkforgeError(f"cluster.trainer_timeout_s must be > 0, got {self.trainer_timeout_s}")
        if not self.bucket_mb > 0:
            raise ThinkforgeError(f"cluster.bucket_mb must be > 0, got {self.bucket_mb}")
        if self.backend == "local" and (self.rollout_workers > 1 or self.address):
            raise ThinkforgeError("cluster.rollout_workers > 1 and cluster.address need cluster.backend=ray")

"""Scale-out for RL: the roles one controller (`thinkforge.train.rl`) drives, in this process or on Ray.

`config.ClusterConfig` (where the roles run), `roles` (the `RolloutEngine` / `RewardPool` interfaces and
the in-process engine), `weights` (versioned bucket weight sync), `ray_rollout` / `ray_reward` (the Ray
actors), `vllm_engine` (vLLM, GPU), `fsdp` (the FSDP2 trainer), `setup` (builds the roles from a config).
Ray and vLLM are optional and imported only by the modules that need them.
"""

from thinkforge.cluster.config import ClusterConfig
from thinkforge.cluster.weights import WeightBucket, WeightVersionError

__all__ = ["ClusterConfig", "WeightBucket", "WeightVersionError"]

"""Rewards for RL: a registry of reward functions and a router that picks one per task (mixed tasks in one run)."""

from thinkforge.rewards import vision  # noqa: F401  (registers the visual rewards and their task kinds)
from thinkforge.rewards.base import (
    KIND_DEFAULTS,
    REWARDS,
    RewardFn,
    RewardResult,
    RewardRouter,
    get_reward,
    register_reward,
)

__all__ = ["KIND_DEFAULTS", "REWARDS", "RewardFn", "RewardResult", "RewardRouter", "get_reward", "register_reward"]

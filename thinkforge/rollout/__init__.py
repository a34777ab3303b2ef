"""The Seamless Rollout Engine: continuous rollout, asynchronous reward and FIFO early termination over the
rollout engine(s), plus the RL data side (prompt stream, Easy-Data Pool, pass-rate statistics)."""

from thinkforge.rollout.data import ProblemSampler, Slot, StepDraw
from thinkforge.rollout.engine import Group, RolloutConfig, RolloutResult, Sample, SeamlessRollout

__all__ = ["Group", "ProblemSampler", "RolloutConfig", "RolloutResult", "Sample", "SeamlessRollout", "Slot",
           "StepDraw"]

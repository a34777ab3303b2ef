"""The roles an RL run is made of, as small interfaces, and their in-process implementations.

The controller (`thinkforge.train.rl`, with the Seamless Rollout scheduler in `thinkforge.rollout`)
only talks to these, so one process and a Ray cluster run the same loop:

- `RolloutEngine`: add request, abort, step (returns the samples that finished), load weights with a
  version. `NativeRolloutEngine` wraps thinkforge's engine; `thinkforge.cluster.ray_rollout` fans one
  out over Ray actors; `thinkforge.cluster.vllm_engine` wraps vLLM (GPU).
- `RewardPool`: submit, then take results as they finish. In-process it is the reward router's thread
  pool (`RewardRouter`); `thinkforge.cluster.ray_reward` scores on CPU actors.
- `WeightSync` (`thinkforge.cluster.weights`): trainer -> engines in versioned buckets.
- The trainer: `thinkforge.train.rl` in one process; `thinkforge.cluster.fsdp` shards it with FSDP2.
"""

from __future__ import annotations

from concurrent.futures import Future
from typing import Any, Protocol

from thinkforge.cluster.weights import VersionedReceiver, WeightBucket
from thinkforge.engine.base import Completion, SamplingParams
from thinkforge.engine.native import SequenceOutput
from thinkforge.rewards.base import RewardResult
from thinkforge.tasks.base import Problem


class RolloutEngine(Protocol):
    tokenizer: Any
    max_batch_size: int  # rows the engine(s) can run at once
    weight_version: int  # version of the weights it samples from (-1 before the first sync)

    @property
    def num_running(self) -> int: ...

    @property
    def num_waiting(self) -> int: ...

    def add_request(self, prompt_ids: list[int], params: SamplingParams, *, request_id: str) -> str: ...

    def abort(self, request_id: str) -> None: ...

    def step(self) -> list[SequenceOutput]:
        """Advances generation once; returns the samples that finished (aborted ones with reason "abort")."""

    def has_unfinished(self) -> bool: ...

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[list[Completion]]:
        """Blocking helper (held-out evaluation)."""

    def load_weight_buckets(self, buckets: list[WeightBucket], version: int) -> int:
        """Loads a versioned update; returns the version now held (the sender checks it)."""

    def close(self) -> None: ...


class RewardPool(Protocol):
    timeout_s: float

    def submit(self, problem: Problem, response: str) -> Future: ...

    def result(self, fut: Future, timeout_s: float | None = None) -> RewardResult: ...

    def expired(self, fut: Future) -> bool: ...

    def score(self, problem: Problem, response: str) -> RewardResult: ...

    def refresh(self, state: dict[str, Any]) -> None:
        """Hands the scorers the controller's reward state (test-difficulty statistics) before a step."""

    def close(self) -> None: ...


def generate_blocking(engine: RolloutEngine, prompts: list[list[int]], params: SamplingParams,
                      prefix: str = "gen") -> list[list[Completion]]:
    """`generate` for engines that only have add_request/step: results in prompt order."""
    rids = [engine.add_request(p, params, request_id=f"{prefix}-{i}") for i, p in enumerate(prompts)]
    pos = {rid: i for i, rid in enumerate(rids)}
    out: list[list[Completion | None]] = [[None] * params.n for _ in prompts]
    while engine.has_unfinished():
        for o in engine.step():
            if o.request_id in pos:
                out[pos[o.request_id]][o.index] = o.completion
    return [[c for c in row if c is not None] for row in out]


def _consumed(out: SequenceOutput) -> None:
    pass


class NativeRolloutEngine:
    """thinkforge's continuous-batching `LLMEngine` as a `RolloutEngine` (in-process, or inside a Ray actor)."""

    def __init__(self, engine: Any, version: int = -1) -> None:
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.max_batch_size = engine.max_batch_size
        self._receiver = VersionedReceiver(engine.load_weights, version)

    @property
    def weight_version(self) -> int:
        return self._receiver.version

    @property
    def num_running(self) -> int:
        return self.engine.num_running

    @property
    def num_waiting(self) -> int:
        return self.engine.num_waiting

    @property
    def speculator(self) -> Any:
        return self.engine.speculator

    def encode(self, prompt: str) -> list[int]:
        return self.engine.encode(prompt)

    def add_request(self, prompt_ids: list[int], params: SamplingParams, *, request_id: str) -> str:
        # A finish callback makes the engine drop the request's record once done (step() returns the results).
        return self.engine.add_request(prompt_ids, params, request_id=request_id, on_finish=_consumed)

    def abort(self, request_id: str) -> None:
        self.engine.abort(request_id)

    def step(self) -> list[SequenceOutput]:
        return self.engine.step()

    def has_unfinished(self) -> bool:
        return self.engine.has_unfinished()

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[list[Completion]]:
        return self.engine.generate(prompts, params)

    def load_weight_buckets(self, buckets: list[WeightBucket], version: int) -> int:
        return self._receiver.receive(buckets, version)

    def named_weights(self) -> dict[str, Any]:
        return {k: v.detach().clone() for k, v in self.engine.model.named_parameters()}

    def close(self) -> None:
        self.engine.drop_all()

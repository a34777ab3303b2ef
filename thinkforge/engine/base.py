"""The generation contract every backend implements (native engine, HF generate, OpenAI API, vLLM).

Distillation, evaluation and RL only ever talk to `Backend`, so a tiny CPU model and a hosted
teacher are interchangeable.
"""

from __future__ import annotations

import math
import numbers
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from thinkforge.errors import ThinkforgeError, UnknownNameError

Message = dict[str, str]  # {"role": "system" | "user" | "assistant", "content": "..."}


@dataclass
class SamplingParams:
    """Sampling settings, OpenAI/vLLM-style. temperature == 0 means greedy."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    max_tokens: int = 256
    n: int = 1
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    seed: int | None = None
    logprobs: bool = False

    def validate(self) -> SamplingParams:
        for name in ("temperature", "top_p"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise ThinkforgeError(f"{name} must be a number, got {value!r}")
        for name in ("top_k", "max_tokens", "n"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise ThinkforgeError(f"{name} must be an integer, got {value!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, numbers.Integral)):
            raise ThinkforgeError(f"seed must be an integer or None, got {self.seed!r}")
        if not isinstance(self.stop, (list, tuple)) or not all(isinstance(s, str) for s in self.stop):
            raise ThinkforgeError(f"stop must be a list of strings, got {self.stop!r}")
        if not isinstance(self.stop_token_ids, (list, tuple)) or not all(
                isinstance(t, numbers.Integral) and not isinstance(t, bool) for t in self.stop_token_ids):
            raise ThinkforgeError(f"stop_token_ids must be a list of integers, got {self.stop_token_ids!r}")
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise ThinkforgeError(f"temperature must be >= 0, got {self.temperature}")
        if not (0 < self.top_p <= 1):
            raise ThinkforgeError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ThinkforgeError(f"top_k must be >= 0, got {self.top_k}")
        if self.max_tokens < 1:
            raise ThinkforgeError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.n < 1:
            raise ThinkforgeError(f"n must be >= 1, got {self.n}")
        return self


@dataclass
class Completion:
    """One sampled continuation of one prompt."""

    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" | "length" | "abort"
    logprobs: list[float] | None = None  # log-prob of each sampled token under the sampling policy
    prompt_tokens: int = 0

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)


class Backend(ABC):
    """Generates completions. `prompts` are raw strings; `chat` applies the model's chat template."""

    name: str = "base"

    @abstractmethod
    def generate(self, prompts: list[str], params: SamplingParams) -> list[list[Completion]]:
        """Returns, for each prompt, `params.n` completions."""

    @abstractmethod
    def chat(self, conversations: list[list[Message]], params: SamplingParams) -> list[list[Completion]]:
        """Like `generate`, but each prompt is a list of chat messages."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release resources (threads, servers, GPU memory)."""


BACKENDS: dict[str, Callable[..., Backend]] = {}


def model_vocab_size(model: Any, tokenizer: Any = None) -> int:
    """How many token ids `model` accepts: its input-embedding rows (may exceed len(tokenizer) when padded)."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    rows = getattr(emb, "num_embeddings", None)
    return int(rows) if rows else len(tokenizer)


def out_of_vocab(ids: list[int], vocab_size: int) -> int | None:
    """The first id outside 0..vocab_size-1 (None if all fit): caught before a forward pass, where it would
    fail the whole shared batch."""
    return next((t for t in ids if not 0 <= t < vocab_size), None)


def register_backend(name: str) -> Callable[[Callable[..., Backend]], Callable[..., Backend]]:
    def deco(factory: Callable[..., Backend]) -> Callable[..., Backend]:
        BACKENDS[name] = factory
        return factory

    return deco


def get_backend(name: str, model: str, **kwargs: Any) -> Backend:
    """Builds a backend by name: `native`, `hf`, `openai` (model = base URL or URL#model-name), `vllm`."""
    import thinkforge.engine.backends  # noqa: F401  (registers the built-in backends)

    if name not in BACKENDS:
        raise UnknownNameError(f"unknown backend {name!r}; known: {', '.join(sorted(BACKENDS))}")
    return BACKENDS[name](model, **kwargs)

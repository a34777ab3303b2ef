"""Acceptance of a checkpoint's MTP drafts on a set of prompts (the speedrun reports it).

Kept apart from `thinkforge.engine.speculative` so that module never imports the engine that drives it
(`LLMEngine` builds an `MTPSpeculator`; this helper builds an `LLMEngine`).
"""

from __future__ import annotations

from typing import Any

from thinkforge.engine.base import SamplingParams
from thinkforge.engine.loading import load_model_and_tokenizer
from thinkforge.engine.native import LLMEngine
from thinkforge.engine.speculative import prepare_speculative
from thinkforge.model.mtp import checkpoint_mtp_layers


def mtp_acceptance(model_dir: str, prompts: list[str], num_draft: int | None = None, *, max_tokens: int = 64,
                   device: str = "auto", dtype: str = "auto", max_batch_size: int = 16) -> dict[str, Any]:
    """Greedy self-speculative decoding of `prompts` with the checkpoint's MTP layers; returns the
    speculator's metrics: `acceptance` (per draft position), `mean_accepted_length`, `tokens_per_s`...
    `num_draft` defaults to every MTP layer the checkpoint has. The speedrun reports this."""
    k = num_draft if num_draft is not None else checkpoint_mtp_layers(model_dir)
    model, tokenizer = load_model_and_tokenizer(model_dir, device, dtype)
    spec = prepare_speculative(model, model_dir, "mtp", max(k, 1))
    engine = LLMEngine(model, tokenizer, max_batch_size=max_batch_size, speculative=spec, num_draft=max(k, 1))
    engine.generate(prompts, SamplingParams(temperature=0, max_tokens=max_tokens))
    return engine.speculator.metrics()

"""Acceptance of a checkpoint's MTP drafts on a set of prompts (the speedrun reports it).

Also the fallback threshold (`calibrate_spec_max_batch`). Kept apart from `thinkforge.engine.speculative` so that
module never imports the engine that drives it
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


def calibrate_spec_max_batch(model: Any, tokenizer: Any, prompts: list[Any], num_drafts: list[int],
                             batches: list[int], params: SamplingParams, *, repeats: int = 2, margin: float = 1.05,
                             seed: int = 0, clock: str = "wall", serial_rows: int = 0) -> dict[str, Any]:
    """The fallback threshold `spec_max_batch` per draft count k, measured once on this machine: for each batch
    size B (ascending), `prompts` go through a plain engine and one speculative engine per k in chunks of B,
    every configuration back to back per chunk (the order alternating), `repeats` timed passes after one
    untimed warm-up pass; ratio = speculative tokens/s over plain's (best pass each). A k's threshold is the
    largest B up to which every measured ratio is >= `margin` (0: speculation never paid). A step of more
    running rows than that decodes plain. `model` must carry its MTP layers (`prepare_speculative`).
    `clock`: "wall" (what a user waits) or "cpu" (process CPU time: steadier on a shared machine at one thread);
    ratios by both clocks are returned, the threshold follows `clock`. `serial_rows`: the engines' (LLMEngine)."""
    import time

    from thinkforge.errors import ThinkforgeError

    if clock not in ("wall", "cpu"):
        raise ThinkforgeError(f"calibration clock must be 'wall' or 'cpu', got {clock!r}")

    ks = sorted(set(num_drafts))
    ratios: dict[int, dict[int, float]] = {k: {} for k in ks}  # by `clock`
    other: dict[int, dict[int, float]] = {k: {} for k in ks}  # by the other clock
    for B in sorted(set(batches)):
        engines = {0: LLMEngine(model, tokenizer, max_batch_size=B, seed=seed, serial_rows=serial_rows)}
        engines.update({k: LLMEngine(model, tokenizer, max_batch_size=B, seed=seed, speculative="mtp", num_draft=k,
                                     serial_rows=serial_rows) for k in ks})
        order = list(engines)
        chunks = [prompts[i:i + B] for i in range(0, len(prompts), B)]
        # Best tokens/s per clock (sampled outputs differ in length between configurations).
        best = {c: dict.fromkeys(order, 0.0) for c in ("wall", "cpu")}
        for r in range(repeats + 1):  # pass 0 warms up (allocator, caches) and is not timed
            spent = {c: dict.fromkeys(order, 0.0) for c in ("wall", "cpu")}
            tokens = dict.fromkeys(order, 0)
            for ci, chunk in enumerate(chunks):
                for k in (order if (r + ci) % 2 == 0 else order[::-1]):
                    t, c = time.perf_counter(), time.process_time()
                    out = engines[k].generate(chunk, params)
                    spent["wall"][k] += time.perf_counter() - t
                    spent["cpu"][k] += time.process_time() - c
                    tokens[k] += sum(len(x.token_ids) for g in out for x in g)
            if r:
                for c in best:
                    best[c] = {k: max(best[c][k], tokens[k] / max(spent[c][k], 1e-9)) for k in order}
        for k in ks:
            ratios[k][B] = best[clock][k] / best[clock][0]
            other[k][B] = best["cpu" if clock == "wall" else "wall"][k] / best["cpu" if clock == "wall" else "wall"][0]
    return {"spec_max_batch": {k: spec_max_batch_from(ratios[k], margin) for k in ks}, "ratios": ratios,
            "clock": clock, "ratios_other_clock": other, "margin": margin, "repeats": repeats,
            "max_tokens": params.max_tokens, "temperature": params.temperature, "prompts": len(prompts)}


def spec_max_batch_from(ratios: dict[int, float], margin: float) -> int:
    """The largest batch size up to which every measured speculative / plain ratio is >= `margin` (0: none)."""
    threshold = 0
    for B in sorted(ratios):
        if ratios[B] < margin:
            break
        threshold = B
    return threshold

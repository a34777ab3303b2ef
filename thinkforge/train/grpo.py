"""The GRPO objective as MiMo-7B uses it (see `thinkforge.train.rl` for the whole recipe).

    A_i      = (r_i - mean(r)) / (std(r) + eps)      within each prompt's group (Dr. GRPO: no std division)
    ratio_t  = pi_theta(o_t) / pi_old(o_t)
    loss     = - sum_t min(ratio_t A, clip(ratio_t, 1 - eps_low, 1 + eps_high) A) / (#tokens in the mini-batch)
               [+ kl_coef * k3(pi_theta || pi_ref)]

Pure functions over tensors and rollout groups, so each piece is tested on its own numbers.

Multimodal samples (MiMo-VL's MORL) carry their prompt's vision inputs in `TrainSample.mm`: the batch then
also holds `pixel_values`, `image_grid_thw` and `mm_token_type_ids` (3D MRoPE), and the vision token ids
the sampler suppressed, which the trainer's log-probs exclude too (so they are the sampling policy's).
A group gets them from the rollout (`Group.mm`, set by `thinkforge.vl.rollout`). Text batches are
built and scored exactly as before.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from thinkforge.rollout.engine import Group


def group_advantages(rewards: list[float], std_normalize: bool, eps: float = 1e-6) -> list[float]:
    """GRPO: reward minus the group mean, divided by the group std (population) unless Dr. GRPO."""
    n = len(rewards)
    mean = sum(rewards) / n
    centred = [r - mean for r in rewards]
    if not std_normalize:
        return centred
    std = math.sqrt(sum(c * c for c in centred) / n)
    return [c / (std + eps) for c in centred]


def overlong_penalty(length: int, max_tokens: int, buffer: int, factor: float) -> float:
    """DAPO soft overlong punishment: 0 up to max_tokens - buffer, then linearly down to -factor."""
    start = max_tokens - buffer
    if buffer <= 0 or length <= start:
        return 0.0
    return -factor * min(1.0, (length - start) / buffer)


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor,
                clip_low: float, clip_high: float, ref_logp: torch.Tensor | None = None,
                kl_coef: float = 0.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Sum over masked tokens of the clipped-surrogate loss (+ k3 KL); the caller divides by the token count.

    logp/old_logp/mask: [B, T]; adv: [B] (one advantage per sample, shared by its tokens).
    """
    ratio = torch.exp(logp - old_logp)
    a = adv[:, None]
    s1 = ratio * a
    s2 = torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high) * a
    per_token = -torch.minimum(s1, s2)
    kl = torch.zeros_like(logp)
    if ref_logp is not None and kl_coef > 0:
        d = ref_logp - logp
        kl = torch.exp(d) - d - 1.0  # k3: unbiased, always >= 0
        per_token = per_token + kl_coef * kl
    m = mask.to(per_token.dtype)
    clipped = ((ratio > 1.0 + clip_high) & (a > 0)) | ((ratio < 1.0 - clip_low) & (a < 0))
    stats = {"clipped": (clipped.to(m.dtype) * m).sum().detach(), "kl": (kl * m).sum().detach(),
             "ratio": (ratio * m).sum().detach()}
    return (per_token * m).sum(), stats


@dataclass
class TrainSample:
    input_ids: list[int]  # prompt + completion
    prompt_len: int
    old_logprobs: list[float]  # one per completion token (engine)
    advantage: float
    mask: bool  # False: excluded from the loss (overlong masking)
    weight: float = 1.0  # per-token weight multiplier (sequence-level aggregation)
    # Vision inputs of the prompt: pixel_values [patches, D], image_grid_thw [images, 3], mm_token_type_ids
    # (one per prompt token), suppress_ids (token ids the sampler never emits). None for text.
    mm: dict[str, Any] | None = None


def build_samples(groups: list[Group], *, std_normalize: bool = True, overlong: str = "mask", max_tokens: int = 0,
                  overlong_buffer: int = 0, overlong_factor: float = 1.0) -> tuple[list[list[TrainSample]], dict[str, float]]:
    """Per group: the samples with advantages. Overlong ("length"-finished) samples are masked out of the
    loss (`overlong="mask"`, they still count in their group's baseline) or get the soft length penalty."""
    out, truncated, lengths = [], 0, []
    for g in groups:
        shaped = []
        for s in g.samples:
            r = s.reward.reward
            if overlong == "penalty":
                r += overlong_penalty(len(s.token_ids), max_tokens, overlong_buffer, overlong_factor)
            shaped.append(r)
        adv = group_advantages(shaped, std_normalize)
        mm = getattr(g, "mm", None)
        rows = []
        for s, a in zip(g.samples, adv, strict=True):
            trunc = s.finish_reason == "length"
            truncated += trunc
            lengths.append(len(s.token_ids))
            rows.append(TrainSample(g.prompt_ids + s.token_ids, len(g.prompt_ids), s.logprobs, a,
                                    not (trunc and overlong == "mask"), 1.0 / max(1, len(s.token_ids)), mm))
        out.append(rows)
    return out, {"truncated_frac": truncated / max(1, len(lengths))}


def micro_batches(rows: list[TrainSample], max_rows: int, max_tokens: int = 0) -> list[list[TrainSample]]:
    """A mini-batch's rows in forward passes. `max_tokens` 0: every `max_rows` rows in their order (bit for bit
    what earlier runs did). `max_tokens` > 0: sorted by length (stable), cut every `max_rows` rows or before a row
    would make the pass hold more than `max_tokens` padded tokens (verl's dynamic batch size): a pass pads to its
    longest row, so short rows stop paying for long ones. The loss is a sum over passes divided by the
    mini-batch's denominator, so the split changes only the order of float additions."""
    if not max_tokens:
        return [rows[i: i + max_rows] for i in range(0, len(rows), max_rows)]
    out: list[list[TrainSample]] = []
    cur: list[TrainSample] = []
    for r in sorted(rows, key=lambda r: len(r.input_ids)):
        if cur and (len(cur) >= max_rows or (len(cur) + 1) * len(r.input_ids) > max_tokens):
            out.append(cur)
            cur = []
        cur.append(r)
    return out + [cur] if cur else out


def collate(rows: list[TrainSample], pad_id: int, device: Any) -> dict[str, torch.Tensor]:
    width = max(len(r.input_ids) for r in rows)
    B = len(rows)
    ids = torch.full((B, width), pad_id, dtype=torch.long)
    attn = torch.zeros((B, width), dtype=torch.long)
    comp = torch.zeros((B, width - 1), dtype=torch.bool)  # target positions that are completion tokens
    old = torch.zeros((B, width - 1))
    for i, r in enumerate(rows):
        n = len(r.input_ids)
        ids[i, :n] = torch.tensor(r.input_ids)
        attn[i, :n] = 1
        lo, hi = r.prompt_len - 1, n - 1
        comp[i, lo:hi] = True
        old[i, lo:hi] = torch.tensor(r.old_logprobs[: hi - lo], dtype=torch.float32)
    batch = {"input_ids": ids.to(device), "attention_mask": attn.to(device), "completion": comp.to(device),
             "old": old.to(device), "adv": torch.tensor([r.advantage for r in rows], device=device),
             "mask": torch.tensor([r.mask for r in rows], device=device)[:, None] & comp.to(device),
             "weight": torch.tensor([r.weight for r in rows], device=device)}
    if any(r.mm is not None for r in rows):
        batch.update(collate_multimodal(rows, width, device))
    return batch


MM_INPUTS = ("pixel_values", "image_grid_thw", "mm_token_type_ids")


def collate_multimodal(rows: list[TrainSample], width: int, device: Any) -> dict[str, torch.Tensor]:
    """Vision inputs in row order (a group's rows repeat their prompt's images: each row needs its own
    features), token types padded like `input_ids`, and the union of the suppressed token ids."""
    types = torch.zeros((len(rows), width), dtype=torch.long)
    pixels, grids, suppress = [], [], set()
    for i, r in enumerate(rows):
        if r.mm is None:
            continue
        prompt_types = list(r.mm.get("mm_token_type_ids", []))
        if len(prompt_types) != r.prompt_len:
            raise ValueError(f"multimodal sample: {len(prompt_types)} token types for a {r.prompt_len}-token prompt")
        types[i, : r.prompt_len] = torch.tensor(prompt_types, dtype=torch.long)
        if r.mm.get("pixel_values") is not None:
            pixels.append(r.mm["pixel_values"])
            grids.append(r.mm["image_grid_thw"])
        suppress.update(r.mm.get("suppress_ids", []))
    out = {"mm_token_type_ids": types.to(device)}
    if pixels:
        out["pixel_values"] = torch.cat(pixels).to(device)
        out["image_grid_thw"] = torch.cat(grids).to(device)
    if suppress:
        out["suppress_ids"] = torch.tensor(sorted(suppress), dtype=torch.long, device=device)
    return out


def token_logprobs(model: Any, batch: dict[str, torch.Tensor], temperature: float,
                   with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log pi(token_t | prefix) at the sampling temperature for every target position, [B, T-1]."""
    vision = {k: batch[k] for k in MM_INPUTS if k in batch}
    if "pixel_values" in vision:
        vision["pixel_values"] = vision["pixel_values"].to(next(model.parameters()).dtype)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **vision).logits[:, :-1]
    logits = logits if logits.dtype == torch.float64 else logits.float()  # float64 stays (numerics checks)
    if "suppress_ids" in batch:  # the sampler never emits these: its distribution is renormalised without them
        logits = logits.index_fill(-1, batch["suppress_ids"], float("-inf"))
    logp_all = torch.log_softmax(logits / temperature, dim=-1)
    logp = logp_all.gather(-1, batch["input_ids"][:, 1:, None])[..., 0]
    if "suppress_ids" in batch:  # prompt targets may be vision tokens (-inf): only completion tokens count
        logp = logp.masked_fill(~batch["completion"], 0.0)
    entropy = None
    if with_entropy:
        with torch.no_grad():
            plogp = logp_all.exp() * logp_all
            if "suppress_ids" in batch:  # 0 * -inf: suppressed tokens add nothing
                plogp = plogp.nan_to_num(nan=0.0)
            entropy = -plogp.sum(-1)
    return logp, entropy

"""The trainer role over torch.distributed: the GRPO update of `thinkforge.train.rl`, with the policy
sharded by FSDP2 (`torch.distributed.fsdp.fully_shard`; gloo on CPU, NCCL on GPUs).

Every rank receives the whole mini-batch and trains on its share (rows rank, rank + world, ...). The
loss of each micro-batch is divided by the *whole* mini-batch's token count (DAPO's token-level mean)
and multiplied by the world size, because FSDP's gradient reduce-scatter averages over ranks: the
summed gradient, the clipped norm and the AdamW step on each shard are then those of one process
training on the whole mini-batch. Ranks run the same number of micro-batches (a rank short of rows
runs a zero-weight one), since every forward all-gathers parameters collectively.

Launch under torchrun (`torchrun --nproc_per_node N ...`): `init_distributed` reads the usual
environment (RANK, WORLD_SIZE, MASTER_ADDR/PORT). `full_weights` gathers the unsharded weights, which
is what the weight sync sends to the rollout engines.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist

from thinkforge.errors import ThinkforgeError
from thinkforge.train.grpo import TrainSample, collate


def init_distributed(device: str) -> tuple[int, int]:
    """Joins the process group (gloo for CPU, nccl for CUDA); returns (rank, world size)."""
    if not dist.is_initialized():
        dist.init_process_group("nccl" if str(device).startswith("cuda") else "gloo")
    return dist.get_rank(), dist.get_world_size()


def shard_model(model: Any, device: str) -> Any:
    """FSDP2 over all ranks: each decoder layer is one unit (gathered for its forward, freed after), the
    rest (embeddings, final norm, head) the root unit."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(torch.device(device).type, (dist.get_world_size(),))
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        raise ThinkforgeError(f"fsdp: {type(model).__name__} has no model.layers to shard")
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def fsdp_update(model: Any, ref: Any, optimizer: torch.optim.Optimizer, rows: list[TrainSample], cfg: Any,
                pad_id: int, device: Any, first: bool, step: int) -> dict[str, float]:
    """One gradient update on a mini-batch, sharded; returns the same statistics as the one-process update
    (summed over ranks)."""
    from thinkforge.train.rl import _loss_denominator, _micro_backward, _new_totals

    rank, world = dist.get_rank(), dist.get_world_size()
    denom = _loss_denominator(rows, cfg)
    mine = rows[rank::world]
    n_micro = max(1, math.ceil(math.ceil(len(rows) / world) / cfg.micro_batch_size))
    totals = _new_totals()
    for i in range(n_micro):
        chunk = mine[i * cfg.micro_batch_size: (i + 1) * cfg.micro_batch_size]
        scale = float(world)
        if not chunk:  # keeps the ranks' collectives in step; contributes nothing
            chunk, scale = rows[:1], 0.0
        batch = collate(chunk, pad_id, device)
        scratch = _new_totals() if scale == 0.0 else totals
        _micro_backward(model, ref, batch, cfg, denom, first, step, scratch, scale=scale)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
    if not torch.isfinite(grad_norm):
        raise ThinkforgeError(f"rl: gradient norm is {float(grad_norm)} at step {step} (fsdp)")
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    keys = sorted(k for k in totals if k != "drift_max")
    summed = torch.tensor([totals[k] for k in keys], dtype=torch.float64)
    dist.all_reduce(summed)
    out = dict(zip(keys, summed.tolist(), strict=True))
    drift_max = torch.tensor([totals["drift_max"]], dtype=torch.float64)
    dist.all_reduce(drift_max, op=dist.ReduceOp.MAX)
    out["drift_max"] = float(drift_max)
    out["grad_norm"] = float(grad_norm)
    out["comp_tokens"] = float(sum(len(r.old_logprobs) for r in rows))
    return out


def full_weights(model: Any) -> dict[str, torch.Tensor]:
    """The unsharded parameters on CPU: every rank takes part, rank 0 gets them (the others an empty dict)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    names = {k for k, _ in model.named_parameters()}  # the state dict also lists tied aliases (lm_head)
    return {k: v for k, v in full.items() if k in names}

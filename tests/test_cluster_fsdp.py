"""The FSDP2 trainer role: two gloo processes (torchrun) take the same GRPO updates as one process, in
loss, gradient norm and updated weights (float64 weights, tolerances relative to the update's size)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

import tests.test_rl_support as support

ROOT = Path(__file__).resolve().parents[1]

WORKER = """
import json, sys
sys.path.insert(0, {root!r})
import torch
from tests.test_cluster_fsdp import build
from thinkforge.cluster.fsdp import fsdp_update, full_weights, init_distributed, shard_model
rank, world = init_distributed("cpu")
model, optimizer, batches, cfg, pad_id = build({model!r}, shard=lambda m: shard_model(m, "cpu"))
stats = [fsdp_update(model, None, optimizer, rows, cfg, pad_id, "cpu", first=i == 0, step=1)
         for i, rows in enumerate(batches)]
weights = full_weights(model)
if rank == 0:
    torch.save({{"stats": stats, "weights": weights}}, {out!r})
# As the trainer's ranks do (thinkforge.cluster.trainer.main): leave the group together, then exit without
# interpreter finalization, where gloo's threads aborted a rank ("terminate called without an active
# exception", about one run in ten) even after destroy_process_group
torch.distributed.barrier()
torch.distributed.destroy_process_group()
sys.stdout.flush(); sys.stderr.flush()
import os; os._exit(0)
"""


def build(model_dir: str, shard=None):
    """A float64 micro policy, its AdamW, and two mini-batches of GRPO rows with behaviour log-probs near
    the policy's own (ratios near 1, some clipped) -- identical in every process."""
    from thinkforge.model.io import load_model
    from thinkforge.train.common import make_optimizer
    from thinkforge.train.grpo import TrainSample, collate, token_logprobs
    from thinkforge.train.rl import RLConfig

    torch.manual_seed(0)
    model, tokenizer = load_model(model_dir, device="cpu", dtype=torch.float64)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    gen = torch.Generator().manual_seed(1)
    vocab = model.get_input_embeddings().num_embeddings
    batches = []
    for n_rows in (10, 9):  # 9: the ranks get 5 and 4 rows
        rows = []
        for _ in range(n_rows):
            prompt, comp = int(torch.randint(3, 7, (1,), generator=gen)), int(torch.randint(4, 12, (1,), generator=gen))
            ids = torch.randint(3, vocab, (prompt + comp,), generator=gen).tolist()
            rows.append(TrainSample(ids, prompt, [0.0] * comp, float(torch.randn(1, generator=gen)), True))
        with torch.no_grad():
            logp, _ = token_logprobs(model, collate(rows, pad_id, "cpu"), 1.0)
        for i, r in enumerate(rows):
            lo = r.prompt_len - 1
            own = logp[i, lo: lo + len(r.old_logprobs)]
            r.old_logprobs = (own + 0.3 * torch.randn(own.shape, generator=gen, dtype=own.dtype)).tolist()
        batches.append(rows)
    if shard is not None:
        model = shard(model)
    model.train()
    cfg = RLConfig(model=model_dir, micro_batch_size=3, lr=1e-3, grad_clip=1.0)
    return model, make_optimizer(model, cfg.lr, cfg.weight_decay), batches, cfg, pad_id


def test_two_process_fsdp2_step_equals_the_one_process_step(tmp_path):
    from thinkforge.train.rl import _update

    micro = support.micro_model(tmp_path / "micro")
    out = tmp_path / "fsdp.pt"
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(root=str(ROOT), model=micro, out=str(out)), encoding="utf-8")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script)], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sharded = torch.load(out, weights_only=False)

    model, optimizer, batches, cfg, pad_id = build(micro)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    single = [_update(model, None, optimizer, rows, cfg, pad_id, "cpu", first=i == 0, step=1)
              for i, rows in enumerate(batches)]
    for a, b in zip(single, sharded["stats"], strict=True):
        for key in ("loss", "grad_norm", "tokens", "clipped", "ratio", "drift"):
            assert abs(b[key] - a[key]) <= 1e-6 * max(1.0, abs(a[key])), (key, a[key], b[key])
        assert a["clipped"] > 0  # the clip is exercised, not only the plain ratio
    after = {k: v.detach() for k, v in model.named_parameters()}
    assert set(sharded["weights"]) == set(after)
    total_step = sum(float((after[k] - before[k]).pow(2).sum()) for k in after) ** 0.5
    total_gap = sum(float((sharded["weights"][k] - after[k]).pow(2).sum()) for k in after) ** 0.5
    assert total_step > 0 and total_gap <= 1e-4 * total_step, (total_gap, total_step)
    for k in after:  # and tensor by tensor, relative to that tensor's own update
        step = float((after[k] - before[k]).norm())
        gap = float((sharded["weights"][k] - after[k]).norm())
        assert gap <= 1e-3 * step + 1e-12, (k, gap, step)
    json.dumps([{k: float(v) for k, v in s.items()} for s in single])  # statistics are plain numbers


def test_length_sorted_token_budget_micro_batches_take_the_same_update(tmp_path):
    """`micro_batch_tokens` only regroups a mini-batch's rows into forward passes (sorted by length, each pass at
    most that many padded tokens): the statistics and the updated weights are those of one pass over all rows."""
    from thinkforge.train.grpo import micro_batches
    from thinkforge.train.rl import _update

    micro = support.micro_model(tmp_path / "micro")
    results = []
    for rows_cap, tokens in ((64, 0), (64, 40)):
        model, optimizer, batches, cfg, pad_id = build(micro)
        cfg.micro_batch_size, cfg.micro_batch_tokens = rows_cap, tokens
        stats = [_update(model, None, optimizer, rows, cfg, pad_id, "cpu", first=i == 0, step=1)
                 for i, rows in enumerate(batches)]
        results.append((stats, {k: v.detach().clone() for k, v in model.named_parameters()}))
    passes = micro_batches(batches[0], 64, 40)
    assert len(passes) > 2 and sorted(map(id, batches[0])) == sorted(id(r) for p in passes for r in p)
    assert all(len(p) * max(len(r.input_ids) for r in p) <= 40 for p in passes)  # rows here are 7-18 tokens
    lengths = [len(r.input_ids) for p in passes for r in p]
    assert lengths == sorted(lengths)
    (one, w_one), (many, w_many) = results
    for a, b in zip(one, many, strict=True):
        for key in ("loss", "grad_norm", "tokens", "clipped", "ratio", "drift"):
            assert abs(b[key] - a[key]) <= 1e-9 * max(1.0, abs(a[key])), (key, a[key], b[key])
    assert max(float((w_one[k] - w_many[k]).abs().max()) for k in w_one) <= 1e-12
    assert [r for p in micro_batches(batches[0], 4) for r in p] == batches[0]  # 0 tokens: rows in their order
    assert [len(p) for p in micro_batches(batches[0], 4)] == [4, 4, 2]

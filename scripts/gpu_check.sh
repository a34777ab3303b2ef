#!/usr/bin/env bash
# GPU check of the scale-out path that the CPU-only CI cannot run: the vLLM rollout engine
# (thinkforge/cluster/vllm_engine.py) and Ray with a GPU rollout actor. Run it as is from the repository
# root on a machine with one NVIDIA GPU (network needed once, to install vllm and ray):
#
#     bash scripts/gpu_check.sh            # WORK=/tmp/thinkforge_gpu_check by default
#
# No weights are downloaded: a tiny Qwen2 is pretrained from config on the GPU (about a minute).
# Checks, each printed as PASS/FAIL (exit 1 on the first failure):
#  1. vLLM's log-probs of its own samples match the trainer's recomputation (processed log-probs);
#  2. abort stops a request and reports it as "abort";
#  3. a versioned bucket weight update changes vLLM's samples to those of the new weights (greedy outputs
#     equal the native engine's on the same weights), a stale version is refused, the prefix cache is reset;
#  4. two RL steps with cluster.rollout_engine=vllm train (logprob_drift small);
#  5. two RL steps on Ray with the native engine on a GPU rollout actor.
set -euo pipefail
WORK=${WORK:-/tmp/thinkforge_gpu_check}
PY=${PY:-python}
mkdir -p "$WORK"
nvidia-smi -L
"$PY" -c "import vllm, ray" 2>/dev/null || "$PY" -m pip install -e '.[vllm,cluster]'
"$PY" -c "import vllm, ray, torch; print('vllm', vllm.__version__, 'ray', ray.__version__, 'torch', torch.__version__)"

if [ ! -f "$WORK/pre/model/config.json" ]; then
  "$PY" -m thinkforge.cli pretrain --out "$WORK/pre" --device cuda \
    --set model_size=tiny --set steps=200 --set batch_size=32 --set seq_len=128 --set docs_per_stage=4000 \
    --set save_every=1000 --set eval_every=100
fi
MODEL="$WORK/pre/model"

"$PY" - "$MODEL" <<'PYEOF'
import sys

import torch

from thinkforge.cluster.vllm_engine import VLLMRolloutEngine, VLLMWeightSync
from thinkforge.cluster.weights import WeightVersionError
from thinkforge.engine.base import SamplingParams
from thinkforge.engine.native import LLMEngine
from thinkforge.model.io import load_model
from thinkforge.train.grpo import TrainSample, collate, token_logprobs

model_dir = sys.argv[1]


def check(name, ok, detail=""):
    print(("PASS " if ok else "FAIL ") + name + (f" ({detail})" if detail else ""), flush=True)
    if not ok:
        sys.exit(1)


trainer, tok = load_model(model_dir, device="cuda", dtype=torch.float32)
engine = VLLMRolloutEngine(model_dir, tok, seed=0, dtype="float32", max_batch_size=64, gpu_memory_utilization=0.3,
                           enforce_eager=True)
prompts = [tok(f"{a} + {b} =", add_special_tokens=False)["input_ids"] for a, b in [(3, 4), (12, 9), (25, 17), (8, 8)]]
params = SamplingParams(temperature=1.0, max_tokens=24, n=4, seed=7, logprobs=True)
outs = engine.generate(prompts, params)
rows = [TrainSample(p + c.token_ids, len(p), c.logprobs, 0.0, True) for p, cs in zip(prompts, outs) for c in cs]
with torch.no_grad():
    batch = collate(rows, tok.pad_token_id or 0, "cuda")
    logp, _ = token_logprobs(trainer, batch, 1.0)
gap = ((logp - batch["old"]).abs() * batch["completion"]).max().item()
check("1 vllm log-probs match the trainer's", gap < 2e-2, f"max |gap| {gap:.2e}")

engine.add_request(prompts[0], SamplingParams(temperature=1.0, max_tokens=400, n=2, seed=1), request_id="long")
engine.step()
engine.abort("long")
got = []
while engine.has_unfinished():
    got += engine.step()
check("2 abort", [o.completion.finish_reason for o in got] == ["abort", "abort"], str([o.completion.finish_reason for o in got]))

sync = VLLMWeightSync(engine, 16 << 20)
sync.push(dict(trainer.named_parameters()), 0)
with torch.no_grad():
    g = torch.Generator(device="cuda").manual_seed(0)
    for p in trainer.parameters():
        p.add_(torch.randn(p.shape, generator=g, device="cuda") * 0.05)
sync.push(dict(trainer.named_parameters()), 1)
greedy = SamplingParams(temperature=0.0, max_tokens=16)
native = LLMEngine(trainer, tok, max_batch_size=16).generate(prompts, greedy)
after = engine.generate(prompts, greedy)
same = sum(a[0].token_ids == b[0].token_ids for a, b in zip(after, native))
check("3a after a sync vllm decodes like the new weights", same >= len(prompts) - 1, f"{same}/{len(prompts)} equal")
try:
    sync.push(dict(trainer.named_parameters()), 1)
    check("3b stale version refused", False)
except WeightVersionError as err:
    check("3b stale version refused", True, str(err))
PYEOF

"$PY" -m thinkforge.cli rl --model "$MODEL" --tasks arith --out "$WORK/rl_vllm" --steps 2 --device cuda \
  --set batch_groups=4 --set mini_batch_groups=2 --set group_size=8 --set max_tokens=32 --set eval_problems=8 \
  --set lr=1e-5 --set engine_dtype=float32 --set cluster.rollout_engine=vllm --set max_degenerate_steps=3
"$PY" - "$WORK/rl_vllm/metrics.jsonl" <<'PYEOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if '"logprob_drift"' in l]
ok = bool(rows) and all(r["logprob_drift"] < 1e-2 for r in rows)
print(("PASS" if ok else "FAIL") + f" 4 rl on vllm: drift {[round(r['logprob_drift'], 5) for r in rows]}")
sys.exit(0 if ok else 1)
PYEOF

"$PY" -m thinkforge.cli rl --model "$MODEL" --tasks arith --out "$WORK/rl_ray_gpu" --steps 2 --device cuda \
  --set batch_groups=4 --set mini_batch_groups=2 --set group_size=8 --set max_tokens=32 --set eval_problems=8 \
  --set lr=1e-5 --set cluster.backend=ray --set cluster.rollout_workers=1 --set cluster.rollout_gpus=0.4 \
  --set cluster.reward_workers=2 --set max_degenerate_steps=3
echo "PASS 5 rl on ray with a GPU rollout actor"
echo "all GPU checks passed"

"""Native vs portable CPU numerics, side by side: do the same bits come out, and what does portable cost?

Each configuration trains the same tiny Qwen2 (4 layers, AdamW, fixed seed and data) for `--steps` steps in a
fresh process (the kernel choice is made when torch loads), and reports the SHA-256 of the final weights, the last
loss, wall and CPU seconds. Native mode uses this CPU's fastest kernels (AVX-512 where present); a second x86 CPU
whose torch picks other kernels gives other bits. Portable mode (`thinkforge.numerics.PORTABLE_ENV`) pins PyTorch,
MKL and oneDNN to their AVX2 paths: the same bits on any x86 CPU with AVX2 and FMA, and whatever the thread count
(checked here with 1 and 2 threads). A configuration that emulates an AVX2-only CPU
(ATEN_CPU_CAPABILITY=avx2 alone) shows what another machine's native run looks like.

    python benchmarks/numerics_portable.py --steps 30 --repeats 3 --out benchmarks/results/numerics_portable.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

CHILD = r"""
import hashlib, json, sys, time
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM
steps, threads = int(sys.argv[1]), int(sys.argv[2])
torch.set_num_threads(threads)
torch.manual_seed(0)
cfg = Qwen2Config(vocab_size=512, hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256)
model = Qwen2ForCausalLM(cfg)
opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
data = torch.Generator().manual_seed(1)
wall, cpu = time.perf_counter(), time.process_time()
for _ in range(steps):
    x = torch.randint(0, 512, (16, 128), generator=data)
    loss = model(input_ids=x, labels=x).loss
    loss.backward()
    opt.step()
    opt.zero_grad()
wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
digest = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in model.parameters())).hexdigest()[:16]
print(json.dumps({"capability": torch.backends.cpu.get_cpu_capability(), "loss": loss.item(), "weights_sha256": digest,
                  "wall_s": wall, "cpu_s": cpu}))
"""


def configs() -> list[tuple[str, dict[str, str], int]]:
    from thinkforge.numerics import PORTABLE_ENV

    return [("native, 2 threads", {}, 2), ("native, 1 thread", {}, 1),
            ("AVX2-only CPU emulated (native there)", {"ATEN_CPU_CAPABILITY": "avx2"}, 2),
            ("portable, 2 threads", dict(PORTABLE_ENV), 2), ("portable, 1 thread", dict(PORTABLE_ENV), 1)]


def run(env: dict[str, str], threads: int, steps: int) -> dict:
    clean = {k: v for k, v in os.environ.items() if k not in ("ATEN_CPU_CAPABILITY", "MKL_CBWR", "ONEDNN_MAX_CPU_ISA")}
    out = subprocess.run([sys.executable, "-c", CHILD, str(steps), str(threads)], capture_output=True, text=True,
                         env={**clean, **env}, timeout=1800, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3, help="runs per configuration, interleaved; min time kept")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    from thinkforge.numerics import machine_fingerprint, portable_supported
    from thinkforge.utils import atomic_write_json, run_metadata

    ok, why = portable_supported()
    if not ok:
        sys.exit(f"error: {why}")
    rows = [{"config": name, "env": env, "threads": threads, "runs": []} for name, env, threads in configs()]
    for _ in range(args.repeats):  # interleaved, so a slow spell of a shared machine hits every configuration
        for row in rows:
            row["runs"].append(run(row["env"], row["threads"], args.steps))
    base = None
    print(f"{args.steps} AdamW steps of a 4-layer Qwen2, {machine_fingerprint()['cpu']}, {os.cpu_count()} cores")
    print(f"{'configuration':<40} {'kernels':>8} {'weights sha256':>17} {'same bits':>9} {'CPU s':>7} {'wall s':>7} {'vs native':>9}")
    for row in rows:
        digests = {r["weights_sha256"] for r in row["runs"]}
        row.update(capability=row["runs"][0]["capability"], weights_sha256=sorted(digests)[0],
                   deterministic=len(digests) == 1, loss=row["runs"][0]["loss"],
                   cpu_s=min(r["cpu_s"] for r in row["runs"]), wall_s=min(r["wall_s"] for r in row["runs"]))
        base = base or row
        row["cpu_ratio_vs_native"] = row["cpu_s"] / base["cpu_s"]
        same = "=" if row["weights_sha256"] == base["weights_sha256"] else "differs"
        print(f"{row['config']:<40} {row['capability']:>8} {row['weights_sha256']:>17} {same:>9} {row['cpu_s']:>7.2f} "
              f"{row['wall_s']:>7.2f} {row['cpu_ratio_vs_native']:>8.2f}x")
    portable = [r for r in rows if r["config"].startswith("portable")]
    verdict = {"portable_same_bits_across_threads": len({r["weights_sha256"] for r in portable}) == 1,
               "portable_equals_avx2_cpu": portable[0]["weights_sha256"] == rows[2]["weights_sha256"],
               "native_differs_from_avx2_cpu": rows[0]["weights_sha256"] != rows[2]["weights_sha256"]}
    print(json.dumps(verdict))
    if args.out:
        atomic_write_json(args.out, {"rows": rows, **verdict, **run_metadata({"steps": args.steps,
                                                                             "repeats": args.repeats})})


if __name__ == "__main__":
    main()

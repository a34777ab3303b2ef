"""Native engine vs HF `generate`, side by side in one run, same model and prompts; plus server throughput.

    python benchmarks/engine_vs_hf.py --out results/engine_vs_hf.json [--threads 2]

Model: a random Qwen2 (hidden 256, 4 layers, GQA 4/2 heads, ~400-token BPE vocab) from a fixed seed.
Both wall-clock and CPU-time throughput are reported: on a shared machine the CPU-time ratio is the
steadier one (run with --threads 1 there), the wall-clock one is what a dedicated box sees.

Workload: short prompts of mixed length, greedy, `--max-tokens` budget, and stop tokens picked from a
pilot run so that most sequences stop early at different points (mixed output lengths, as in
reasoning rollouts). Throughput = completion tokens / wall seconds (prefill included, identical work
for both), best of `--repeats` interleaved runs (the machine may be shared). Greedy outputs of the two
must be token-identical; the table says so per batch size.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from roofline import gemm_gflops, main_gemm_weights  # noqa: E402  (benchmarks/roofline.py)

WORDS = ("what is 12 + 35 ? let me think step by step . the answer is 47 solve for x : 3x + 5 = 20 "
         "def add ( a , b ) : return a + b quick brown fox reasoning models think before they answer").split()


def make_prompts(tok: Any, count: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [tok(" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 24))))["input_ids"] for _ in range(count)]


def pick_stop_ids(first_pos: dict[int, list[tuple[int, int]]], n_seqs: int, max_tokens: int, target: float = 0.75) -> list[int]:
    """Stop tokens from a pilot run: add tokens (late first-occurrences first) until `target` of the
    sequences would stop early, giving a spread of output lengths rather than one early cliff."""
    cands = sorted(first_pos, key=lambda t: -statistics.median(p for _, p in first_pos[t]))
    chosen: list[int] = []
    stopped: dict[int, int] = {}
    for t in cands:
        if len(stopped) >= target * n_seqs:
            break
        chosen.append(t)
        for seq, pos in first_pos[t]:
            stopped[seq] = min(stopped.get(seq, max_tokens), pos)
    return chosen


def time_pair(fa: Any, fb: Any, repeats: int) -> tuple[dict[str, float], dict[str, float], Any, Any]:
    """Best-of-`repeats` wall and CPU seconds of two workloads, interleaved (a, b, a, b...) so that load
    from other processes on a shared machine hits both alike. CPU time is the steadier figure there."""
    best = [{"wall": float("inf"), "cpu": float("inf")} for _ in range(2)]
    outs: list[Any] = [None, None]
    for _ in range(repeats):
        for i, fn in enumerate((fa, fb)):
            w, c = time.perf_counter(), time.process_time()
            outs[i] = fn()
            best[i]["wall"] = min(best[i]["wall"], time.perf_counter() - w)
            best[i]["cpu"] = min(best[i]["cpu"], time.process_time() - c)
    return best[0], best[1], outs[0], outs[1]


def server_throughput(ckpt: str, clients: int, requests: int, max_tokens: int, stop_ids: list[int],
                      threads: int) -> dict[str, Any]:
    import openai
    import uvicorn

    from thinkforge.serve.server import ServeConfig, create_app

    app = create_app(ServeConfig(model=ckpt, served_name="bench", device="cpu", dtype="float32", max_batch_size=64))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    th = threading.Thread(target=srv.run, daemon=True)
    th.start()
    while not srv.started:
        time.sleep(0.05)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=600)
    rng = random.Random(1)
    prompts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 24))) for _ in range(requests)]

    def one(i: int) -> int:
        r = client.completions.create(model="bench", prompt=prompts[i], max_tokens=max_tokens, temperature=0.8,
                                      seed=i, extra_body={"stop_token_ids": stop_ids})
        return r.usage.completion_tokens

    one(0)  # warm-up
    app.state.generator.engine.stats["max_rows"] = 0
    t = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        toks = list(pool.map(one, range(requests)))
    wall = time.perf_counter() - t
    max_rows = app.state.generator.engine.stats["max_rows"]
    srv.should_exit = True
    th.join(timeout=10)
    return {"clients": clients, "requests": requests, "seconds": round(wall, 3),
            "completions_per_s": round(requests / wall, 2), "tokens_per_s": round(sum(toks) / wall, 1),
            "max_rows_batched": max_rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="results/engine_vs_hf.json")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--batches", default="1,16,64")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch1-prompts", type=int, default=3, help="prompts run one by one for the batch-1 row")
    ap.add_argument("--server-clients", type=int, default=32)
    ap.add_argument("--server-requests", type=int, default=96)
    ap.add_argument("--server-max-tokens", type=int, default=64)
    ap.add_argument("--no-server", action="store_true")
    ap.add_argument("--render", metavar="JSON", help="print the tables of a saved result and exit (runs nothing)")
    args = ap.parse_args()
    if args.render:
        print_tables(load_result(args.render))
        return

    import torch

    from thinkforge.engine.backends import HFBackend
    from thinkforge.engine.base import SamplingParams
    from thinkforge.engine.native import LLMEngine
    from thinkforge.engine.testing import build_tiny_model, build_tokenizer
    from thinkforge.utils import atomic_write_json, run_metadata

    torch.set_num_threads(args.threads)
    tok = build_tokenizer(512)
    model = build_tiny_model(tok, hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=512,
                             max_position_embeddings=1024, seed=args.seed)
    batches = [int(b) for b in args.batches.split(",")]
    prompts = make_prompts(tok, max(batches), args.seed)

    # Pilot (native, greedy, no stops): where does each token first appear in each sequence?
    pilot = LLMEngine(model, tok, max_batch_size=64).generate(
        prompts, SamplingParams(temperature=0, max_tokens=args.max_tokens, stop_token_ids=[]))
    first_pos: dict[int, list[tuple[int, int]]] = {}
    for s, g in enumerate(pilot):
        seen: set[int] = set()
        for pos, t in enumerate(g[0].token_ids):
            if t not in seen:
                seen.add(t)
                first_pos.setdefault(t, []).append((s, pos + 1))
    stop_ids = pick_stop_ids(first_pos, len(prompts), args.max_tokens)
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens, stop_token_ids=stop_ids)

    hf = HFBackend.__new__(HFBackend)  # in-memory model: same object for both engines
    hf.model, hf.tokenizer, hf.model_name, hf.batch_size = model, tok, "bench", 64
    hf.context = model.config.max_position_embeddings
    engine = LLMEngine(model, tok, max_batch_size=64)
    engine.generate(prompts[:2], params)  # warm-up both
    hf.generate_ids(prompts[:2], params)

    rows = []
    for B in batches:
        if B == 1:
            group = [[p] for p in prompts[:args.batch1_prompts]]
        else:
            group = [prompts[:B]]
        t_nat, t_hf, out_nat, out_hf = time_pair(lambda g=group: [engine.generate(x, params) for x in g],
                                                 lambda g=group: [hf.generate_ids(x, params) for x in g], args.repeats)
        nat = [c[0] for chunk in out_nat for c in chunk]
        ref = [c[0] for chunk in out_hf for c in chunk]
        ntok = sum(len(c.token_ids) for c in nat)
        lens = sorted(len(c.token_ids) for c in nat)
        # HF decodes every row until the longest finishes; the native engine only live rows. So the
        # ratio of row-steps is what continuous batching alone can buy (at equal per-row cost).
        hf_row_steps = sum(len(chunk) * max(len(c[0].token_ids) for c in chunk) for chunk in out_hf)
        rows.append({"batch": B, "sequences": len(nat), "completion_tokens": ntok,
                     "row_step_bound": round(hf_row_steps / ntok, 2),
                     "output_len_min_median_max": [lens[0], lens[len(lens) // 2], lens[-1]],
                     "native_tok_s": round(ntok / t_nat["wall"], 1),
                     "hf_tok_s": round(sum(len(c.token_ids) for c in ref) / t_hf["wall"], 1),
                     "speedup": round(t_hf["wall"] / t_nat["wall"], 2),
                     "native_tok_per_cpu_s": round(ntok / t_nat["cpu"], 1),
                     "hf_tok_per_cpu_s": round(sum(len(c.token_ids) for c in ref) / t_hf["cpu"], 1),
                     "speedup_cpu_time": round(t_hf["cpu"] / t_nat["cpu"], 2),
                     "native_s": t_nat, "hf_s": t_hf,
                     "greedy_identical": [c.token_ids for c in nat] == [c.token_ids for c in ref]})

    # The machine's limit: decode's weight GEMMs (2 x layer + head weights per token; prefill time counted,
    # its FLOPs not, so a lower bound) as a share of a large dense matmul at the same thread count.
    peak = gemm_gflops(args.threads)
    weights = main_gemm_weights(model)
    for r in rows:
        for side in ("native", "hf"):
            gf = 2 * weights * r["completion_tokens"] / r[f"{side}_s"]["wall"] / 1e9
            r[f"{side}_gemm_gflops"], r[f"{side}_share_of_gemm_peak"] = round(gf, 6), round(gf / peak, 4)
    torch.set_num_threads(args.threads)

    server = None
    if not args.no_server:
        with tempfile.TemporaryDirectory() as d:
            model.save_pretrained(d)
            tok.save_pretrained(d)
            server = server_throughput(d, args.server_clients, args.server_requests, args.server_max_tokens,
                                       stop_ids, args.threads)
    result = {"rows": rows, "server": server, "stop_token_ids": stop_ids, "gemm_peak_gflops": round(peak, 2),
              "main_gemm_weights": weights,
              "load_average_at_end": os.getloadavg(), "cpu_count": os.cpu_count(),
              **run_metadata({k: v for k, v in vars(args).items()}, seed=args.seed)}
    print_tables(result)
    atomic_write_json(args.out, result)
    print(f"\nwrote {args.out}")


def print_tables(result: dict[str, Any]) -> None:
    """The tables, from a result dict (a fresh run's or a saved JSON's: `--render`)."""
    c, rows = result["config"], result["rows"]
    print(f"\nnative engine vs HF generate  (threads={c['threads']}, max_tokens={c['max_tokens']}, "
          f"{len(result['stop_token_ids'])} stop ids, greedy)")
    print(f"{'batch':>5} {'seqs':>5} {'tokens':>7} {'len min/med/max':>16} {'native tok/s':>13} {'hf tok/s':>9} "
          f"{'ratio':>6} {'native tok/cpu-s':>17} {'hf tok/cpu-s':>13} {'ratio':>6} {'bound':>6} {'identical':>9}")
    for r in rows:
        mm = "/".join(str(x) for x in r["output_len_min_median_max"])
        print(f"{r['batch']:>5} {r['sequences']:>5} {r['completion_tokens']:>7} {mm:>16} {r['native_tok_s']:>13} "
              f"{r['hf_tok_s']:>9} {r['speedup']:>5}x {r['native_tok_per_cpu_s']:>17} {r['hf_tok_per_cpu_s']:>13} "
              f"{r['speedup_cpu_time']:>5}x {r['row_step_bound']:>5}x {str(r['greedy_identical']):>9}")
    print(f"\nmachine limit: 2048x2048 fp32 torch.matmul at {c['threads']} threads = {result['gemm_peak_gflops']:.1f} "
          "GFLOP/s; decode weight-GEMM rate (prefill time counted, its FLOPs not: a lower bound) and share of it:")
    for r in rows:
        print(f"  batch {r['batch']:>3}: native {r['native_gemm_gflops']:.2f} GFLOP/s = "
              f"{100 * r['native_share_of_gemm_peak']:.1f}%, hf {r['hf_gemm_gflops']:.2f} GFLOP/s = "
              f"{100 * r['hf_share_of_gemm_peak']:.1f}% of it")
    server = result.get("server")
    if server:
        print(f"\nserver (native, {server['clients']} concurrent openai clients, {server['requests']} completions, "
              f"max_tokens {c['server_max_tokens']}): {server['completions_per_s']} completions/s, "
              f"{server['tokens_per_s']} tokens/s, up to {server['max_rows_batched']} sequences per batch")
    print("bound = HF row-steps / completion tokens: the speed-up continuous batching alone gives when both "
          "pay the same per row-step")


def load_result(path: str) -> dict[str, Any]:
    try:
        result = json.loads(Path(path).read_text())
        result["rows"], result["config"], result["gemm_peak_gflops"]  # noqa: B018  (a result file has these)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise SystemExit(f"error: --render {path}: not a saved engine_vs_hf result ({type(err).__name__}: {err})") from err
    return result


if __name__ == "__main__":
    main()

"""Every benchmark script runs end to end on tiny settings and writes the JSON its docstring promises.

Numbers at these sizes mean nothing; what is checked is that each script still runs against the current
code, compares the two sides it claims to compare, and reports the correctness half of its claim
(pass counts, identical greedy outputs, same selected batches). `benchmarks/mtp_speculative.py` has its
own tests (test_benchmarks_mtp.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import tests.test_rl_support as support
from thinkforge.verify import sandbox_info

ROOT = Path(__file__).resolve().parents[1]


def run_script(name: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / name), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    return support.micro_model(tmp_path_factory.mktemp("bench_micro"))


def test_sandbox_humaneval_ours_and_peers(tmp_path):
    assert sandbox_info().mode == "bwrap", sandbox_info().reason  # the isolated path is what is measured
    out = tmp_path / "h.json"
    run_script("sandbox_humaneval.py", "--limit", "6", "--workers", "2", "--out", str(out))
    res = json.loads(out.read_text())
    assert [r["passed"] for r in res["rows"]] == [6, 6]  # canonical solutions pass both ways
    assert all(r["problems_per_s"] > 0 for r in res["rows"]) and res["rows"][-1]["ratio_vs_peers"] == 1.0


def test_math_grader_accepts_references_and_rejects_perturbations(tmp_path):
    out = tmp_path / "m.json"
    run_script("math_grader.py", "--limit", "25", "--threads", "2", "--out", str(out))
    rows = {(r["way"].split(" (")[0], r["set"]): r for r in json.loads(out.read_text())["rows"]}
    ours_ref, ours_bad = rows[("thinkforge math_equal", "reference")], rows[("thinkforge math_equal", "perturbed")]
    assert ours_ref["n"] == 25 and ours_ref["accuracy"] >= 0.96
    assert ours_bad["false_positives"] == 0
    assert ("math-verify in-process", "reference") in rows


def test_engine_vs_hf_identical_greedy_and_server(tmp_path):
    out = tmp_path / "e.json"
    run_script("engine_vs_hf.py", "--batches", "1,4", "--max-tokens", "16", "--repeats", "1", "--threads", "1",
               "--batch1-prompts", "2", "--server-clients", "4", "--server-requests", "8",
               "--server-max-tokens", "8", "--out", str(out))
    res = json.loads(out.read_text())
    assert [r["batch"] for r in res["rows"]] == [1, 4]
    assert all(r["greedy_identical"] and r["native_tok_s"] > 0 and r["hf_tok_s"] > 0 for r in res["rows"])
    assert res["server"]["requests"] == 8 and res["server"]["completions_per_s"] > 0
    assert all(0 < r["native_share_of_gemm_peak"] < 1 and r["hf_gemm_gflops"] > 0 for r in res["rows"])
    # --render prints the saved run's tables (nothing runs): the GEMM shares and the server line included
    shown = run_script("engine_vs_hf.py", "--render", str(out)).stdout
    assert "machine limit: 2048x2048 fp32 torch.matmul at 1 threads" in shown
    assert f"{100 * res['rows'][1]['native_share_of_gemm_peak']:.1f}%" in shown and "8 completions" in shown


def test_rollout_ablation_same_batches_in_every_mode(micro, tmp_path):
    out = tmp_path / "r.json"
    run_script("rollout_ablation.py", "--model", micro, "--task", "arith", "--reward", "math", "--steps", "1",
               "--batch-groups", "2", "--group-size", "4", "--max-tokens", "12", "--engine-batch", "16",
               "--max-slots-factor", "3", "--cores", "split" if len(os.sched_getaffinity(0)) > 1 else "shared",
               "--out", str(out))
    res = json.loads(out.read_text())
    assert list(res["rows"]) == ["naive", "+continuous", "+async reward", "+early termination"]
    assert res["same_batches"] is True and res["speedup"] > 0


def test_sft_vs_trl_thinkforge_sides(tmp_path):
    out = tmp_path / "s.json"
    run_script("sft_vs_trl.py", "--steps", "2", "--batch-size", "4", "--examples-per-task", "16",
               "--model-size", "micro", "--skip-trl", "--out", str(out))
    res = json.loads(out.read_text())["results"]
    packed, padded = res["thinkforge packed"], res["thinkforge padded"]
    assert packed["real_tokens"] == padded["real_tokens"] > 0  # same conversations, only the layout differs
    assert packed["tokens_per_s"] > 0 and padded["speedup_vs_reference"] == 1.0


def test_rl_vs_trl_thinkforge_side_and_a_reused_work_dir(micro, tmp_path):
    out, work = tmp_path / "r.json", tmp_path / "work"
    args = ("--model", micro, "--skip-trl", "--max-steps", "1", "--eval-every", "1", "--eval-problems", "4",
            "--batch-groups", "2", "--mini-batch-groups", "1", "--group-size", "4", "--max-tokens", "8",
            "--train-problems", "16", "--target", "0.0", "--work-dir", str(work), "--out", str(out))
    run_script("rl_vs_trl.py", *args)
    res = json.loads(out.read_text())
    (run,) = res["results"].values()
    assert run["steps"] == 1 and run["stop_reason"] == "target" and run["time_to_target_s"] > 0
    assert run["config"]["engine_max_batch"] == 256  # the benchmark's default engine rows
    # A second run in the same work dir is refused (its finished thinkforge run would be handed back, not timed).
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    again = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "rl_vs_trl.py"), *args], capture_output=True,
                           text=True, timeout=300, cwd=ROOT, env=env)
    assert again.returncode != 0 and "exists; use a new --work-dir" in again.stderr.strip().splitlines()[-1]

"""benchmarks/mtp_speculative.py end to end on a micro checkpoint: every (batch, temperature, k) row, the
extension path, greedy identity, consistent counts, the analytic ceiling, the fallback, the JSON file; skipping
k without extension; bad input (no MTP layers, a missing model directory, bad flags) as one-line errors."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from thinkforge.engine.testing import build_tiny_model, build_tokenizer
from thinkforge.errors import ThinkforgeError
from thinkforge.model.io import save_model
from thinkforge.model.mtp import add_mtp_layers, checkpoint_mtp_layers

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "mtp_speculative.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("mtp_speculative_bench", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """Random micro Qwen2 with one (random) MTP layer: drafts are mostly rejected, so the reject path runs."""
    tok = build_tokenizer()
    model = build_tiny_model(tok, seed=0)
    add_mtp_layers(model, 1)
    model.config.num_nextn_predict_layers = 1
    return str(save_model(model, tok, tmp_path_factory.mktemp("ckpt") / "model"))


def test_extends_then_compares_every_k_with_identical_greedy_outputs(bench, checkpoint, tmp_path):
    out = tmp_path / "r.json"
    res = bench.main(["--model", checkpoint, "--out", str(out), "--threads", "1", "--batches", "1,3",
                      "--prompts", "3", "--max-tokens", "12", "--repeats", "2", "--extend-steps", "2",
                      "--extend-docs", "40", "--extend-batch-size", "2", "--extend-out", str(tmp_path / "ext"),
                      "--temperatures", "0", "--fallback", "off"])
    assert res["extension"]["layers"] == 3 and checkpoint_mtp_layers(res["model_dir"]) == 3
    assert res["mtp_layers"] == 3 and res["skipped_k"] == []
    rows = {(r["batch"], r["k"]): r for r in res["rows"]}
    assert set(rows) == {(b, k) for b in (1, 3) for k in (0, 1, 2, 3)}
    assert all(r["temperature"] == 0 for r in res["rows"])
    for (b, k), r in rows.items():
        assert r["identical"] and r["mismatched_sequences"] == 0 and r["first_divergence_token"] is None
        assert r["sequences"] == 3
        assert r["completion_tokens"] == rows[(b, 0)]["completion_tokens"] > 0
        assert rows[(b, 0)]["ratio_wall"] == 1.0 and r["tok_s"] > 0 and r["tok_per_cpu_s"] > 0
        if k == 0:
            assert "acceptance" not in r and r["break_even_accepted_length"] == 1.0 and r["step_ms"] > 0
            continue
        # The analytic ceiling: E = 1 + sum(acceptance) over the measured round cost relative to a plain step.
        assert r["fell_back"] == "none" and r["spec_max_batch"] is None
        assert r["expected_tokens_per_round"] == pytest.approx(1 + sum(r["acceptance"]), abs=1e-3)
        assert r["round_cost_ratio"] == pytest.approx(r["round_ms"] / rows[(b, 0)]["step_ms"], rel=1e-3)
        assert r["ceiling"] == pytest.approx(r["expected_tokens_per_round"] / r["round_cost_ratio"], rel=2e-3)
        assert r["round_ms"] >= r["verify_ms"] + r["draft_ms"] > 0
        cost = 1 + sum(res["draft_pass_weights"][:k]) / res["main_gemm_weights"]
        assert r["ideal_weight_bound"] * cost == pytest.approx(r["expected_tokens_per_round"], rel=5e-3)
        acc = r["acceptance"]
        assert len(acc) == k and all(0.0 <= a <= 1.0 for a in acc)
        assert all(x >= y for x, y in zip(acc, acc[1:], strict=False))  # cumulative: never rises with position
        assert 1.0 <= r["mean_accepted_length"] <= k + 1
        # Rounds emit every token but each row's first (from prefill); a row's last round may also count
        # up to k accepted tokens past its stop/length limit (emitted, then cut).
        emitted = round(r["row_rounds"] * r["mean_accepted_length"])
        assert r["completion_tokens"] - 3 <= emitted <= r["completion_tokens"] - 3 + 3 * k
        assert r["verify_forwards"] == r["decode_forwards"] <= rows[(b, 0)]["decode_forwards"]
    t = res["target"]
    assert t["greedy_batch1"]["best_k"] in (1, 2, 3) and t["greedy_batch1"]["all_identical"]
    assert t["largest_batch_not_slower"]["batch"] == 3 and "sampling_t1_batch1" not in t
    # Roofline: the machine's GEMM rate is measured, decode's weight-GEMM rate is a share of it, and for
    # plain decoding it is 2 x (main layers + head weights) per emitted token over the wall time.
    assert res["gemm_peak_gflops"] > 0
    for r in rows.values():
        assert 0 < r["share_of_gemm_peak"] < 1 and r["gemm_gflops"] > 0
    plain = rows[(1, 0)]
    ratio = plain["gemm_gflops"] * 1e9 * plain["seconds"]["wall"] / (2 * plain["completion_tokens"])
    assert ratio == pytest.approx(res["main_gemm_weights"], rel=5e-2)  # GFLOP/s is rounded
    on_disk = json.loads(out.read_text())
    assert on_disk["rows"] == json.loads(json.dumps(res["rows"]))
    assert on_disk["config"]["max_tokens"] == 12 and on_disk["seed"] == 0 and "torch" in on_disk["versions"]
    assert len(on_disk["problem_ids"]) == 3 and on_disk["cpu_count"] >= 1

    # An existing extended checkpoint with enough layers is reused, not retrained.
    again = bench.main(["--model", checkpoint, "--out", str(tmp_path / "r2.json"), "--threads", "1", "--batches", "1",
                        "--ks", "2", "--prompts", "1", "--max-tokens", "4", "--repeats", "1",
                        "--extend-out", str(tmp_path / "ext")])
    assert again["extension"] == {"reused": res["model_dir"]}


def test_without_extension_larger_k_are_skipped(bench, checkpoint, tmp_path):
    res = bench.main(["--model", checkpoint, "--out", str(tmp_path / "r.json"), "--threads", "1", "--batches", "2",
                      "--prompts", "2", "--max-tokens", "6", "--repeats", "1", "--extend-steps", "0",
                      "--temperatures", "0", "--fallback", "off"])
    assert res["extension"] is None and res["skipped_k"] == [2, 3]
    assert [(r["batch"], r["k"]) for r in res["rows"]] == [(2, 0), (2, 1)]
    assert all(r["identical"] for r in res["rows"])


def test_checkpoint_without_mtp_layers_is_a_one_line_error(bench, tmp_path):
    tok = build_tokenizer()
    path = save_model(build_tiny_model(tok, seed=0), tok, tmp_path / "plain")
    with pytest.raises(ThinkforgeError, match="no MTP layers"):
        bench.main(["--model", str(path), "--out", str(tmp_path / "r.json"), "--threads", "1"])
    with pytest.raises(ThinkforgeError, match="--batches"):
        bench.main(["--model", str(path), "--batches", "1,x"])


def test_ceiling_formulas_on_hand_computed_numbers(bench):
    acc = [0.9, 0.72, 0.5]  # cumulative: draft 1 accepted 90% of rounds, drafts 1-2 72%, all three 50%
    assert bench.expected_tokens_per_round(acc) == pytest.approx(3.12)
    # A round costs 15 ms against 10 ms per plain step: 3.12 tokens for 1.5 steps' time.
    assert bench.analytic_ceiling(acc, 15.0, 10.0) == pytest.approx(2.08)
    assert bench.analytic_ceiling([], 10.0, 10.0) == pytest.approx(1.0)  # no drafts, same cost: plain
    # Weight-bound: each draft pass costs 100 weights against 1000 in the main model: 3.12 / 1.3.
    assert bench.weight_bound_ideal(acc, 1000, [100, 100, 100]) == pytest.approx(2.4)
    assert bench.weight_bound_ideal([1.0], 1000, [0]) == pytest.approx(2.0)


def test_sampling_rows_and_the_fallback_are_reported(bench, checkpoint, tmp_path, capsys):
    """T > 0 rows have acceptance and speed but no identity check; --fallback 0 makes every speculative step
    plain, and the rows and the output say so; --fallback auto records its calibration per temperature."""
    res = bench.main(["--model", checkpoint, "--out", str(tmp_path / "r.json"), "--threads", "1", "--batches", "1,2",
                      "--ks", "1", "--prompts", "2", "--max-tokens", "8", "--repeats", "1", "--extend-steps", "0",
                      "--temperatures", "0,1.0", "--fallback", "0"])
    out = capsys.readouterr().out
    spec = [r for r in res["rows"] if r["k"] == 1]
    assert {(r["batch"], r["temperature"]) for r in spec} == {(1, 0.0), (2, 0.0), (1, 1.0), (2, 1.0)}
    for r in spec:
        assert r["fell_back"] == "all" and r["verify_forwards"] == 0 and r["spec_max_batch"] == 0
        assert r["fallback_steps"] == r["decode_forwards"] > 0 and "ceiling" not in r
        assert (r["identical"] is None) == (r["temperature"] > 0)
        assert f"fallback: batch {r['batch']} T={r['temperature']} k=1: {r['fallback_steps']} step(s) decoded plain" in out
    assert all(r["identical"] for r in res["rows"] if r["temperature"] == 0)
    assert res["calibration"] is None and res["fallback"] == "0"

    res = bench.main(["--model", checkpoint, "--out", str(tmp_path / "r2.json"), "--threads", "1", "--batches", "1",
                      "--ks", "1", "--prompts", "2", "--max-tokens", "6", "--repeats", "1", "--extend-steps", "0",
                      "--temperatures", "0.6", "--calib-tokens", "4"])
    cal = res["calibration"]["0.6"]
    assert cal["temperature"] == 0.6 and cal["max_tokens"] == 4 and set(cal["ratios"][1]) == {1}
    (row,) = [r for r in res["rows"] if r["k"] == 1]
    assert row["spec_max_batch"] == cal["spec_max_batch"][1] in (0, 1)
    assert row["fell_back"] == ("all" if cal["spec_max_batch"][1] == 0 else "none")
    assert "fallback calibration, T=0.6" in capsys.readouterr().out
    # Without --calib-tokens the calibration measures the run's own budget (a short one misjudged batch 16).
    res = bench.main(["--model", checkpoint, "--out", str(tmp_path / "r3.json"), "--threads", "1", "--batches", "1",
                      "--ks", "1", "--prompts", "2", "--max-tokens", "5", "--repeats", "1", "--extend-steps", "0",
                      "--temperatures", "0"])
    assert res["calibration"]["0.0"]["max_tokens"] == 5
    assert "fallback calibration, T=0.0: plain vs k = [1] at batch [1], 5 tokens" in capsys.readouterr().out


def test_missing_model_directory_and_bad_flags_are_one_line_errors(bench, checkpoint, tmp_path):
    import subprocess
    import sys

    missing = str(tmp_path / "nowhere" / "model")
    with pytest.raises(ThinkforgeError, match="not a checkpoint directory"):
        bench.main(["--model", missing, "--out", str(tmp_path / "r.json"), "--threads", "1"])
    for flag, value, match in (("--fallback", "sometimes", "--fallback"), ("--fallback", "-1", ">= 0"),
                               ("--temperatures", "-0.5", "--temperatures"), ("--calib-tokens", "-1", "--calib-tokens")):
        with pytest.raises(ThinkforgeError, match=match):
            bench.main(["--model", checkpoint, "--out", str(tmp_path / "r.json"), flag, value])
    proc = subprocess.run([sys.executable, str(SCRIPT), "--model", missing, "--out", str(tmp_path / "r.json")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0
    assert proc.stderr.startswith("error: --model ") and "not a checkpoint directory" in proc.stderr


ROLLOUT = Path(__file__).resolve().parents[1] / "benchmarks" / "mtp_rollout.py"


@pytest.fixture(scope="module")
def rollout_bench():
    spec = importlib.util.spec_from_file_location("mtp_rollout_bench", ROLLOUT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_rollout_benchmark_plain_vs_mtp_with_logprob_drift(rollout_bench, checkpoint, tmp_path):
    """GRPO-shaped rollouts at T=1 through plain, MTP and MTP-with-fallback engines: tokens/s and ratios, the
    speculator's acceptance, and engine-vs-trainer log-prob drift at float noise for every configuration."""
    common = ["--model", checkpoint, "--threads", "1", "--steps", "1", "--batch-groups", "2", "--group-size", "2",
              "--max-tokens", "8", "--engine-batch", "4", "--ks", "1", "--repeats", "2", "--max-slots-factor", "1"]
    res = rollout_bench.main([*common, "--fallback", "0", "--out", str(tmp_path / "r.json")])
    rows = res["rows"]
    assert set(rows) == {"plain", "mtp k=1", "mtp k=1 +fallback"} and rows["plain"]["ratio"] == 1.0
    assert rows["plain"]["ratio_cpu"] == 1.0 and all(r["tok_per_cpu_s"] > 0 for r in rows.values())
    for name, r in rows.items():  # two repeats of each: the same seeded workload, run by fresh engines
        assert r["tokens"] > 0 and r["tok_s"] > 0 and r["committed_groups"] == 2 and len(r["tok_s_every_repeat"]) == 2
        assert r["drift"]["tokens"] > 0 and r["drift"]["max"] < 1e-4, (name, r["drift"])
    assert rows["mtp k=1"]["verify_forwards"] > 0 and rows["mtp k=1"]["fallback_steps"] == 0
    assert len(rows["mtp k=1"]["acceptance"]) == 1
    fb = rows["mtp k=1 +fallback"]
    assert fb["verify_forwards"] == 0 and fb["fallback_steps"] > 0 and fb["spec_max_batch"] == 0
    assert json.loads((tmp_path / "r.json").read_text())["rows"]["plain"]["tokens"] == rows["plain"]["tokens"]


def test_rollout_benchmark_renders_a_saved_result(rollout_bench, checkpoint, tmp_path, capsys):
    """`--render JSON` prints the saved run's table without running anything; a bad file is a one-line error."""
    common = ["--model", checkpoint, "--threads", "1", "--steps", "1", "--batch-groups", "2", "--group-size", "2",
              "--max-tokens", "8", "--engine-batch", "4", "--ks", "1", "--repeats", "1", "--max-slots-factor", "1"]
    rollout_bench.main([*common, "--out", str(tmp_path / "r.json")])
    fresh = capsys.readouterr().out
    table = fresh[fresh.index("RL rollouts"):fresh.index("wrote ")]
    assert rollout_bench.main(["--render", str(tmp_path / "r.json")])["rows"].keys() == {"plain", "mtp k=1"}
    assert capsys.readouterr().out.strip() == table.strip()
    (tmp_path / "bad.json").write_text('{"rows": {}}')
    with pytest.raises(ThinkforgeError, match="bad.json: not a saved mtp_rollout result"):
        rollout_bench.main(["--render", str(tmp_path / "bad.json")])


def test_rollout_benchmark_bad_input_is_one_line_errors(rollout_bench, checkpoint, tmp_path):
    tok = build_tokenizer()
    plain = str(save_model(build_tiny_model(tok, seed=0), tok, tmp_path / "plain"))
    out = ["--out", str(tmp_path / "r.json")]
    with pytest.raises(ThinkforgeError, match="not a checkpoint directory"):
        rollout_bench.main(["--model", str(tmp_path / "missing"), *out])
    with pytest.raises(ThinkforgeError, match="no MTP layers"):
        rollout_bench.main(["--model", plain, "--threads", "1", *out])
    with pytest.raises(ThinkforgeError, match="num_draft 3 > the 1 trained MTP layer"):
        rollout_bench.main(["--model", checkpoint, "--threads", "1", "--ks", "1,3", *out])
    with pytest.raises(ThinkforgeError, match="--fallback"):
        rollout_bench.main(["--model", checkpoint, "--fallback", "maybe", *out])

"""benchmarks/mtp_speculative.py end to end on a micro checkpoint: every (batch, k) row, the extension path,
greedy identity, consistent counts, the JSON file; skipping k without extension; a checkpoint without MTP."""

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
                      "--extend-docs", "40", "--extend-batch-size", "2", "--extend-out", str(tmp_path / "ext")])
    assert res["extension"]["layers"] == 3 and checkpoint_mtp_layers(res["model_dir"]) == 3
    assert res["mtp_layers"] == 3 and res["skipped_k"] == []
    rows = {(r["batch"], r["k"]): r for r in res["rows"]}
    assert set(rows) == {(b, k) for b in (1, 3) for k in (0, 1, 2, 3)}
    for (b, k), r in rows.items():
        assert r["identical"] and r["mismatched_sequences"] == 0 and r["first_divergence_token"] is None
        assert r["sequences"] == 3
        assert r["completion_tokens"] == rows[(b, 0)]["completion_tokens"] > 0
        assert rows[(b, 0)]["ratio_wall"] == 1.0 and r["tok_s"] > 0 and r["tok_per_cpu_s"] > 0
        if k == 0:
            assert "acceptance" not in r and r["break_even_accepted_length"] == 1.0
            continue
        acc = r["acceptance"]
        assert len(acc) == k and all(0.0 <= a <= 1.0 for a in acc)
        assert all(x >= y for x, y in zip(acc, acc[1:], strict=False))  # cumulative: never rises with position
        assert 1.0 <= r["mean_accepted_length"] <= k + 1
        # Rounds emit every token but each row's first (from prefill); a row's last round may also count
        # up to k accepted tokens past its stop/length limit (emitted, then cut).
        emitted = round(r["row_rounds"] * r["mean_accepted_length"])
        assert r["completion_tokens"] - 3 <= emitted <= r["completion_tokens"] - 3 + 3 * k
        assert r["verify_forwards"] == r["decode_forwards"] <= rows[(b, 0)]["decode_forwards"]
    assert res["target"]["batch"] == 1 and res["target"]["best_k"] in (1, 2, 3)
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
                      "--prompts", "2", "--max-tokens", "6", "--repeats", "1", "--extend-steps", "0"])
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

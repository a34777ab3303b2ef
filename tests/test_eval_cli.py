"""`thinkforge eval --responses` and `thinkforge report`, through the real command line."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from thinkforge.cli import app
from thinkforge.eval.harness import resolve_task
from thinkforge.eval.report import load_references

runner = CliRunner()


def _responses(tmp_path, name: str, wrong_every: int) -> str:
    rows = []
    for i, p in enumerate(resolve_task(name).problems()):
        answer = p.answer if i % wrong_every else "-987654"
        rows += [{"problem_id": p.id, "response": f"\\boxed{{{answer}}}"}, {"problem_id": p.id, "response": ""}]
    path = tmp_path / f"{name}-{wrong_every}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_rescore_cli_and_report(tmp_path):
    for run, every in (("modelA", 3), ("modelB", 5)):
        for name in ("aime24", "amc23"):
            res = runner.invoke(app, ["eval", "--task", name, "--responses", _responses(tmp_path, name, every),
                                      "--output", str(tmp_path / run)])
            assert res.exit_code == 0, res.output
            assert f"{name}: accuracy" in res.output
    a = json.loads((tmp_path / "modelA/aime24/summary.json").read_text())
    # Every third problem wrong (ids 0, 3, ... of 30 = 10 wrong), and one empty sample per problem.
    assert a["n_samples"] == 2 and a["accuracy"] == pytest.approx((20 / 30) / 2, abs=1e-6)
    assert a["pass_at_k"]["2"] == pytest.approx(20 / 30, abs=1e-6) and a["reasons"]["no_answer"] == 30
    assert {"task", "accuracy", "pass_at_k", "maj_at_k", "n_samples", "n_problems", "config", "config_hash", "seed",
            "versions"} <= set(a)
    assert a["config"]["responses_sha256"] and a["config"]["mode"] == "rescore"

    out, plot = tmp_path / "report.md", tmp_path / "report.png"
    res = runner.invoke(app, ["report", str(tmp_path / "modelA"), str(tmp_path / "modelB"), "--out", str(out),
                              "--plot", str(plot), "--references"])
    assert res.exit_code == 0, res.output
    md = out.read_text()
    assert "| model | aime24 | amc23 |" in md
    assert "| modelA | 33.3 | 32.5 |" in md and "| modelB | 40.0 | 40.0 |" in md
    assert "| MiMo-7B-RL (published) | 68.2 | – |" in md
    assert "https://huggingface.co/deepseek-ai/DeepSeek-R1-Distill-Qwen-7B" in md and "![accuracy](report.png)" in md
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_references_have_sources():
    refs = load_references()
    models = {r["model"] for r in refs}
    assert models == {"MiMo-7B-RL", "Sky-T1-32B-Preview", "o1-mini", "QwQ-32B-Preview", "DeepSeek-R1-Distill-Qwen-7B"}
    assert all(r["source"].startswith("https://") and 0 < r["value"] <= 100 for r in refs)


def test_cli_errors_name_the_row(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"problem_id": "aime24/60", "response": "\\\\boxed{204}"}\n{"problem_id": "aime24/999", "response": "x"}\n')
    cases = [
        (["eval", "--task", "aime24", "--responses", str(bad), "--output", str(tmp_path / "o")],
         f"error: {bad}:2: unknown problem_id 'aime24/999' for task aime24"),
        (["eval", "--task", "nosuch", "--responses", str(bad), "--output", str(tmp_path / "o")],
         "error: unknown task 'nosuch'"),
        (["eval", "--task", "aime24", "--output", str(tmp_path / "o")], "error: --model is required"),
        (["report", str(tmp_path / "empty")], "error: "),
        (["eval", "--task", "arith", "--model", "x", "--backend", "hf", "--speculative", "mtp", "--output",
          str(tmp_path / "o")], "error: --speculative mtp needs --backend native, got --backend hf"),
        (["eval", "--task", "arith", "--model", "x", "--num-draft", "2", "--output", str(tmp_path / "o")],
         "error: --num-draft needs --speculative mtp"),
    ]
    (tmp_path / "empty").mkdir()
    for argv, message in cases:
        proc = subprocess.run([sys.executable, "-m", "thinkforge.cli", *argv], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2, (argv, proc.stderr)
        assert proc.stderr.startswith(message), proc.stderr

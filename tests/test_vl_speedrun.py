"""`thinkforge speedrun --preset vl-smoke` (thinkforge.train.vl_speedrun), shrunk further for the test suite."""

from __future__ import annotations

import json

import pytest

from thinkforge.train.vl_speedrun import count_direction, load_vl_speedrun_config, run_vl_speedrun
from thinkforge.utils import read_jsonl


def test_vl_smoke_runs_every_stage_and_writes_the_report(tmp_path):
    cfg = load_vl_speedrun_config("vl-smoke", {"out_dir": str(tmp_path / "run"), "device": "cpu", "eval_problems": 2,
                                               "eval_tasks": ["vl_count", "vl_ground"], "rl.steps": 1,
                                               "rl.tasks": ["vl_count", "vl_caption"],
                                               "pretrain.problems_per_task": 6, "rl.problems_per_task": 4,
                                               "eval_max_tokens": 8, "rl.max_tokens": 8, "rl.eval_max_tokens": 8,
                                               "rl.eval_problems": 1, "rl.max_slots_factor": 1.0,
                                               "eval_samples": 2})
    assert cfg.pretrain["preset"] == "micro" and cfg.rl["steps"] == 1
    report = run_vl_speedrun(cfg)
    assert list(report["stages"]) == ["stage1_projector", "stage2_vit_projector", "stage3_all", "stage4_long_sft",
                                      "morl"]
    for stage in report["stages"].values():
        assert set(stage["accuracy"]) == {"vl_count", "vl_ground"}
        assert all(0.0 <= a <= 1.0 for a in stage["accuracy"].values())
    assert report["model"]["projector"] < report["model"]["vit"] < report["model"]["llm"]
    on_disk = json.loads((tmp_path / "run" / "report.json").read_text())
    assert on_disk["stages"].keys() == report["stages"].keys()
    assert "| morl |" in (tmp_path / "run" / "report.md").read_text()
    # MORL is tested against the stage it started from on the same held-out problems: per task, and pooled over
    # the RL tasks that were evaluated (vl_count only here: vl_caption is not an eval task).
    stats = report["statistics"]
    assert stats["intervals"]["morl"]["vl_count"]["n"] == 2
    paired = {p["task"]: p for p in stats["paired"]}
    assert set(paired) == {"vl_count", "vl_ground", "rl_tasks_pooled"}
    for p in paired.values():
        assert (p["a"], p["b"]) == ("stage4_long_sft", "morl") and p["n"] == 2 and 0.0 <= p["p_value"] <= 1.0
        assert p["a_only"] + p["b_only"] <= p["n"]
    for key in ("a_only", "b_only", "n"):
        assert paired["rl_tasks_pooled"][key] == paired["vl_count"][key]
    stage4 = report["stages"]["stage4_long_sft"]["accuracy"]["vl_count"]
    assert paired["vl_count"]["difference"] == round(report["stages"]["morl"]["accuracy"]["vl_count"] - stage4, 6)
    assert "| rl_tasks_pooled | 2 |" in (tmp_path / "run" / "report.md").read_text()
    # T=1 draws (eval_samples) on the RL tasks, for MORL and its starting stage only: sampled pass@1 and pass@2.
    assert set(stats["sampled"]) == {"stage4_long_sft", "morl"}
    for per_task in stats["sampled"].values():
        assert set(per_task) == {"vl_count"} and per_task["vl_count"]["k"] == 2
        assert per_task["vl_count"]["pass1"]["estimate"] <= per_task["vl_count"]["passk"]["estimate"]
    assert len(read_jsonl(tmp_path / "run" / "eval" / "morl-sampled" / "vl_count" / "samples.jsonl")) == 4
    assert "sampled pass@1" in (tmp_path / "run" / "report.md").read_text()
    (diff,) = stats["sampled_paired"]
    assert (diff["a"], diff["b"], diff["task"], diff["n"]) == ("stage4_long_sft", "morl", "vl_count", 2)
    s4, morl = (stats["sampled"][n]["vl_count"]["pass1"]["estimate"] for n in ("stage4_long_sft", "morl"))
    assert diff["estimate"] == pytest.approx(morl - s4, abs=1e-6) and diff["low"] <= diff["estimate"] <= diff["high"]
    # Which way the greedy counts miss, per stage: every held-out answer is below, at, above the truth or unparsed.
    bias = stats["answer_bias"]
    assert set(bias) == set(report["stages"]) and all(set(b) == {"vl_count"} for b in bias.values())
    for name, b in bias.items():
        b = b["vl_count"]
        assert b["below"] + b["exact"] + b["above"] + b["unparsed"] == b["n"] == 2
        assert b["exact"] / 2 == report["stages"][name]["accuracy"]["vl_count"]
        assert [sum(c[i] for c in b["exact_by_truth"].values()) for i in (0, 1)] == [b["exact"], 2]
    assert "| morl | vl_count |" in (tmp_path / "run" / "report.md").read_text()
    rows = read_jsonl(tmp_path / "run" / "morl" / "metrics.jsonl")
    assert any("reward/vl_count" in r for r in rows) and any("reward/vl_caption" in r for r in rows)
    # The Bradley-Terry reward model trained first and reached MORL's caption route through reward_options.
    rm = report["reward_model"]
    assert 0.0 <= rm["heldout_pair_accuracy"]["all"] <= 1.0 and rm["heldout_pairs"] > 0
    morl = json.loads((tmp_path / "run" / "morl" / "summary.json").read_text())["config"]
    assert morl["reward_options"]["bt_preference"]["path"] == rm["model_dir"]
    assert [r["name"] for r in morl["rewards"]["vl_caption"]] == ["caption_f1", "bt_preference"]
    assert "Bradley-Terry reward model" in (tmp_path / "run" / "report.md").read_text()


def test_count_direction_splits_misses_into_below_and_above():
    gold = {"a": "3", "b": "4", "c": "5", "d": "2", "e": "6"}
    rows = [{"problem_id": "a", "extracted": "2"}, {"problem_id": "b", "extracted": "4"},
            {"problem_id": "c", "extracted": "7"}, {"problem_id": "d", "extracted": None},
            {"problem_id": "e", "extracted": " 5 "}]
    got = count_direction(rows, gold)
    assert got == {"below": 2, "exact": 1, "above": 1, "unparsed": 1, "n": 5, "mean_signed_error": 0.0,
                   "exact_by_truth": {"2": [0, 1], "3": [0, 1], "4": [1, 1], "5": [0, 1], "6": [0, 1]}}
    assert count_direction(rows[:1], gold)["mean_signed_error"] == -1.0

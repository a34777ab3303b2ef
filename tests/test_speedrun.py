import json
import subprocess
import sys

import pytest
import torch


def test_smoke_speedrun_end_to_end(tmp_path):
    """The CI smoke preset: tokenizer -> staged pretrain (+1 MTP layer) -> SFT -> RL, each evaluated, then the
    report, via the real CLI."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "thinkforge.cli", "speedrun", "--preset", "smoke", "--out", str(out)]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert list(report["stages"]) == ["pretrain", "sft", "rl"]
    for name, stage in report["stages"].items():
        assert set(stage["accuracy"]) == {"arith", "code"}
        assert all(0.0 <= acc <= 1.0 for acc in stage["accuracy"].values())
        # An untrained smoke model rarely earns a reward, so RL may find no valid group to train on.
        assert stage["train_wall_s"] > 0 and stage["train_cpu_s"] > 0 and (stage["tokens"] > 0 or name == "rl")
        mtp = stage["mtp"]  # the MTP layer from pretraining rides through SFT and RL
        assert len(mtp["acceptance"]) == 1 and 0.0 <= mtp["acceptance"][0] <= 1.0
        assert mtp["mean_accepted_length"] == pytest.approx(1 + mtp["acceptance"][0], abs=1e-3)
    assert report["model"]["params"] > 10_000
    assert report["seed"] == 0 and len(report["config_hash"]) == 16 and "torch" in report["versions"]
    assert report["total_cpu_s"] > 0 and 0.0 <= report["steal_ratio"] <= 1.0
    md = (out / "report.md").read_text()
    assert "| pretrain |" in md and "| sft |" in md and "| rl |" in md and "Estimated cost" in md
    assert "draft 1 accepted" in md
    # The report card: a Wilson interval per stage and task, McNemar between consecutive stages.
    for name in ("pretrain", "sft", "rl"):
        for task in ("arith", "code"):
            ci = report["intervals"][name][task]
            assert ci["n"] == 20 and ci["low"] <= ci["estimate"] <= ci["high"]
            assert ci["estimate"] == pytest.approx(report["stages"][name]["accuracy"][task], abs=1e-6)
    pairs = {(m["a"], m["b"], m["task"]): m for m in report["paired"]}
    assert set(pairs) == {(a, b, t) for a, b in (("pretrain", "sft"), ("sft", "rl")) for t in ("arith", "code")}
    sft_rl = pairs[("sft", "rl", "arith")]
    assert sft_rl["difference"] == pytest.approx(report["stages"]["rl"]["accuracy"]["arith"]
                                                 - report["stages"]["sft"]["accuracy"]["arith"], abs=1e-6)
    assert 0.0 < sft_rl["p_value"] <= 1.0 and "McNemar p =" in md and "95% Wilson" in md
    assert (out / "loss.png").stat().st_size > 1000 and (out / "accuracy.png").stat().st_size > 1000
    # RL keeps the MTP layers frozen (MiMo); SFT trained them.
    from safetensors.torch import load_file

    def mtp_weight(stage):
        return load_file(str(out / stage / "model" / "model.safetensors"))["model.mtp_layers.0.input_proj.weight"]

    assert torch.equal(mtp_weight("rl"), mtp_weight("sft")) and not torch.equal(mtp_weight("sft"), mtp_weight("pretrain"))
    for name in ("pretrain", "sft"):
        samples = (out / "eval" / name / "arith" / "samples.jsonl").read_text().splitlines()
        assert len(samples) == 20

    # A rerun finds both stages done (same config) and reproduces the same numbers.
    second = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert second.returncode == 0, second.stderr[-3000:]
    again = json.loads((out / "report.json").read_text())
    assert {k: v["accuracy"] for k, v in again["stages"].items()} == {k: v["accuracy"] for k, v in report["stages"].items()}
    assert again["stages"]["pretrain"]["train_wall_s"] == report["stages"]["pretrain"]["train_wall_s"]


@pytest.mark.parametrize("preset", ["cpu", "full"])
def test_fewtrace_presets_build_every_stage(preset):
    """The default (`cpu`) and complete (`full`) presets carry issue 14's data budget: every section is a valid
    stage config; SFT sees the 100-trace set and its reference the 1000-trace set that a teacher makes through
    distill -> curate, RL a large answer-only pool, RFT RL's budget; everything evaluated on 1000 held-out
    problems, greedy and sampled. `full` adds the code task and the code-only TDDR ablation (binary / strict / soft
    at one budget)."""
    from thinkforge.data.trace_sets import TraceSetsConfig
    from thinkforge.speedrun import EvalSpec, load_speedrun_config, plan_stages
    from thinkforge.train.pretrain import PretrainConfig
    from thinkforge.train.rft import RFTConfig
    from thinkforge.train.rl import RLConfig
    from thinkforge.train.sft import SFTConfig
    from thinkforge.utils import build_config

    cfg = load_speedrun_config(preset, {"rl.steps": 3})
    ablations = ["rl_binary", "rl_strict", "rl_soft"] if preset == "full" else []
    assert [s.name for s in plan_stages(cfg)] == ["pretrain", "teacher", "traces", "sft", "sft_10n", "rl", *ablations,
                                                  "rft"]
    build_config(PretrainConfig, cfg.pretrain, "pretrain")
    build_config(SFTConfig, cfg.teacher, "teacher")
    traces = build_config(TraceSetsConfig, cfg.traces, "traces")
    assert sorted(traces.sizes) == [100, 1000] and traces.problems_per_task > 1000
    assert (cfg.sft["traces"], cfg.sft_10n["traces"]) == (100, 1000)
    for section in (cfg.sft, cfg.sft_10n):
        build_config(SFTConfig, {k: v for k, v in section.items() if k != "traces"}, "sft")
    rl = build_config(RLConfig, {**cfg.rl, "model": "m"}, "rl")
    rl.check()
    build_config(RFTConfig, cfg.rft, "rft")
    spec = build_config(EvalSpec, cfg.eval, "eval")
    tasks = ["arith", "code"] if preset == "full" else ["arith"]
    assert rl.tasks == tasks == spec.tasks == traces.tasks and rl.problems_per_task >= 100 * rl.batch_groups
    assert rl.steps == 3 and spec.problems_per_task >= 1000 and spec.sampled_n == 8
    modes = []
    for name, overrides in cfg.ablations.items():
        ab = build_config(RLConfig, {**cfg.rl, **overrides, "model": "m"}, name)
        ab.check()
        assert ab.tasks == ["code"] and ab.steps == cfg.ablations["binary"]["steps"]  # one budget per row
        modes.append(ab.rewards["code"][0]["mode"])
    assert modes == (["binary", "strict", "soft"] if preset == "full" else [])


def test_code_preset_is_code_only_tddr_rl_from_the_full_presets_sft():
    """`--preset code` shares the `full` preset's upstream stages (so its SFT model is the same one) and runs
    code-only GRPO with TDDR strict, evaluated on 1000 held-out code problems, greedy and sampled."""
    from thinkforge.speedrun import EvalSpec, load_speedrun_config, plan_stages
    from thinkforge.train.rl import RLConfig
    from thinkforge.utils import build_config

    code, full = load_speedrun_config("code", {}), load_speedrun_config("full", {})
    assert [s.name for s in plan_stages(code)] == ["pretrain", "teacher", "traces", "sft", "rl"]
    for section in ("pretrain", "teacher", "traces", "sft"):
        assert getattr(code, section) == getattr(full, section), section
    rl = build_config(RLConfig, {**code.rl, "model": "m"}, "rl")
    rl.check()
    assert rl.tasks == ["code"] and rl.rewards == {"code": [{"name": "code_tddr", "mode": "strict"}]}
    spec = build_config(EvalSpec, code.eval, "eval")
    assert spec.tasks == ["code"] and spec.problems_per_task == 1000 and spec.sampled_n == 8

"""The speedrun's reference rows (issue 14): verified trace sets from a teacher through distill -> curate,
SFT on N and 10N traces, RFT with RL's completion budget, reward ablations, sampled pass@k, and the stage
graph's cache (a changed reference row reruns alone)."""

import json
import os
import re
import subprocess
import sys

import pytest
from fastapi import FastAPI, Request

from thinkforge.engine.testing import serve_in_thread
from thinkforge.errors import ThinkforgeError

EXPR = re.compile(r"Compute (.*)\.$")


def scripted_teacher_app(calls: list[str]) -> FastAPI:
    """An OpenAI-compatible teacher that solves our arith prompts, but gets every third request wrong, so
    the verifier has something to reject."""
    app = FastAPI()

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [{"id": "scripted", "object": "model", "created": 0, "owned_by": "t"}]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        prompt = body["messages"][-1]["content"]
        calls.append(prompt)
        expr = EXPR.search(prompt).group(1)
        value = eval(expr) + (1 if len(calls) % 3 == 0 else 0)  # our own prompts: digits, + - * ( ) only
        text = f"{expr} = {value}\nThe answer is \\boxed{{{value}}}."
        return {"id": "c", "object": "chat.completion", "created": 0, "model": "scripted",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 10, "completion_tokens": 10, "total_tokens": 20}}

    return app


@pytest.fixture(scope="module")
def teacher_url():
    srv, thread, url = serve_in_thread(scripted_teacher_app([]))
    yield url
    srv.should_exit = True
    thread.join(timeout=10)


def rows(path):
    return [json.loads(line) for line in open(path) if line.strip()]


def test_trace_sets_are_verified_nested_and_sized(teacher_url, tmp_path):
    from thinkforge.data.trace_sets import TraceSetsConfig, build_trace_sets
    from thinkforge.tasks import get_task

    cfg = TraceSetsConfig(teacher=teacher_url, tasks=["arith"], sizes=[3, 6], problems_per_task=12, max_tokens=32,
                          concurrency=1, out_dir=str(tmp_path / "traces"))
    summary = build_trace_sets(cfg)
    small, large = rows(summary["files"]["3"]), rows(summary["files"]["6"])
    assert len(small) == 3 and len(large) == 6 and large[:3] == small  # N is the first N of 10N
    # not curate's id order: ids lead with the level, so the first N by id would all be the easiest problems
    ids = [r["problem_id"] for r in large]
    assert ids != sorted(ids) and len({i.split("/")[1] for i in ids}) > 1
    task = get_task("arith")
    by_id = {p.id: p for p in task.problems("train", n=12, seed=0)}
    for r in large:  # every kept trace passes the task's verifier; the teacher's wrong ones are gone
        assert task.score(by_id[r["problem_id"]], r["messages"][-1]["content"]).correct
    assert summary["traces"]["arith"] == {"asked": 12, "verified": 8}  # every third answer was wrong
    assert summary["teacher_pass_rate"]["arith"] == pytest.approx(8 / 12, abs=1e-4)

    with pytest.raises(ThinkforgeError, match=r"8 verified arith traces for 12 problems.*problems_per_task"):
        build_trace_sets(TraceSetsConfig(**{**cfg.__dict__, "sizes": [20]}))


MICRO = """
seed: 0
pretrain: {model_size: micro, steps: 8, batch_size: 8, seq_len: 96, lr: 3.0e-3, warmup_steps: 2, docs_per_stage: 300,
           eval_every: 100, eval_docs: 16, save_every: 100, mtp_layers: 0}
traces: {teacher: TEACHER, tasks: [arith], sizes: [4, 8], problems_per_task: 16, max_tokens: 32, concurrency: 2}
sft: {traces: 4, steps: 2, batch_size: 4, warmup_steps: 0, eval_examples: 0, eval_every: 100, save_every: 100}
sft_10n: {traces: 8, steps: 2, batch_size: 4, warmup_steps: 0, eval_examples: 0, eval_every: 100, save_every: 100}
rl: {tasks: [arith], steps: 1, batch_groups: 2, mini_batch_groups: 2, group_size: 4, lr: 1.0e-4, max_tokens: 16,
     max_slots_factor: 2.0, problems_per_task: 50, reward_workers: 1, eval_problems: 4, eval_max_tokens: 16}
ablations: {small_lr: {lr: 1.0e-5}}
rft: {samples_per_problem: 2, max_tokens: 16, batch_size: 4}
eval: {tasks: [arith], problems_per_task: 8, max_tokens: 16, mtp_prompts_per_task: 0, sampled_n: 2,
       sampled_problems: 4, sampled_stages: [sft, rl], compare: [[rft, rl]], ablation_task: arith}
"""


def test_reference_rows_end_to_end_and_only_changed_rows_rerun(teacher_url, tmp_path):
    from thinkforge.speedrun import load_speedrun_config, rl_completions, run_speedrun

    preset = tmp_path / "micro.yaml"
    preset.write_text(MICRO.replace("TEACHER", teacher_url))
    out = tmp_path / "run"
    report = run_speedrun(load_speedrun_config(str(preset), {"out_dir": str(out)}))
    stages = report["stages"]
    assert list(stages) == ["pretrain", "traces", "sft", "sft_10n", "rl", "rl_small_lr", "rft"]
    assert "accuracy" not in stages["traces"] and stages["traces"]["traces"]["arith"]["verified"] >= 8
    assert stages["sft"]["label"] == "sft (4 traces/task)" and stages["sft_10n"]["label"] == "sft_10n (8 traces/task)"
    sft_cfg = json.loads((out / "sft" / "summary.json").read_text())["config"]
    assert sft_cfg["data"].endswith("sft-4.jsonl") and sft_cfg["model"].endswith("pretrain/model")

    # RFT drew what RL drew (whole problems of 2 samples), from the SFT model
    drawn = rl_completions(out / "rl")["arith"]
    assert drawn >= 8 and drawn <= stages["rft"]["completions"] < drawn + 2
    # sampled pass@1 / pass@k beside greedy, for the stages asked
    assert set(report["sampled"]) == {"sft", "rl"}
    smp = report["sampled"]["rl"]["arith"]
    assert smp["k"] == 2 and smp["pass1"]["n"] == 4 and smp["pass1"]["estimate"] <= smp["passk"]["estimate"]
    pairs = {(m["a"], m["b"]) for m in report["paired"]}
    assert {("pretrain", "sft"), ("sft", "rl"), ("sft", "rft"), ("rft", "rl")} <= pairs
    ablation = report["ablation"]
    assert [r["stage"] for r in ablation["rows"]] == ["rl", "rl_small_lr"]  # the main RL run, then each ablation
    assert "vs_first" in ablation["rows"][1] and ablation["rows"][0]["interval"]["n"] == 8
    md = (out / "report.md").read_text()
    assert "sampled pass@k" in md and "Reward ablation" in md and (out / "rl.png").exists()

    # The CLI on the same preset and directory: every stage cached, the summary printed for the evaluated
    # stages only (the traces stage has no accuracy; its row crashed `make speedrun` after the report).
    cli = subprocess.run([sys.executable, "-m", "thinkforge.cli", "speedrun", "--preset", str(preset), "--out", str(out),
                          "--numerics", "native"],
                         capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert cli.returncode == 0, cli.stderr[-2000:]
    printed = [line.split(":")[0].strip() for line in cli.stdout.splitlines() if "%" in line]
    assert printed == ["pretrain", "sft", "sft_10n", "rl", "rl_small_lr", "rft"] and "report:" in cli.stdout

    # A changed reference row reruns alone; its siblings and parents are read from the cache.
    before = {n: (out / n / "summary.json").stat().st_mtime_ns for n in stages}
    run_speedrun(load_speedrun_config(str(preset), {"out_dir": str(out), "sft_10n.steps": 3}))
    changed = {n for n in stages if (out / n / "summary.json").stat().st_mtime_ns != before[n]}
    assert changed == {"sft_10n"}

    # Ablations that train on tasks of their own (the TDDR rows: code only, one budget each) form their own
    # table, without the main run, and are evaluated on those tasks only.
    report = run_speedrun(load_speedrun_config(str(preset), {"out_dir": str(out), "ablations.small_lr.tasks": ["arith"],
                                                             "ablations.own.tasks": ["arith"],
                                                             "ablations.own.lr": 3.0e-5}))
    assert [r["stage"] for r in report["ablation"]["rows"]] == ["rl_small_lr", "rl_own"]
    assert set(report["stages"]["rl_own"]["accuracy"]) == {"arith"}


def test_rft_without_a_budget_or_traces_without_a_teacher_fail_in_one_line(tmp_path):
    from thinkforge.speedrun import load_speedrun_config, plan_stages
    from thinkforge.train.rft import RFTConfig, rft

    with pytest.raises(ThinkforgeError, match="completions_per_task has no budget for arith"):
        rft(RFTConfig(model=str(tmp_path), tasks=["arith"], out_dir=str(tmp_path / "rft")))
    preset = tmp_path / "p.yaml"
    preset.write_text("pretrain: {}\ntraces: {sizes: [4]}\nsft: {traces: 4}\n")
    with pytest.raises(ThinkforgeError, match="traces needs a teacher"):
        plan_stages(load_speedrun_config(str(preset), {}))


def test_rft_asks_for_enough_draws_to_spend_the_budget():
    """Synthetic train draws repeat problems and distill samples each distinct one once: RFT must ask for as
    many draws as hold the budget's distinct problems (a first run drew 39,216 samples for RL's 53,240)."""
    from thinkforge.tasks import get_task
    from thinkforge.train.rft import draws_for_distinct

    limit = draws_for_distinct("arith", 2000, seed=1)
    ids = [p.id for p in get_task("arith").problems("train", n=limit, seed=1)]
    assert len(set(ids)) == 2000 and len(set(ids[:-1])) == 1999 and limit > 2000


def test_rl_redoes_the_evals_of_an_earlier_run_in_its_directory(tmp_path):
    """A fresh RL run in a directory an earlier run finished in must not resume into that run's held-out evals
    (the first full fewtrace run reported the old model's eval curve); a resumed run keeps those up to its step."""
    from thinkforge.train.rl import drop_evals_after

    for step in (0, 20, 40):
        (tmp_path / "eval" / f"step{step}" / "arith").mkdir(parents=True)
    drop_evals_after(tmp_path, 20)
    assert sorted(p.name for p in (tmp_path / "eval").iterdir()) == ["step0", "step20"]
    drop_evals_after(tmp_path, 0)
    assert not list((tmp_path / "eval").iterdir())

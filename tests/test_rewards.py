"""Reward registry and router: math / code (TDDR) / choice / reward-model rewards and broken rewards."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

import tests.test_rl_support  # noqa: F401  (registers the test rewards)
from thinkforge.errors import ThinkforgeError, UnknownNameError
from thinkforge.rewards import RewardRouter, get_reward
from thinkforge.tasks import get_task
from thinkforge.tasks.base import Problem
from thinkforge.verify import tddr_reward


def _code_problem(template: str) -> Problem:
    return next(p for p in get_task("code").problems("train", n=200, seed=0) if p.meta["template"] == template)


def test_math_and_choice_rewards():
    p = get_task("arith").problems("train", n=1, seed=0)[0]
    math = get_reward("math")
    assert math(p, f"so \\boxed{{{p.answer}}}").reward == 1.0
    wrong = math(p, f"\\boxed{{{int(p.answer) + 1}}}")
    assert (wrong.reward, wrong.correct, wrong.reason) == (0.0, False, "wrong_answer")
    assert math(p, "no idea").reason == "no_answer"
    q = Problem(id="mc/1", task="mc", prompt="?", answer="C")
    choice = get_reward("choice")
    assert choice(q, "The answer is (C).").reward == 1.0
    assert choice(q, "The answer is (B).").reward == 0.0


def test_code_tddr_strict_soft_and_levels_from_population():
    p = _code_problem("max_or_default")
    good = f"```python\n{p.solution.split('```python')[1].split('```')[0]}```"
    no_edge = "```python\ndef f(xs):\n    return max(xs)\n```"
    strict, soft = get_reward("code_tddr", mode="strict"), get_reward("code_tddr", mode="soft")
    assert strict(p, good).reward == pytest.approx(1.0) and strict(p, good).correct
    r = strict(p, no_edge)
    # Tests are levels [0, 0, 1, 1, 2]; the empty-list edge case (level 1) fails: strict keeps only level 0.
    assert r.details["levels"] == [0, 0, 1, 1, 2] and r.details["passed"] == [True, True, False, True, True]
    assert r.reward == pytest.approx(1 / 3) and not r.correct
    assert soft(p, no_edge).reward == pytest.approx(1 / 3 + 1 / 6 + 1 / 3)
    assert strict(p, "I cannot write code").reward == 0.0
    # Levels are recomputed from the population: once most solutions fail only the first edge test,
    # that test becomes the hardest level and the others drop to level 0.
    for _ in range(8):
        strict.commit(p, r)
    assert strict.levels(p) == [0, 0, 2, 0, 0]
    # Two levels have tests (0 and 2; level 1 is empty and pays nothing): level 0 passes, level 2 fails.
    assert strict(p, no_edge).reward == pytest.approx(1 / 2)
    state = strict.state_dict()
    fresh = get_reward("code_tddr", mode="strict")
    fresh.load_state_dict(state)
    assert fresh.levels(p) == [0, 0, 2, 0, 0]


def test_router_routes_mixed_tasks_and_survives_broken_rewards():
    arith = get_task("arith").problems("train", n=1, seed=0)[0]
    code = _code_problem("affine")
    # A generous timeout here: the first code reward may start a sandbox (seconds on a loaded machine);
    # the timeout path is the `broken` router's below.
    router = RewardRouter({"code": [{"name": "code_tddr", "mode": "soft"}]}, workers=2, timeout_s=30.0)
    try:
        assert router.route("arith")[0][0] == "math"  # by task kind
        assert router.score(arith, f"\\boxed{{{arith.answer}}}").reward == 1.0
        assert router.score(code, code.solution).reward == pytest.approx(1.0)
    finally:
        router.close()
    broken = RewardRouter({"arith": "test_raises", "code": [{"name": "test_hangs", "seconds": 3.0}]},
                          workers=1, timeout_s=0.3)
    try:
        res = broken.score(arith, "x")
        assert (res.reward, res.correct) == (0.0, False) and res.reason.startswith("reward_error: test_raises")
        assert "ValueError: boom" in res.reason and any("boom" in e for e in broken.errors)
        t0 = time.monotonic()
        res = broken.score(code, "x")
        assert res.reward == 0.0 and res.reason.startswith("reward_timeout")
        assert time.monotonic() - t0 < 1.5
        # The hung worker was replaced: scoring goes on.
        assert broken.score(arith, "y").reason.startswith("reward_error")
    finally:
        broken.close()


def test_code_reward_runs_a_repeated_program_once():
    """Samples repeating a program reuse its test results (also when scored concurrently); a run that timed
    out is not kept; the reward still follows the current test levels."""
    from concurrent.futures import ThreadPoolExecutor

    code = _code_problem("affine")
    reward = get_reward("code_tddr", mode="soft")
    plain = get_reward("code_tddr", mode="soft", cache=False)
    assert plain.cache is None
    # A lookup table of the level-0 tests' answers: passes the level-0 tests only.
    table = dict(re.fullmatch(r"assert f\((-?\d+),?\) == (-?\d+)", t["assert"]).groups()
                 for t in code.tests if t["level"] == 0)
    wrong = f"```python\ndef f(x):\n    return {{{', '.join(f'{a}: {b}' for a, b in table.items())}}}.get(x, 0)\n```"
    with ThreadPoolExecutor(4) as pool:
        first = list(pool.map(lambda r: reward(code, r), [code.solution] * 4 + [wrong] * 4))
    assert (reward.cache.misses, reward.cache.hits) == (2, 6)
    assert [r.reward for r in first] == [1.0] * 4 + [plain(code, wrong).reward] * 4
    assert first[4].details["passed"] == plain(code, wrong).details["passed"]
    # Levels recomputed from committed solutions rescore the cached pass vector, without a new run.
    passed = first[4].details["passed"]
    assert passed == [True, True, False, False, False]
    for _ in range(reward.min_population):
        reward.commit(code, first[4])
    again = reward(code, wrong)
    assert again.details["levels"] == reward.levels(code) != first[4].details["levels"]
    assert again.reward == tddr_reward(passed, reward.levels(code), "soft") and reward.cache.misses == 2
    slow = Problem(id="code/slow", task="code", prompt="?", answer="", tests=[{"assert": "assert f() == 1"}])
    hang = get_reward("code_tddr", timeout_s=0.5)
    for _ in range(2):
        assert hang(slow, "```python\ndef f():\n    while True:\n        pass\n```").reason == "timeout"
    assert hang.cache.misses == 2


def test_a_hung_reward_does_not_keep_the_process_alive():
    """The call abandoned at the timeout is still sleeping when the script ends: the interpreter exits
    anyway (ThreadPoolExecutor workers would be joined at exit, here for 120 s)."""
    root = Path(__file__).resolve().parents[1]
    script = ("import sys; sys.path.insert(0, sys.argv[1]); import tests.test_rl_support\n"
              "from thinkforge.rewards import RewardRouter\nfrom thinkforge.tasks import get_task\n"
              "p = get_task('arith').problems('train', n=1, seed=0)[0]\n"
              "r = RewardRouter({'arith': {'name': 'test_hangs', 'seconds': 120}}, workers=1, timeout_s=0.2)\n"
              "print(r.score(p, 'x').reason, flush=True)\n")
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", script, str(root)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("reward_timeout") and time.monotonic() - t0 < 30


def test_router_mixes_weights_and_rejects_bad_values():
    p = get_task("arith").problems("train", n=1, seed=0)[0]
    router = RewardRouter({"arith": [{"name": "math", "weight": 3}, {"name": "test_constant", "value": 1.0}]})
    try:
        res = router.score(p, "\\boxed{-1}")
        assert res.reward == pytest.approx(0.25) and not res.correct  # correctness from the verifiable part
        assert res.details["parts"] == {"math": 0.0, "test_constant": 1.0}
    finally:
        router.close()
    # A later part that breaks (a reward model with a bad path) is reported, not a silent 0 under the first
    # part's reason.
    broken = RewardRouter({"arith": [{"name": "math"}, {"name": "test_raises", "weight": 0.5}]})
    try:
        res = broken.score(p, f"\\boxed{{{p.answer}}}")
        assert res.correct and res.reason == "correct" and res.reward == pytest.approx(1.0 / 1.5)
        assert res.details["part_errors"] == ["reward_error: test_raises: ValueError: boom"]
        assert broken.errors == [f"{p.id}: reward_error: test_raises: ValueError: boom"]
    finally:
        broken.close()
    bad = RewardRouter({"arith": {"name": "test_constant", "value": 2.0}})
    try:
        res = bad.score(p, "x")
        assert res.reward == 0.0 and res.reason.startswith("reward_invalid")
    finally:
        bad.close()
    with pytest.raises(UnknownNameError, match="unknown reward 'nope'"):
        RewardRouter({"arith": "nope"})
    with pytest.raises(ThinkforgeError, match="weights sum to 0"):
        RewardRouter({"arith": [{"name": "math", "weight": 0}]})


@pytest.mark.parametrize("num_labels", [1, 2])
def test_reward_model_reward(tmp_path, num_labels):
    import torch
    from transformers import Qwen2Config, Qwen2ForSequenceClassification

    from thinkforge.engine.testing import build_tokenizer

    tok = build_tokenizer(256)
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, num_labels=num_labels,
                      pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    Qwen2ForSequenceClassification(cfg).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    rm = get_reward("reward_model", path=str(tmp_path))
    p = get_task("arith").problems("train", n=1, seed=0)[0]
    a, b = rm(p, "The answer is 3."), rm(p, "def f(x): return x")
    assert 0.0 < a.reward < 1.0 and 0.0 < b.reward < 1.0 and a.reward != b.reward
    assert rm(p, "The answer is 3.").reward == a.reward  # deterministic
    with pytest.raises(ThinkforgeError, match="not an HF model directory"):
        get_reward("reward_model", path=str(tmp_path / "missing"))

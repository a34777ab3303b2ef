"""MTP self-speculative decoding: greedy identity, the output distribution, batching, limits, errors, serving."""

from __future__ import annotations

import itertools
import json
import socket
import threading
import time
from collections import Counter

import openai
import pytest
import torch
import uvicorn
from scipy.stats import chisquare

from thinkforge.engine.base import SamplingParams, get_backend
from thinkforge.engine.mtp_acceptance import mtp_acceptance
from thinkforge.engine.native import LLMEngine
from thinkforge.engine.speculative import filtered_probs
from thinkforge.engine.testing import build_tiny_model, build_tokenizer
from thinkforge.errors import ThinkforgeError
from thinkforge.model.io import save_model
from thinkforge.model.mtp import add_mtp_layers, mtp_lm_loss

BASE, PERIOD = 20, 40  # the counting model continues BASE + (i mod PERIOD)


def counting(start: int, n: int) -> list[int]:
    return [BASE + (start + i) % PERIOD for i in range(n)]


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    """A tiny Qwen2 + 2 MTP layers trained a few seconds to count: drafts are mostly right on counting
    prompts and mostly wrong on text prompts, so both the accept and the reject paths run."""
    torch.manual_seed(0)
    m = build_tiny_model(tok, seed=0)
    add_mtp_layers(m, 2)
    m.train()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(5):  # few steps: drafts mostly right (~0.75 accepted), but not always
        starts = torch.randint(0, PERIOD, (8,), generator=g)
        seq = BASE + (starts[:, None] + torch.arange(17)[None]) % PERIOD
        loss, _ = mtp_lm_loss(m, seq[:, :-1], seq[:, 1:], weight=1.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return m.eval()


def prompts_of(tok):
    text = ["What is 12 + 35?", "def add(a, b):", "x", "The quick brown fox jumps over the lazy dog.",
            "<think>First compute"]
    return [counting(s, 3 + s % 5) for s in range(0, PERIOD, 5)] + [tok(t)["input_ids"] for t in text]


def run(engine, prompts, params):
    return [[(c.token_ids, c.finish_reason) for c in group] for group in engine.generate(prompts, params)]


@pytest.mark.parametrize("fast_path, k", [(True, 1), (True, 2), (False, 2)])
def test_greedy_is_token_identical_to_plain_greedy(model, tok, fast_path, k):
    prompts = prompts_of(tok)
    # Batch smaller than the prompt list (rows join mid-run), varied lengths, n=2 forks, a stop token.
    params = SamplingParams(temperature=0, max_tokens=28, n=2, stop_token_ids=[BASE + 33], logprobs=True)
    plain = LLMEngine(model, tok, max_batch_size=5, fast_path=fast_path)
    spec = LLMEngine(model, tok, max_batch_size=5, fast_path=fast_path, speculative="mtp", num_draft=k)
    ref, out = plain.generate(prompts, params), spec.generate(prompts, params)
    for a, b in zip(ref, out, strict=True):
        for x, y in zip(a, b, strict=True):
            assert (y.token_ids, y.finish_reason) == (x.token_ids, x.finish_reason)
            assert y.logprobs == pytest.approx(x.logprobs, abs=1e-4)
    m = spec.speculator.metrics()
    assert any(f == "stop" for g in out for c in g for f in [c.finish_reason])
    assert len(m["acceptance"]) == k and 0.3 < m["acceptance"][0] < 1.0  # both accepts and rejections
    assert m["acceptance"] == sorted(m["acceptance"], reverse=True)  # draft j+1 needs draft j accepted
    total = sum(len(c.token_ids) for g in out for c in g)
    first = sum(len(g) for g in out)  # each sample's first token comes from the prefill
    assert m["tokens"] == total - first and m["mean_accepted_length"] == pytest.approx(
        1 + m["mean_accepted_drafts"], abs=1e-9)
    assert spec.stats["decode_forwards"] < plain.stats["decode_forwards"] * 0.8


def test_near_the_context_end_and_seeded_rows_independent_of_batch(model, tok):
    plain = LLMEngine(model, tok, max_batch_size=4, max_model_len=24)
    spec = LLMEngine(model, tok, max_batch_size=4, max_model_len=24, speculative="mtp", num_draft=2)
    prompts = [counting(3, 20), counting(7, 9), counting(0, 22)]
    params = SamplingParams(temperature=0, max_tokens=50)
    assert run(spec, prompts, params) == run(plain, prompts, params)
    assert all(len(p) + len(c.token_ids) <= 24 for p, g in zip(prompts, spec.generate(prompts, params), strict=True)
               for c in g)
    # A seeded sampled row draws only from its own stream: alone or in a batch, same tokens.
    sp = SamplingParams(temperature=1.0, max_tokens=20, seed=7)
    alone = LLMEngine(model, tok, speculative="mtp", num_draft=2).generate([counting(5, 4)], sp)
    crowd = LLMEngine(model, tok, speculative="mtp", num_draft=2).generate(
        [counting(1, 6), counting(5, 4), tok("x")["input_ids"]],
        SamplingParams(temperature=1.0, max_tokens=20, seed=7))
    assert alone[0][0].token_ids == crowd[1][0].token_ids


def exact_joint(model, prompt, params, depth):
    """P(x1..x_depth) under the main model's filtered sampling distribution, by enumeration."""
    from thinkforge.engine.sampling import RowSampling

    rs = RowSampling(params.temperature, params.top_p, params.top_k, torch.Generator())
    out = {(): 1.0}
    for _ in range(depth):
        nxt = {}
        seqs = list(out)
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([prompt + list(s) for s in seqs])).logits[:, -1]
        probs = filtered_probs(logits, [rs] * len(seqs))
        for s, p in zip(seqs, probs, strict=True):
            for t in torch.nonzero(p).flatten().tolist():
                nxt[s + (t,)] = out[s] * float(p[t])
        out = nxt
    return out


def chi2_pvalue(counts: Counter, probs: dict, n: int) -> float:
    cells = sorted(probs, key=probs.get, reverse=True)
    big = [c for c in cells if probs[c] * n >= 5]
    obs = [counts.get(c, 0) for c in big]
    exp = [probs[c] * n for c in big]
    rest_obs, rest_exp = n - sum(obs), n - sum(exp)
    if rest_exp >= 5:
        obs.append(rest_obs)
        exp.append(rest_exp)
    else:  # fold a tiny remainder into the last cell so totals match
        obs[-1] += rest_obs
        exp[-1] += rest_exp
    return float(chisquare(obs, exp).pvalue)


def test_sampling_keeps_the_main_models_distribution(model, tok):
    """Tokens 2-3 come from one verify round (k=2): accepted drafts or residual samples. Their joint with
    token 1 must follow the main model's distribution exactly (chi-square over all 3-token outcomes)."""
    prompt = counting(11, 4)
    params = SamplingParams(temperature=2.5, top_k=3, max_tokens=3, n=3000, seed=123)
    engine = LLMEngine(model, tok, max_batch_size=500, speculative="mtp", num_draft=2)
    (group,) = engine.generate([prompt], params)
    counts = Counter(tuple(c.token_ids) for c in group)
    exact = exact_joint(model, prompt, params, 3)
    acc = engine.speculator.metrics()["acceptance"]
    assert 0.2 < acc[0] < 0.9, acc  # drafts are often rejected: the residual distribution is exercised
    assert chi2_pvalue(counts, exact, len(group)) > 1e-3
    # The test has power: the same samples against a slightly different distribution fail clearly.
    wrong = exact_joint(model, prompt, SamplingParams(temperature=1.8, top_k=3), 3)
    assert chi2_pvalue(counts, wrong, len(group)) < 1e-6


def test_bad_requests_are_clear_errors(model, tok, tmp_path, capsys):
    with pytest.raises(ThinkforgeError, match="num_draft 3 > the checkpoint's 2 trained MTP layer"):
        LLMEngine(model, tok, speculative="mtp", num_draft=3)
    with pytest.raises(ThinkforgeError, match="unknown speculative method 'eagle'"):
        LLMEngine(model, tok, speculative="eagle")
    plain = build_tiny_model(tok, seed=1)
    with pytest.raises(ThinkforgeError, match="no MTP layers"):
        LLMEngine(plain, tok, speculative="mtp")
    path = str(tmp_path / "plain")
    save_model(plain, tok, path)
    with pytest.raises(ThinkforgeError, match="has no MTP layers"):
        get_backend("native", path, device="cpu", speculative="mtp")
    backend = get_backend("native", path, device="cpu", speculative="mtp", speculative_fallback=True)
    assert backend.engine.speculator is None
    assert "falling back to plain decoding" in capsys.readouterr().err


def test_backend_server_and_acceptance_helper(model, tok, tmp_path):
    from thinkforge.serve.server import ServeConfig, create_app

    path = str(tmp_path / "ck")
    save_model(model, tok, path)
    prompts = [tok.decode(counting(s, 5)) for s in (0, 9, 21)]
    params = SamplingParams(temperature=0, max_tokens=16)
    with pytest.raises(ThinkforgeError, match="num_draft 3 > the 2 trained MTP layer"):
        get_backend("native", path, device="cpu", speculative="mtp", num_draft=3)
    spec = get_backend("native", path, device="cpu", dtype="float32", speculative="mtp", num_draft=2)
    plain = get_backend("native", path, device="cpu", dtype="float32")
    assert [g[0].token_ids for g in spec.generate(prompts, params)] == \
        [g[0].token_ids for g in plain.generate(prompts, params)]
    m = mtp_acceptance(path, prompts, max_tokens=16, device="cpu")
    assert m["num_draft"] == 2 and m["acceptance"][0] > 0.5

    # `thinkforge serve --speculative mtp`, and with --spec-max-batch 0 (every step plain): the plain text.
    for limit in (None, 0):
        app = create_app(ServeConfig(model=path, device="cpu", dtype="float32", speculative="mtp", num_draft=2,
                                     spec_max_batch=limit, serial_rows=4))
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        thread = threading.Thread(target=srv.run, daemon=True)
        thread.start()
        try:
            deadline = time.time() + 30
            while not srv.started and time.time() < deadline:
                time.sleep(0.05)
            client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
            r = client.completions.create(model=path, prompt=prompts[1], max_tokens=16, temperature=0)
            assert r.choices[0].text == plain.generate([prompts[1]], params)[0][0].text
            m = app.state.generator.engine.speculator.metrics()
            if limit is None:
                assert m["verify_forwards"] > 0 and m["fallback_steps"] == 0
            else:
                assert m["verify_forwards"] == 0 and m["fallback_steps"] >= 15
        finally:
            srv.should_exit = True
            thread.join(timeout=10)
    with pytest.raises(ThinkforgeError, match="spec_max_batch must be >= 0"):
        ServeConfig(model=path, speculative="mtp", spec_max_batch=-1).validate()


def test_eval_cli_speculative_mtp_gives_the_plain_greedy_samples(model, tok, tmp_path):
    """`thinkforge eval --speculative mtp --num-draft K` decodes with the MTP layers; greedy samples (text,
    token counts, finish reasons, scores) are exactly those of plain decoding."""
    from typer.testing import CliRunner

    from thinkforge.cli import app

    path = str(tmp_path / "ck")
    save_model(model, tok, path)
    common = ["eval", "--model", path, "--backend", "native", "--device", "cpu", "--dtype", "float32", "--task",
              "arith", "--n", "2", "--limit", "4", "--max-tokens", "24", "--temperature", "0", "--batch-size", "3"]
    runner = CliRunner()
    plain = runner.invoke(app, [*common, "--output", str(tmp_path / "plain")])
    assert plain.exit_code == 0, plain.output
    assert "speculative mtp" not in plain.output
    spec = runner.invoke(app, [*common, "--speculative", "mtp", "--num-draft", "2", "--output", str(tmp_path / "spec")])
    assert spec.exit_code == 0, spec.output
    assert "speculative mtp (num_draft 2): acceptance per draft position" in spec.output
    a = (tmp_path / "plain/arith/samples.jsonl").read_text()
    b = (tmp_path / "spec/arith/samples.jsonl").read_text()
    assert len(a.splitlines()) == 8 and a == b
    summary = json.loads((tmp_path / "spec/arith/summary.json").read_text())
    assert summary["config"]["speculative"] == "mtp" and summary["config"]["num_draft"] == 2
    # Asking for more drafts than trained MTP layers is a clear error, before any generation.
    bad = runner.invoke(app, [*common, "--speculative", "mtp", "--num-draft", "3", "--output", str(tmp_path / "bad")])
    assert bad.exit_code != 0 and "num_draft 3 > the 2 trained MTP layer" in str(bad.exception)
    assert not (tmp_path / "bad/arith/samples.jsonl").exists()


def test_sampling_distribution_chi2_helper_is_sound():
    # Guard for the statistical test above: exact samples from a known distribution pass.
    g = torch.Generator().manual_seed(0)
    probs = {c: p for c, p in zip(itertools.product(range(3), repeat=2), torch.softmax(torch.randn(9, generator=g), 0).tolist(), strict=True)}
    draws = torch.multinomial(torch.tensor(list(probs.values())), 3000, replacement=True, generator=g).tolist()
    keys = list(probs)
    assert chi2_pvalue(Counter(keys[i] for i in draws), probs, 3000) > 1e-3


def exact_joint_pruned(model, prompt, temperature, depth, keep=1e-3):
    """P(x1..x_depth) at `temperature` (full vocabulary) for every prefix whose probability stays >= `keep`;
    the pruned rest is left out (the chi-square helper lumps it into one remainder cell)."""
    out = {(): 1.0}
    for _ in range(depth):
        seqs = [s for s, p in out.items() if p >= keep]
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([prompt + list(s) for s in seqs])).logits[:, -1].float()
        probs = torch.softmax(logits / temperature, dim=-1)
        out = {s + (t,): out[s] * float(p[t]) for s, p in zip(seqs, probs, strict=True) for t in range(p.numel())}
    return out


def test_sampling_at_t1_full_vocab_keeps_the_distribution(model, tok):
    """T = 1, no top-k/top-p (what RL rollouts use), k = 2: tokens 2-3 come from one verify round. Their joint
    with token 1 follows the main model's distribution (chi-square over every 3-token outcome of probability
    >= 5 / n, the rest in one cell), and the same draws clearly fail against T = 0.8."""
    prompt = counting(23, 5)
    params = SamplingParams(temperature=1.0, max_tokens=3, n=3000, seed=321)
    engine = LLMEngine(model, tok, max_batch_size=500, speculative="mtp", num_draft=2)
    (group,) = engine.generate([prompt], params)
    counts = Counter(tuple(c.token_ids) for c in group)
    m = engine.speculator.metrics()
    assert 0.2 < m["acceptance"][0] < 0.95, m["acceptance"]  # both accepted drafts and residual draws
    assert m["acceptance"][1] > 0.05  # the second draft position is exercised too
    assert chi2_pvalue(counts, exact_joint_pruned(model, prompt, 1.0, 3), len(group)) > 1e-3
    assert chi2_pvalue(counts, exact_joint_pruned(model, prompt, 0.8, 3), len(group)) < 1e-6


def test_fallback_to_plain_decoding_above_spec_max_batch(model, tok):
    """More running rows than spec_max_batch: the step decodes plain, rows in it stay plain until they finish,
    greedy output is still plain greedy's, and the speculator reports the plain steps. A small batch on the
    same engine speculates again."""
    prompts = prompts_of(tok)[:5]
    params = SamplingParams(temperature=0, max_tokens=20)
    plain = LLMEngine(model, tok, max_batch_size=5)
    spec = LLMEngine(model, tok, max_batch_size=5, speculative="mtp", num_draft=2, spec_max_batch=2)
    ref = run(plain, prompts, params)
    assert run(spec, prompts, params) == ref
    m = spec.speculator.metrics()
    assert m["spec_max_batch"] == 2 and m["verify_forwards"] == 0  # 5 rows > 2: every step plain
    assert m["fallback_steps"] == spec.stats["decode_forwards"] == plain.stats["decode_forwards"]
    assert m["fallback_row_steps"] >= m["fallback_steps"] and m["fallback_s"] > 0

    spec.speculator.reset_metrics()
    assert run(spec, prompts[:2], params) == ref[:2]  # 2 rows: speculates
    m = spec.speculator.metrics()
    assert m["fallback_steps"] == 0 and m["verify_forwards"] > 0 and m["round_s"] >= m["verify_s"] + m["draft_s"]


def test_rows_admitted_into_a_speculating_batch_push_it_plain(model, tok):
    """A speculating row whose batch grows past the threshold turns plain mid-sequence (and the newcomers are
    plain from their first token); outputs equal plain decoding's, greedy and seeded sampling alike."""
    for params in (SamplingParams(temperature=0, max_tokens=24), SamplingParams(temperature=1.0, max_tokens=24, seed=5)):
        outs = []
        for kw in ({}, {"speculative": "mtp", "num_draft": 2, "spec_max_batch": 1}):
            eng = LLMEngine(model, tok, max_batch_size=4, **kw)
            first = eng.add_request(counting(2, 6), params)
            for _ in range(3):  # the first row alone: speculative rounds
                eng.step()
            rest = [eng.add_request(p, params) for p in (counting(9, 4), tok("x")["input_ids"])]
            while eng.has_unfinished():
                eng.step()
            outs.append([[c.token_ids for c in eng._pop_outputs(r)] for r in [first, *rest]])
            if kw:
                m = eng.speculator.metrics()
                assert m["verify_forwards"] == 3 and m["fallback_steps"] > 0
        if params.temperature == 0:
            assert outs[0] == outs[1]
        else:  # seeded rows draw from their own streams: the newcomers, plain throughout, draw the same tokens
            assert outs[0][1:] == outs[1][1:]  # (the first row's speculative rounds use its stream differently)


def test_spec_max_batch_must_be_non_negative(model, tok):
    with pytest.raises(ThinkforgeError, match="spec_max_batch must be >= 0"):
        LLMEngine(model, tok, speculative="mtp", num_draft=1, spec_max_batch=-1)


def test_calibration_threshold_follows_the_margin(model, tok):
    """The threshold is the largest batch size up to which every measured ratio reaches the margin; the
    calibration measures a ratio per (k, batch size) with real engines."""
    from thinkforge.engine.mtp_acceptance import calibrate_spec_max_batch, spec_max_batch_from

    assert spec_max_batch_from({1: 1.5, 4: 1.2, 16: 0.9}, 1.05) == 4
    assert spec_max_batch_from({1: 1.5, 4: 1.0, 16: 1.3}, 1.05) == 1  # only up to the first loss
    assert spec_max_batch_from({1: 1.01, 16: 1.3}, 1.05) == 0
    assert spec_max_batch_from({16: 1.3, 1: 1.5}, 1.05) == 16
    cal = calibrate_spec_max_batch(model, tok, prompts_of(tok)[:2], [1, 2], [1, 2], SamplingParams(temperature=0,
                                   max_tokens=6), repeats=1, margin=1e9)
    assert cal["spec_max_batch"] == {1: 0, 2: 0} and cal["clock"] == "wall"
    for ratios in (cal["ratios"], cal["ratios_other_clock"]):
        assert set(ratios) == {1, 2} and all(set(r) == {1, 2} and min(r.values()) > 0 for r in ratios.values())
    with pytest.raises(ThinkforgeError, match="clock must be 'wall' or 'cpu'"):
        calibrate_spec_max_batch(model, tok, [], [1], [1], SamplingParams(temperature=0), clock="gpu")


def test_serial_rows_runs_small_decode_steps_on_one_thread(model, tok):
    """serial_rows = N: a decode step over at most N token rows (running rows x (1 + drafts verified)) runs on
    one intra-op thread, larger ones on all of them; the thread count is restored after each step and greedy
    output is plain greedy's either way. Negative N is a clear error."""
    prompts = prompts_of(tok)[:3]
    params = SamplingParams(temperature=0, max_tokens=12)
    ref = run(LLMEngine(model, tok, max_batch_size=3), prompts, params)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for B, expect in ((1, 1), (3, 2)):  # k = 2: 1 row verifies 3 tokens (<= 3), 3 rows verify 9 (> 3)
            eng = LLMEngine(model, tok, max_batch_size=B, speculative="mtp", num_draft=2, serial_rows=3)
            seen: list[int] = []
            decode = eng.speculator.decode

            def counted(decode=decode, seen=seen):
                seen.append(torch.get_num_threads())
                return decode()

            eng.speculator.decode = counted
            assert run(eng, prompts, params) == ref
            # 3 rows start together; once rows finish, a lone last row runs on one thread again.
            assert seen and seen[0] == expect and (B == 3 or set(seen) == {1}), (B, seen)
            assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    with pytest.raises(ThinkforgeError, match="serial_rows must be >= 0"):
        LLMEngine(model, tok, serial_rows=-1)

"""Native engine: identity with HF generate, continuous batching, seeds, stops, logprobs, abort, weights."""

from __future__ import annotations

import pytest
import torch

from thinkforge.engine.base import SamplingParams, get_backend
from thinkforge.engine.native import LLMEngine
from thinkforge.engine.testing import build_tiny_model, build_tokenizer, save_tiny_checkpoint
from thinkforge.errors import ThinkforgeError

PROMPTS = ["What is 12 + 35?", "def add(a, b):", "x",
           "The quick brown fox jumps over the lazy dog. Reasoning models think before they answer.",
           "Solve for x: 3x + 5 = 20.", "<think>First compute"]


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    return build_tiny_model(tok, seed=0)


def ids_of(tok, prompts):
    return [tok(p)["input_ids"] for p in prompts]


def hf_greedy(model, tok, prompts, max_new_tokens):
    """Reference: HF generate on the whole batch, left-padded."""
    ids = ids_of(tok, prompts)
    P = max(len(x) for x in ids)
    pad = tok.pad_token_id
    inp = torch.tensor([[pad] * (P - len(x)) + x for x in ids])
    att = torch.tensor([[0] * (P - len(x)) + [1] * len(x) for x in ids])
    with torch.no_grad():
        out = model.generate(input_ids=inp, attention_mask=att, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=pad, eos_token_id=tok.eos_token_id)
    res = []
    for row in out[:, P:].tolist():
        end = row.index(tok.eos_token_id) + 1 if tok.eos_token_id in row else len(row)
        res.append(row[:end])
    return res


@pytest.mark.parametrize("fast_path", [True, False])
def test_greedy_identical_to_hf_generate(model, tok, fast_path):
    # max_batch_size < #prompts: later prompts are admitted into freed slots mid-run.
    engine = LLMEngine(model, tok, max_batch_size=4, fast_path=fast_path)
    assert (engine._lean is not None) == fast_path
    params = SamplingParams(temperature=0, max_tokens=24)
    ours = [g[0].token_ids for g in engine.generate(ids_of(tok, PROMPTS), params)]
    assert ours == hf_greedy(model, tok, PROMPTS, 24)
    assert engine.stats["max_rows"] <= 4


def test_continuous_batching_short_leaves_long_continues_and_slots_reused(model, tok):
    engine = LLMEngine(model, tok, max_batch_size=2)
    events = []
    long_p = SamplingParams(temperature=0, max_tokens=40, stop_token_ids=[])
    short_p = SamplingParams(temperature=0, max_tokens=3)
    ids = ids_of(tok, ["def add(a, b):", "x", "What is 12 + 35?"])

    outputs = {}

    def record(out):
        events.append((out.request_id, engine.stats["decode_forwards"], engine.num_running))
        outputs[out.request_id] = out.completion

    engine.add_request(ids[0], long_p, request_id="long", on_finish=record)
    engine.add_request(ids[1], short_p, request_id="short", on_finish=record)
    engine.add_request(ids[2], short_p, request_id="third", on_finish=record)  # waits: only 2 slots
    assert engine.num_waiting == 3
    engine.step()
    assert engine.num_running == 2 and engine.num_waiting == 1  # long + short running, third waiting
    while engine.has_unfinished():
        engine.step()
    order = [e[0] for e in events]
    assert order == ["short", "third", "long"]
    short_step, third_step, long_step = (e[1] for e in events)
    assert short_step <= 3 and third_step <= short_step + 4 < long_step  # third took the freed slot early
    assert engine.stats["max_rows"] == 2 and engine.stats["prefill_forwards"] == 2
    assert engine.cache.keys[0].shape[0] == 2  # never more than the 2 preallocated slots
    # Row moves / slot reuse did not disturb the long sequence: same tokens as running it alone.
    alone = LLMEngine(model, tok, max_batch_size=2).generate([ids[0]], long_p)[0][0]
    assert alone.finish_reason == "length" and len(alone.token_ids) == 40
    assert outputs["long"].finish_reason == "length" and outputs["long"].token_ids == alone.token_ids
    assert outputs["long"].text == alone.text
    assert engine._requests == {}  # callback users' records are dropped


def test_seed_reproducible_regardless_of_batch_composition(model, tok):
    p = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, max_tokens=16, seed=7, n=3)
    target = ids_of(tok, ["What is 12 + 35?"])
    alone = LLMEngine(model, tok, max_batch_size=8).generate(target, p)[0]
    crowd_engine = LLMEngine(model, tok, max_batch_size=8, seed=123)
    others = SamplingParams(temperature=0.8, max_tokens=10)
    crowd_engine.add_request(ids_of(tok, ["x"])[0], others)
    rid = crowd_engine.add_request(target[0], p)
    crowd_engine.add_request(ids_of(tok, ["def add(a, b):"])[0], others)
    while crowd_engine.has_unfinished():
        crowd_engine.step()
    crowd = crowd_engine._pop_outputs(rid)
    assert [c.token_ids for c in crowd] == [c.token_ids for c in alone]
    assert len({tuple(c.token_ids) for c in alone}) == 3  # the n samples differ from each other
    other_seed = LLMEngine(model, tok).generate(target, SamplingParams(**{**p.__dict__, "seed": 8}))[0]
    assert [c.token_ids for c in other_seed] != [c.token_ids for c in alone]


def test_stop_strings_and_stop_token_ids(model, tok):
    engine = LLMEngine(model, tok)
    prompt = ids_of(tok, ["The quick brown fox"])
    base = engine.generate(prompt, SamplingParams(temperature=0, max_tokens=30))[0][0]
    assert base.finish_reason == "length"
    text = base.text
    stop = text[10:13]
    assert stop and stop not in text[:10]
    cut = engine.generate(prompt, SamplingParams(temperature=0, max_tokens=30, stop=[stop]))[0][0]
    assert cut.finish_reason == "stop" and cut.text == text[:text.index(stop)]
    assert len(cut.token_ids) < len(base.token_ids)
    assert cut.token_ids == base.token_ids[:len(cut.token_ids)]
    k = 5
    stop_id = base.token_ids[k]
    first = base.token_ids.index(stop_id)
    by_id = engine.generate(prompt, SamplingParams(temperature=0, max_tokens=30, stop_token_ids=[stop_id]))[0][0]
    assert by_id.finish_reason == "stop" and by_id.token_ids == base.token_ids[:first + 1]
    assert len(by_id.logprobs) == len(by_id.token_ids)


def test_logprobs_match_full_forward_recomputation(model, tok):
    engine = LLMEngine(model, tok)
    T, k, top_p = 0.7, 40, 0.9
    params = SamplingParams(temperature=T, top_k=k, top_p=top_p, max_tokens=20, n=2, seed=1)
    prompts = ["What is 12 + 35?", "def add(a, b):"]
    out = engine.generate(ids_of(tok, prompts), params)
    for prompt_ids, group in zip(ids_of(tok, prompts), out, strict=True):
        for c in group:
            full = torch.tensor([prompt_ids + c.token_ids])
            with torch.no_grad():
                logits = model(full).logits[0, len(prompt_ids) - 1:-1].float() / T
            # top-k then top-p (smallest prefix with mass >= top_p), as documented in sampling.py
            sorted_l, order = logits.sort(dim=-1, descending=True)
            sorted_l[:, k:] = float("-inf")
            probs = sorted_l.softmax(-1)
            sorted_l[(probs.cumsum(-1) - probs) >= top_p] = float("-inf")
            ref = torch.full_like(logits, float("-inf")).scatter(1, order, sorted_l).log_softmax(-1)
            expected = ref.gather(1, torch.tensor(c.token_ids)[:, None])[:, 0]
            assert torch.isfinite(expected).all()  # every sampled token was inside the filtered set
            assert torch.allclose(torch.tensor(c.logprobs), expected, atol=1e-4)
    greedy = engine.generate(ids_of(tok, prompts[:1]), SamplingParams(temperature=0, max_tokens=5))[0][0]
    with torch.no_grad():
        logits = model(torch.tensor([ids_of(tok, prompts[:1])[0] + greedy.token_ids])).logits[0].float()
    n = len(ids_of(tok, prompts[:1])[0])
    ref = logits[n - 1:-1].log_softmax(-1).gather(1, torch.tensor(greedy.token_ids)[:, None])[:, 0]
    assert torch.allclose(torch.tensor(greedy.logprobs), ref, atol=1e-4)


def test_abort_running_and_waiting(model, tok):
    engine = LLMEngine(model, tok, max_batch_size=1)
    done = {}
    p = SamplingParams(temperature=0, max_tokens=200, stop_token_ids=[])
    engine.add_request(ids_of(tok, ["x"])[0], p, request_id="a", on_finish=lambda o: done.setdefault("a", o))
    engine.add_request(ids_of(tok, ["y"])[0], p, request_id="b", on_finish=lambda o: done.setdefault("b", o))
    for _ in range(5):
        engine.step()
    engine.abort("a")
    engine.abort("b")  # still waiting (one slot)
    engine.step()
    assert not engine.has_unfinished()
    assert done["a"].completion.finish_reason == "abort" and 0 < len(done["a"].completion.token_ids) < 200
    assert done["b"].completion.finish_reason == "abort" and done["b"].completion.token_ids == []


def test_abort_callback_may_call_add_request_and_abort(model, tok):
    import threading

    engine = LLMEngine(model, tok, max_batch_size=1)
    p = SamplingParams(temperature=0, max_tokens=200, stop_token_ids=[])
    short = SamplingParams(temperature=0, max_tokens=3)
    seen = []

    def on_abort(out):  # re-enters the engine from inside its step
        seen.append(out.completion.finish_reason)
        engine.add_request(ids_of(tok, ["z"])[0], short, request_id="c")
        engine.abort("a")

    engine.add_request(ids_of(tok, ["x"])[0], p, request_id="a")
    engine.add_request(ids_of(tok, ["y"])[0], p, request_id="b", on_finish=on_abort)
    engine.step()
    assert engine.num_running == 1 and engine.num_waiting == 1  # "a" runs, "b" waits for the slot
    engine.abort("b")
    errors = []

    def run():
        try:
            while engine.has_unfinished():
                engine.step()
        except Exception as err:  # surfaced below
            errors.append(err)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout=60)
    assert not t.is_alive(), "engine deadlocked running an abort callback"
    assert errors == [] and seen == ["abort"]
    a, c = engine._pop_outputs("a")[0], engine._pop_outputs("c")[0]
    assert a.finish_reason == "abort" and 0 < len(a.token_ids) < 200
    expected = LLMEngine(model, tok).generate(ids_of(tok, ["z"]), short)[0][0]
    assert c.token_ids == expected.token_ids and c.finish_reason == expected.finish_reason


@pytest.mark.parametrize("field,value", [
    ("top_p", "x"), ("temperature", None), ("top_k", 1.5), ("max_tokens", "8"), ("n", [2]), ("seed", "s"),
    ("stop", "abc"), ("stop_token_ids", ["1"]),
])
def test_sampling_params_wrong_types_name_the_field(field, value):
    with pytest.raises(ThinkforgeError, match=f"^{field} must be"):
        SamplingParams(**{field: value}).validate()
    assert SamplingParams(temperature=0, top_p=1, max_tokens=4, seed=3, stop=["x"], stop_token_ids=[1]).validate()


def test_load_weights_in_place(model, tok):
    other = build_tiny_model(tok, seed=1)
    engine = LLMEngine(build_tiny_model(tok, seed=0), tok)
    prompt = ids_of(tok, PROMPTS[:3])
    params = SamplingParams(temperature=0, max_tokens=12)
    before = [g[0].token_ids for g in engine.generate(prompt, params)]
    weights_obj = engine.model.model.layers[0].self_attn.q_proj.weight
    engine.load_weights(other.state_dict())
    assert engine.model.model.layers[0].self_attn.q_proj.weight is weights_obj  # updated in place
    after = [g[0].token_ids for g in engine.generate(prompt, params)]
    expected = [g[0].token_ids for g in LLMEngine(other, tok).generate(prompt, params)]
    assert after == expected and after != before
    with pytest.raises(ThinkforgeError, match="unknown parameter"):
        engine.load_weights({"nope.weight": torch.zeros(1)})
    with pytest.raises(ThinkforgeError, match="shape"):
        engine.load_weights({"lm_head.weight": torch.zeros(3, 3)})


def test_bad_input_errors(model, tok, tmp_path):
    engine = LLMEngine(model, tok, max_model_len=32)
    with pytest.raises(ThinkforgeError, match="context"):
        engine.add_request(list(range(5, 40)), SamplingParams())
    with pytest.raises(ThinkforgeError, match="top_p"):
        engine.add_request("x", SamplingParams(top_p=1.5))
    with pytest.raises(ThinkforgeError, match="max_tokens"):
        engine.add_request("x", SamplingParams(max_tokens=-1))
    # max_tokens beyond the context is cut to fit, finishing with "length"
    out = engine.generate(["x"], SamplingParams(temperature=0, max_tokens=500, stop_token_ids=[]))[0][0]
    assert out.finish_reason == "length" and len(out.token_ids) + out.prompt_tokens == 32
    with pytest.raises(ThinkforgeError, match="not found"):
        get_backend("native", str(tmp_path / "missing"))
    with pytest.raises(ThinkforgeError, match="config.json"):
        get_backend("hf", str(tmp_path))
    with pytest.raises(ThinkforgeError, match="vllm"):
        get_backend("vllm", str(tmp_path))


def test_native_and_hf_backends_agree_on_chat(tmp_path):
    path = str(save_tiny_checkpoint(tmp_path / "ckpt"))
    native = get_backend("native", path, device="cpu", dtype="float32", max_batch_size=4)
    hf = get_backend("hf", path, device="cpu", dtype="float32")
    convs = [[{"role": "user", "content": "What is 2 + 2?"}],
             [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "def f(x):"}]]
    params = SamplingParams(temperature=0, max_tokens=16, logprobs=True)
    a, b = native.chat(convs, params), hf.chat(convs, params)
    for x, y in zip(a, b, strict=True):
        assert x[0].token_ids == y[0].token_ids and x[0].text == y[0].text
        assert x[0].finish_reason == y[0].finish_reason and x[0].prompt_tokens == y[0].prompt_tokens
        assert max(abs(p - q) for p, q in zip(x[0].logprobs, y[0].logprobs, strict=True)) < 1e-4
    sampled = native.generate(["What"], SamplingParams(temperature=1.0, n=4, max_tokens=8, seed=0))
    assert len(sampled) == 1 and len(sampled[0]) == 4


def test_hf_backend_samples_the_full_distribution_when_top_k_is_off(tmp_path):
    """top_k=0 means no top-k filter: the sampled tokens' log-probs are the model's own (teacher-forced), not
    renormalised over generate's default top 50."""
    from transformers import AutoModelForCausalLM

    path = str(save_tiny_checkpoint(tmp_path / "ckpt"))
    hf = get_backend("hf", path, device="cpu", dtype="float32")
    params = SamplingParams(temperature=1.0, top_k=0, n=4, max_tokens=6, seed=0, logprobs=True, stop_token_ids=[])
    prompt = hf.tokenizer.encode("What is")
    outs = hf.generate(["What is"], params)[0]
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    for out in outs:
        ids = torch.tensor([prompt + out.token_ids])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
        ref = [float(logp[len(prompt) - 1 + i, t]) for i, t in enumerate(out.token_ids)]
        assert out.logprobs == pytest.approx(ref, abs=1e-4)


def test_engine_loop_serves_threads_with_callbacks_abort_and_async(model, tok):
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    from thinkforge.engine.runner import EngineLoop

    loop = EngineLoop(LLMEngine(model, tok, max_batch_size=4))
    try:
        params = SamplingParams(temperature=0, max_tokens=10)
        finished = []
        prompts = ids_of(tok, PROMPTS)
        with ThreadPoolExecutor(3) as pool:
            handles = list(pool.map(lambda p: loop.submit(p, params, on_finish=finished.append), prompts))
        results = [h.future.result(timeout=60) for h in handles]
        expected = LLMEngine(model, tok).generate(prompts, params)
        assert [r[0].token_ids for r in results] == [e[0].token_ids for e in expected]
        assert sorted(o.request_id for o in finished) == sorted(h.request_id for h in handles)
        long = loop.submit(prompts[0], SamplingParams(temperature=0, max_tokens=400, stop_token_ids=[]))
        loop.abort(long.request_id)
        assert long.future.result(timeout=60)[0].finish_reason == "abort"
        out = asyncio.run(loop.generate_async(prompts[1], SamplingParams(temperature=0, max_tokens=10)))
        assert out[0].token_ids == expected[1][0].token_ids
    finally:
        loop.close()

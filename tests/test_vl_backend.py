"""VL generation behind the Backend contract (thinkforge.vl.backend) and the eval harness on VL tasks."""

from __future__ import annotations

import json

import pytest
import torch

from thinkforge.engine.base import SamplingParams, get_backend
from thinkforge.errors import ThinkforgeError
from thinkforge.eval import evaluate
from thinkforge.tasks import get_task
from thinkforge.vl.backend import HFVLBackend
from thinkforge.vl.model import build_tiny_vl, save_vl

TEXTS = [f"{p.prompt} {p.solution}" for p in get_task("vl_count").problems("train", n=30)]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    model, proc = build_tiny_vl(TEXTS, "micro", seed=1)
    path = tmp_path_factory.mktemp("vl") / "model"
    save_vl(model.eval(), proc, path)
    return path


def test_batched_generation_matches_one_by_one_and_logprobs_are_the_policy(ckpt):
    backend = HFVLBackend(str(ckpt), device="cpu", dtype="float32", batch_size=4)
    task = get_task("vl_compare")  # two images per prompt: interleaved input
    convs = [task.messages(p) for p in task.problems("heldout", n=2)] + [
        get_task("vl_count").messages(get_task("vl_count").problems("heldout", n=1)[0]),
        [{"role": "user", "content": "no image here"}]]
    params = SamplingParams(temperature=0, max_tokens=8, logprobs=True)
    together = backend.chat(convs, params)
    alone = [backend.chat([c], params)[0][0] for c in convs]
    for a, b in zip(together, alone, strict=True):
        assert a[0].token_ids == b.token_ids
        assert max(abs(x - y) for x, y in zip(a[0].logprobs, b.logprobs, strict=True)) < 1e-3
    # The reported log-probs are the sampling policy's: the model's next-token distribution with the
    # vision tokens removed (renormalised over the rest).
    proc, model = backend.processor, backend.model
    enc = backend.encode_chat(convs[2], "c")
    c = together[2][0]
    full = proc.collate([proc.extend(enc, c.token_ids)])
    with torch.no_grad():
        logits = model(**full).logits[0, enc.length - 1:-1]
        logits[:, proc.vision_token_ids] = float("-inf")
        logp = logits.log_softmax(-1)
    ref = logp.gather(-1, torch.tensor(c.token_ids)[:, None])[:, 0]
    assert torch.allclose(ref, torch.tensor(c.logprobs), atol=1e-4)


def test_vision_tokens_are_never_sampled(ckpt, tmp_path):
    backend = HFVLBackend(str(ckpt), device="cpu", dtype="float32")
    model, proc = backend.model, backend.processor
    conv = get_task("vl_count").messages(get_task("vl_count").problems("heldout", n=1)[0])
    enc = backend.encode_chat(conv, "c")
    batch = proc.collate([enc])
    with torch.no_grad():
        logits = model(**batch).logits[0, -1]
        best = int(logits.argmax())
        assert logits[best] > 0
        # Make <|image_pad|> the model's favourite next token (tied head: scale the best token's row).
        model.lm_head.weight[proc.image_token_id] = 3 * model.lm_head.weight[best]
        raw = model.generate(**batch, max_new_tokens=1, do_sample=False)
    assert int(raw[0, -1]) == proc.image_token_id  # plain generate would emit an image token
    for params in (SamplingParams(temperature=0, max_tokens=6), SamplingParams(temperature=1.5, max_tokens=24, n=8, seed=0)):
        for comp in backend.chat([conv], params)[0]:
            assert not set(comp.token_ids) & set(proc.vision_token_ids)


def test_eval_harness_runs_a_vl_task_through_get_backend(ckpt, tmp_path):
    import thinkforge.vl.backend  # noqa: F401  (registers hf-vl)

    backend = get_backend("hf-vl", str(ckpt), device="cpu", dtype="float32")
    task = get_task("vl_ground")
    problems = task.problems("heldout", n=3)
    summary = evaluate(task, backend, SamplingParams(temperature=0, max_tokens=10), problems=problems,
                       output_dir=tmp_path / "eval")
    assert summary["task"] == "vl_ground" and 0.0 <= summary["accuracy"] <= 1.0
    rows = [json.loads(line) for line in (tmp_path / "eval" / "vl_ground" / "samples.jsonl").read_text().splitlines()]
    assert sorted(r["problem_id"] for r in rows) == sorted(p.id for p in problems)
    assert all(r["prompt_tokens"] > 16 for r in rows)  # the image's 16 tokens are in every prompt


def test_bad_conversations_are_one_line_errors(ckpt):
    backend = HFVLBackend(str(ckpt), device="cpu", dtype="float32")
    params = SamplingParams(temperature=0, max_tokens=2)
    good = get_task("vl_count").problems("heldout", n=1)[0].meta["images"][0]
    cases = [
        ([{"role": "user", "content": [{"type": "image", "image": "data:image/png;base64,AAAA"}]}], "corrupt"),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:text/html;base64,PGI+"}}]}],
         "not a base64 image data URL"),
        ([{"role": "user", "content": [{"type": "image"}]}], "image part without an image"),
        ([{"role": "user", "content": "<image> and <image>"}], "2 image placeholders but 0 images"),
        ([{"role": "user", "content": [{"type": "image", "image": good}, {"type": "text", "text": "<image>"}]}],
         "2 image placeholders but 1 images"),
        ([{"role": "user", "content": [{"type": "video", "video": "x"}]}], "unknown content part 'video'"),
    ]
    for conv, message in cases:
        with pytest.raises(ThinkforgeError, match=message) as err:
            backend.chat([[{"role": "user", "content": "fine"}], conv], params)
        assert str(err.value).startswith("conversation 1") and "\n" not in str(err.value)

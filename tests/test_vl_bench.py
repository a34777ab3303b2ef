"""Hub vision benchmarks (thinkforge.tasks.vision_bench) on tiny local copies in the hubs' own formats.

The fixtures are written with `datasets` itself and the hub datasets' declared features (their
`dataset_info` in each hub README), so the same `load_dataset` + row mapping runs as on the hub.
"""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image, ImageDraw

from thinkforge.errors import ThinkforgeError
from thinkforge.rewards import get_reward
from thinkforge.rewards.vision import giou
from thinkforge.tasks import get_task
from thinkforge.tasks.vision_bench import CharXiv, CountBench, MathVista, Mmmu, RefCoco
from thinkforge.vl.images import smart_resize

RED = (220, 30, 30)


def png(w: int, h: int, box: tuple[int, int, int, int] | None = None, color=(255, 255, 255)) -> bytes:
    img = Image.new("RGB", (w, h), color)
    if box:
        ImageDraw.Draw(img).rectangle((box[0], box[1], box[2] - 1, box[3] - 1), fill=RED)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def write(tmp_path, name: str, rows: list[dict], features: dict) -> str:
    import datasets

    feats = datasets.Features({k: (datasets.Image() if v == "image" else v) for k, v in features.items()})
    cols = {k: [r.get(k) for r in rows] for k in features}
    for k, v in features.items():
        if v == "image":
            cols[k] = [None if b is None else {"bytes": b, "path": None} for b in cols[k]]
    path = tmp_path / f"{name}.parquet"
    datasets.Dataset.from_dict(cols, features=feats).to_parquet(str(path))
    return str(path)


def V(dtype: str):
    import datasets

    return datasets.Value(dtype)


def seq(dtype: str):
    import datasets

    return datasets.Sequence(datasets.Value(dtype))


def refcoco_file(tmp_path, rows=None) -> str:
    # lmms-lab/RefCOCO: question_id, image, question, answer (list), segmentation, bbox [x, y, w, h], iscrowd, file_name
    rows = rows or [
        {"question_id": "101", "image": png(640, 480, (400, 300, 460, 360)), "question": "",
         "answer": ["red box", "the red square"], "segmentation": [], "bbox": [400.0, 300.0, 60.0, 60.0],
         "iscrowd": 0, "file_name": "COCO_train2014_000000000101.jpg"},
        {"question_id": "102", "image": png(112, 112, (20, 30, 50, 70)), "question": "", "answer": ["small one"],
         "segmentation": [], "bbox": [20.0, 30.0, 30.0, 40.0], "iscrowd": 0, "file_name": "b.jpg"},
    ]
    return write(tmp_path, "refcoco", rows, {"question_id": V("string"), "image": "image", "question": V("string"),
                                             "answer": seq("string"), "segmentation": seq("float32"),
                                             "bbox": seq("float32"), "iscrowd": V("int8"), "file_name": V("string")})


def _decode(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


def test_refcoco_boxes_are_in_the_frame_the_model_sees_and_acc_at_half(tmp_path):
    task = RefCoco(data_files=refcoco_file(tmp_path))
    probs = task.problems()
    assert [p.id for p in probs] == ["refcoco/101/0", "refcoco/101/1", "refcoco/102/0"]  # one per expression
    big, small = probs[0], probs[2]
    frame = smart_resize(480, 640)
    assert frame[0] * frame[1] < 480 * 640 and tuple(big.meta["frames"][0]) == frame  # resized under the cap
    pixels = _decode(big.meta["images"][0])
    assert pixels.shape[:2] == frame  # the stored image is the one the model sees: the processor keeps it
    sy, sx = frame[0] / 480, frame[1] / 640
    assert big.meta["box"] == pytest.approx([400 * sx, 300 * sy, 460 * sx, 360 * sy], abs=0.01)
    # The gold box covers the red pixels of the resized image (bicubic edges within a pixel).
    red = np.argwhere(np.abs(pixels.astype(int) - RED).sum(-1) < 60)
    (y1, x1), (y2, x2) = red.min(0), red.max(0) + 1
    assert np.allclose([x1, y1, x2, y2], big.meta["box"], atol=1.5)
    assert small.meta["box"] == [20, 30, 50, 70] and small.meta["frames"] == [[112, 112]]  # no resize needed
    # Acc@0.5: the gold box scores 1; the box in the original frame (the classic bug) misses entirely.
    assert task.score(big, big.solution).correct and task.score(big, big.solution).reward == 1.0
    wrong_frame = task.score(big, "\\boxed{[400, 300, 460, 360]}")
    assert not wrong_frame.correct and wrong_frame.details["iou"] == 0.0
    # A known box: shifted by half its width -> IoU 1/3 (not Acc@0.5); by a sixth -> IoU 5/7 (Acc@0.5).
    bx1, by1, bx2, by2 = small.meta["box"]
    half = task.score(small, f"\\boxed{{[{bx1 + 15}, {by1}, {bx2 + 15}, {by2}]}}")
    assert half.details["iou"] == pytest.approx(1 / 3) and not half.correct
    assert half.reward == pytest.approx((giou((35, 30, 65, 70), (20, 30, 50, 70))[1] + 1) / 2)
    sixth = task.score(small, f"\\boxed{{[{bx1 + 5}, {by1}, {bx2 + 5}, {by2}]}}")
    assert sixth.details["iou"] == pytest.approx(5 / 7) and sixth.correct
    # Routed by kind: the RL router and `score` use the same GIoU reward.
    assert get_reward("giou")(big, big.solution).correct


def test_refcoco_subset_decodes_only_what_it_returns_and_is_seeded(tmp_path):
    task = RefCoco(data_files=refcoco_file(tmp_path))
    a, b = task.problems(n=2, seed=3), RefCoco(data_files=refcoco_file(tmp_path)).problems(n=2, seed=3)
    assert [p.id for p in a] == [p.id for p in b] and len(a) == 2
    assert [p.id for p in task.problems(n=2, seed=3)] == [p.id for p in task.all_problems if p.id in {q.id for q in a}]


def test_bad_refcoco_rows_are_one_line_errors_naming_row_and_field(tmp_path):
    good = {"question_id": "1", "image": png(112, 112), "question": "", "answer": ["x"], "segmentation": [],
            "bbox": [10.0, 10.0, 20.0, 20.0], "iscrowd": 0, "file_name": "a.jpg"}
    cases = [
        ({"bbox": [100.0, 10.0, 30.0, 20.0]}, r"row 1: field 'bbox' \[100\.0, 10\.0, 30\.0, 20\.0\] .*empty or outside the 112x112"),
        ({"bbox": [1.0, 2.0]}, r"row 1: field 'bbox' must be \[x, y, w, h\]"),
        ({"image": b"\x89PNG\r\n\x1a\n garbage"}, r"row 1: field 'image': corrupt or non-image bytes"),
        ({"image": png(20, 112)}, r"row 1: field 'image': image is 20x112; both sides must be >= 28"),
        ({"answer": []}, r"row 1: field 'answer' must be a non-empty list"),
        ({"question_id": None}, r"row 1: missing field 'question_id'"),
    ]
    for i, (change, message) in enumerate(cases):
        (tmp_path / str(i)).mkdir()
        path = refcoco_file(tmp_path / str(i), [{**good, **change}])
        with pytest.raises(ThinkforgeError, match=message) as err:
            RefCoco(data_files=path).problems()
        assert "\n" not in str(err.value) and "refcoco.parquet row 1" in str(err.value)
    with pytest.raises(ThinkforgeError, match=r"refcoco: data file .*nope.parquet not found"):
        RefCoco(data_files=str(tmp_path / "nope.parquet")).problems()


def test_mmmu_interleaves_images_at_their_mentions_and_scores_letters(tmp_path):
    # MMMU/MMMU (per subject): id, question, options (a list literal), explanation, image_1..image_7, img_type,
    # answer, topic_difficulty, question_type, subfield
    features = {"id": V("string"), "question": V("string"), "options": V("string"), "explanation": V("string"),
                **{f"image_{k}": "image" for k in range(1, 8)}, "img_type": V("string"), "answer": V("string"),
                "topic_difficulty": V("string"), "question_type": V("string"), "subfield": V("string")}
    rows = [
        {"id": "validation_Art_1", "question": "Compare <image 2> with <image 1>. Which is red?",
         "options": "['the first', 'the second']", "answer": "B", "question_type": "multiple-choice",
         "image_1": png(56, 56), "image_2": png(56, 56, (0, 0, 56, 56)), "subfield": "Art"},
        {"id": "validation_Math_3", "question": "What is the area?", "options": "[]", "answer": "['12', '12.0']",
         "question_type": "open", "image_1": png(84, 56), "subfield": "Geometry"},
    ]
    task = Mmmu(data_files=write(tmp_path, "mmmu", rows, features))
    mc, open_q = task.problems()
    assert mc.id == "mmmu/validation_Art_1" and mc.answer == "B" and mc.meta["image_order"] == [2, 1]
    parts = task.messages(mc)[-1]["content"]
    assert [p["type"] for p in parts] == ["text", "image", "text", "image", "text"]
    assert parts[0]["text"] == "Compare " and parts[2]["text"] == " with "
    assert _decode(parts[1]["image"].split(",", 1)[1])[0, 0].tolist() == list(RED)  # image 2 at its mention
    assert "A) the first" in mc.prompt and task.score(mc, "\\boxed{B}").correct and not task.score(mc, "\\boxed{A}").correct
    assert task.score(mc, "\\boxed{C}").reason == "wrong_answer"
    assert open_q.meta["answers"] == ["12", "12.0"] and open_q.meta["frames"] == [[56, 84]]
    assert task.score(open_q, "\\boxed{12}").correct and not task.score(open_q, "\\boxed{13}").correct
    assert [p["type"] for p in task.messages(open_q)[-1]["content"]] == ["image", "text"]
    bad = [{**rows[0], "question": "See <image 3>."}]
    with pytest.raises(ThinkforgeError, match=r"row 1: <image 3> is mentioned but field 'image_3' is empty"):
        Mmmu(data_files=write(tmp_path, "bad", bad, features)).problems()
    with pytest.raises(ThinkforgeError, match=r"row 1: field 'answer' 'E' is not one of the 2 options"):
        Mmmu(data_files=write(tmp_path, "bad2", [{**rows[0], "answer": "E"}], features)).problems()


def test_mathvista_charxiv_countbench_rows_map_to_problems(tmp_path):
    import datasets

    mv_features = {"pid": V("string"), "question": V("string"), "image": V("string"), "decoded_image": "image",
                   "choices": seq("string"), "unit": V("string"), "precision": V("float64"), "answer": V("string"),
                   "question_type": V("string"), "answer_type": V("string"),
                   "metadata": datasets.Features({"category": V("string")}), "query": V("string")}
    mv = MathVista(data_files=write(tmp_path, "mv", [
        {"pid": "1", "question": "How many bars?", "image": "images/1.jpg", "decoded_image": png(112, 84),
         "choices": ["3", "4", "5"], "answer": "4", "question_type": "multi_choice", "answer_type": "text",
         "metadata": {"category": "math-targeted-vqa"}},
        {"pid": "2", "question": "What is the slope?", "image": "images/2.jpg", "decoded_image": png(56, 56),
         "choices": None, "unit": "m", "precision": 1.0, "answer": "1.5", "question_type": "free_form",
         "answer_type": "float", "metadata": {"category": "general-vqa"}},
    ], mv_features))
    choice, free = mv.problems()
    assert choice.answer == "B" and choice.meta["answer_text"] == "4" and mv.score(choice, "\\boxed{B}").correct
    assert "(unit: m)" in free.prompt and mv.score(free, "so \\boxed{1.5}").correct
    assert mv.score(free, "\\boxed{1.52}").correct and not mv.score(free, "\\boxed{1.56}").correct  # precision 1
    assert not mv.score(free, "\\boxed{2}").correct and mv.score(free, "no box").reason == "no_answer"

    cx_features = {"image": "image", "category": V("string"), "original_id": V("string"), "figure_path": V("string"),
                   "reasoning_q": V("string"), "reasoning_q_source": V("int64"), "reasoning_a": V("string"),
                   "reasoning_a_type": V("int64")}
    cx = CharXiv(data_files=write(tmp_path, "cx", [
        {"image": png(140, 112), "figure_path": "images/0.jpg", "original_id": "2401.0001", "reasoning_q": "Which line peaks first?",
         "reasoning_q_source": 1, "reasoning_a": "Blue line", "reasoning_a_type": 1},
        {"image": png(112, 112), "figure_path": "images/1.jpg", "reasoning_q": "What is the gap?", "reasoning_q_source": 4,
         "reasoning_a": "0.25", "reasoning_a_type": 4},
    ], cx_features))
    text_q, num_q = cx.problems()
    assert text_q.id == "charxiv/0" and cx.score(text_q, "\\boxed{blue line.}").correct
    assert not cx.score(text_q, "\\boxed{red line}").correct
    assert "2 decimal places" in num_q.prompt and cx.score(num_q, "\\boxed{0.25}").correct

    cb_features = {"image_url": V("string"), "text": V("string"), "number": V("int64"), "image": "image"}
    cb = CountBench(data_files=write(tmp_path, "cb", [
        {"image_url": "u0", "text": "Three dogs on a sofa", "number": 3, "image": png(112, 112)},
        {"image_url": "u1", "text": "dead link", "number": 4, "image": None},  # no image: not a problem
        {"image_url": "u2", "text": "a box of 7 pens", "number": 7, "image": png(56, 56)},
    ], cb_features))
    dogs, pens = cb.problems()
    assert (dogs.id, pens.id) == ("countbench/0", "countbench/2")
    assert "___ dogs on a sofa" in dogs.prompt and "a box of ___ pens" in pens.prompt and "Three" not in dogs.prompt
    assert cb.score(dogs, "\\boxed{3}").correct and not cb.score(dogs, "\\boxed{4}").correct
    with pytest.raises(ThinkforgeError, match=r"row 1: field 'number' must be an integer"):
        CountBench(data_files=write(tmp_path, "cb_bad", [{"image_url": "u", "text": "t", "number": "seven",
                                                          "image": png(56, 56)}],
                                    {**cb_features, "number": V("string")})).problems()


def _offline_env(tmp_path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("THINKFORGE_")}
    return {**env, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}


def test_hub_loading_offline_is_a_one_line_error(tmp_path):
    responses = tmp_path / "r.jsonl"
    responses.write_text(json.dumps({"problem_id": "x", "response": "y"}) + "\n")
    proc = subprocess.run([sys.executable, "-m", "thinkforge.cli", "eval", "--task", "mathvista", "--responses",
                           str(responses), "--output", str(tmp_path / "o")], capture_output=True, text=True,
                          env=_offline_env(tmp_path), timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: mathvista: cannot load AI4Math/MathVista")
    assert "THINKFORGE_MATHVISTA_DATA_FILES" in proc.stderr and proc.stderr.count("\n") == 1


def test_thinkforge_eval_runs_refcoco_on_a_vl_checkpoint(tmp_path):
    """The CLI end to end: `thinkforge eval --task refcoco` on the fixture, offline; `--backend auto` (the default)
    picks hf-vl for a VL checkpoint."""
    from thinkforge.vl.model import build_tiny_vl, save_vl

    model, proc = build_tiny_vl(["Give the bounding box of the region. \\boxed{[1, 2, 3, 4]}"] * 10, "micro", seed=0)
    save_vl(model.eval(), proc, tmp_path / "ck")
    env = {**_offline_env(tmp_path), "THINKFORGE_REFCOCO_DATA_FILES": refcoco_file(tmp_path), "OMP_NUM_THREADS": "1"}
    proc_ = subprocess.run([sys.executable, "-m", "thinkforge.cli", "eval", "--task", "refcoco", "--model",
                            str(tmp_path / "ck"), "--device", "cpu", "--dtype", "float32",
                            "--max-tokens", "6", "--temperature", "0", "--output", str(tmp_path / "out")],
                           capture_output=True, text=True, env=env, timeout=300)
    assert proc_.returncode == 0, proc_.stderr[-2000:]
    summary = json.loads((tmp_path / "out" / "refcoco" / "summary.json").read_text())
    assert summary["n_problems"] == 3 and 0.0 <= summary["accuracy"] <= 1.0
    rows = [json.loads(x) for x in (tmp_path / "out" / "refcoco" / "samples.jsonl").read_text().splitlines()]
    big = smart_resize(480, 640)
    assert {r["problem_id"] for r in rows} == {"refcoco/101/0", "refcoco/101/1", "refcoco/102/0"}
    # the 640x480 image reaches the model at its resized frame: (h/14 * w/14) / 4 image tokens in the prompt
    assert max(r["prompt_tokens"] for r in rows) > (big[0] // 14) * (big[1] // 14) // 4
    assert get_task("refcoco").kind == "box"

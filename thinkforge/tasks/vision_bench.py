"""Vision benchmarks from the Hugging Face hub: MMMU, MathVista, CharXiv (reasoning), RefCOCO (Acc@0.5), CountBench.

Each loads with the real `datasets` call on the real hub id, config and split, and maps the hub's own field
names; offline, `THINKFORGE_<TASK>_DATA_FILES` (or `data_files=`) points at local files in the same format
(.parquet, .json/.jsonl, .csv), as for the text hub benchmarks (`bench_hub.py`).

    task        hub id               split       fields read
    mmmu        MMMU/MMMU (30 subject configs) validation  id, question, options, answer, question_type, image_1..7
    mathvista   AI4Math/MathVista    testmini    pid, query/question, decoded_image, choices, answer, question_type
    charxiv     princeton-nlp/CharXiv validation image, figure_path, reasoning_q, reasoning_a, reasoning_a_type
    refcoco     lmms-lab/RefCOCO     val         question_id, image, answer (expressions), bbox [x, y, w, h]
    countbench  nielsr/countbench    train       image, text, number

Images go into the frame the model sees *before* anything else reads them: each is resized to
`smart_resize`'s (height, width) under the task's pixel caps (`THINKFORGE_VL_MAX_PIXELS` /
`THINKFORGE_VL_MIN_PIXELS`, default the tiny models' caps) and stored as a lossless PNG, so the processor
leaves it unchanged, and RefCOCO's box is scaled from the original image's pixels into that frame
(`to_model_frame`); `meta.frames` records the frame. A reward reading the box against the original frame
would give IoU ~0 on every resized image. Images are decoded only for the problems asked for (a
seeded subset with `n`), so `--limit 50` on RefCOCO's 8,811 rows does not decode them all.

Scoring is rule-based (no LLM judge): choices by letter, free-form answers by math-verify, CharXiv's text
answers by normalised exact match (its official grader is a GPT judge), RefCOCO by IoU >= 0.5 (the GIoU
reward's `correct`), CountBench by the boxed number.
"""

from __future__ import annotations

import ast
import os
import random
import re
from functools import cached_property
from typing import Any

from thinkforge.errors import ThinkforgeError
from thinkforge.tasks.base import Problem, Score, register_task
from thinkforge.tasks.bench_hub import LETTERS, choice_prompt, local_load_call, score_choice
from thinkforge.tasks.benchmarks import MATH_PROMPT, BenchmarkTask, require, score_math

MMMU_SUBJECTS = (
    "Accounting", "Agriculture", "Architecture_and_Engineering", "Art", "Art_Theory", "Basic_Medical_Science",
    "Biology", "Chemistry", "Clinical_Medicine", "Computer_Science", "Design", "Diagnostics_and_Laboratory_Medicine",
    "Economics", "Electronics", "Energy_and_Power", "Finance", "Geography", "History", "Literature", "Manage",
    "Marketing", "Materials", "Math", "Mechanical_Engineering", "Music", "Pharmacy", "Physics", "Psychology",
    "Public_Health", "Sociology",
)
IMAGE_REF = re.compile(r"<image (\d+)>")
BOX_SLACK_PX = 1.0  # COCO boxes may overshoot the image edge by rounding; more than this is bad data


# --------------------------------------------------------------------------- loading
def load_table(name: str, dataset: str, configs: list[str | None], split: str,
               data_files: str | list[str] | None) -> list[dict[str, Any]]:
    """Rows of the hub dataset (each config in turn) or of local files, with image columns left undecoded
    ({"bytes", "path"}): decoding happens per problem, for the problems asked for."""
    import datasets

    datasets.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    calls: list[tuple[tuple[Any, ...], dict[str, Any]]] = []
    if data_files:
        calls.append(local_load_call(name, data_files))
    else:
        calls += [((dataset, c) if c else (dataset,), {"split": split}) for c in configs]
    rows: list[dict[str, Any]] = []
    for args, kwargs in calls:
        try:
            ds = datasets.load_dataset(*args, **kwargs)
        except Exception as err:  # ConnectionError, FileNotFoundError, DatasetNotFoundError...
            config = f" (config {args[1]})" if len(args) > 1 else ""
            where = f"data files {data_files}" if data_files else f"{dataset}{config} from the Hugging Face hub"
            raise ThinkforgeError(f"{name}: cannot load {where} ({type(err).__name__}: "
                                  f"{str(err).splitlines()[0][:200] if str(err) else ''}); offline, point "
                                  f"THINKFORGE_{name.upper()}_DATA_FILES at a local copy") from None
        for col, feat in ds.features.items():
            if isinstance(feat, datasets.Image):
                ds = ds.cast_column(col, datasets.Image(decode=False))
        rows += [dict(r) for r in ds]
    return rows


def image_bytes(value: Any, where: str) -> Any:
    """A hub image cell (undecoded {"bytes", "path"}, raw bytes, a PIL image, a local path) as bytes or PIL."""
    if isinstance(value, dict):
        if value.get("bytes"):
            return bytes(value["bytes"])
        path = value.get("path")
        if isinstance(path, str) and os.path.isfile(path):
            with open(path, "rb") as fh:
                return fh.read()
        raise ThinkforgeError(f"{where}: image cell has neither bytes nor a readable path")
    if isinstance(value, str) and not value.startswith("data:") and os.path.isfile(value):
        with open(value, "rb") as fh:
            return fh.read()
    return value


def to_frame(value: Any, where: str, min_pixels: int, max_pixels: int) -> tuple[Any, tuple[int, int], tuple[int, int]]:
    """(image resized to the frame the model sees, original (h, w), frame (h, w)). Corrupt bytes, non-images
    and sides under 28 px raise naming `where` (decode_image's checks)."""
    from PIL import Image

    from thinkforge.vl.images import MAX_DECODE_PIXELS, decode_image, smart_resize

    img = decode_image(image_bytes(value, where), where, max_pixels=MAX_DECODE_PIXELS)
    try:
        frame = smart_resize(img.height, img.width, min_pixels=min_pixels, max_pixels=max_pixels)
    except ValueError as err:  # aspect ratio above 200
        raise ThinkforgeError(f"{where}: image is {img.width}x{img.height}: {err}") from None
    original = (img.height, img.width)
    if frame != original:
        img = img.resize((frame[1], frame[0]), Image.Resampling.BICUBIC)  # the HF processor's resample
    return img, original, (int(frame[0]), int(frame[1]))


class VisionBenchmark(BenchmarkTask):
    """A hub benchmark with images: rows -> cheap entries -> problems built (images decoded) on demand."""

    dataset = ""
    configs: tuple[str | None, ...] = (None,)
    hub_split = "test"
    reward_name = ""

    def __init__(self, data_files: str | list[str] | None = None, max_pixels: int | None = None,
                 min_pixels: int | None = None) -> None:
        from thinkforge.vl.images import DEFAULT_MAX_PIXELS, DEFAULT_MIN_PIXELS

        self.data_files = data_files or os.environ.get(f"THINKFORGE_{self.name.upper()}_DATA_FILES") or None
        self.max_pixels = int(max_pixels or os.environ.get("THINKFORGE_VL_MAX_PIXELS") or DEFAULT_MAX_PIXELS)
        self.min_pixels = int(min_pixels or os.environ.get("THINKFORGE_VL_MIN_PIXELS") or DEFAULT_MIN_PIXELS)
        if not 0 < self.min_pixels <= self.max_pixels:
            raise ThinkforgeError(f"{self.name}: pixel caps must satisfy 0 < min_pixels <= max_pixels, got "
                                  f"{self.min_pixels} and {self.max_pixels}")

    @property
    def source(self) -> str:  # type: ignore[override]
        if self.data_files:
            return f"local files {self.data_files}"
        return f"hf://{self.dataset}" + (f" ({len(self.configs)} configs)" if self.configs != (None,) else "")

    # ------------------------------------------------------------------ rows -> problems
    def entries(self, rows: list[tuple[str, dict[str, Any]]]) -> list[tuple[str, dict[str, Any], Any]]:
        """(where, row, extra) per problem; cheap (no image decoding). One per row unless overridden."""
        return [(where, r, None) for where, r in rows]

    def build(self, where: str, row: dict[str, Any], extra: Any) -> Problem:
        raise NotImplementedError

    @cached_property
    def _entries(self) -> list[tuple[str, dict[str, Any], Any]]:
        rows = load_table(self.name, self.dataset, list(self.configs), self.hub_split, self.data_files)
        if not rows:
            raise ThinkforgeError(f"{self.name}: no rows in {self.source}")
        return self.entries([(f"{self.source} row {i}", r) for i, r in enumerate(rows, 1)])

    def load(self) -> list[Problem]:
        return [self.build(*e) for e in self._entries]

    def problems(self, split: str = "test", n: int | None = None, seed: int = 0,
                 difficulty: int | None = None) -> list[Problem]:
        if difficulty is not None:
            return super().problems(split, n, seed, difficulty)
        if split not in self.splits:
            raise ThinkforgeError(f"{self.name} has split 'test' only, not {split!r}")
        pool = self._entries
        if n is not None and n < len(pool):  # the same seeded subset BenchmarkTask draws, before decoding
            keep = set(random.Random(f"{self.name}/{seed}").sample(range(len(pool)), n))
            pool = [e for i, e in enumerate(pool) if i in keep]
        out = [self.build(*e) for e in pool]
        ids = [p.id for p in out]
        if len(set(ids)) != len(ids):
            dup = next(i for i in ids if ids.count(i) > 1)
            raise ThinkforgeError(f"{self.name}: duplicate problem id {dup!r} in {self.source}")
        return out

    def images(self, cells: list[tuple[str, Any]]) -> dict[str, Any]:
        """meta for images given as (field name, cell): base64 PNGs in the model frame, frames, original sizes."""
        from thinkforge.vl.images import encode_png

        imgs, frames, sizes = [], [], []
        for where, cell in cells:
            img, original, frame = to_frame(cell, where, self.min_pixels, self.max_pixels)
            imgs.append(encode_png(img))
            frames.append(list(frame))
            sizes.append(list(original))
        return {"images": imgs, "frames": frames, "original_sizes": sizes}

    # ------------------------------------------------------------------ prompt and score
    def messages(self, problem: Problem, system_prompt: str | None = None) -> list[dict[str, Any]]:
        """Content parts: the images, then the prompt; `<image k>` markers in the prompt (MMMU) put image k
        at its first mention instead."""
        system = system_prompt if system_prompt is not None else self.system_prompt
        images = ["data:image/png;base64," + b64 for b64 in problem.meta.get("images", [])]
        order = problem.meta.get("image_order") or list(range(1, len(images) + 1))
        slot = {k: i for i, k in enumerate(order)}
        parts: list[dict[str, Any]] = []
        placed: set[int] = set()
        pos = 0
        text = problem.prompt
        for m in IMAGE_REF.finditer(text):
            k = int(m.group(1))
            if k in slot and k not in placed:
                if text[pos:m.start()]:
                    parts.append({"type": "text", "text": text[pos:m.start()]})
                parts.append({"type": "image", "image": images[slot[k]]})
                placed.add(k)
                pos = m.end()
        if text[pos:]:
            parts.append({"type": "text", "text": text[pos:]})
        lead = [{"type": "image", "image": images[slot[k]]} for k in order if k not in placed]
        msgs: list[dict[str, Any]] = [{"role": "system", "content": system}] if system else []
        return msgs + [{"role": "user", "content": lead + parts}]

    def score(self, problem: Problem, response: str) -> Score:
        from thinkforge.rewards import get_reward
        from thinkforge.rewards.vision import as_score

        return as_score(get_reward(self.reward_name)(problem, response))


def _text(row: dict[str, Any], key: str, where: str) -> str:
    value = require(row, key, where)
    if not isinstance(value, str | int | float) or not str(value).strip():
        raise ThinkforgeError(f"{where}: field {key!r} must be non-empty text, got {value!r}")
    return str(value).strip()


def _normalize(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s.\-]", " ", text.lower()).split()).rstrip(".")


def score_free(problem: Problem, response: str) -> Score:
    """math-verify on the boxed answer against each accepted gold answer, then normalised exact match."""
    from thinkforge.verify import extract_boxed

    golds = problem.meta.get("answers") or [problem.answer]
    best = Score(False, 0.0, "no_answer")
    for gold in golds:
        s = score_math(Problem(problem.id, problem.task, problem.prompt, str(gold)), response)
        if s.correct:
            return s
        best = s if best.reason == "no_answer" else best
    got = extract_boxed(response) if response else None
    if got is not None and any(_normalize(got) == _normalize(str(g)) for g in golds):
        return Score(True, 1.0, "correct", got)
    return best


# --------------------------------------------------------------------------- MMMU
@register_task("mmmu")
class Mmmu(VisionBenchmark):
    """MMMU (Yue et al. 2024), validation: 900 college-level questions over 30 subjects, up to 7 images each."""

    kind = "choice"
    dataset, configs, hub_split = "MMMU/MMMU", MMMU_SUBJECTS, "validation"

    def build(self, where: str, row: dict[str, Any], extra: Any) -> Problem:
        qid = _text(row, "id", where)
        question = _text(row, "question", where)
        qtype = str(row.get("question_type") or "multiple-choice")
        raw = row.get("options") or "[]"
        try:
            options = [str(o) for o in (ast.literal_eval(raw) if isinstance(raw, str) else raw)]
        except (ValueError, SyntaxError):
            raise ThinkforgeError(f"{where}: field 'options' is not a list literal: {str(raw)[:60]!r}") from None
        answer = _text(row, "answer", where)
        mentioned = [int(k) for k in IMAGE_REF.findall(question + " " + " ".join(options))]
        present = [k for k in range(1, 8) if row.get(f"image_{k}") is not None]
        for k in mentioned:
            if k not in present:
                raise ThinkforgeError(f"{where}: <image {k}> is mentioned but field 'image_{k}' is empty")
        if not present:
            raise ThinkforgeError(f"{where}: no image (fields image_1..image_7 are empty)")
        order = list(dict.fromkeys(mentioned)) + [k for k in present if k not in mentioned]
        meta = {**self.images([(f"{where}: field 'image_{k}'", row[f"image_{k}"]) for k in order]),
                "image_order": order, "question_type": qtype, "subject": row.get("subfield") or "",
                "difficulty": row.get("topic_difficulty") or "", "question": question, "source_id": qid}
        if qtype == "multiple-choice":
            if not options:
                raise ThinkforgeError(f"{where}: multiple-choice question with no options")
            if answer.upper() not in LETTERS[: len(options)]:
                raise ThinkforgeError(f"{where}: field 'answer' {answer!r} is not one of the {len(options)} options")
            return Problem(id=f"mmmu/{qid}", task=self.name, prompt=choice_prompt(question, options),
                           answer=answer.upper(), meta={**meta, "choices": options})
        try:
            answers = [str(a) for a in ast.literal_eval(answer)] if answer.startswith("[") else [answer]
        except (ValueError, SyntaxError):
            answers = [answer]
        return Problem(id=f"mmmu/{qid}", task=self.name, prompt=MATH_PROMPT.format(problem=question),
                       answer=answers[0], meta={**meta, "answers": answers})

    def score(self, problem: Problem, response: str) -> Score:
        if problem.meta.get("question_type") == "multiple-choice":
            return score_choice(problem, response)
        return score_free(problem, response)


# --------------------------------------------------------------------------- MathVista
@register_task("mathvista")
class MathVista(VisionBenchmark):
    """MathVista (Lu et al. 2024), testmini: 1,000 math questions on figures, charts, plots and photos."""

    kind = "math"
    dataset, hub_split = "AI4Math/MathVista", "testmini"

    def build(self, where: str, row: dict[str, Any], extra: Any) -> Problem:
        pid = _text(row, "pid", where)
        question = _text(row, "question", where)
        answer = _text(row, "answer", where)
        qtype = str(row.get("question_type") or "free_form")
        meta = {**self.images([(f"{where}: field 'decoded_image'", require(row, "decoded_image", where))]),
                "question_type": qtype, "answer_type": row.get("answer_type") or "", "unit": row.get("unit") or "",
                "precision": row.get("precision"), "question": question, "source_id": pid,
                "category": ((row.get("metadata") or {}).get("category") or "") if isinstance(row.get("metadata"), dict) else ""}
        if qtype == "multi_choice":
            choices = [str(c) for c in (row.get("choices") or [])]
            if answer not in choices:
                raise ThinkforgeError(f"{where}: field 'answer' {answer!r} is not one of the choices {choices}")
            gold = LETTERS[choices.index(answer)]
            return Problem(id=f"mathvista/{pid}", task=self.name, prompt=choice_prompt(question, choices), answer=gold,
                           meta={**meta, "choices": choices, "answer_text": answer})
        unit = f" (unit: {meta['unit']})" if meta["unit"] else ""
        return Problem(id=f"mathvista/{pid}", task=self.name, prompt=MATH_PROMPT.format(problem=question + unit),
                       answer=answer, meta=meta)

    def score(self, problem: Problem, response: str) -> Score:
        if problem.meta.get("question_type") == "multi_choice":
            return score_choice(problem, response)
        precision = problem.meta.get("precision")
        if problem.meta.get("answer_type") == "float" and precision is not None:
            # MathVista's own rule: the prediction rounded to the answer's `precision` decimals
            from thinkforge.verify import extract_boxed

            got = extract_boxed(response) if response else None
            try:
                ok = round(float(str(got).strip()), int(precision)) == round(float(problem.answer), int(precision))
            except (TypeError, ValueError):
                return score_free(problem, response)
            return Score(ok, float(ok), "correct" if ok else "wrong_answer", got)
        return score_free(problem, response)


# --------------------------------------------------------------------------- CharXiv
CHARXIV_TYPES = {1: "text-in-chart", 2: "text-in-general", 3: "number-in-chart", 4: "number-in-general"}


@register_task("charxiv")
class CharXiv(VisionBenchmark):
    """CharXiv (Wang et al. 2024) reasoning questions (RQ, as MiMo-VL reports), validation: 1,000 arXiv charts."""

    kind = "math"
    dataset, hub_split = "princeton-nlp/CharXiv", "validation"

    def build(self, where: str, row: dict[str, Any], extra: Any) -> Problem:
        fig = _text(row, "figure_path", where)
        question = _text(row, "reasoning_q", where)
        answer = _text(row, "reasoning_a", where)
        atype = int(row.get("reasoning_a_type") or 0)
        hint = ""
        if atype == 4:  # the official prompt states the answer's precision for number-in-general answers
            decimals = answer.split(".", 1)[1] if "." in answer else ""
            hint = f" Give a number with {len(decimals)} decimal places." if decimals else " Give an exact integer."
        stem = os.path.splitext(os.path.basename(fig))[0]
        return Problem(
            id=f"charxiv/{stem}", task=self.name, prompt=MATH_PROMPT.format(problem=question + hint), answer=answer,
            meta={**self.images([(f"{where}: field 'image'", require(row, "image", where))]),
                  "answer_type": CHARXIV_TYPES.get(atype, ""), "category": row.get("category") or "",
                  "question": question, "source_id": str(row.get("original_id") or fig)})

    def score(self, problem: Problem, response: str) -> Score:
        return score_free(problem, response)


# --------------------------------------------------------------------------- RefCOCO
REFCOCO_PROMPT = ("Give the bounding box of the region this sentence describes as [x1, y1, x2, y2] in pixels of the "
                  "image: {ref}")


def coco_box(bbox: Any, original: tuple[int, int], frame: tuple[int, int], where: str) -> list[float]:
    """COCO [x, y, w, h] in the original image's pixels -> [x1, y1, x2, y2] in the frame the model sees."""
    from thinkforge.vl.images import check_box, to_model_frame

    if not isinstance(bbox, list | tuple) or len(bbox) != 4:
        raise ThinkforgeError(f"{where}: field 'bbox' must be [x, y, w, h], got {bbox!r}")
    try:
        x, y, w, h = (float(v) for v in bbox)
    except (TypeError, ValueError):
        raise ThinkforgeError(f"{where}: field 'bbox' must be numbers, got {bbox!r}") from None
    oh, ow = original
    x1, y1, x2, y2 = x, y, x + w, y + h
    if -BOX_SLACK_PX <= x1 and -BOX_SLACK_PX <= y1 and x2 <= ow + BOX_SLACK_PX and y2 <= oh + BOX_SLACK_PX:
        x1, y1, x2, y2 = max(0.0, x1), max(0.0, y1), min(float(ow), x2), min(float(oh), y2)
    box = to_model_frame((x1, y1, x2, y2), original, frame)
    # check_box refuses empty boxes and boxes outside the image, naming the field
    check_box(box, frame, f"{where}: field 'bbox' {list(bbox)} (in the {ow}x{oh} original)")
    return [round(v, 2) for v in box]


@register_task("refcoco")
class RefCoco(VisionBenchmark):
    """RefCOCO (Kazemzadeh et al. 2014; UNC splits, lmms-lab's copy), val: one problem per referring expression;
    Acc@0.5 = IoU >= 0.5 with the gold box in the frame the model sees."""

    kind = "box"
    reward_name = "giou"
    dataset, hub_split = "lmms-lab/RefCOCO", "val"

    def entries(self, rows: list[tuple[str, dict[str, Any]]]) -> list[tuple[str, dict[str, Any], Any]]:
        out = []
        for where, r in rows:
            refs = require(r, "answer", where)
            refs = [refs] if isinstance(refs, str) else list(refs)
            if not refs or not all(isinstance(s, str) and s.strip() for s in refs):
                raise ThinkforgeError(f"{where}: field 'answer' must be a non-empty list of referring expressions")
            out += [(where, r, (k, s.strip())) for k, s in enumerate(refs)]
        return out

    def build(self, where: str, row: dict[str, Any], extra: Any) -> Problem:
        k, ref = extra
        qid = _text(row, "question_id", where)
        meta = self.images([(f"{where}: field 'image'", require(row, "image", where))])
        box = coco_box(require(row, "bbox", where), tuple(meta["original_sizes"][0]), tuple(meta["frames"][0]), where)
        text = "[" + ", ".join(f"{v:g}" for v in box) + "]"
        return Problem(id=f"refcoco/{qid}/{k}", task=self.name, prompt=REFCOCO_PROMPT.format(ref=ref), answer=text,
                       solution=f"The region is \\boxed{{{text}}}.",
                       meta={**meta, "box": box, "bbox_original": list(row["bbox"]), "question": ref,
                             "file_name": row.get("file_name") or "", "source_id": qid})


# --------------------------------------------------------------------------- CountBench
NUMBER_WORDS = {2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven", 8: "eight", 9: "nine", 10: "ten"}


@register_task("countbench")
class CountBench(VisionBenchmark):
    """CountBench (Paiss et al. 2023): 540 web images with captions stating a count of 2-10 objects."""

    kind = "vl_exact"
    reward_name = "vl_exact"
    dataset, hub_split = "nielsr/countbench", "train"

    def entries(self, rows: list[tuple[str, dict[str, Any]]]) -> list[tuple[str, dict[str, Any], Any]]:
        # Some image URLs were dead when the hub copy was made: those rows have no image and are not problems.
        return [(where, r, i) for i, (where, r) in enumerate(rows) if r.get("image") is not None]

    def build(self, where: str, row: dict[str, Any], extra: Any) -> Problem:
        number = require(row, "number", where)
        try:
            n = int(number)
        except (TypeError, ValueError):
            raise ThinkforgeError(f"{where}: field 'number' must be an integer, got {number!r}") from None
        caption = _text(row, "text", where)
        words = [re.escape(str(n))] + ([NUMBER_WORDS[n]] if n in NUMBER_WORDS else [])
        masked, hits = re.subn(rf"\b({'|'.join(words)})\b", "___", caption, count=1, flags=re.IGNORECASE)
        prompt = ("How many are there? The image's caption, with the count hidden, is: \"" + masked + "\". "
                  if hits else "How many objects are in the image? ")
        prompt += "Put the number within \\boxed{}."
        return Problem(id=f"countbench/{extra}", task=self.name, prompt=prompt, answer=str(n),
                       solution=f"The answer is \\boxed{{{n}}}.",
                       meta={**self.images([(f"{where}: field 'image'", row["image"])]), "caption": caption,
                             "image_url": row.get("image_url") or "", "source_id": str(extra)})


VISION_BENCHMARKS = ("mmmu", "mathvista", "charxiv", "refcoco", "countbench")

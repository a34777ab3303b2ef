"""N-gram decontamination against the shipped benchmarks, through the library and the CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from thinkforge.data.decontam import Decontaminator, ngram_overlap, normalize_words
from thinkforge.errors import ThinkforgeError
from thinkforge.eval.harness import resolve_task


def test_normalisation_and_overlap():
    assert normalize_words("Find the Sum: $x^2+1$, (ＡＢ)!") == ["find", "the", "sum", "x", "2", "1", "ab"]
    text = " ".join(f"w{i}" for i in range(40))
    assert ngram_overlap(text, text, n=16) == 1.0
    assert ngram_overlap(text, "unrelated words only", n=16) == 0.0
    half = " ".join(f"w{i}" for i in range(20, 40))  # shares 5 of the 25 16-grams
    assert ngram_overlap(text, half, n=16) == pytest.approx(5 / 25)
    assert ngram_overlap("too short", text) == 0.0


def test_decontaminator_finds_paraphrase_embedded_benchmark_text():
    aime = resolve_task("aime24").problems()[0]
    dec = Decontaminator.from_benchmarks(["aime24"], n=16)
    assert dec.n_items == 30
    # Same problem, different case/punctuation/LaTeX spacing, buried in a longer training example.
    leaked = "Problem: " + aime.meta["question"].upper().replace("$", " ") + "\nSolution: ..."
    hits = dec.check(leaked)
    assert [h.benchmark_id for h in hits] == [aime.id] and len(hits[0].ngram.split()) == 16
    # 15 consecutive words are not enough for a 16-gram match.
    words = normalize_words(aime.meta["question"])
    assert dec.check(" ".join(words[:15])) == []
    assert dec.check("Compute the sum of the first 100 positive integers.") == []


def test_short_benchmark_items_matched_whole_or_skipped():
    dec = Decontaminator(n=16, min_words=4)
    dec.add("b/1", "What is the derivative of x squared?")  # 7 words: matched as a whole sequence
    dec.add("b/2", "Compute 7!.")  # 2 words: too short to be evidence of anything
    assert dec.skipped == ["b/2"]
    assert [m.benchmark_id for m in dec.check("Q: what is the derivative of x squared? A: 2x")] == ["b/1"]
    assert dec.check("what is the derivative of y squared") == []
    assert dec.check("compute 7") == []


def test_filter_and_fields():
    dec = Decontaminator(n=4)
    dec.add("b/1", "alpha beta gamma delta epsilon")
    rows = [{"prompt": "x alpha beta gamma delta", "answer": "1"}, {"prompt": "clean text here", "answer": "2"},
            {"messages": [{"role": "user", "content": "beta gamma delta epsilon"}]}]
    kept, flagged = dec.filter(rows)
    assert kept == [rows[1]] and [f["row"] for f in flagged] == [1, 3]
    kept, flagged = dec.filter(rows[:2], fields=["answer"])
    assert len(kept) == 2
    with pytest.raises(ThinkforgeError, match="train:1: none of the fields nope"):
        dec.filter(rows[:1], fields=["nope"])


def test_decontam_cli(tmp_path):
    math = resolve_task("math500").problems()
    long_q = next(p for p in math if len(normalize_words(p.meta["question"])) > 30)
    rows = [{"problem": "Totally original question about apples and oranges " * 3, "solution": "42"},
            {"problem": "Rephrased: " + long_q.meta["question"], "solution": "copied"},
            {"messages": [{"role": "user", "content": "hello"}]}]
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "clean.jsonl"
    proc = subprocess.run([sys.executable, "-m", "thinkforge.cli", "decontam", "--train", str(train),
                           "--benchmarks", "math500,aime24", "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    kept = [json.loads(x) for x in out.read_text().splitlines()]
    assert kept == [rows[0], rows[2]]
    report = json.loads((tmp_path / "clean.jsonl.decontam.json").read_text())
    assert report["removed"] == 1 and report["flagged"][0]["row"] == 2
    assert report["flagged"][0]["matches"][0]["benchmark_id"] == long_q.id
    bad = subprocess.run([sys.executable, "-m", "thinkforge.cli", "decontam", "--train", str(tmp_path / "none.jsonl"),
                          "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and "none.jsonl" in bad.stderr


def test_template_ngrams_shared_by_many_items_are_not_contamination():
    """A templated task's held-out problems share their template's words: a train problem of the same template
    with other parameters is not a copy (the first speedrun on the ten-template code task dropped 739 of 1381
    verified code traces this way). A copy of one held-out problem still is."""
    template = ("Write a Python function f(xs) that returns how many numbers in the list xs are divisible by {k}, "
                "or {d} if the list xs is empty.")
    dec = Decontaminator(n=16, max_shared=3)
    for k in range(2, 12):
        dec.add(f"code/{k}", template.format(k=k, d=-k))
    dec.finish()
    assert dec.templates_dropped > 0
    assert dec.check(template.format(k=37, d=5)) == []  # same template, new parameters
    assert [m.benchmark_id for m in dec.check(template.format(k=7, d=-7))] == ["code/7"]  # a held-out copy
    plain = Decontaminator(n=16)  # max_shared=0: every n-gram stays indexed
    for k in range(2, 12):
        plain.add(f"code/{k}", template.format(k=k, d=-k))
    assert plain.check(template.format(k=37, d=5)) != []
    # The shipped benchmarks share almost no 16-grams: the template rule drops only a handful of boilerplate ones.
    real = Decontaminator.from_benchmarks(["math500", "aime24"])
    assert real.templates_dropped < 0.001 * len(real.index)

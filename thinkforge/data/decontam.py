"""Benchmark decontamination by word n-gram overlap (MiMo uses 16-grams).

Text is normalised (Unicode NFKC, lower case, every run of non-alphanumerics becomes one space) and
split into words; a training text is contaminated when it shares any n-gram with a benchmark problem.
Benchmark problems shorter than n words cannot produce an n-gram, so they are matched whole (as a
contiguous word sequence) when they have at least `min_words` words; shorter ones ("Compute 7!.")
would flag innocent text and are skipped and counted. An n-gram that more than `max_shared` distinct
benchmark problems contain is the benchmark's template ("write a python function f xs that returns how many
numbers in the list xs are"), not any one problem's content, and is not indexed: a templated task's held-out
set would otherwise flag every train problem of a long template.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from thinkforge.errors import ThinkforgeError

_NON_WORD = re.compile(r"[\W_]+", re.UNICODE)


def normalize_words(text: str) -> list[str]:
    text = unicodedata.normalize("NFKC", text).lower()
    return _NON_WORD.sub(" ", text).split()


def _key(words: Iterable[str]) -> bytes:
    # 8-byte digests keep a large benchmark index small; collisions at 2^-64 are irrelevant here.
    return hashlib.blake2b(" ".join(words).encode(), digest_size=8).digest()


def ngrams(words: list[str], n: int) -> Iterable[tuple[str, ...]]:
    return (tuple(words[i:i + n]) for i in range(len(words) - n + 1))


def ngram_overlap(a: str, b: str, n: int = 16) -> float:
    """Fraction of `a`'s word n-grams that also occur in `b` (0.0 if `a` has none)."""
    wa, wb = normalize_words(a), normalize_words(b)
    grams_a = {_key(g) for g in ngrams(wa, n)}
    if not grams_a:
        return 0.0
    grams_b = {_key(g) for g in ngrams(wb, n)}
    return len(grams_a & grams_b) / len(grams_a)


@dataclass
class Match:
    benchmark_id: str
    ngram: str  # the first shared n-gram (normalised), for the report


@dataclass
class Decontaminator:
    """Index of benchmark texts; `check(text)` returns the benchmark items a text overlaps."""

    n: int = 16
    min_words: int = 8
    index: dict[bytes, str] = field(default_factory=dict)  # n-gram digest -> benchmark id
    short: dict[int, dict[bytes, str]] = field(default_factory=dict)  # length -> whole-text digest -> id
    skipped: list[str] = field(default_factory=list)  # benchmark ids too short to check
    n_items: int = 0
    max_shared: int = 0  # > 0: n-grams in more than this many distinct items are template text (see `finish`)
    shared: dict[bytes, int] = field(default_factory=dict)  # n-gram digest -> distinct items containing it
    templates_dropped: int = 0

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ThinkforgeError(f"n-gram size must be >= 1, got {self.n}")

    def add(self, item_id: str, text: str) -> None:
        words = normalize_words(text)
        self.n_items += 1
        if len(words) >= self.n:
            for key in {_key(g) for g in ngrams(words, self.n)}:
                self.index.setdefault(key, item_id)
                if self.max_shared:
                    self.shared[key] = self.shared.get(key, 0) + 1
        elif len(words) >= self.min_words:
            self.short.setdefault(len(words), {})[_key(words)] = item_id
        else:
            self.skipped.append(item_id)

    def finish(self) -> Decontaminator:
        """Drops the n-grams more than `max_shared` distinct items share (template text); returns self."""
        if self.max_shared:
            common = [k for k, count in self.shared.items() if count > self.max_shared]
            for key in common:
                del self.index[key]
            self.templates_dropped += len(common)
            self.shared.clear()
        return self

    @classmethod
    def from_benchmarks(cls, names: Iterable[str], n: int = 16, min_words: int = 8,
                        max_shared: int = 3) -> Decontaminator:
        """Indexes the problem statements (not the prompt templates, which every problem shares)."""
        from thinkforge.eval.harness import default_split, resolve_task

        dec = cls(n=n, min_words=min_words, max_shared=max_shared)
        for name in names:
            task = resolve_task(name.strip())
            for p in task.problems(default_split(task)):
                dec.add(p.id, str(p.meta.get("question") or p.prompt))
        return dec.finish()

    def check(self, text: str, first_only: bool = True) -> list[Match]:
        words = normalize_words(text)
        found: dict[str, Match] = {}
        for g in ngrams(words, self.n):
            hit = self.index.get(_key(g))
            if hit is not None and hit not in found:
                found[hit] = Match(hit, " ".join(g))
                if first_only:
                    return list(found.values())
        for length, table in self.short.items():
            for g in ngrams(words, length):
                hit = table.get(_key(g))
                if hit is not None and hit not in found:
                    found[hit] = Match(hit, " ".join(g))
                    if first_only:
                        return list(found.values())
        return list(found.values())

    def filter(self, rows: list[dict[str, Any]], fields: list[str] | None = None, where: str = "train"
               ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """Splits rows into (clean rows, report entries for contaminated rows)."""
        kept, flagged = [], []
        for i, row in enumerate(rows, 1):
            text = row_text(row, fields, f"{where}:{i}")
            matches = self.check(text, first_only=False)
            if matches:
                flagged.append({"row": i, "matches": [{"benchmark_id": m.benchmark_id, "ngram": m.ngram}
                                                      for m in matches]})
            else:
                kept.append(row)
        return kept, flagged


def row_text(row: dict[str, Any], fields: list[str] | None, where: str) -> str:
    """The text of a training row: the named fields, or every string (and chat message content) in it."""
    if fields:
        missing = [f for f in fields if f not in row]
        if len(missing) == len(fields):
            raise ThinkforgeError(f"{where}: none of the fields {', '.join(fields)} present")
        return "\n".join(_flatten(row[f]) for f in fields if f in row)
    return _flatten(row)


def _flatten(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        return "\n".join(_flatten(v) for v in value.values())
    if isinstance(value, list | tuple):
        return "\n".join(_flatten(v) for v in value)
    return ""

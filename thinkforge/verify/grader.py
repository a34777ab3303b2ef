"""Math and multiple-choice answer checking: `extract_boxed`, `math_equal`, `choice_equal`, `MathGrader`.

`math_equal` is built on the `math-verify` library (gold parsed first, then `verify(gold, pred)`). Its own
timeout uses SIGALRM, which only works on the main thread of the main interpreter: called from a worker
thread (a rollout pool, a data loader) it fails, and verl's rewards silently became 0. Here the sympy work
runs in a small pool of persistent worker processes (`_math_worker.py`, started with subprocess, so no
fork-of-threads or `__main__` re-import issues) with signals off; a call that overruns its deadline has its
worker killed and replaced, and returns False. Plain numbers on both sides skip the pool entirely.
Fork-safe: a forked child (multiprocessing "fork", a data-loader worker) starts its own empty pool instead of
sharing the parent's worker pipes and lock.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import re
import select
import subprocess
import sys
import threading
import time
import weakref
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation

_BOXED = re.compile(r"\\(?:boxed|fbox)\b")
_NUMBER = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)$")


def extract_boxed(text: str) -> str | None:
    """The content of the last `\\boxed{...}` / `\\fbox{...}` (brace-matched), or of `\\boxed 5`; else None."""
    if not isinstance(text, str):
        return None
    for match in reversed(list(_BOXED.finditer(text))):
        i = match.end()
        while i < len(text) and text[i] == " ":
            i += 1
        if i < len(text) and text[i] == "{":
            depth = 0
            for j in range(i, len(text)):
                if text[j] == "{" and text[j - 1] != "\\":
                    depth += 1
                elif text[j] == "}" and text[j - 1] != "\\":
                    depth -= 1
                    if depth == 0:
                        return text[i + 1:j].strip()
            continue  # unbalanced: try an earlier box
        if i > match.end():  # "\boxed 5": the token up to whitespace or "$"
            token = re.match(r"[^\s$]+", text[i:])
            if token:
                return token.group(0).rstrip(".,;")
    return None


def _clean(answer: str) -> str:
    answer = answer.strip().strip("$").strip()
    answer = re.sub(r"^\\text\{(.*)\}$", r"\1", answer)
    return answer.replace(",", "") if re.fullmatch(r"[+-]?\d{1,3}(,\d{3})+(\.\d+)?", answer) else answer


def _plain_number(text: str) -> Decimal | None:
    text = _clean(text)
    if not _NUMBER.match(text):
        return None
    try:
        return Decimal(text)
    except InvalidOperation:
        return None


def fast_equal(response: str, gold: str) -> bool | None:
    """Exact comparison when both answers are plain integers/decimals; None when math-verify is needed."""
    boxed = extract_boxed(response)
    pred = _plain_number(boxed if boxed is not None else response)
    ref = _plain_number(gold)
    if pred is None or ref is None:
        return None
    return pred == ref


_BASE_NUMBER = re.compile(r"^(\d[0-9A-Z]*)_\{?(\d+)\}?$")


def _base_number(text: str) -> str | None:
    """"52_8" / "52_{8}" (a numeral in base 8) normalised to "52_8"; math-verify would drop the base."""
    match = _BASE_NUMBER.match(re.sub(r"\s+|\\text\{|\\mbox\{|\}$", "", _clean(text)))
    return f"{match.group(1)}_{match.group(2)}" if match else None


def _grade(response: str, gold: str) -> bool:
    """The math-verify comparison itself (no timeout: run it in a worker). Gold first, as math-verify wants."""
    from math_verify import parse, verify

    def parse_answer(text: str, bare: bool) -> list:
        # A bare answer ("\frac{1}{2}", "\$18.90", "(3, \pi/2)") is read as LaTeX math first; a full response
        # goes to math-verify's own extraction (boxed first, then "final answer" patterns).
        if bare:
            for wrapped in (f"${text}$", f"\\boxed{{{text}}}"):
                parsed = parse(wrapped, parsing_timeout=None)
                if parsed:
                    return parsed
        return parse(text, parsing_timeout=None)

    gold_boxed = extract_boxed(gold)
    gold_answer = gold_boxed if gold_boxed is not None else gold
    boxed = extract_boxed(response)
    pred_answer = boxed if boxed is not None else response
    gold_base = _base_number(gold_answer)
    if gold_base is not None:  # a numeral in another base: digits and base must both match
        return _base_number(pred_answer) == gold_base
    gold_parsed = parse_answer(_clean(gold_answer), bare=True)
    if not gold_parsed:
        return False
    bare = boxed is not None or (len(response) < 100 and "\n" not in response)
    pred_parsed = parse_answer(_clean(pred_answer) if bare else pred_answer, bare=bare)
    if not pred_parsed:
        return False
    return bool(verify(gold_parsed, pred_parsed, timeout_seconds=None))


class MathGrader:
    """A pool of `workers` persistent math-verify processes, safe to call from any thread.

    `equal(response, gold, timeout_s)` returns within about `timeout_s` plus the wait for a free worker;
    an overrunning worker is killed (and lazily restarted), the answer is False. Owned by the process that
    made it: in a forked child it starts over with no workers.
    """

    def __init__(self, workers: int = 2, startup_timeout_s: float = 300.0) -> None:
        self.workers = max(1, workers)
        self.startup_timeout_s = startup_timeout_s
        self._idle: list[subprocess.Popen] = []
        self._started = 0
        self._cond = threading.Condition()
        self._next_id = 0
        self.timeouts = 0
        self._pid = os.getpid()
        _GRADERS.add(self)
        atexit.register(self.close)

    def _forget_after_fork(self) -> None:
        """In a forked child: the workers, their pipes and the lock belong to the parent. Close the child's
        copies of the pipes (the parent's stay open) and start an empty pool owned by this process."""
        for proc in self._idle:
            for pipe in (proc.stdin, proc.stdout):
                with contextlib.suppress(OSError, ValueError):
                    pipe.close()
        self._idle = []
        self._started = 0
        self._cond = threading.Condition()
        self._pid = os.getpid()

    def _spawn(self) -> subprocess.Popen:
        """A new worker, returned once it has imported math-verify (sympy takes seconds to import; that wait
        must not count against the first comparison's timeout, or a loaded machine would fail it)."""
        proc = subprocess.Popen([sys.executable, "-m", "thinkforge.verify._math_worker"], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, bufsize=0,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        try:
            line = self._readline(proc, time.monotonic() + self.startup_timeout_s)
            if json.loads(line) != {"ready": True}:
                raise ValueError(line)
        except (OSError, ValueError, EOFError, TimeoutError) as e:
            proc.kill()
            proc.wait()
            raise RuntimeError(f"math-verify worker did not start: {e!r}") from None
        return proc

    @staticmethod
    def _readline(proc: subprocess.Popen, deadline: float) -> bytes:
        line = b""
        while not line.endswith(b"\n"):
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([proc.stdout], [], [], remaining)[0]:
                raise TimeoutError
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:
                raise EOFError
            line += chunk
        return line

    def _acquire(self) -> subprocess.Popen:
        with self._cond:
            while not self._idle and self._started >= self.workers:
                self._cond.wait()
            if self._idle:
                return self._idle.pop()
            self._started += 1
        try:
            proc = self._spawn()
        except BaseException:
            with self._cond:
                self._started -= 1
                self._cond.notify()
            raise
        return proc

    def _release(self, proc: subprocess.Popen | None) -> None:
        with self._cond:
            if proc is None:
                self._started -= 1
            else:
                self._idle.append(proc)
            self._cond.notify()

    def warm(self) -> None:
        """Starts every worker and waits until each has imported math-verify (so timings exclude start-up)."""
        procs = [self._acquire() for _ in range(self.workers)]
        for proc in procs:
            ok = self._ask(proc, {"response": "1", "gold": "1"}, 120.0)
            self._release(proc if ok is not None else None)

    def _ask(self, proc: subprocess.Popen, request: dict, timeout_s: float) -> bool | None:
        """Sends one request; the worker's answer, or None (worker killed) on timeout or a dead worker."""
        with self._cond:
            self._next_id += 1
            request = {**request, "id": self._next_id}
        deadline = time.monotonic() + timeout_s
        try:
            proc.stdin.write((json.dumps(request) + "\n").encode())
            line = self._readline(proc, deadline)
            reply = json.loads(line)
            if reply.get("id") != request["id"]:
                raise EOFError
            return bool(reply["ok"])
        except (OSError, ValueError, EOFError, TimeoutError) as e:
            if isinstance(e, TimeoutError):
                self.timeouts += 1
            proc.kill()
            proc.wait()
            return None

    def equal(self, response: str, gold: str, timeout_s: float = 5.0) -> bool:
        if not isinstance(response, str) or not isinstance(gold, str):
            return False
        fast = fast_equal(response, gold)
        if fast is not None:
            return fast
        try:
            # The wait for a free worker does not count against the timeout: a correct answer queued behind
            # slow ones must not be graded False (silently zeroed rewards are what this module prevents).
            proc = self._acquire()
        except RuntimeError:  # no worker could start: grading must not crash a training loop
            return False
        ok = self._ask(proc, {"response": response, "gold": gold}, timeout_s)
        self._release(proc if ok is not None else None)
        return bool(ok)

    def close(self) -> None:
        if os.getpid() != self._pid:  # inherited through fork: the workers are the parent's to stop
            self._forget_after_fork()
            return
        with self._cond:
            procs, self._idle = self._idle, []
            self._started -= len(procs)
        for proc in procs:
            proc.kill()
            proc.wait()


_DEFAULT: MathGrader | None = None
_DEFAULT_LOCK = threading.Lock()
_GRADERS: weakref.WeakSet[MathGrader] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    """Runs in the child right after fork (one thread): locks may have been held by parent threads."""
    global _DEFAULT_LOCK
    _DEFAULT_LOCK = threading.Lock()
    for grader in list(_GRADERS):
        grader._forget_after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def default_grader() -> MathGrader:
    """The process-wide grader used by `math_equal` (THINKFORGE_MATH_WORKERS workers, default min(4, cores))."""
    global _DEFAULT
    with _DEFAULT_LOCK:
        if _DEFAULT is None:
            n = int(os.environ.get("THINKFORGE_MATH_WORKERS", min(4, os.cpu_count() or 1)))
            _DEFAULT = MathGrader(n)
        return _DEFAULT


def math_equal(response: str, gold: str, timeout_s: float = 5.0) -> bool:
    """Whether `response` (a full response with a boxed answer, or a bare answer) matches `gold`.

    Uses the boxed answer when there is one, else math-verify's own extraction. Works from any thread or
    process; a comparison that takes longer than `timeout_s` (a pathological expression) returns False.
    """
    return default_grader().equal(response, gold, timeout_s)


# Letters are upper-case only, so "the answer is a prime" does not read as choice A.
_CHOICE_PATTERNS = [
    re.compile(r"(?:[Aa]nswer|ANSWER)\s*(?:is|:)?\s*[:\-]?\s*\**\s*\(?\s*([A-Z])\b\)?"),
    re.compile(r"(?:[Oo]ption|[Cc]hoice)\s*\(?([A-Z])\)?\b"),
]


def extract_choice(response: str) -> str | None:
    """The final multiple-choice letter: a boxed letter, "answer is (C)", "Answer: C", else a lone "(C)"/"C"."""
    if not isinstance(response, str):
        return None
    boxed = extract_boxed(response)
    if boxed is not None:
        letter = re.fullmatch(r"\s*(?:\\text\{)?\s*\(?([A-Za-z])\)?\s*\}?\s*", boxed)
        if letter:
            return letter.group(1).upper()
    for pattern in _CHOICE_PATTERNS:
        hits = pattern.findall(response)
        if hits:
            return hits[-1].upper()
    lone = re.fullmatch(r"\s*\(?([A-Za-z])\)?[.\s]*", response)
    return lone.group(1).upper() if lone else None


def choice_equal(response: str, gold_letter: str) -> bool:
    """Whether the final letter chosen in `response` is `gold_letter` (GPQA-style, case-insensitive)."""
    choice = extract_choice(response)
    return choice is not None and isinstance(gold_letter, str) and choice == gold_letter.strip().strip("()").upper()


# --------------------------------------------------------------------------- final-answer extraction
# Follows the field's conventions (lm-evaluation-harness's gsm8k strict-match / flexible-extract filters and
# minerva_math answer line, Qwen2.5-Math's `extract_answer`): `\boxed{}` first, then the benchmark's own
# answer marker, then generic phrases, then, for numeric benchmarks only, the last number.


@dataclass(frozen=True)
class AnswerMarker:
    """A phrase that introduces a final answer; the answer is the rest of its line (or the next line when the
    phrase ends its line). `take`: "first" for a benchmark's own marker (a few-shot model that runs on into an
    invented next problem answers that one too, as lm-evaluation-harness's take_first assumes), "last" else."""

    name: str
    pattern: re.Pattern[str]
    take: str = "last"


GSM8K_MARKER = AnswerMarker("#### N", re.compile(r"####"), take="first")
MINERVA_MARKER = AnswerMarker("Final Answer: The final answer is X. I hope it is correct.",
                              re.compile(r"Final Answer:\s*The final answer is\b"), take="first")
GENERIC_PHRASES = (
    AnswerMarker("final answer is / Final Answer:", re.compile(r"\bfinal answer\b(?:\s*\**\s*(?:is\b|:))?", re.I)),
    AnswerMarker("the answer is", re.compile(r"\bthe (?:correct |final )?answer is\b", re.I)),
    AnswerMarker("Answer: / A: (line start)", re.compile(r"^[ \t]*(?:\*\*)?(?:A|Answer|ANSWER)(?:\*\*)?[ \t]*:", re.M)),
)


@dataclass(frozen=True)
class AnswerFormat:
    """How a benchmark's final answers are written, declared by the benchmark (not an if-else on task names).

    strict: `\\boxed{}` (the prompt's required format) when `boxed`, then the benchmark's own `markers`.
    flexible: strict first, then the generic `phrases`, then, when `numeric`, the last number in the response.
    `numeric`: answers are plain numbers, so a phrase's answer must start with a number and is reduced to it
    ("18 apples." -> "18"). A truncated response gets no last-number fallback, and a marker's answer that runs
    into the cut (its line neither ends nor closes) is not read: the number there may be the start of another.
    """

    boxed: bool = True
    markers: tuple[AnswerMarker, ...] = ()
    phrases: tuple[AnswerMarker, ...] = GENERIC_PHRASES
    numeric: bool = False

    def describe(self) -> dict[str, list[str]]:
        strict = (["\\boxed{}"] if self.boxed else []) + [m.name for m in self.markers]
        return {"strict": strict, "flexible": strict + [p.name for p in self.phrases]
                + (["last number (not in truncated responses)"] if self.numeric else [])}


BOXED_ONLY = AnswerFormat(phrases=())

# A number as written in prose: thousands separators, decimals; a minus only where it cannot be a hyphen or
# a subtraction ("9-2" is not -2).
_NUMBER_IN_TEXT = re.compile(r"(?:(?<![\w)\]}])-)?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?!\d)")
# $...$, $$...$$, \(...\), \[...\]; an escaped dollar (MATH's "\$18.90") is content, not a delimiter.
_MATH_SPAN = re.compile(r"(?<!\\)\$\$?\s*(.+?)\s*(?<!\\)\$\$?|\\\(\s*(.+?)\s*\\\)|\\\[\s*(.+?)\s*\\\]", re.S)
_COMPLETE_END = (".", "$", "}", ")", "]", "*", "!")


def _number(text: str) -> str | None:
    """The first number in `text` (after its last "=": "5 * 3 = 15" is 15), commas dropped."""
    match = _NUMBER_IN_TEXT.search(text.split("=")[-1])
    return match.group(0).replace(",", "") if match else None


def _answer_after(text: str, end: int, numeric: bool, truncated: bool) -> str | None:
    """The answer written after a marker that ends at `end`: a math span, else the sentence up to its period."""
    rest = text[end:]
    line, newline, after = rest.partition("\n")
    if not line.strip(" \t:*") and newline:  # "The answer is:\n\n$$18$$": the answer is on the next line
        lines = after.lstrip("\n \t")
        line, newline, _ = lines.partition("\n")
    span = line.strip().lstrip(":").strip().strip("*").strip()
    if truncated and not newline and not span.endswith(_COMPLETE_END):
        return None  # the answer runs into the length cut
    if span.startswith("\\boxed") or span.startswith("\\fbox"):
        return extract_boxed(span)
    math = _MATH_SPAN.search(span)
    if math and (math.start() == 0 or not numeric):
        span = next(g for g in math.groups() if g is not None)
    else:
        span = re.split(r"\.(?:\s|$)", span, maxsplit=1)[0]
    span = span.strip().rstrip(".,;:!").strip("*").strip()
    if numeric:
        # "18", "$18", "\$1,234.50 per week" are answers; "Janet has 16 eggs" is the start of a solution.
        if not re.match(r"(?:\\?\$|\\text\{\$?)?\s*-?\.?\d", span):
            return None
        return _number(span)
    return span or None


def _marked_answer(text: str, markers: tuple[AnswerMarker, ...], numeric: bool, truncated: bool
                   ) -> tuple[str, str] | None:
    """(answer, marker name) for the latest-placed usable marker among `markers`."""
    candidates = []
    for marker in markers:
        matches = list(marker.pattern.finditer(text))
        if marker.take == "first":
            matches = matches[:1]
        candidates += [(m.start(), m.end(), marker.name) for m in matches]
    for _, end, name in sorted(candidates, reverse=True):  # the last stated answer first
        answer = _answer_after(text, end, numeric, truncated)
        if answer:
            return answer, name
    return None


def extract_answer(text: str, fmt: AnswerFormat = BOXED_ONLY, *, flexible: bool = False,
                   truncated: bool = False) -> tuple[str | None, str | None]:
    """(final answer, how it was found) under `fmt`'s strict rules, or its flexible rules; (None, None) if none.

    How: "boxed", a marker's name, or "last number". Strict with `BOXED_ONLY` is exactly `extract_boxed`.
    """
    if not isinstance(text, str) or not text.strip():
        return None, None
    if fmt.boxed:
        boxed = extract_boxed(text)
        if boxed:
            return boxed, "boxed"
    found = _marked_answer(text, fmt.markers, fmt.numeric, truncated)
    if found is None and flexible:
        found = _marked_answer(text, fmt.phrases, fmt.numeric, truncated)
        if found is None and fmt.numeric and not truncated:
            numbers = _NUMBER_IN_TEXT.findall(text)
            if numbers:
                found = numbers[-1].replace(",", ""), "last number"
    return found if found is not None else (None, None)

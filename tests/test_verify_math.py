"""Math / multiple-choice answer checking: extraction, equivalence, and a timeout that works off the main thread."""

import threading
import time

import pytest

from thinkforge.verify import (
    MathGrader,
    choice_equal,
    default_grader,
    extract_boxed,
    extract_choice,
    math_equal,
)

PATHOLOGICAL = "The answer is \\boxed{9^{9^{9^{9^{9}}}}}"  # sympy tries to build this integer


@pytest.mark.parametrize("text,expected", [
    ("so \\boxed{\\frac{1}{2}} and", "\\frac{1}{2}"),
    ("first \\boxed{1} then \\boxed{2}", "2"),  # the last box
    ("\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}", "\\left( 3, \\frac{\\pi}{2} \\right)"),
    ("\\fbox{x^{2}+1}", "x^{2}+1"),
    ("The answer is $\\boxed 5$.", "5"),
    ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),  # escaped braces are content, not structure
    ("\\boxed{ok} then \\boxed{unclosed", "ok"),  # an unbalanced box falls back to the previous one
    ("no box here", None),
    (None, None),
])
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


@pytest.mark.parametrize("response,gold,expected", [
    ("Half of it: \\boxed{\\frac{1}{2}}.", "0.5", True),
    ("\\boxed{\\frac{2}{4}}", "\\frac12", True),
    ("(3, \\pi/2)", "\\left( 3, \\frac{\\pi}{2} \\right)", True),  # bare answers on both sides
    ("Thus the total is \\boxed{\\$18.90}.", "\\$18.90", True),
    ("\\boxed{\\text{Evelyn}}", "\\text{Evelyn}", True),
    ("\\boxed{52_{8}}", "52_8", True),
    ("\\boxed{52_9}", "52_8", False),  # math-verify alone ignores the base
    ("\\boxed{\\frac{1}{3}}", "0.5", False),
    ("\\boxed{(3, \\pi)}", "\\left( 3, \\frac{\\pi}{2} \\right)", False),
    ("The final answer is 7.", "7", True),  # no box: math-verify's own extraction
    ("no answer", "7", False),
])
def test_math_equal(response, gold, expected):
    assert math_equal(response, gold) is expected


def test_plain_numbers_skip_the_worker_pool():
    grader = MathGrader(workers=1)
    assert grader.equal("\\boxed{1,000}", "1000") and grader.equal("42.50", "42.5")
    assert not grader.equal("\\boxed{41}", "42") and not grader.equal(7, "7")
    assert grader._started == 0  # no process was needed
    # The worker's start-up (seconds of sympy import) does not count against the first call's timeout.
    assert grader.equal("\\boxed{\\frac{1}{2}}", "0.5", timeout_s=0.5) and grader._started == 1
    grader.close()
    # A worker that cannot start makes the answer False, never an exception.
    assert MathGrader(workers=1, startup_timeout_s=0.001).equal("\\boxed{\\frac{1}{2}}", "0.5") is False


def test_pathological_expression_times_out_off_the_main_thread():
    grader = default_grader()
    assert grader.equal("\\boxed{2}", "2.0")  # warm
    before = grader.timeouts
    out: dict[str, object] = {}

    def worker():
        start = time.monotonic()
        out["verdict"] = math_equal(PATHOLOGICAL, "2", timeout_s=1.0)
        out["seconds"] = time.monotonic() - start

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join(30)
    assert out["verdict"] is False and out["seconds"] < 3.0
    assert grader.timeouts == before + 1
    assert math_equal("\\boxed{\\sqrt{4}}", "2")  # the killed worker was replaced


def test_concurrent_callers_get_their_own_answers():
    cases = [(f"\\boxed{{\\frac{{{i}}}{{2}}}}", str(i / 2), True) for i in range(1, 5)]
    cases += [(f"\\boxed{{\\frac{{{i}}}{{3}}}}", str(i / 2), False) for i in range(1, 5)]
    got: dict[int, bool] = {}
    threads = [threading.Thread(target=lambda i=i, c=c: got.__setitem__(i, math_equal(c[0], c[1])))
               for i, c in enumerate(cases)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert [got[i] for i in range(len(cases))] == [c[2] for c in cases]


def _grade_in_child(queue):
    import os

    verdicts = [math_equal("\\boxed{\\frac{2}{4}}", "\\frac12"), math_equal("\\boxed{\\frac{1}{3}}", "0.5"),
                math_equal(PATHOLOGICAL, "2", timeout_s=1.0)]  # the timeout kills a worker: it must be our own
    queue.put((verdicts, default_grader()._pid == os.getpid()))


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs fork")
def test_math_equal_in_a_forked_child_uses_its_own_workers():
    import multiprocessing

    assert math_equal("\\boxed{\\sqrt{4}}", "2")  # the parent's pool is up (idle workers the child inherits)
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_grade_in_child, args=(queue,))
    child.start()
    try:
        verdicts, own_pool = queue.get(timeout=120)
    finally:
        child.join(30)
        if child.is_alive():
            child.kill()
    assert verdicts == [True, False, False] and child.exitcode == 0
    # The child's timeout killed its own worker, not the parent's: the parent still grades correctly.
    before = default_grader().timeouts
    assert math_equal("\\boxed{\\frac{2}{4}}", "\\frac12") and math_equal("\\boxed{\\sqrt{9}}", "3")
    assert default_grader().timeouts == before
    assert own_pool  # the child's default grader belonged to the child


@pytest.mark.parametrize("response,letter", [
    ("... so the answer is (C).", "C"),
    ("Answer: B", "B"),
    ("Therefore \\boxed{D}", "D"),
    ("\\boxed{\\text{(A)}}", "A"),
    ("I think it's option (B), wait no, the answer is A", "A"),  # the final one
    ("  (c) ", "C"),
    ("the answer is a prime", None),  # lower-case words are not letters
])
def test_extract_choice(response, letter):
    assert extract_choice(response) == letter


def test_choice_equal():
    assert choice_equal("The answer is (C).", "C") and choice_equal("Answer: C", "(C)")
    assert choice_equal("\\boxed{B}", "b") and not choice_equal("\\boxed{B}", "C") and not choice_equal("", "A")

"""MATH-500 reference solutions graded against their answers, and perturbed answers that must be rejected.

Ours: `math_equal` (boxed extraction, bare answers read as LaTeX, worker-process pool with a real timeout),
called from `--threads` threads. Beside it: math-verify used directly in-process the common way
(`verify(parse(gold), parse(solution))` on the main thread, its own SIGALRM timeouts), same pairs.

    python benchmarks/math_grader.py --out results/math_grader.json   [--data path/to/math500.jsonl]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor


def packaged_math500() -> str:
    """The MATH-500 copy shipped inside the package (where the `math500` task reads it)."""
    from thinkforge.tasks.benchmarks import DATA_DIR

    return str(DATA_DIR / "math500.jsonl")


def perturb(answer: str) -> str:
    """A different answer: bump the first integer (1/2 -> 2/2, 52_8 -> 53_8; the last one could be a unit's
    exponent, which graders rightly ignore), else shift a choice letter, else add 1."""
    numbers = list(re.finditer(r"\d+", answer))
    if numbers:
        m = numbers[0]
        return answer[:m.start()] + str(int(m.group()) + 1) + answer[m.end():]
    letter = re.fullmatch(r"\s*(\\text\{)?\(?([A-Z])\)?(\})?\s*", answer)
    if letter:
        shifted = "B" if letter.group(2) == "A" else "A"
        return answer.replace(letter.group(2), shifted)
    if answer.startswith("\\text{"):
        return answer[:-1] + "x}"
    return f"{answer} + 1"


def ours(pairs: list[tuple[str, str]], threads: int, timeout_s: float) -> tuple[list[bool], float]:
    from thinkforge.verify import math_equal

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=threads) as pool:
        verdicts = list(pool.map(lambda p: math_equal(p[0], p[1], timeout_s=timeout_s), pairs))
    return verdicts, time.perf_counter() - start


def raw_math_verify(pairs: list[tuple[str, str]]) -> tuple[list[bool], float]:
    from math_verify import parse, verify

    start = time.perf_counter()
    verdicts = []
    for response, gold in pairs:
        try:
            verdicts.append(bool(verify(parse(f"${gold}$"), parse(response))))
        except Exception:  # noqa: BLE001 - count as rejected, like a grader would
            verdicts.append(False)
    return verdicts, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=None,
                        help="MATH-500 jsonl (problem/solution/answer/unique_id); default: the packaged copy")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--timeout", type=float, default=5.0)
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--skip-raw", action="store_true", help="skip the in-process math-verify baseline")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    from thinkforge.errors import ThinkforgeError
    from thinkforge.utils import atomic_write_json, read_jsonl, run_metadata
    from thinkforge.verify import default_grader

    args.data = args.data or packaged_math500()
    if not os.path.exists(args.data):
        raise ThinkforgeError(f"{args.data}: MATH-500 jsonl not found (--data)")
    rows = read_jsonl(args.data)[: args.limit]
    correct = [(r["solution"], r["answer"]) for r in rows]
    wrong = [(r["solution"], perturb(r["answer"])) for r in rows]
    grader = default_grader()
    grader.warm()  # worker start-up (importing sympy) is not part of the throughput

    table = []

    def add(way: str, kind: str, pairs: list, verdicts: list[bool], seconds: float) -> None:
        accepted = sum(verdicts)
        misses = [(rows[i]["unique_id"], pairs[i][1]) for i, v in enumerate(verdicts) if v != (kind == "reference")]
        table.append({"way": way, "set": kind, "n": len(pairs), "accepted": accepted,
                      "accuracy" if kind == "reference" else "false_positives":
                          accepted / len(pairs) if kind == "reference" else accepted,
                      "seconds": seconds, "verifications_per_s": len(pairs) / seconds, "misses": misses})

    for kind, pairs in (("reference", correct), ("perturbed", wrong)):
        verdicts, seconds = ours(pairs, args.threads, args.timeout)
        add(f"thinkforge math_equal ({args.threads} threads, {grader.workers} workers)", kind, pairs, verdicts, seconds)
        if not args.skip_raw:
            verdicts, seconds = raw_math_verify(pairs)
            add("math-verify in-process (main thread)", kind, pairs, verdicts, seconds)

    print(f"MATH-500: {len(rows)} reference solutions vs answers, and vs perturbed answers; timeouts: {grader.timeouts}")
    print(f"{'way':<48} {'set':<10} {'accepted':>9} {'result':>16} {'seconds':>8} {'verif/s':>8}")
    for row in table:
        result = (f"{100 * row['accuracy']:.1f}% correct" if row["set"] == "reference"
                  else f"{row['false_positives']} false pos")
        print(f"{row['way']:<48} {row['set']:<10} {row['accepted']:>5}/{row['n']:<3} {result:>16} "
              f"{row['seconds']:>8.2f} {row['verifications_per_s']:>8.1f}")
    for row in table:
        for uid, answer in row["misses"][:8]:
            print(f"    {row['way'][:24]} {row['set']}: {uid} gold/perturbed={json.dumps(answer)[:60]}")
    if args.out:
        config = {"data": args.data, "threads": args.threads, "timeout_s": args.timeout, "limit": args.limit}
        atomic_write_json(args.out, {"rows": table, "timeouts": grader.timeouts, **run_metadata(config)})


if __name__ == "__main__":
    main()

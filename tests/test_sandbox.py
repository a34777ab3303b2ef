"""The code sandbox's contract: test formats, statuses, bad input, batching from threads."""

import threading

import pytest

from thinkforge.errors import ThinkforgeError
from thinkforge.verify import STATUSES, TestResult, run_code, run_code_batch, sandbox_info

DOUBLE = "import sys\nfor line in sys.stdin:\n    print(int(line) * 2)\n"


def statuses(results: list[TestResult]) -> list[str]:
    assert all(r.status in STATUSES for r in results)
    assert all(r.passed == (r.status == "passed") for r in results)
    return [r.status for r in results]


def test_stdin_stdout_tests_compare_after_trailing_whitespace():
    results = run_code(DOUBLE, [
        {"stdin": "3\n", "stdout": "6"},
        {"stdin": "1\n2\n", "stdout": "2   \n4\n\n\n"},  # trailing spaces / blank lines don't matter
        {"stdin": "5\n", "stdout": "11\n"},
        {"stdin": "1\n2\n", "stdout": "2 4"},  # but line structure does
    ])
    assert statuses(results) == ["passed", "passed", "failed", "failed"]
    assert results[2].stdout == "10\n"
    assert "'11'" in results[2].detail and "'10'" in results[2].detail


def test_assert_tests_run_in_the_programs_namespace():
    code = "def add(a, b):\n    return a + b\n"
    results = run_code(code, [{"assert": "assert add(2, 3) == 5"},
                              {"assert": "assert add(2, 2) == 5", "level": 1},  # extra keys are ignored
                              {"assert": "def check(f):\n    assert f(1, 1) == 2\ncheck(add)"}])
    assert statuses(results) == ["passed", "failed", "passed"]
    assert "AssertionError" in results[1].detail


def test_exit_codes_exceptions_and_sys_exit():
    assert statuses(run_code("import sys\nprint(7)\nsys.exit(0)\n", [{"stdin": "", "stdout": "7"}])) == ["passed"]
    assert statuses(run_code("import sys\nprint(7)\nsys.exit(3)\n", [{"stdin": "", "stdout": "7"}])) == ["runtime_error"]
    r = run_code("def f(:\n", [{"assert": "pass"}])[0]
    assert r.status == "runtime_error" and "SyntaxError" in r.detail
    r = run_code("x = 1 / 0\n", [{"stdin": "", "stdout": ""}])[0]
    assert r.status == "runtime_error" and "ZeroDivisionError" in r.detail


def test_timeout_and_memory_are_their_own_statuses():
    results = run_code("import time\ntime.sleep(30)\n", [{"stdin": "", "stdout": ""}], timeout_s=0.5)
    assert statuses(results) == ["timeout"] and results[0].time_s < 2.0
    assert statuses(run_code("while True:\n    pass\n", [{"assert": "pass"}], timeout_s=1.0)) == ["timeout"]
    assert statuses(run_code("x = bytearray(2 << 30)\n", [{"assert": "pass"}], memory_mb=256)) == ["memory"]
    # The same allocation fits a larger limit: the limit is the parameter, not a constant.
    assert statuses(run_code("x = bytearray(64 << 20)\n", [{"assert": "pass"}], memory_mb=512)) == ["passed"]


def test_tests_are_isolated_from_each_other():
    # Each test gets a fresh process: state from one test (a global, a file) does not leak into the next.
    code = "import os\nn = len(os.listdir('.'))\nopen(f'f{n}', 'w').close()\nprint(n)\n"
    assert statuses(run_code(code, [{"stdin": "", "stdout": "0"}] * 2)) == ["passed", "passed"]


def test_non_utf8_output_is_replaced_not_an_exception():
    r = run_code("import sys\nsys.stdout.buffer.write(b'\\xff\\xfeok\\n')\n", [{"stdin": "", "stdout": "ok"}])[0]
    assert r.status == "failed" and "ok" in r.stdout and "\ufffd" in r.stdout


def test_bad_input_is_a_clear_error_or_sandbox_error():
    with pytest.raises(ThinkforgeError, match="non-empty list"):
        run_code("print(1)", [])
    with pytest.raises(ThinkforgeError, match="non-empty list"):
        run_code("print(1)", "assert True")
    with pytest.raises(ThinkforgeError, match="positive"):
        run_code("print(1)", [{"stdin": "", "stdout": "1"}], timeout_s=0)
    results = run_code(b"print(1)", [{"stdin": "", "stdout": "1"}] * 2)
    assert statuses(results) == ["sandbox_error"] * 2 and "string" in results[0].detail
    results = run_code("print(1)", [{"input": "x"}, {"stdin": "", "stdout": "1"}, "nope", {"assert": 3}])
    assert statuses(results) == ["sandbox_error", "passed", "sandbox_error", "sandbox_error"]
    assert "neither" in results[0].detail


def test_batch_from_threads_keeps_order():
    items = [(f"print({i} * 3)", [{"stdin": "", "stdout": str(i * 3)}]) for i in range(6)]
    items.append({"code": "print(1)", "tests": []})  # a malformed item does not stop the batch
    results = run_code_batch(items, max_workers=2)
    assert [statuses(r) for r in results] == [["passed"]] * 6 + [["sandbox_error"]]
    # run_code itself is thread-safe: concurrent callers get their own answers.
    got: dict[int, str] = {}

    def call(i: int) -> None:
        got[i] = run_code(f"print({i})", [{"stdin": "", "stdout": str(i)}])[0].status

    threads = [threading.Thread(target=call, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == dict.fromkeys(range(4), "passed")


def test_sandbox_info_reports_isolation():
    info = sandbox_info()
    assert info.mode in ("bwrap", "unsafe")
    assert info.network_isolated == info.filesystem_isolated == (info.mode == "bwrap")
    assert (info.reason == "") == (info.mode == "bwrap")


def test_installed_packages_are_importable_read_only():
    # numpy is a project dependency: solutions that use it work; the project itself is not exposed.
    code = "import numpy as np\nprint(int(np.arange(10).sum()))\n"
    assert statuses(run_code(code, [{"stdin": "", "stdout": "45"}])) == ["passed"]
    r = run_code("import thinkforge\n", [{"stdin": "", "stdout": ""}])[0]
    assert r.status == "runtime_error" and "ModuleNotFoundError" in r.detail


def test_bwrap_mounts_tmp_before_the_python_binds():
    """A Python installed under /tmp (a CI checkout there) must be bound on top of the sandbox's /tmp
    tmpfs, not hidden by it (bwrap applies mounts in order); /tmp stays world-writable (1777)."""
    from thinkforge.verify.sandbox import _bwrap_argv

    argv = _bwrap_argv(root=True)
    assert argv.index("--tmpfs") < argv.index("--ro-bind")
    assert argv[argv.index("--tmpfs") - 4: argv.index("--tmpfs") + 2] == ["--perms", "1777", "--size",
                                                                          str(256 << 20), "--tmpfs", "/tmp"]
    chmods = [argv[i + 2] for i, a in enumerate(argv) if a == "--chmod"]
    assert "/tmp" not in chmods

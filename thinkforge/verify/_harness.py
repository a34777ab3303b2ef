"""The trusted half of the code sandbox. It runs INSIDE the sandbox (`python -I -S -c <this file>`).

Protocol (length-prefixed `marshal` frames; marshal rather than json because importing json pulls in re and
enum, which costs more than the rest of start-up, and both ends are the same interpreter): the harness is
started with the uid to become as argv[1] (and directories to append to sys.path after it), says {"ready"}, then reads job frames ({code, tests, timeout_s,
memory_mb, ...}) from stdin until EOF, answering each with one row per test and a {"done"} frame. One
harness thus serves many programs (start-up is paid once per sandbox, not per program); each program gets
fresh processes and a fresh directory, and in a PID namespace everything it left behind (processes, files
in /tmp) is removed before the next one.

The harness keeps its stdout pipe to itself: every test runs in forked children that close it before the
untrusted code runs, and the harness is non-dumpable, so no child can open it through /proc either. Hence
printing "passed", exiting early, patching builtins or killing the harness cannot forge a result:

- stdin/stdout tests are compared here, in the harness, from what the child wrote to its own pipe;
- assert tests never run in the program's process. A second forked child, the *judge* (trusted code, same
  limits), executes the test statements; the program's top-level names are proxies in the judge's namespace,
  and each call travels over a pipe to the program's process, which runs it and sends back the result as
  plain data (exact builtin types via marshal, validated again by the judge) or as a handle to an object
  that stays in the program. So `assert f(x) == y` is evaluated by the judge: the program cannot skip it,
  patch it, fake its exit status, or return an object whose `__eq__` is always true. Only the judge holds
  the pipe on which a pass is reported. Values cross by copy, so tests that inspect in-place mutation of
  their arguments or the identity of returned objects are not supported.

Only built-in modules are imported up front; `traceback` is imported in a child only when something raised.
"""

import _signal as signal  # the C module: `signal` imports enum, which costs ~10 ms of start-up
import builtins
import marshal
import math
import os
import resource
import select
import sys
import time

MEMORY_EXIT = 86  # exit code for a MemoryError (a program that fakes it only earns "memory")
GONE_EXIT = 87  # the judge's exit code when the program died before or while serving the test
ASSERT_EXIT = 88  # the judge's exit code when an assertion failed
PLAIN = frozenset({type(None), bool, int, float, complex, str, bytes})
PRELOAD = ("typing", "re", "collections", "itertools", "functools", "heapq", "bisect", "string", "random", "copy",
           "fractions", "traceback")
SKIP_EXCEPTIONS = frozenset({"SystemExit", "KeyboardInterrupt", "GeneratorExit", "BaseException"})
_BUILTIN_NAMES = frozenset(vars(builtins))
_exec, _compile, _read, _write, _exit = builtins.exec, builtins.compile, os.read, os.write, os._exit


def _drop_privileges(uid: int) -> None:
    # As host root the sandbox starts with CAP_SETUID only so that it can become an unused uid here: the
    # kernel exempts root from RLIMIT_NPROC, and a fresh uid per sandbox keeps sandboxes from signalling
    # each other. setuid from root to non-root clears every capability.
    # Non-dumpable: children (same uid) can then neither open /proc/<harness>/fd/* nor ptrace the harness.
    # Changing uid does that by itself; otherwise ask for it (ctypes is only imported on that path).
    if os.geteuid() == 0 and uid:
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
        return
    try:
        import ctypes

        ctypes.CDLL(None).prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE = 4
    except Exception:  # noqa: BLE001 - best effort (no libc/ctypes): the uid is still unprivileged
        pass


def _read_all(fd: int) -> bytes:
    chunks = []
    while True:
        chunk = os.read(fd, 1 << 20)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def _send(fd: int, obj: object) -> None:
    data = marshal.dumps(obj)
    data = len(data).to_bytes(4, "big") + data
    while data:
        data = data[_write(fd, data):]


def _recv(fd: int) -> object:
    def exactly(n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = _read(fd, n - len(buf))
            if not chunk:
                raise EOFError
            buf += chunk
        return buf

    return marshal.loads(exactly(int.from_bytes(exactly(4), "big")))


def _is_plain(x: object, depth: int = 0) -> bool:
    """Exact builtin data types only (an int subclass could carry a forged __eq__)."""
    t = type(x)
    if t in PLAIN:
        return True
    if depth > 64:
        return False
    if t in (tuple, list, set, frozenset):
        return all(_is_plain(v, depth + 1) for v in x)
    if t is dict:
        return all(_is_plain(k, depth + 1) and _is_plain(v, depth + 1) for k, v in x.items())
    return False


def _enter(job: dict, dups: dict, keep: tuple, workdir: str) -> None:
    """Child set-up: own process group, fresh workdir, fds 0-2 from `dups`, every other fd but `keep` closed,
    rlimits. Exits the child (never returns into the harness loop) if anything fails."""
    try:
        os.setpgid(0, 0)
        os.chdir(workdir)
        for target, src in dups.items():
            os.dup2(src, target)
        keep = {0, 1, 2, *keep}
        top = max(keep) + 64
        for fd in range(3, top):
            if fd not in keep:
                try:
                    os.close(fd)
                except OSError:
                    pass
        os.closerange(top, 65536)
        cpu = max(1, math.ceil(job["timeout_s"]))
        mem = job["memory_mb"] << 20
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
        resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
        resource.setrlimit(resource.RLIMIT_FSIZE, (job["file_size_mb"] << 20,) * 2)
        resource.setrlimit(resource.RLIMIT_NOFILE, (job["max_files"],) * 2)
        resource.setrlimit(resource.RLIMIT_NPROC, (job["max_procs"],) * 2)
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    except BaseException as e:  # noqa: BLE001
        os.write(2, f"sandbox child setup failed: {e!r}".encode())
        _exit(70)


def _print_exception(e: BaseException) -> None:
    try:  # tb_next: hide the harness's own frame
        import traceback

        traceback.print_exception(type(e), e, e.__traceback__.tb_next)
    except BaseException:  # noqa: BLE001
        pass


def _finish(status: int) -> None:
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        try:
            stream.flush()
        except BaseException:  # noqa: BLE001
            pass
    _exit(status & 0xFF)


def _program(code: str, serve: tuple | None) -> None:
    """The untrusted child: run the program; for assert tests then serve the judge's calls until it hangs up."""
    namespace = {"__name__": "__main__", "__builtins__": builtins}
    status = 0
    try:
        _exec(_compile(code, "<solution>", "exec", dont_inherit=True, optimize=0), namespace)
        if serve is not None:
            _serve(namespace, *serve)
    except SystemExit as e:
        status = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if not isinstance(e.code, int) and e.code is not None:
            print(e.code, file=sys.stderr)
    except MemoryError:
        status = MEMORY_EXIT
    except BaseException as e:  # noqa: BLE001 - any error in untrusted code is the program's runtime error
        status = 1
        _print_exception(e)
    _finish(status)


def _serve(namespace: dict, req_r: int, rep_w: int) -> None:
    """Runs in the program's process: answers the judge. Nothing here is trusted by the judge."""
    objects: dict[int, object] = {}

    def enc(x: object) -> tuple:
        if _is_plain(x):
            return ("v", x)
        objects[id(x)] = x
        if type(x) is type(sys):
            return ("m", x.__name__, id(x))
        return ("r", id(x), type(x).__name__)

    def dec(x: tuple) -> object:
        return objects[x[1]] if x[0] == "r" else x[1]

    _send(rep_w, ("hello", {k: enc(v) for k, v in namespace.items() if not (k[:2] == "__" == k[-2:])}))
    while True:
        try:
            op, ref, *rest = _recv(req_r)
        except EOFError:
            return
        try:
            target = objects[ref]
            if op == "call":
                value = target(*[dec(a) for a in rest[0]], **{k: dec(v) for k, v in rest[1].items()})
            elif op == "getattr":
                value = getattr(target, rest[0])
            elif op == "getitem":
                value = target[dec(rest[0])]
            elif op == "list":
                value = list(target)
            elif op == "len":
                value = len(target)
            else:
                value = bool(target)
            reply = ("ok", enc(value))
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as e:  # noqa: BLE001 - relayed to the judge, which raises it in the test
            try:
                reply = ("raise", type(e).__name__, str(e)[:2000])
            except BaseException:  # noqa: BLE001
                reply = ("raise", "Exception", "")
        _send(rep_w, reply)


class _Gone(Exception):
    """The program's process died, or broke the protocol."""


class ProgramError(Exception):
    """An exception of a program-defined type, raised by a call into the program."""


def _judge(src: str, req_w: int, rep_r: int, verdict_w: int) -> None:
    """The trusted child: run the test statements against proxies of the program's names."""

    def rpc(message: tuple) -> object:
        try:
            _send(req_w, message)
            reply = _recv(rep_r)
        except (OSError, EOFError, ValueError) as e:
            raise _Gone(f"the program died during the test ({type(e).__name__})") from None
        if type(reply) is not tuple or not reply or reply[0] not in ("ok", "raise"):
            raise _Gone("the program broke the sandbox protocol")
        if reply[0] == "ok":
            return dec(reply[1])
        name, message_text = str(reply[1]), str(reply[2])
        exc = getattr(builtins, name, None)
        if name in SKIP_EXCEPTIONS or not (isinstance(exc, type) and issubclass(exc, BaseException)):
            raise ProgramError(f"{name}: {message_text}")
        raise exc(message_text)

    class Remote:
        """A handle to an object that stays in the program's process."""

        __slots__ = ("_ref", "_type")

        def __init__(self, ref: int, type_name: str) -> None:
            object.__setattr__(self, "_ref", ref)
            object.__setattr__(self, "_type", type_name)

        def __call__(self, *args: object, **kwargs: object) -> object:
            return rpc(("call", self._ref, tuple(map(enc, args)), {k: enc(v) for k, v in kwargs.items()}))

        def __getattr__(self, name: str) -> object:
            if name.startswith("__"):
                raise AttributeError(name)
            return rpc(("getattr", self._ref, name))

        def __getitem__(self, key: object) -> object:
            return rpc(("getitem", self._ref, enc(key)))

        def __iter__(self):  # noqa: ANN204
            return iter(rpc(("list", self._ref)))

        def __len__(self) -> int:
            return rpc(("len", self._ref))

        def __bool__(self) -> bool:
            return rpc(("bool", self._ref))

        def __repr__(self) -> str:
            return f"<program {self._type} object>"

    def enc(x: object) -> tuple:
        if type(x) is Remote:
            return ("r", x._ref)
        if _is_plain(x):
            return ("v", x)
        raise TypeError(f"the test passed a {type(x).__name__} to the program: only plain data and the "
                        "program's own objects can cross the sandbox")

    def dec(x: object) -> object:
        if type(x) is not tuple or len(x) < 2:
            raise _Gone("the program broke the sandbox protocol")
        if x[0] == "v" and _is_plain(x[1]):
            return x[1]
        if x[0] == "m" and type(x[1]) is str:
            # Only a module the judge has already imported is used locally: importing a name the program
            # chose could run a file the program wrote onto the path (the fallback sandbox can write there).
            module = sys.modules.get(x[1])
            return module if module is not None else Remote(x[2], "module")
        if x[0] == "r" and type(x[1]) is int:
            return Remote(x[1], str(x[2]))
        raise _Gone("the program sent a value that is not plain data")

    status = 0
    try:
        try:
            tag, names = _recv(rep_r)
        except (OSError, EOFError, ValueError, TypeError):
            raise _Gone("the program exited before its tests ran") from None
        if tag != "hello" or type(names) is not dict:
            raise _Gone("the program broke the sandbox protocol")
        namespace = {"__name__": "__main__", "__builtins__": builtins}
        # A program global named like a builtin (`abs = lambda x: 0`) would change what the test's own
        # `abs(f(x) - y) < 1e-9` means: tests always see the real builtins.
        namespace.update({str(k): dec(v) for k, v in names.items() if str(k) not in _BUILTIN_NAMES})
        _exec(_compile(src, "<test>", "exec", dont_inherit=True, optimize=0), namespace)
        _write(verdict_w, b"P")
    except _Gone as e:
        status = GONE_EXIT
        print(e, file=sys.stderr)
    except AssertionError as e:
        status = ASSERT_EXIT
        _print_exception(e)
    except MemoryError:
        status = MEMORY_EXIT
    except BaseException as e:  # noqa: BLE001 - the test errored (often: the program raised)
        status = 1
        _print_exception(e)
    _finish(status)


def _normalise(text: str) -> str:
    return "\n".join(line.rstrip() for line in text.rstrip().splitlines())


def _kill(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except OSError:
        pass


def _run_test(code: str, test: dict, job: dict, index: int) -> dict:
    """Runs one test; if the harness itself fails (fork refused...), frees what it took before re-raising."""
    opened: list[int] = []
    children: dict[int, int] = {}  # pid -> pidfd
    try:
        return _run_one(code, test, job, index, opened, children)
    except BaseException:
        for pid in children:
            _kill(pid)
            try:
                os.waitpid(pid, 0)
            except OSError:
                pass
        for fd in opened + list(children.values()):
            try:
                os.close(fd)
            except OSError:
                pass
        raise


def _run_one(code: str, test: dict, job: dict, index: int, opened: list, children: dict) -> dict:
    workdir = f"test{index}"
    os.mkdir(workdir, 0o700)  # a fresh working directory per test
    stdin_fd = os.memfd_create("stdin")
    opened.append(stdin_fd)
    data = test.get("stdin") or ""
    os.write(stdin_fd, data.encode() if isinstance(data, str) else bytes(data))
    os.lseek(stdin_fd, 0, os.SEEK_SET)
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    opened += [out_r, out_w, err_r, err_w]
    is_assert = "assert" in test
    start = time.monotonic()
    bufs = {out_r: bytearray(), err_r: bytearray()}
    if is_assert:
        req_r, req_w = os.pipe()
        rep_r, rep_w = os.pipe()
        verdict_r, verdict_w = os.pipe()
        judge_r, judge_w = os.pipe()
        opened += [req_r, req_w, rep_r, rep_w, verdict_r, verdict_w, judge_r, judge_w]
        judge = os.fork()
        if judge == 0:
            devnull = os.open(os.devnull, os.O_RDONLY)
            _enter(job, {0: devnull, 1: judge_w, 2: judge_w}, (req_w, rep_r, verdict_w), workdir)
            _judge(test["assert"], req_w, rep_r, verdict_w)
        children[judge] = os.pidfd_open(judge)
        bufs[judge_r] = bytearray()
        bufs[verdict_r] = bytearray()
    program = os.fork()
    if program == 0:
        serve = (req_r, rep_w) if is_assert else None
        _enter(job, {0: stdin_fd, 1: out_w, 2: err_w}, serve or (), workdir)
        _program(code, serve)
    children[program] = os.pidfd_open(program)
    for fd in (stdin_fd, out_w, err_w) + ((req_r, req_w, rep_r, rep_w, verdict_w, judge_w) if is_assert else ()):
        os.close(fd)
    # The test is over when its last process exits: the judge for assert tests (the program only serves it).
    final = judge if is_assert else program
    poller = select.poll()
    watched = set(bufs) | set(children.values())
    for fd in watched:
        poller.register(fd, select.POLLIN)
    deadline = start + job["timeout_s"]
    exited: dict[int, int] = {}
    timed_out = flooded = False
    grace = None
    cap = job["output_limit"]
    while True:
        now = time.monotonic()
        if grace is None and now >= deadline:
            timed_out = True
            break
        if grace is not None and (not watched or now >= grace):
            break
        for fd, _ in poller.poll(max((grace or deadline) - now, 0.0) * 1000):
            if fd not in watched:
                continue
            pid = next((p for p, pfd in children.items() if pfd == fd), None)
            if pid is not None:
                poller.unregister(fd)
                watched.discard(fd)
                exited[pid] = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
                _kill(pid)  # stray grandchildren die with the test; their pipe ends then close
                if pid == final:
                    for other in children:
                        _kill(other)
                    grace = time.monotonic() + 0.5
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                poller.unregister(fd)
                watched.discard(fd)
                continue
            bufs[fd] += chunk
            if sum(len(b) for b in bufs.values()) > cap:
                flooded = True
        if flooded:
            break
    for pid, pidfd in children.items():
        _kill(pid)
        if pid not in exited:
            exited[pid] = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
        os.close(pidfd)
    elapsed = time.monotonic() - start
    for fd in bufs:
        os.close(fd)
    stdout = bytes(bufs[out_r][:cap]).decode("utf-8", "replace")
    stderr = bytes(bufs[err_r][-4000:]).decode("utf-8", "replace")
    rc = exited[program]
    judged = bytes(bufs[judge_r][-4000:]).decode("utf-8", "replace") if is_assert else ""
    jrc = exited[judge] if is_assert else 0
    if timed_out or -signal.SIGXCPU in (rc, jrc):
        status, detail = "timeout", f"exceeded {job['timeout_s']}s"
    elif flooded:
        status, detail = "runtime_error", f"output limit exceeded ({cap} bytes)"
    elif MEMORY_EXIT in (rc, jrc) or "MemoryError" in (stderr[-300:] + judged[-300:]):
        status, detail = "memory", f"exceeded {job['memory_mb']} MB"
    elif is_assert:
        if jrc == 0 and bytes(bufs[verdict_r]) == b"P":
            status, detail = "passed", ""
        elif jrc == ASSERT_EXIT:
            status, detail = "failed", judged[-1000:]
        elif jrc == GONE_EXIT and rc == 0:
            status, detail = "runtime_error", f"the program exited before its tests finished ({judged.strip()})"
        elif jrc == GONE_EXIT:
            status, detail = "runtime_error", f"exit code {rc}: {stderr[-1000:]}"
        else:
            status, detail = "runtime_error", f"{judged[-1000:]}{stderr[-500:]}"
    elif rc != 0:
        status, detail = "runtime_error", f"exit code {rc}: {stderr[-1000:]}"
    elif _normalise(stdout) == _normalise(str(test.get("stdout", ""))):
        status, detail = "passed", ""
    else:
        want = _normalise(str(test.get("stdout", "")))
        status, detail = "failed", f"expected {want[:200]!r}, got {_normalise(stdout)[:200]!r}"
    return {"status": status, "detail": detail, "time_s": round(elapsed, 4), "stdout": stdout[:2000]}


def _become_subreaper() -> None:
    # Orphaned descendants (a program's daemon that left the test's process group with setsid) are then
    # re-parented to the harness instead of init, so `_kill_adopted` can find them without a PID namespace.
    try:
        import ctypes

        ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER = 36
    except Exception:  # noqa: BLE001 - best effort: without it, plain mode cannot catch such daemons
        pass


def _children(me: int) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", "rb") as f:
                    stat = f.read()
            except OSError:
                continue
            # Field 4 is the parent pid; the command name (field 2) may hold spaces and parentheses.
            fields = stat[stat.rfind(b")") + 2:].split()
            if len(fields) > 1 and int(fields[1]) == me:
                pids.append(int(entry))
    return pids


def _kill_adopted() -> None:
    """Kills and reaps every remaining child: orphans adopted as subreaper. Killing one re-parents its own
    children here, hence the loop."""
    me = os.getpid()
    for _ in range(100):
        pids = _children(me)
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        for pid in pids:
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass


def _clean(base: str, own_namespace: bool) -> None:
    """After a program: remove its files and kill whatever it left running (in a PID namespace of our own,
    every other process; in any case the orphans the harness adopted as subreaper)."""
    if own_namespace:
        me = os.getpid()
        for entry in os.listdir("/proc"):
            if entry.isdigit() and int(entry) not in (1, me):  # 1 is bwrap's init
                try:
                    os.kill(int(entry), signal.SIGKILL)
                except OSError:
                    pass
    _kill_adopted()  # as subreaper the harness also reaps what it adopted (no zombies pile up)
    _remove_contents(base, os.lstat(base).st_dev)


def _remove_contents(path: str, dev: int) -> None:
    """Deletes what a program wrote under `path`, never crossing a mount point: the read-only binds of the
    Python install sit inside the sandbox's /tmp when the checkout lives under /tmp, and a cleanup that walked
    into them would cost an EROFS failure per file (and delete host files the day a bind is writable)."""
    import stat

    try:
        entries = list(os.scandir(path))
    except PermissionError:  # the program (same uid) took the permissions away: give them back once
        try:
            os.chmod(path, 0o700)
            entries = list(os.scandir(path))
        except OSError:
            return
    except OSError:
        return
    for entry in entries:
        try:
            st = entry.stat(follow_symlinks=False)
        except OSError:
            continue
        if stat.S_ISDIR(st.st_mode):
            if st.st_dev != dev:
                continue  # a mount point (a bind of the host): not the program's to have written
            _remove_contents(entry.path, dev)
            try:
                os.rmdir(entry.path)
            except OSError:
                pass  # still holds a mount point (a parent of a bind), or is not ours
        else:
            try:
                os.unlink(entry.path)
            except OSError:
                pass


def main() -> None:
    _drop_privileges(int(sys.argv[1]) if len(sys.argv) > 1 else 0)
    _become_subreaper()
    sys.path.extend(sys.argv[2:])  # site-packages (-S skipped site.py, and with it the .pth hooks)
    jobs, results = os.dup(0), os.dup(1)
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)
    base = os.getcwd()
    # Preload what solutions and tests commonly import: every forked child then finds it in sys.modules, so
    # `from typing import List` costs nothing per program (the harness pays once per sandbox).
    for name in PRELOAD:
        try:
            __import__(name)
        except Exception:  # noqa: BLE001 - a missing optional module only costs speed
            pass
    # "ready" tells the host the sandbox started: rows missing after it mean the program killed the harness.
    _send(results, {"ready": True})
    while True:
        try:
            job = _recv(jobs)
        except EOFError:
            return
        for i, test in enumerate(job["tests"]):
            try:
                row = _run_test(job["code"], test, job, i)
            except Exception as e:  # noqa: BLE001 - a harness failure is reported, the next test still runs
                row = {"status": "sandbox_error", "detail": f"harness: {type(e).__name__}: {e}", "time_s": 0.0}
            row["i"] = i
            _send(results, row)
        try:
            _clean(base, job.get("own_pid_namespace", False))
        except Exception:  # noqa: BLE001 - a leftover file is not worth failing the next program for
            pass
        _send(results, {"done": True})


main()

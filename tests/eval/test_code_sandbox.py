"""The code sandbox under attack (issue 18): each escape is scored failed and leaves no trace outside it,
and a program that exits before its asserts ran is scored failed.

Every program here escaped, or passed, under the previous sandbox (a plain subprocess with an audit
hook); the namespaced sandbox must score them failed while nothing outside changes: no file written in a
host directory, no connection to a host socket, no host process signalled, no child left running.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lmforge.errors import LmforgeError
from lmforge.eval import code
from lmforge.eval.code import MAX_PROCESSES, run_program, run_programs

_PROBLEM = code.sandbox_problem()
pytestmark = pytest.mark.skipif(_PROBLEM is not None, reason=f"no namespace sandbox here: {_PROBLEM}")

# Spawns processes with no audit event at all: subprocess.Popen raises its only one ("subprocess.Popen")
# through its module's `sys`, and underneath calls _posixsubprocess.fork_exec, which raises none.
NO_AUDIT = '''
import subprocess, sys
class _NoAudit:
    def __getattr__(self, name):
        return getattr(sys, name)
    @staticmethod
    def audit(*args):
        pass
subprocess.sys = _NoAudit()
'''

WRONG = "def add(a, b):\n    return a - b\n"
RIGHT = "def add(a, b):\n    return a + b\n"
TESTS = "assert add(2, 3) == 5\nassert add(-1, 1) == 0\n"


@pytest.fixture(params=["root", "user"] if os.geteuid() == 0 else ["user"])
def kind(request, monkeypatch) -> str:
    """Both ways of isolating: as root (no user namespace, an unused uid) and with a user namespace."""
    monkeypatch.setattr(code, "_sandbox_kind", lambda: request.param)
    return request.param


@pytest.fixture
def tcp_server() -> Iterator[tuple[int, list[bytes]]]:
    """A host TCP server on 127.0.0.1: (port, what every connection sent)."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.2)
    received: list[bytes] = []
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(2)
                try:
                    received.append(conn.recv(100) or b"<connected>")
                except OSError:
                    received.append(b"<connected>")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield server.getsockname()[1], received
    stop.set()
    thread.join()
    server.close()


def _processes_with(token: str) -> list[int]:
    """Host pids whose command line contains ``token``."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if token.encode() in (entry / "cmdline").read_bytes():
                    pids.append(int(entry.name))
            except OSError:
                pass
    return pids


def test_early_exit_is_scored_failed():
    """Exiting with status 0 before the asserts (or forcing 0 after they failed) is not a pass."""
    cheats = {
        "sys.exit": f"{WRONG}import sys\nsys.exit(0)\n{TESTS}",
        "SystemExit": f"{WRONG}raise SystemExit\n{TESTS}",
        "os._exit": f"{WRONG}import os\nos._exit(0)\n{TESTS}",
        "atexit": f"{WRONG}import atexit, os\natexit.register(os._exit, 0)\n{TESTS}",  # asserts fail, status 0
        "excepthook": f"{WRONG}import os, sys\nsys.excepthook = lambda *a: os._exit(0)\n{TESTS}",
        "in the function": "def add(a, b):\n    raise SystemExit(0)\n" + TESTS,
        "fake sentinel": f"{WRONG}import os\nprint('\\n' + 'f' * 32)\nos._exit(0)\n{TESTS}",
        "reads its inputs": (f"{WRONG}import os, sys\nprint(sys.argv, dict(os.environ), sys.stdin.read())\n"
                             f"print(open(sys.argv[1]).read()[-40:])\nos._exit(0)\n{TESTS}"),
    }
    results = dict(zip(cheats, run_programs(list(cheats.values()), timeout_s=5, workers=2)))
    for name, result in results.items():
        assert result.status == "failed", (name, result)
    assert "no completion sentinel" in results["sys.exit"].detail
    # the same shapes with a correct solution and nothing cut short do pass
    honest = [f"{RIGHT}{TESTS}", f"{RIGHT}import atexit\natexit.register(print, 'bye')\n{TESTS}",
              f"{RIGHT}import sys\nsys.stdout.write('no newline at the end')\n{TESTS}"]
    assert [r.status for r in run_programs(honest, timeout_s=5, workers=2)] == ["passed"] * 3


def test_clearing_the_blocked_set_gives_neither_shell_nor_network(kind, tmp_path, tcp_server):
    port, received = tcp_server
    marker = tmp_path / "marker"
    program = f'''
import os, socket, sys
try:
    sys.modules["__main__"].BLOCKED.clear()  # the audit hook's set of refused events
except Exception:
    pass
rc = os.system("touch {marker}")
socket.create_connection(("127.0.0.1", {port}), timeout=2).sendall(b"escaped")
assert rc == 0 and os.path.exists("{marker}")
'''
    result = run_program(program, timeout_s=5)
    assert not result.passed, result
    assert not marker.exists() and received == []


@pytest.mark.parametrize("route", ["globals", "code"])
def test_disarming_the_hook_through_gc_gives_nothing(kind, route, tmp_path, tcp_server):
    """The hook found through gc, then its globals emptied or its code replaced by a no-op."""
    port, received = tcp_server
    marker = tmp_path / "marker"
    disarm = ('hook.__globals__["BLOCKED"].clear()' if route == "globals"
              else "hook.__code__ = (lambda event, args: None).__code__")
    program = f'''
import gc, os, socket
hook = next(f for f in gc.get_objects() if getattr(f, "__name__", "") == "_hook")
{disarm}
rc = os.system("touch {marker}")
socket.create_connection(("127.0.0.1", {port}), timeout=2).sendall(b"escaped")
assert rc == 0 and os.path.exists("{marker}")
'''
    result = run_program(program, timeout_s=5)
    assert not result.passed, result
    assert not marker.exists() and received == []


def test_unaudited_fork_exec_reaches_neither_host_files_nor_network(kind, tmp_path, tcp_server):
    """A child interpreter started without any audit event has no hook at all: the namespaces hold."""
    port, received = tcp_server
    marker = tmp_path / "marker"
    program = NO_AUDIT + f'''
write = subprocess.run([sys.executable, "-c", "open({str(marker)!r}, 'w').write('escaped')"])
connect = subprocess.run([sys.executable, "-c", "import socket; "
                          "socket.create_connection(('127.0.0.1', {port}), timeout=2).sendall(b'escaped')"])
assert write.returncode == 0 and connect.returncode == 0, (write, connect)
'''
    result = run_program(program, timeout_s=10)
    assert not result.passed, result
    assert not marker.exists() and received == []


@pytest.mark.parametrize("ending", ["loops until the timeout", "exits"])
def test_setsid_child_does_not_outlive_the_run(kind, ending):
    token = f"{random.randint(10**6, 10**7)}.5"  # `sleep 1234567.5`: findable on the host by its argv
    program = NO_AUDIT + f'subprocess.Popen(["sleep", "{token}"], start_new_session=True)\n'
    program += "import time\ntime.sleep(0.3)\n" + ("while True:\n    pass\n" if "loops" in ending else "")
    try:
        result = run_program(program, timeout_s=2)
        assert result.status == ("timeout" if "loops" in ending else "passed"), result
        assert _processes_with(f"sleep\0{token}") == []
    finally:
        for pid in _processes_with(f"sleep\0{token}"):  # the old sandbox leaves it behind: end it
            os.kill(pid, signal.SIGKILL)


def test_pidfd_send_signal_cannot_reach_a_host_process(kind):
    victim = subprocess.Popen(["sleep", "60"])
    try:
        program = ("import os, signal\n"
                   f"signal.pidfd_send_signal(os.pidfd_open({victim.pid}), signal.SIGKILL)\n")
        result = run_program(program, timeout_s=5)
        assert not result.passed, result
        time.sleep(0.2)
        assert victim.poll() is None, "the sandboxed program killed a host process"
    finally:
        victim.kill()
        victim.wait()


def test_proc_self_mem_cannot_be_opened_for_writing(kind):
    result = run_program('f = open("/proc/self/mem", "r+b")\nassert f.writable()\n', timeout_s=5)
    assert not result.passed, result


def test_filesystem_outside_its_tmp_is_invisible_or_read_only(kind, tmp_path):
    repo = Path(code.__file__).resolve().parents[2]
    marker = tmp_path / "marker"
    program = f'''
import os
assert os.getcwd() == "/tmp"
open("/tmp/scratch", "w").write("its own /tmp is writable")
for hidden in ({str(tmp_path)!r}, {str(repo / "lmforge")!r}, "/proc", "/sys", "/home", "/run", "/var"):
    assert not os.path.exists(hidden), hidden
for path in ({str(marker)!r}, "/escaped", "/usr/escaped", "/etc/escaped", "/dev/escaped",
             {sys.prefix + "/escaped"!r}):
    try:
        open(path, "w").write("escaped")
    except OSError:
        pass
    else:
        raise AssertionError("wrote " + path)
'''
    result = run_program(program, timeout_s=5)
    assert result.passed, result  # every check above held inside the sandbox
    assert not marker.exists()


def test_program_is_unprivileged_and_cannot_nest_namespaces(kind):
    program = NO_AUDIT + '''
import os
assert os.getuid() != 0 and os.geteuid() != 0
for attempt in (lambda: os.chroot("/tmp"), lambda: os.setuid(0)):
    try:
        attempt()
    except OSError:  # EPERM, or EINVAL for a uid the user namespace does not map
        pass
    else:
        raise AssertionError("privileged call succeeded")
assert subprocess.run(["unshare", "--user", "--map-root-user", "true"]).returncode != 0
'''
    result = run_program(program, timeout_s=10)
    assert result.passed, result


def test_process_count_is_capped(kind):
    if kind == "user" and os.geteuid() == 0:
        pytest.skip("the kernel exempts host uid 0 from RLIMIT_NPROC, and a user namespace made by root maps "
                    "to uid 0; as root the sandbox uses the 'root' kind, tested here")
    program = NO_AUDIT + f'children = [subprocess.Popen(["sleep", "5"]) for _ in range({MAX_PROCESSES + 4})]\n'
    result = run_program(program, timeout_s=10)
    assert result.status == "failed" and "Resource temporarily unavailable" in result.detail, result


def test_setup_failure_is_an_error_not_a_failed_program(kind, monkeypatch):
    paths = code._host_paths()
    monkeypatch.setattr(code, "_host_paths", lambda: [*paths, "/nonexistent-lmforge-path"])
    with pytest.raises(LmforgeError, match="sandbox setup failed: .*nonexistent-lmforge-path"):
        run_program("pass", timeout_s=5)


@pytest.fixture
def fresh_probe() -> Iterator[None]:
    code._sandbox_problem.cache_clear()
    code._warn_unisolated.cache_clear()
    yield
    code._sandbox_problem.cache_clear()


def test_without_unshare_it_refuses_unless_told_to_run_unisolated(fresh_probe, monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # no `unshare` to be found
    monkeypatch.delenv(code.SANDBOX_ENV, raising=False)
    assert "unshare" in code.sandbox_problem()
    with pytest.raises(LmforgeError, match=f"cannot isolate generated code: .*unshare.*{code.SANDBOX_ENV}=none"):
        run_program(f"{RIGHT}{TESTS}")
    monkeypatch.setenv(code.SANDBOX_ENV, "nonsense")
    with pytest.raises(LmforgeError, match="unknown sandbox isolation 'nonsense'"):
        run_program("pass")
    # the explicit opt-in: warned, limits and the sentinel still apply
    monkeypatch.setenv(code.SANDBOX_ENV, "none")
    with pytest.warns(RuntimeWarning, match="WITHOUT namespace isolation"):
        results = run_programs([f"{RIGHT}{TESTS}", f"{WRONG}import sys\nsys.exit(0)\n{TESTS}",
                                "while True:\n    pass\n"], timeout_s=2, workers=1)
    assert [r.status for r in results] == ["passed", "failed", "timeout"]


def test_a_python_installation_under_tmp_is_bound_inside_the_private_tmp(tmp_path):
    """A virtualenv under the host's /tmp (a CI clone, say) stays visible: the sandbox's private /tmp is mounted
    first and the installation bound inside it, not hidden by it."""
    import subprocess
    import sys
    from pathlib import Path

    import lmforge

    if not str(tmp_path).startswith("/tmp/"):
        pytest.skip(f"needs a temporary directory under /tmp, got {tmp_path}")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    script = ("from lmforge.eval.code import run_program\n"
              "print(run_program('assert sum([1, 2]) == 3', timeout_s=20).status)\n"
              "print(run_program('assert 1 == 2', timeout_s=20).status)\n")
    site = [p for p in sys.path if p.endswith("site-packages")]  # torch etc. from the running environment
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(lmforge.__file__).parent.parent), *site])}
    out = subprocess.run([str(venv / "bin" / "python"), "-c", script], capture_output=True, text=True, env=env,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["passed", "failed"]

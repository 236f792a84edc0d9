"""Functional correctness of generated code: pass@k, with each program run in an isolated sandbox.

**How a sample is decided.** The harness draws a random 128-bit secret per run and writes it into a pipe
that becomes the program's stdin. The guard (``_GUARD``, the interpreter's ``__main__``) first moves that
pipe to a private descriptor and puts ``/dev/null`` on stdin, then executes the program (solution + tests
as one module). Only when that module body *returns normally* does the guard read the secret, write it as
the last line of stdout and ``os._exit(0)``. The harness scores *passed* only for exit status 0 **and**
stdout ending in that line. So ``sys.exit(0)``, ``raise SystemExit``, ``os._exit(0)``, an ``atexit``
handler forcing status 0 after a failed assert, a signal, or printing something sentinel-shaped all score
failed: none of them reaches the end of the tests, and before that point the secret exists only in the
pipe — not in argv, the environment, any file, or the interpreter's memory. What this cannot stop is code
written *against this harness* that reads the pipe itself (it is a descriptor of its own process): code
under test runs in the same interpreter as its asserts, so no in-process sentinel is unforgeable by a
program that targets it. Such code has to read a descriptor it was never told about; ordinary cheating
(exiting early, forcing the exit status, faking output) does not work.

**The boundary: Linux namespaces** (``unshare`` from util-linux, no extra package). Each program runs in new
PID, mount, network, IPC, UTS and cgroup namespaces — plus a user namespace when lmforge does not run as
root — and:

* sees a private root built from read-only bind mounts of ``/usr`` (and the ``/bin``, ``/lib*`` links
  or dirs), ``/etc/ld.so.cache`` and the Python installation(s) in use, a minimal ``/dev`` (null, zero,
  full, random, urandom) and a private size-capped ``noexec`` tmpfs ``/tmp`` (its working directory).
  Nothing else of the host filesystem exists there: no ``/proc``, ``/sys``, ``/home``, ``/run``, host
  ``/tmp``, sockets of host daemons; it can write nowhere but its own ``/tmp``;
* has no network: a fresh network namespace holds only a loopback that is down (no host loopback,
  no abstract unix sockets of the host);
* sees only its own processes (PID namespace) and so can signal, ``pidfd_open`` or ``ptrace`` nothing
  outside; when its init (our setup process) exits, or the harness kills it on timeout, the kernel
  kills every process in the namespace, ``setsid``/daemonised children included, before the run returns;
* runs unprivileged: as root the program gets an unused uid (one per run), otherwise uid 1000 of a new
  user namespace mapped to the caller; the capability bounding and ambient sets are emptied and
  ``no_new_privs`` is set, so it cannot remount, ``chroot`` out or gain privileges through setuid files.
  It is ``chroot``-ed (after ``MS_MOVE`` of the new root), which also makes the kernel refuse it new
  user namespaces;
* has ``RLIMIT_AS`` (memory: a runaway allocation raises ``MemoryError``), ``RLIMIT_CPU`` (a backstop to
  the wall-clock timeout), ``RLIMIT_FSIZE`` (stdout/stderr go to capped files, never into our memory),
  ``RLIMIT_NPROC`` (``MAX_PROCESSES`` processes and threads), ``RLIMIT_NOFILE`` and no core files. The
  kernel exempts host uid 0 from ``RLIMIT_NPROC``; that is why root runs the program under an unused uid
  rather than in a user namespace, whose only uid would map to root.

What is *not* isolated: it is the same kernel (a kernel bug reachable from an unprivileged process is
reachable from the sandbox; there is no seccomp filter), CPU time and memory bandwidth are shared with
the host (no cgroup quota; only the per-process limits above), it can read the bound directories
(``/usr``, the Python installation), and nothing stops it from spending its time budget.

An audit hook (``sys.addaudithook``) stays as defence in depth and gives a clear ``blocked`` status: it
refuses sockets, process creation, ``os.kill``, ``ctypes`` loading, ``resource.setrlimit``, ``gc`` object
walks and replacing a function's ``__code__``/``__defaults__``. It keeps no mutable state (its blocked
set is a constant of its code) but it is Python inside the program's own interpreter, so it is not the
boundary — the namespaces are.

**Without namespaces** (``unshare`` missing, or not permitted, as in a default Docker container): every
run raises :class:`~lmforge.errors.LmforgeError` naming the reason. Running unisolated is an explicit
opt-in: ``LMFORGE_SANDBOX=none`` (or ``isolation="none"``) keeps the sentinel, the rlimits and the audit
hook — so early exits still fail — but is *not* a security boundary, and warns once per process.
"""

from __future__ import annotations

import functools
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lmforge.errors import LmforgeError

MAX_OUTPUT_BYTES = 1 << 20  # per output file (RLIMIT_FSIZE)
MAX_PROCESSES = 16  # RLIMIT_NPROC inside the sandbox; threads count too
MAX_OPEN_FILES = 256
TMP_MB = 64  # size of the sandbox's private /tmp
SANDBOX_ENV = "LMFORGE_SANDBOX"  # "namespaces" (default) or "none" (explicit opt-in to run unisolated)
_USER_NS_UID = 1000  # the program's uid inside a user namespace (non-root callers)
_SETUP_FAILED = "lmforge sandbox setup failed: "

# Runs in the program's own interpreter: limits (again, for isolation="none"), the audit hook, the
# program, then — only if its module body returned — the secret from the pipe that arrived as stdin.
_GUARD = r'''
import os, resource, sys
_read, _write, _exit, _flush_std = os.read, os.write, os._exit, (sys.stdout.flush, sys.stderr.flush)
_secret_fd = os.dup(0)  # the harness's pipe; non-inheritable, so no child gets it
_null = os.open("/dev/null", os.O_RDONLY)
os.dup2(_null, 0)
os.close(_null)
path, mem, cpu, fsize, nproc, nofile = sys.argv[1], *(int(x) for x in sys.argv[2:7])
for limit, value in ((resource.RLIMIT_AS, mem), (resource.RLIMIT_CPU, cpu), (resource.RLIMIT_FSIZE, fsize),
                     (resource.RLIMIT_CORE, 0), (resource.RLIMIT_NPROC, nproc), (resource.RLIMIT_NOFILE, nofile)):
    if value >= 0:
        resource.setrlimit(limit, (value, value))
with open(path, encoding="utf-8") as f:
    _code = compile(f.read(), "solution.py", "exec")
def _hook(event, args, _deny=PermissionError):
    # constants only: no global, closure or mutable set the program could reach and change
    if event in {"socket.__new__", "socket.connect", "socket.bind", "socket.getaddrinfo", "socket.gethostbyname",
                 "socket.gethostbyaddr", "socket.sendto", "subprocess.Popen", "os.system", "os.exec",
                 "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty", "pty.spawn", "os.kill", "os.killpg",
                 "signal.pthread_kill", "ctypes.dlopen", "ctypes.dlsym", "ctypes.cdata", "resource.setrlimit",
                 "resource.prlimit", "gc.get_objects", "gc.get_referrers", "gc.get_referents", "sys.addaudithook"}:
        raise _deny("lmforge sandbox: " + event + " is not allowed")
    if event == "object.__setattr__" and args[1] in {"__code__", "__defaults__", "__kwdefaults__"}:
        raise _deny("lmforge sandbox: replacing a function's " + str(args[1]) + " is not allowed")
sys.addaudithook(_hook)
del _hook, f, path, mem, cpu, fsize, nproc, nofile, limit, value
exec(_code, {"__name__": "__main__"})
for _flush in (*_flush_std, sys.stdout.flush, sys.stderr.flush):
    _flush()
_write(1, b"\n" + _read(_secret_fd, 64) + b"\n")
_exit(0)
'''

# Runs as init (PID 1) of the new namespaces, still privileged there: builds the private root, then forks
# the program's process, which drops every privilege before exec'ing the guard. Errors go to the "ready"
# pipe (close-on-exec), so the harness can tell a broken sandbox from a failing program.
_SETUP = r'''
import ctypes, fcntl, json, os, signal, sys
cfg = json.loads(sys.argv[1])
ready = fcntl.fcntl(cfg["ready_fd"], fcntl.F_DUPFD_CLOEXEC, 10)
os.close(cfg["ready_fd"])
def fail(message):
    try:
        os.write(ready, (cfg["failed"] + message).encode("utf-8", "replace"))
    finally:
        os._exit(125)
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT = 1, 2, 4, 8, 32
MS_BIND, MS_MOVE, MS_REC, MS_PRIVATE = 4096, 8192, 16384, 1 << 18
libc = ctypes.CDLL(None, use_errno=True)
libc.mount.argtypes = (ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p)
libc.prctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong)
def mount(source, target, fstype, flags, data=None):
    enc = lambda s: None if s is None else s.encode()
    if libc.mount(enc(source), enc(target), enc(fstype), flags, enc(data)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {source or fstype} on {target} (flags {flags:#x}): {os.strerror(err)}")
def prctl(option, arg=0):
    if libc.prctl(option, arg, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl({option}, {arg}): {os.strerror(err)}")
def locked_flags(path):
    # flags a bind remount must keep (the kernel refuses to clear them inside a user namespace)
    f = os.statvfs(path).f_flag
    out = f & (MS_NOSUID | MS_NODEV | MS_NOEXEC | 1024 | 2048)  # ST_NOATIME/ST_NODIRATIME == MS_ bits
    return out | ((1 << 21) if f & 4096 else 0)  # ST_RELATIME -> MS_RELATIME
def bind_ro(source, target, extra):
    mount(source, target, None, MS_BIND)
    mount(None, target, None, MS_REMOUNT | MS_BIND | MS_RDONLY | extra | locked_flags(source))
def place(path, root):
    target = root + path
    os.makedirs(os.path.dirname(target), mode=0o755, exist_ok=True)
    if os.path.islink(path):
        os.symlink(os.readlink(path), target)
    elif os.path.isdir(path):
        os.makedirs(target, mode=0o755, exist_ok=True)
        bind_ro(path, target, MS_NOSUID | MS_NODEV)
    else:
        open(target, "w").close()
        bind_ro(path, target, MS_NOSUID | MS_NODEV)
try:
    root = cfg["root"]
    mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing we mount propagates to the host
    mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,nr_inodes=4096,mode=0755")
    # The private /tmp first: a Python installation (a virtualenv) under the host's /tmp is then bound inside it
    # rather than hidden by it.
    os.makedirs(root + "/tmp", mode=0o755)
    mount("tmpfs", root + "/tmp", "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC,
          f"size={cfg['tmp_mb']}m,nr_inodes=4096,mode=0700")
    for path in cfg["paths"]:
        place(path, root)
    os.makedirs(root + "/dev", mode=0o755)
    mount("tmpfs", root + "/dev", "tmpfs", MS_NOSUID | MS_NOEXEC, "size=64k,nr_inodes=64,mode=0755")
    for name in ("null", "zero", "full", "random", "urandom"):
        open(f"{root}/dev/{name}", "w").close()
        mount(f"/dev/{name}", f"{root}/dev/{name}", None, MS_BIND)
    mount(None, root + "/dev", None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NOEXEC)
    with open(cfg["solution"], "rb") as src, open(root + "/tmp/solution.py", "wb") as dst:
        dst.write(src.read())
    os.chown(root + "/tmp", cfg["uid"], cfg["uid"])
    mount(None, root, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)
    os.chdir(root)
    mount(root, "/", None, MS_MOVE)
    os.chroot(".")
    os.chdir("/tmp")
    prctl(4, 0)  # PR_SET_DUMPABLE 0: the program cannot ptrace or read this privileged process
    signal.signal(signal.SIGINT, signal.SIG_IGN)
except BaseException as e:
    fail(f"{type(e).__name__}: {e}")
pid = os.fork()
if pid == 0:
    try:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.closerange(3, ready)
        os.closerange(ready + 1, 1 << 16)
        import resource
        for limit, value in ((resource.RLIMIT_AS, cfg["mem"]), (resource.RLIMIT_CPU, cfg["cpu"]),
                             (resource.RLIMIT_FSIZE, cfg["fsize"]), (resource.RLIMIT_CORE, 0),
                             (resource.RLIMIT_NPROC, cfg["nproc"]), (resource.RLIMIT_NOFILE, cfg["nofile"])):
            resource.setrlimit(limit, (value, value))
        prctl(47, 4)  # PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL
        cap = 0
        while libc.prctl(24, cap, 0, 0, 0) == 0:  # PR_CAPBSET_DROP every capability, until EINVAL
            cap += 1
        if cap < 32:
            fail(f"could not drop capability {cap}: {os.strerror(ctypes.get_errno())}")
        if cfg["setuid"]:
            os.setgroups([])
        os.setresgid(cfg["uid"], cfg["uid"], cfg["uid"])
        os.setresuid(cfg["uid"], cfg["uid"], cfg["uid"])  # a non-zero uid: effective/permitted caps cleared
        prctl(38, 1)  # PR_SET_NO_NEW_PRIVS
        os.write(ready, b"ok")
        os.execve(cfg["argv"][0], cfg["argv"], cfg["env"])
    except BaseException as e:
        fail(f"{type(e).__name__}: {e}")
os.close(ready)
os.dup2(os.open("/dev/null", os.O_RDONLY), 0)  # init never holds the secret
while True:  # reap orphans; when the program exits, so does init, and the kernel kills the rest
    try:
        done, status = os.wait()
    except InterruptedError:
        continue
    if done == pid:
        code = os.waitstatus_to_exitcode(status)
        os._exit(code if code >= 0 else 128 - code)
'''


@dataclass
class ExecResult:
    """``status``: passed | failed | timeout | memory | blocked."""

    status: str
    seconds: float
    detail: str = ""

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from ``n`` samples of which ``c`` pass (Chen et al. 2021, eq. 1):
    1 - C(n-c, k) / C(n, k), as a numerically stable product."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise LmforgeError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:  # every size-k subset contains a passing sample
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def _sandbox_kind() -> str:
    """``root``: namespaces without a user namespace, the program under an unused uid; ``user``: a user
    namespace too (needed without root), the program as uid 1000 there, mapped to the caller."""
    return "root" if os.geteuid() == 0 else "user"


def _isolation(isolation: str | None) -> str:
    value = isolation if isolation is not None else os.environ.get(SANDBOX_ENV, "namespaces")
    if value not in ("namespaces", "none"):
        raise LmforgeError(f"unknown sandbox isolation {value!r} (from {'isolation=' if isolation else SANDBOX_ENV}); "
                           "use 'namespaces' or 'none'")
    if value == "none":
        _warn_unisolated()
    return value


@functools.lru_cache(maxsize=1)
def _warn_unisolated() -> None:
    warnings.warn("lmforge.eval.code runs generated code WITHOUT namespace isolation (isolation='none'): only "
                  "rlimits and an audit hook, which is not a security boundary", RuntimeWarning, stacklevel=4)


@functools.lru_cache(maxsize=4)
def _sandbox_problem(kind: str) -> str | None:
    if shutil.which("unshare") is None:
        return "the `unshare` command (util-linux) is not on PATH"
    try:
        probe = _run("print('ok')", 10.0, 256, "namespaces", kind)
    except (LmforgeError, OSError) as e:
        return str(e)
    return None if probe.passed else f"a trivial program did not pass in the sandbox: {probe.status} {probe.detail}"


def sandbox_problem() -> str | None:
    """Why programs cannot run namespace-isolated here (``None`` when they can). Probed once per process."""
    return _sandbox_problem(_sandbox_kind())


def run_program(source: str, timeout_s: float = 5.0, memory_mb: int = 512, *,
                isolation: str | None = None) -> ExecResult:
    """Run ``source`` (solution and tests as one script) in the sandbox described in the module docstring.

    Passed means it ran to the end of its module body: exit status 0 *and* the per-run secret as the last
    line of stdout. ``isolation``: "namespaces" (default, or from ``LMFORGE_SANDBOX``) or "none"."""
    mode = _isolation(isolation)
    if mode == "namespaces":
        kind = _sandbox_kind()
        problem = _sandbox_problem(kind)
        if problem is not None:
            raise LmforgeError(f"cannot isolate generated code: {problem}. Run where `unshare --user --pid --net "
                               f"--mount --fork true` works (root, or unprivileged user namespaces allowed), or set "
                               f"{SANDBOX_ENV}=none to run it with only rlimits and an audit hook (not a security "
                               "boundary)")
        return _run(source, timeout_s, memory_mb, mode, kind)
    return _run(source, timeout_s, memory_mb, mode, "")


def _host_paths() -> list[str]:
    """What the sandbox's root shows, read-only: the system's library dirs and the Python in use."""
    paths = [p for p in ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc/ld.so.cache",
                         "/etc/localtime") if os.path.lexists(p)]
    for p in (sys.base_prefix, sys.base_exec_prefix, sys.prefix, sys.exec_prefix,
              os.path.dirname(sys.executable), os.path.dirname(os.path.realpath(sys.executable))):
        for q in (os.path.abspath(p), os.path.realpath(p)):
            if q not in paths:
                paths.append(q)
    out: list[str] = []  # parents before children; a path inside an already bound dir is already there
    for p in sorted(paths, key=lambda q: q.count("/")):
        real_dirs = [q for q in out if not os.path.islink(q)]
        if p != "/" and not any(p == q or p.startswith(q.rstrip("/") + "/") for q in real_dirs):
            out.append(p)
    return out


def _run(source: str, timeout_s: float, memory_mb: int, mode: str, kind: str) -> ExecResult:
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="lmforge-exec-") as tmp:
        d = Path(tmp)
        (d / "solution.py").write_text(source, encoding="utf-8")
        secret = secrets.token_hex(16).encode()
        cpu = max(1, int(timeout_s) + 1)
        limits = [memory_mb << 20, cpu, MAX_OUTPUT_BYTES]
        env = {"PATH": os.defpath, "HOME": "/tmp", "TMPDIR": "/tmp", "LANG": "C.UTF-8", "PYTHONHASHSEED": "0"}
        secret_r, secret_w = os.pipe()
        ready_r, ready_w = os.pipe()
        os.write(secret_w, secret)
        os.close(secret_w)
        pass_fds: tuple[int, ...] = ()
        if mode == "namespaces":
            (d / "root").mkdir()
            uid = _USER_NS_UID if kind == "user" else 0x50000000 + secrets.randbelow(1 << 24)  # one per run
            guard = [sys.executable, "-I", "-B", "-c", _GUARD, "/tmp/solution.py",
                     *map(str, limits), str(MAX_PROCESSES), str(MAX_OPEN_FILES)]
            cfg = {"root": str(d / "root"), "solution": str(d / "solution.py"), "paths": _host_paths(),
                   "tmp_mb": TMP_MB, "uid": uid, "setuid": kind == "root", "ready_fd": ready_w,
                   "failed": _SETUP_FAILED, "argv": guard, "env": env, "mem": limits[0], "cpu": cpu,
                   "fsize": MAX_OUTPUT_BYTES, "nproc": MAX_PROCESSES, "nofile": MAX_OPEN_FILES}
            user = ["--user", f"--map-user={_USER_NS_UID}", f"--map-group={_USER_NS_UID}", "--keep-caps"]
            argv = [shutil.which("unshare") or "unshare", "--pid", "--fork", "--kill-child", "--mount", "--net",
                    "--ipc", "--uts", "--cgroup", "--propagation", "private", *(user if kind == "user" else []),
                    "--", sys.executable, "-I", "-S", "-B", "-c", _SETUP, json.dumps(cfg)]
            pass_fds = (ready_w,)
        else:  # no RLIMIT_NPROC: unisolated it would count every process of this user
            argv = [sys.executable, "-I", "-B", "-c", _GUARD, str(d / "solution.py"), *map(str, limits), "-1",
                    str(MAX_OPEN_FILES)]
            env = {**env, "HOME": tmp, "TMPDIR": tmp}
        timed_out = False
        try:
            with open(d / "stdout", "wb") as out, open(d / "stderr", "wb") as err:
                proc = subprocess.Popen(argv, cwd=tmp, env=env, stdin=secret_r, stdout=out, stderr=err,
                                        pass_fds=pass_fds, start_new_session=True)
                os.close(ready_w)
                ready_w = -1
                try:
                    rc = proc.wait(timeout=timeout_s)
                except subprocess.TimeoutExpired:
                    timed_out = True
                finally:
                    _kill(proc, mode)
            ready = _read_all(ready_r)
        finally:
            for fd in (secret_r, ready_r, ready_w):
                if fd >= 0:
                    os.close(fd)
        with open(d / "stdout", "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 256))
            tail = f.read()
        stderr = (d / "stderr").read_bytes()[-4000:].decode("utf-8", "replace")
    seconds = time.perf_counter() - start
    if timed_out:
        return ExecResult("timeout", seconds, f"exceeded {timeout_s:g}s")
    if mode == "namespaces":
        if not ready:  # unshare or our setup failed before the program could start
            raise LmforgeError(f"the sandbox did not start (`unshare` exited {rc}): "
                               f"{stderr.strip()[-500:] or 'no message'}")
        if ready != b"ok":
            raise LmforgeError(ready.decode("utf-8", "replace").removeprefix("ok"))
        if 128 < rc <= 128 + 64:  # init reports the program's death by signal N as 128 + N
            rc = 128 - rc
    if rc == 0 and tail.endswith(b"\n" + secret + b"\n"):
        return ExecResult("passed", seconds)
    if rc in (-signal.SIGXCPU, -signal.SIGKILL):
        return ExecResult("timeout", seconds, "CPU time limit")
    last = stderr.strip().splitlines()[-1] if stderr.strip() else f"exit status {rc}"
    if "MemoryError" in stderr:
        return ExecResult("memory", seconds, last)
    if "lmforge sandbox:" in stderr:
        return ExecResult("blocked", seconds, last)
    if rc == 0:
        return ExecResult("failed", seconds, "exited with status 0 before the end of the program "
                          "(no completion sentinel): the tests did not all run")
    return ExecResult("failed", seconds, last)


def _read_all(fd: int) -> bytes:
    os.set_blocking(fd, False)  # every writer is gone by now; never wait on a stray one
    chunks = []
    while True:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def _kill(proc: subprocess.Popen, mode: str) -> None:
    """Kill what the program left. Namespaces: SIGKILL the namespace's init (``unshare``'s child); the
    kernel then kills every process in it and ``unshare`` returns only once they are gone."""
    if mode == "namespaces":
        try:
            children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        except OSError:  # unshare already exited, and with it the namespace
            children = []
        for child in children:  # still unshare's unreaped child, so the pid cannot have been reused
            try:
                os.kill(int(child), signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # its process group: everything when unisolated
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def run_programs(sources: Sequence[str], timeout_s: float = 5.0, memory_mb: int = 512,
                 workers: int | None = None, *, isolation: str | None = None) -> list[ExecResult]:
    """``run_program`` over many sources, a few at a time (threads only wait on child processes)."""
    workers = workers or max(1, min(4, os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda s: run_program(s, timeout_s, memory_mb, isolation=isolation), sources))


_FENCE = re.compile(r"^[ \t]*(```+|~~~+)[ \t]*([\w+.-]*)[^\n]*$", re.MULTILINE)
_PYTHON_TAGS = ("", "python", "python3", "py")


def extract_code(completion: str) -> str:
    """The program in a completion: the code of its Markdown fence (```python ... ```) if it has one.

    * no fence line: the completion unchanged (a plain continuation of the prompt);
    * the first fence closes an implicit block (a bare fence after indented code, or after any code
      when no other fence follows): the text before it, as a continuation of the prompt;
    * otherwise the first block tagged python/py (or untagged, else any), up to its closing fence or the
      end of the text when generation stopped inside the block. Prose around the fence is dropped.
    """
    fences = list(_FENCE.finditer(completion))
    if not fences:
        return completion
    first = fences[0]
    before = completion[:first.start()]
    if before.strip() and not first.group(2):
        lead = next(line for line in before.splitlines() if line.strip())
        if len(fences) == 1 or lead[:1] in (" ", "\t"):
            return before
    blocks = []  # (tag, code) of each opening fence and what follows it up to its closing fence
    i = 0
    while i < len(fences):
        opening = fences[i]
        closing = next((f for f in fences[i + 1:] if f.group(1)[0] == opening.group(1)[0]
                        and len(f.group(1)) >= len(opening.group(1)) and not f.group(2)), None)
        end = closing.start() if closing else len(completion)
        blocks.append((opening.group(2).lower(), completion[opening.end() + 1:end]))
        if closing is None:
            break
        i = fences.index(closing) + 1
    for tag, code in blocks:
        if tag in _PYTHON_TAGS:
            return code
    return blocks[0][1]


def _compiles(source: str) -> bool:
    try:  # compiling model output runs none of it
        compile(source, "solution.py", "exec")
        return True
    except Exception:  # SyntaxError, ValueError (NUL bytes), RecursionError/MemoryError on odd nesting
        return False


def build_program(prompt: str, completion: str, tests: str, entry_point: str | None = None) -> str:
    """The script that decides a sample: the code, the tests, then ``check(entry_point)`` when the tests
    follow the HumanEval convention of defining ``check(candidate)``.

    The code is ``prompt + completion``, except for a completion with a Markdown fence (a chat reply),
    whose fenced code (:func:`extract_code`) is used: indented code continues the prompt's function body;
    a whole definition follows the prompt (whose imports stay in scope and whose stub it replaces), or,
    when that does not compile (a prompt ending mid-statement), stands alone."""
    code = extract_code(completion)
    if code == completion or code.lstrip("\r\n")[:1] in (" ", "\t") or not code.strip():
        source = f"{prompt}{code}"
    else:
        source = f"{prompt}\n{code}" if _compiles(f"{prompt}\n{code}") else code
    program = f"{source}\n\n{tests}\n"
    if entry_point:
        program += f"\ncheck({entry_point})\n"
    return program

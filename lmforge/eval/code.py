"""Functional correctness of generated code: pass@k, with each program run in a limited subprocess.

The sandbox, honestly stated. Each program runs in a fresh ``python -I`` process, in its own temporary
directory and session, with:

* a wall-clock timeout (the whole process group is killed) and an ``RLIMIT_CPU`` backstop;
* ``RLIMIT_AS`` (address space) as the memory limit, so a runaway allocation raises ``MemoryError``;
* ``RLIMIT_FSIZE`` on files it writes (stdout/stderr go to capped files, never into our memory);
* a ``sys.addaudithook`` hook that refuses socket creation/connection/DNS, process creation (fork,
  exec, subprocess, os.system, posix_spawn), signals to other processes and ``ctypes`` loading.

This stops ordinary Python code from using the network or escaping the limits. It is *not* a security
boundary: there is no network or filesystem namespace (``unshare``/containers are not assumed), so
native code already loaded into the interpreter could still reach the network, and the program can read
(and, within the size limit, write) any file the user can. Run untrusted model output in a container.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lmforge.errors import LmforgeError

# Runs inside the child before the solution: limits first, then the audit hook (which cannot be removed).
_GUARD = r'''
import resource, sys
mem, cpu, fsize = (int(x) for x in sys.argv[2:5])
for limit, value in ((resource.RLIMIT_AS, mem), (resource.RLIMIT_CPU, cpu), (resource.RLIMIT_FSIZE, fsize),
                     (resource.RLIMIT_CORE, 0)):
    resource.setrlimit(limit, (value, value))
with open(sys.argv[1], encoding="utf-8") as f:
    source = f.read()
BLOCKED = {"socket.__new__", "socket.connect", "socket.bind", "socket.getaddrinfo", "socket.gethostbyname",
           "socket.sendto", "subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork",
           "os.forkpty", "os.kill", "os.killpg", "ctypes.dlopen", "ctypes.dlsym", "resource.setrlimit",
           "resource.prlimit"}
def _hook(event, args):
    if event in BLOCKED:
        raise PermissionError("lmforge sandbox: " + event + " is not allowed")
sys.addaudithook(_hook)
del _hook
exec(compile(source, "solution.py", "exec"), {"__name__": "__main__"})
'''

MAX_OUTPUT_BYTES = 1 << 20


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


def run_program(source: str, timeout_s: float = 5.0, memory_mb: int = 512) -> ExecResult:
    """Run ``source`` as a script under the limits above; exit status 0 means it passed."""
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="lmforge-exec-") as tmp:
        d = Path(tmp)
        (d / "solution.py").write_text(source, encoding="utf-8")
        (d / "guard.py").write_text(_GUARD, encoding="utf-8")
        cpu = max(1, int(timeout_s) + 1)
        argv = [sys.executable, "-I", "-B", str(d / "guard.py"), str(d / "solution.py"),
                str(memory_mb << 20), str(cpu), str(MAX_OUTPUT_BYTES)]
        env = {"PATH": os.defpath, "HOME": tmp, "TMPDIR": tmp, "LANG": "C.UTF-8", "PYTHONHASHSEED": "0"}
        with open(d / "stdout", "wb") as out, open(d / "stderr", "wb") as err:
            proc = subprocess.Popen(argv, cwd=tmp, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                    start_new_session=True)  # its own process group, killed as a whole
            try:
                rc = proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                _kill_group(proc)
                return ExecResult("timeout", time.perf_counter() - start, f"exceeded {timeout_s:g}s")
            finally:
                _kill_group(proc)  # anything it left behind in its group
        stderr = (d / "stderr").read_bytes()[-4000:].decode("utf-8", "replace")
    seconds = time.perf_counter() - start
    if rc == 0:
        return ExecResult("passed", seconds)
    if rc in (-signal.SIGXCPU, -signal.SIGKILL):
        return ExecResult("timeout", seconds, "CPU time limit")
    last = stderr.strip().splitlines()[-1] if stderr.strip() else f"exit status {rc}"
    if "MemoryError" in stderr:
        return ExecResult("memory", seconds, last)
    if "lmforge sandbox:" in stderr:
        return ExecResult("blocked", seconds, last)
    return ExecResult("failed", seconds, last)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def run_programs(sources: Sequence[str], timeout_s: float = 5.0, memory_mb: int = 512,
                 workers: int | None = None) -> list[ExecResult]:
    """``run_program`` over many sources, a few at a time (threads only wait on child processes)."""
    workers = workers or max(1, min(4, os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda s: run_program(s, timeout_s, memory_mb), sources))


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

"""Device names and the CPU allocator setting the engine applies."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest
import torch

from lmforge.errors import ConfigError
from lmforge.models.device import pick_device

PROBE = ("import ctypes; from lmforge.models.device import keep_freed_cpu_memory as k; "
         "print(k(), k())")


def test_pick_device_names():
    assert pick_device("cpu") == torch.device("cpu")
    assert pick_device(torch.device("cpu")) == torch.device("cpu")
    with pytest.raises(ConfigError, match="unknown device"):
        pick_device("tpu")


def _probe(**env: str) -> str:
    run = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120,
                         env={**os.environ, **env})
    assert run.returncode == 0, run.stderr
    return run.stdout.strip()


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")
def test_keep_freed_cpu_memory_is_on_once_and_can_be_turned_off():
    assert _probe(LMFORGE_KEEP_FREED_MEMORY="1") == "True True"
    assert _probe(LMFORGE_KEEP_FREED_MEMORY="0") == "False False"

"""The subcommand registry: each stage's ``cli`` module registers its commands here with ``@command``.

A bottom module (it imports nothing from lmforge), so a stage registers commands without importing the
top-level CLI; ``lmforge.cli`` imports the stage modules and builds the parser from ``COMMANDS``.
"""

from __future__ import annotations

import argparse
from typing import Callable

AddArgs = Callable[[argparse.ArgumentParser], None]
Run = Callable[[argparse.Namespace], int]

COMMANDS: dict[str, tuple[str, AddArgs, Run]] = {}

# The one --quantize flag of the commands that load a model to run it (``lmforge serve`` serves a directory that
# ``lmforge quantize`` wrote instead).
QUANTIZE_FLAG: dict = dict(default=None, choices=["int8", "int4", "keep"],
                           help="weight-only quantization of the linears for the CPU low-bit kernels (int4: group 32; "
                                "keep: a .gguf file's Q8_0/Q4_0/Q4_1 blocks as they are)")

# The one --visual-tokens flag of the commands that run a LLaVA-style model (``llava.set_visual_tokens``).
VISUAL_TOKENS_FLAG: dict = dict(default=None, metavar="METHOD:SHARE",
                                help="training-free visual token reduction for a LLaVA model: hired:SHARE (keep the "
                                     "tokens the vision class token attends to most), tome:SHARE (merge similar "
                                     "tokens in the vision tower), fastv:SHARE[@LAYER] (prune image tokens after "
                                     "decoder block LAYER, default 2; not in the engine)")

# The one --device flag of every command that runs a model.
DEVICE_FLAG: dict = dict(default="auto", help="auto (cuda:LOCAL_RANK when there is a GPU, else cpu) | cpu | cuda | cuda:N")


def command(name: str, help: str):  # noqa: A002 - argparse's word
    """Register ``fn(args) -> exit code`` with an ``add_args(parser)`` hook as a subcommand."""

    def wrap(add_args: AddArgs):
        def register(fn: Run):
            COMMANDS[name] = (help, add_args, fn)
            return fn

        return register

    return wrap


__all__ = ["COMMANDS", "DEVICE_FLAG", "QUANTIZE_FLAG", "VISUAL_TOKENS_FLAG", "command"]

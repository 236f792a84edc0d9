"""The ``lmforge`` command line: output a person reads, and errors without tracebacks."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from lmforge.cli import main

from .models.hf_factory import save_hf_model

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def mixtral_dir(tmp_path_factory):
    return save_hf_model("mixtral", tmp_path_factory.mktemp("mixtral") / "m")


def test_inspect_reports_architecture(mixtral_dir, capsys):
    assert main(["inspect", str(mixtral_dir)]) == 0
    out = capsys.readouterr().out
    assert "MixtralForCausalLM (mixtral)" in out
    assert "top-2 of 4" in out and "context_length" in out and "float32" in out


def test_inspect_json_parameter_count_matches_weights(mixtral_dir, capsys):
    import transformers
    assert main(["inspect", "--json", str(mixtral_dir)]) == 0
    info = json.loads(capsys.readouterr().out)
    hf = transformers.AutoModelForCausalLM.from_pretrained(mixtral_dir)
    assert f"{sum(p.numel() for p in hf.parameters()):,}" in info["parameters"]


def test_errors_are_one_line_without_traceback(tmp_path):
    r = subprocess.run([sys.executable, "-m", "lmforge.cli", "inspect", str(tmp_path)], capture_output=True, text=True)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert r.stderr.startswith("lmforge inspect: error:") and "config.json" in r.stderr


def test_generate_rejects_bad_arguments(mixtral_dir, capsys):
    assert main(["generate", "--model", str(mixtral_dir), "--prompt", "hi", "--top-p", "1.5"]) == 2
    assert "--top-p must be in (0, 1]" in capsys.readouterr().err


def test_every_device_flag_defaults_to_auto():
    import argparse

    from lmforge.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    with_device = {name: next((a.default for a in p._actions if "--device" in a.option_strings), None)
                   for name, p in sub.choices.items()}
    with_device = {k: v for k, v in with_device.items() if v is not None}
    assert {"generate", "serve", "chat", "eval", "pretrain", "sft", "dpo", "rm", "grpo", "ppo"} <= set(with_device)
    assert set(with_device.values()) == {"auto"}, with_device

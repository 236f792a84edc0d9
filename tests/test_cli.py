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


@pytest.fixture(scope="module")
def chat_dir(tmp_path_factory):
    from .serve.tiny_server import save_tiny_chat_model

    return save_tiny_chat_model(tmp_path_factory.mktemp("chat") / "m")


def test_generate_reports_prefill_and_decode_rates_apart(chat_dir, capsys):
    import re

    from lmforge.data.tokenizer import load_tokenizer

    assert main(["generate", "--model", str(chat_dir), "--prompt", "the quick brown", "--max-new-tokens", "6",
                 "--dtype", "bfloat16"]) == 0
    err = capsys.readouterr().err.strip()
    m = re.fullmatch(r"\[prefill: (\d+) tokens in \d+\.\d\ds, (?:\d+\.\d|-) tokens/s; "
                     r"decode: (\d+) tokens in \d+\.\d\ds, (?:\d+\.\d|-) tokens/s; (\d+) new tokens\]", err)
    assert m, err
    prefill, decoded, new = map(int, m.groups())
    assert prefill == len(load_tokenizer(chat_dir).encode("the quick brown"))
    assert 1 <= new <= 6 and decoded == new - 1


def test_generation_rates_line():
    from lmforge.cli import generation_rates

    assert generation_rates(100, 0.5, 33, 2.0) == \
        "[prefill: 100 tokens in 0.50s, 200.0 tokens/s; decode: 32 tokens in 2.00s, 16.0 tokens/s; 33 new tokens]"
    assert generation_rates(4, 0.01, 1, 0.0).endswith("decode: 0 tokens in 0.00s, - tokens/s; 1 new tokens]")


@pytest.mark.parametrize("argv", [["generate", "--prompt", "hi", "--model"], ["chat", "--model"],
                                  ["serve", "--model"], ["inspect"]])
def test_a_truncated_gguf_file_is_one_clear_line(argv, tmp_path, capsys):
    gguf = tmp_path / "model.Q4_K_M.gguf"
    gguf.write_bytes(b"GGUF\x03\x00\x00\x00")  # the magic and version, then nothing
    assert main([*argv, str(gguf)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    if argv == ["inspect"]:  # inspect reads Hugging Face directories only, and says where GGUF is read
        assert "is a GGUF file" in err and "load_model and load_tokenizer" in err
    else:
        assert f"{gguf}: cannot read the GGUF file" in err and "truncated or corrupt" in err


def test_load_model_and_load_tokenizer_name_a_broken_gguf_file(tmp_path):
    from lmforge.data.tokenizer import load_tokenizer
    from lmforge.errors import CheckpointError
    from lmforge.models.checkpoint import load_model

    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"GGUF")
    for load in (load_model, load_tokenizer):
        with pytest.raises(CheckpointError, match="tiny.gguf: cannot read the GGUF file .*truncated or corrupt"):
            load(gguf)
    other = tmp_path / "notes.txt"
    other.write_text("x")
    with pytest.raises(CheckpointError, match="is a file, not a tokenizer directory"):
        load_tokenizer(other)


def test_generate_chat_and_serve_take_dtype(chat_dir, monkeypatch):
    import torch

    import lmforge.serve.cli
    import lmforge.serve.server
    from lmforge.cli import build_parser

    for name in ("generate", "chat", "serve"):
        extra = ["--prompt", "hi"] if name == "generate" else []
        args = build_parser().parse_args([name, "--model", str(chat_dir), *extra, "--dtype", "bfloat16"])
        assert args.dtype == "bfloat16"
        assert build_parser().parse_args([name, "--model", str(chat_dir), *extra]).dtype == "float32"

    seen = {}
    monkeypatch.setattr(lmforge.serve.cli, "chat_loop",
                        lambda model, tokenizer, **kw: seen.update(chat=model.dtype) or 0)
    monkeypatch.setattr(lmforge.serve.server, "serve", lambda path, **kw: seen.update(serve=kw["dtype"]))
    assert main(["chat", "--model", str(chat_dir), "--dtype", "bfloat16"]) == 0
    assert main(["serve", "--model", str(chat_dir), "--dtype", "float16"]) == 0
    assert seen == {"chat": torch.bfloat16, "serve": torch.float16}

"""``lmforge chat``'s loop: Ctrl-C during a reply stops the reply and returns to the prompt; Ctrl-C or Ctrl-D at
the prompt leaves cleanly, on a fresh line."""

from __future__ import annotations

import io

import pytest
import torch

import lmforge.models
from lmforge.cli import main
from lmforge.data.tokenizer import load_tokenizer
from lmforge.models.checkpoint import load_model

from .tiny_server import save_tiny_chat_model


@pytest.fixture(scope="module")
def chat_dir(tmp_path_factory):
    return save_tiny_chat_model(tmp_path_factory.mktemp("chat") / "m")


def scripted(*lines):
    """A stand-in for ``input``: returns the lines in turn, raising those that are exceptions."""
    prompts = []
    queue = list(lines)

    def read(prompt: str) -> str:
        prompts.append(prompt)
        item = queue.pop(0)
        if isinstance(item, BaseException) or (isinstance(item, type) and issubclass(item, BaseException)):
            raise item
        return item

    return read, prompts


class Terminal(io.StringIO):
    """A stdin that says it is a terminal and gives its lines one by one, raising those that are exceptions
    (as Ctrl-C or Ctrl-D at ``input`` would)."""

    def __init__(self, *lines) -> None:
        super().__init__()
        self.lines = list(lines)

    def isatty(self) -> bool:
        return True

    def readline(self, *args) -> str:
        item = self.lines.pop(0)
        if isinstance(item, type) and issubclass(item, BaseException):
            raise item
        return item


def interrupt_first_reply(monkeypatch, tokens):
    """Patch generate_stream: the first reply yields ``tokens`` then gets Ctrl-C; later ones run as usual."""
    real = lmforge.models.generate_stream
    calls = []

    def stream(model, ids, **kwargs):
        calls.append(ids[0].tolist())
        if len(calls) == 1:  # Ctrl-C lands while the model computes the next token
            for t in tokens:
                yield torch.tensor([t])
            raise KeyboardInterrupt
        yield from real(model, ids, **kwargs)

    monkeypatch.setattr(lmforge.models, "generate_stream", stream)
    return calls


def test_chat_command_ctrl_c_stops_the_reply_not_the_chat(chat_dir, monkeypatch, capsys):
    tok = load_tokenizer(chat_dir)
    calls = interrupt_first_reply(monkeypatch, tok.encode(" the quick"))
    monkeypatch.setattr("sys.stdin", Terminal("hello there\n", "and then?\n", ""))  # "": Ctrl-D
    assert main(["chat", "--model", str(chat_dir), "--max-new-tokens", "3", "--temperature", "0"]) == 0
    out = capsys.readouterr().out
    assert len(calls) == 2 and out.count("you> ") == 3 and "[stopped]" in out
    assert out.endswith("\n") and not out.endswith("you> ")  # Ctrl-D leaves the shell a fresh line


def test_chat_command_ctrl_c_at_the_prompt_quits_cleanly(chat_dir, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", Terminal(KeyboardInterrupt))
    assert main(["chat", "--model", str(chat_dir)]) == 0
    captured = capsys.readouterr()
    assert captured.out.endswith("you> \n") and "interrupted" not in captured.err


def test_ctrl_c_during_a_reply_stops_it_and_returns_to_the_prompt(chat_dir, monkeypatch):
    from lmforge.serve.cli import chat_loop

    model, tok = load_model(chat_dir), load_tokenizer(chat_dir)
    partial = tok.encode(" the quick")
    calls = interrupt_first_reply(monkeypatch, partial)
    read, prompts = scripted("hello there", "and then?", EOFError)
    out = io.StringIO()
    assert chat_loop(model, tok, read=read, out=out, temperature=0.0, max_new_tokens=4) == 0
    assert prompts == ["you> "] * 3  # back at the prompt after the stopped reply, and after the next one
    text = out.getvalue()
    assert text.startswith("model> " + tok.decode(partial) + " [stopped]\nmodel> ")
    assert text.count("model> ") == 2 and text.endswith("\n\n")  # Ctrl-D: a newline after the last reply
    # The words shown before Ctrl-C stay in the conversation the next turn continues.
    history = [{"role": "user", "content": "hello there"}, {"role": "assistant", "content": tok.decode(partial)},
               {"role": "user", "content": "and then?"}]
    assert calls[1] == tok.apply_chat_template(history, add_generation_prompt=True)


def test_ctrl_c_before_any_word_forgets_the_question(chat_dir, monkeypatch):
    from lmforge.serve.cli import chat_loop

    model, tok = load_model(chat_dir), load_tokenizer(chat_dir)
    calls = []

    def interrupted(model, ids, **kwargs):
        calls.append(ids[0].tolist())
        raise KeyboardInterrupt
        yield

    monkeypatch.setattr(lmforge.models, "generate_stream", interrupted)
    read, _ = scripted("first", "second", KeyboardInterrupt)
    assert chat_loop(model, tok, read=read, out=io.StringIO()) == 0
    assert calls[1] == tok.apply_chat_template([{"role": "user", "content": "second"}], add_generation_prompt=True)


@pytest.mark.parametrize("key", [EOFError, KeyboardInterrupt], ids=["ctrl-d", "ctrl-c"])
def test_ctrl_d_or_ctrl_c_at_the_prompt_leaves_on_a_fresh_line(key, chat_dir):
    from lmforge.serve.cli import chat_loop

    model, tok = load_model(chat_dir), load_tokenizer(chat_dir)
    read, prompts = scripted(key)
    out = io.StringIO()
    assert chat_loop(model, tok, read=read, out=out) == 0
    assert prompts == ["you> "] and out.getvalue() == "\n"


def test_chat_command_reads_piped_stdin(chat_dir, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\n/reset\nworld\n"))
    assert main(["chat", "--model", str(chat_dir), "--max-new-tokens", "3", "--temperature", "0",
                 "--dtype", "bfloat16"]) == 0
    out = capsys.readouterr().out
    assert out.count("model> ") == 2 and "you> " not in out and out.endswith("\n")

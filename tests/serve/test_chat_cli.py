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


# ---- images: `lmforge chat --image` and `/image PATH` with vision-language models ------------------------------
def record_streams(monkeypatch):
    """Patch generate_stream to run as usual while recording each call's prompt ids, image tensors and tokens."""
    real = lmforge.models.generate_stream
    calls = []

    def stream(model, ids, **kwargs):
        call = {"ids": ids[0].tolist(), "kwargs": kwargs, "tokens": []}
        calls.append(call)
        for token in real(model, ids, **kwargs):
            call["tokens"].append(int(token[0]))
            yield token

    monkeypatch.setattr(lmforge.models, "generate_stream", stream)
    return calls


IMAGE_KEYS = ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask", "cross_attention_mask")


def assert_reply_is_generate(call, model, batch, max_new_tokens, stops):
    """The chat turn ran on ``batch`` (the processor's ids and image tensors) and its greedy tokens are
    ``generate``'s on that batch, token for token."""
    assert call["ids"] == batch["input_ids"][0].tolist()
    images = {k: v for k, v in batch.items() if k not in ("input_ids", "attention_mask")}
    assert set(images) == {k for k in IMAGE_KEYS if call["kwargs"].get(k) is not None}
    for key, value in images.items():
        assert torch.equal(call["kwargs"][key], value), key
    expected = lmforge.models.generate(model, batch["input_ids"], batch["attention_mask"], **images,
                                       max_new_tokens=max_new_tokens, temperature=0.0, eos_ids=stops)[0].tolist()
    assert call["tokens"] == expected and expected


def user(text, n_images=0):
    if not n_images:
        return {"role": "user", "content": text}
    return {"role": "user", "content": [*({"type": "image"} for _ in range(n_images)), {"type": "text", "text": text}]}


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    pytest.importorskip("PIL")
    from tests.models.test_llava import drawn_images

    path = tmp_path_factory.mktemp("pictures")
    images = drawn_images()
    images[0].save(path / "cat.png")
    images[2].save(path / "dog.png")
    (path / "garbage.png").write_bytes(b"this is not an image at all")
    return path


def save_llava_chat_dir(path, context=None):
    pytest.importorskip("transformers")
    from tests.models.test_llava import build_hf_llava, hf_image_processor, write_tokenizer

    build_hf_llava("clip_llama").save_pretrained(path)
    hf_image_processor("clip").save_pretrained(path)
    write_tokenizer(path)
    if context is not None:
        import json

        config = json.loads((path / "config.json").read_text())
        config["text_config"]["max_position_embeddings"] = context
        (path / "config.json").write_text(json.dumps(config))
    return path


@pytest.fixture(scope="module")
def llava_chat(tmp_path_factory):
    from lmforge.data.image_processor import load_processor

    path = save_llava_chat_dir(tmp_path_factory.mktemp("llava_chat"))
    return path, load_model(path), load_tokenizer(path), load_processor(path)


def chat_stops(model, tok):
    from lmforge.models.generate import default_eos_ids

    return list(dict.fromkeys([*tok.eos_ids, *default_eos_ids(model)]))


def test_chat_image_flag_goes_with_the_first_message(llava_chat, pictures, monkeypatch):
    from lmforge.data.image_processor import load_image
    from lmforge.serve.cli import chat_loop

    _, model, tok, processor = llava_chat
    calls = record_streams(monkeypatch)
    cat = load_image(pictures / "cat.png")
    read, _ = scripted("what is this ?", EOFError)
    out = io.StringIO()
    assert chat_loop(model, tok, read=read, out=out, temperature=0.0, max_new_tokens=6, processor=processor,
                     images=[cat]) == 0
    batch = processor.apply_chat_template([user("what is this ?", 1)], images=[cat])
    assert (batch["input_ids"] == model.config.image_token_id).sum() == model.config.num_image_tokens  # expanded
    assert len(calls) == 1
    assert_reply_is_generate(calls[0], model, batch, 6, chat_stops(model, tok))
    reply = [t for t in calls[0]["tokens"] if t not in chat_stops(model, tok)]
    assert out.getvalue().startswith("model> " + tok.decode(reply))


def test_chat_slash_image_attaches_to_the_next_message_and_stays(llava_chat, pictures, monkeypatch):
    from lmforge.data.image_processor import load_image
    from lmforge.serve.cli import chat_loop

    _, model, tok, processor = llava_chat
    stops = chat_stops(model, tok)
    calls = record_streams(monkeypatch)
    cat, dog = load_image(pictures / "cat.png"), load_image(pictures / "dog.png")
    read, prompts = scripted(f"/image {pictures / 'cat.png'}", "what is this ?", "hi", f"/image '{pictures / 'dog.png'}'",
                             "what is this ?", "/reset", "hi", EOFError)
    out = io.StringIO()
    assert chat_loop(model, tok, read=read, out=out, temperature=0.0, max_new_tokens=4, processor=processor) == 0
    assert len(calls) == 4 and len(prompts) == 8
    assert f"[image {pictures / 'cat.png'} goes with your next message]" in out.getvalue()
    replies = [tok.decode([t for t in call["tokens"] if t not in stops]) for call in calls]
    history = [user("what is this ?", 1)]
    assert_reply_is_generate(calls[0], model, processor.apply_chat_template(history, images=[cat]), 4, stops)
    # the next question: the image stays in the conversation, re-rendered with it
    history += [{"role": "assistant", "content": replies[0]}, user("hi")]
    assert_reply_is_generate(calls[1], model, processor.apply_chat_template(history, images=[cat]), 4, stops)
    # a second image, on the third question: both images, in order
    history += [{"role": "assistant", "content": replies[1]}, user("what is this ?", 1)]
    batch = processor.apply_chat_template(history, images=[cat, dog])
    assert batch["pixel_values"].shape[0] == 2
    assert_reply_is_generate(calls[2], model, batch, 4, stops)
    # /reset clears the images with the conversation: back to the tokenizer's text path
    assert calls[3]["ids"] == tok.apply_chat_template([user("hi")], add_generation_prompt=True)
    assert calls[3]["kwargs"].get("pixel_values") is None


def test_chat_bad_image_path_is_named_and_the_chat_goes_on(llava_chat, pictures, monkeypatch):
    from lmforge.serve.cli import chat_loop

    _, model, tok, processor = llava_chat
    calls = record_streams(monkeypatch)
    missing, garbage = pictures / "missing.png", pictures / "garbage.png"
    read, prompts = scripted(f"/image {missing}", f"/image {garbage}", "/image", "hi", EOFError)
    out = io.StringIO()
    assert chat_loop(model, tok, read=read, out=out, temperature=0.0, max_new_tokens=3, processor=processor) == 0
    lines = out.getvalue().splitlines()
    assert lines[0] == f"[/image: image file {missing} does not exist]"
    assert lines[1].startswith(f"[/image: cannot read image file {garbage}") and lines[1].endswith("]")
    assert lines[2] == "[/image takes a file: /image PATH]"
    assert lines[3].startswith("model> ") and len(prompts) == 5
    # no image came through: the question went alone
    assert len(calls) == 1 and calls[0]["kwargs"].get("pixel_values") is None


def test_chat_context_check_counts_the_expanded_image_tokens(tmp_path, pictures, monkeypatch):
    """LLaVA's one <image> becomes 16 positions: 22 with the template's words, past a 20-token context, though
    the unexpanded prompt is 7 tokens."""
    from lmforge.data.image_processor import load_processor
    from lmforge.serve.cli import chat_loop

    path = save_llava_chat_dir(tmp_path / "m", context=20)
    model, tok = load_model(path), load_tokenizer(path)
    calls = record_streams(monkeypatch)
    read, _ = scripted(f"/image {pictures / 'cat.png'}", "what is this ?", "hi", EOFError)
    out = io.StringIO()
    assert chat_loop(model, tok, read=read, out=out, temperature=0.0, max_new_tokens=3,
                     processor=load_processor(path)) == 0
    text = out.getvalue()
    assert "[the conversation (22 tokens with its images) is longer than the model's context (20)" in text
    assert "its 1 image(s) too" in text
    # the message and its image were dropped: the next question runs alone, as text
    assert len(calls) == 1 and calls[0]["ids"] == tok.apply_chat_template([user("hi")], add_generation_prompt=True)


def test_chat_images_to_a_text_only_model(chat_dir, pictures, capsys):
    from lmforge.errors import LmforgeError
    from lmforge.serve.cli import chat_loop

    cat = str(pictures / "cat.png")
    assert main(["chat", "--model", str(chat_dir), "--image", cat]) == 2
    err = capsys.readouterr().err
    assert "--image needs a vision-language model (model_type llava or mllama)" in err and "text-only llama" in err
    model, tok = load_model(chat_dir), load_tokenizer(chat_dir)
    with pytest.raises(LmforgeError, match=r"needs a vision-language model \(model_type llava or mllama\)"):
        chat_loop(model, tok, read=scripted(EOFError)[0], out=io.StringIO(), images=[cat])
    read, prompts = scripted(f"/image {cat}", "hello", EOFError)
    out = io.StringIO()
    assert chat_loop(model, tok, read=read, out=out, temperature=0.0, max_new_tokens=3) == 0
    lines = out.getvalue().splitlines()
    assert lines[0].startswith(f"[/image {cat}: an image needs a vision-language model (model_type llava or mllama)")
    assert "text-only llama model" in lines[0] and lines[1].startswith("model> ") and len(prompts) == 3


def test_chat_command_with_image_piped(llava_chat, pictures, monkeypatch, capsys):
    path = llava_chat[0]
    calls = record_streams(monkeypatch)
    monkeypatch.setattr("sys.stdin", io.StringIO(f"what is this ?\n/image {pictures / 'dog.png'}\nhi\n"))
    assert main(["chat", "--model", str(path), "--image", str(pictures / "cat.png"), "--max-new-tokens", "3",
                 "--temperature", "0"]) == 0
    out = capsys.readouterr().out
    assert out.count("model> ") == 2 and "goes with your next message" in out
    assert [call["kwargs"]["pixel_values"].shape[0] for call in calls] == [1, 2]
    capsys.readouterr()
    assert main(["chat", "--model", str(path), "--image", str(pictures / "missing.png")]) == 2
    assert f"image file {pictures / 'missing.png'} does not exist" in capsys.readouterr().err


@pytest.fixture(scope="module")
def mllama_chat(tmp_path_factory):
    pytest.importorskip("transformers")
    from lmforge.data.image_processor import load_processor
    from tests.models.test_mllama import build_hf_mllama, hf_image_processor, write_tokenizer

    path = tmp_path_factory.mktemp("mllama_chat")
    build_hf_mllama().save_pretrained(path)
    hf_image_processor().save_pretrained(path)
    write_tokenizer(path)
    return path, load_model(path), load_tokenizer(path), load_processor(path)


def test_chat_mllama_image_and_a_second_question(mllama_chat, pictures, monkeypatch):
    from lmforge.data.image_processor import load_image
    from lmforge.serve.cli import chat_loop

    _, model, tok, processor = mllama_chat
    stops = chat_stops(model, tok)
    calls = record_streams(monkeypatch)
    cat = load_image(pictures / "cat.png")
    read, _ = scripted("what is this ?", "and this ?", EOFError)
    assert chat_loop(model, tok, read=read, out=io.StringIO(), temperature=0.0, max_new_tokens=4,
                     processor=processor, images=[cat]) == 0
    assert len(calls) == 2
    history = [user("what is this ?", 1)]
    batch = processor.apply_chat_template(history, images=[cat])
    assert batch["cross_attention_mask"].shape[:3] == (1, len(calls[0]["ids"]), 1)
    assert_reply_is_generate(calls[0], model, batch, 4, stops)
    history += [{"role": "assistant", "content": tok.decode([t for t in calls[0]["tokens"] if t not in stops])},
                user("and this ?")]
    assert_reply_is_generate(calls[1], model, processor.apply_chat_template(history, images=[cat]), 4, stops)

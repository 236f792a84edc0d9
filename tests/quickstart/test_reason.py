"""`lmforge quickstart-reason`: thinking delimiters in the tokenizer, the embedding resize, the selection curves,
and the whole pipeline on a stand-in quickstart run (tiny model, a step or two of everything)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from lmforge import save_model
from lmforge.cli import main
from lmforge.data.synthetic import addition_problems, addition_reason_examples, write_jsonl
from lmforge.data.tokenizer import load_tokenizer, train_bpe_tokenizer
from lmforge.errors import LmforgeError
from lmforge.models.checkpoint import load_model
from lmforge.models.config import Config
from lmforge.models.model import Transformer
from lmforge.models.resize import resize_token_embeddings
from lmforge.models.thinking import ThinkingBudget
from lmforge.quickstart.reason import add_thinking_tokens, build_base, selection_curves, thinking_tokens

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (see tests/conftest.py)


def _tiny(vocab: int, tied: bool) -> Transformer:
    cfg = Config.from_hf({"model_type": "llama", "vocab_size": vocab, "hidden_size": 32, "intermediate_size": 64,
                          "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                          "max_position_embeddings": 256, "tie_word_embeddings": tied})
    return Transformer(cfg).init_weights(std=0.05, seed=0)


def _tokenizer():
    texts = [m["content"] for r in addition_reason_examples(addition_problems(300, seed=0), "think")
             for m in r["messages"]]
    return train_bpe_tokenizer(texts, vocab_size=300)


@pytest.mark.parametrize("tied", [True, False])
def test_resize_keeps_old_logits_and_mean_initialises_new_rows(tied):
    model = _tiny(100, tied)
    ids = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(0))
    before = model(ids).detach()
    embed_before = model.model.embed_tokens.weight.detach().clone()
    head_before = model.lm_head.weight.detach().clone()
    resize_token_embeddings(model, 103)
    assert model.config.vocab_size == 103
    assert model.model.embed_tokens.weight.shape == (103, 32) and model.lm_head.weight.shape == (103, 32)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    after = model(ids).detach()
    torch.testing.assert_close(after[..., :100], before)  # old tokens' logits unchanged
    for weight, old in ((model.model.embed_tokens.weight, embed_before), (model.lm_head.weight, head_before)):
        torch.testing.assert_close(weight[:100], old)
        torch.testing.assert_close(weight[100:], old.mean(0, keepdim=True).expand(3, -1))
    # The new logits are the mean logit over the old vocabulary (the head's rows are the mean row).
    torch.testing.assert_close(after[..., 100], before.mean(-1), atol=1e-5, rtol=1e-5)
    # Gradients reach the new rows; a tied model still has one embedding parameter.
    model(torch.tensor([[101, 102]])).sum().backward()
    assert model.model.embed_tokens.weight.grad[101].abs().sum() > 0
    assert len(list(model.parameters())) == len({id(p) for p in model.parameters()})
    assert resize_token_embeddings(model, 103) is model
    with pytest.raises(LmforgeError):
        resize_token_embeddings(model, 50)


def test_thinking_tokens_are_single_ids_kept_in_text_and_saved(tmp_path):
    tok = _tokenizer()
    n = tok.vocab_size
    ids = add_thinking_tokens(tok)
    assert ids == [n, n + 1] and tok.vocab_size == n + 2
    assert add_thinking_tokens(tok) == ids  # idempotent
    text = "<think>7+5=12; 4+8+1=13; carry 1</think>132"
    enc = tok.encode(text, add_special_tokens=False)
    assert enc[0] == ids[0] and ids[1] in enc and tok.decode(enc) == text  # not dropped by skip_special_tokens
    budget = ThinkingBudget.from_tokenizer(tok, max_tokens=4)
    assert (budget.start_ids, budget.end_ids) == ((ids[0],), (ids[1],))
    # build_base: the model grows to the tokenizer, and both reload from the directory.
    src = tmp_path / "pretrained"
    save_model(_tiny(n, True), src, tokenizer=_tokenizer())
    base, info = build_base(src, tmp_path / "base")
    assert info == {"vocab_before": n, "vocab_after": n + 2, "think_ids": ids}
    assert load_model(base).config.vocab_size == n + 2
    assert load_tokenizer(base).encode("<think>", add_special_tokens=False) == [ids[0]]
    assert thinking_tokens([5, ids[0], 7, 8, 9, ids[1], 3], ids) == 3
    assert thinking_tokens([ids[0], 7, 8], ids) == 2 and thinking_tokens([7, 8], ids) == 0


def test_selection_curves_by_hand():
    def out(text: str, tokens: int = 3) -> SimpleNamespace:
        return SimpleNamespace(text=text, token_ids=list(range(tokens)))

    good, bad = "<think>1+1=2</think>2", "<think>1+1=3</think>3"
    problems = [(1, 1)]
    samples = [[out(bad), out(good), out(good), out("<think>1+1=3</think>3")]]
    verifier = [[0.0, 1.0, 1.0, 0.0]]
    rm = [[5.0, 1.0, 2.0, 3.0]]
    curves = selection_curves(samples, problems, True, [1, 2, 4], verifier, rm)
    # N=1: groups [bad], [good], [good], [bad] -> 1/2; N=2: [bad, good] majority tie -> first (bad), [good, bad]
    # -> good; N=4: two votes each, first-sampled (bad) wins.
    assert [r["accuracy"] for r in curves["majority"]] == [0.5, 0.5, 0.0]
    assert [r["accuracy"] for r in curves["verifier"]] == [0.5, 1.0, 1.0]
    assert [r["accuracy"] for r in curves["rm"]] == [0.5, 0.0, 0.0]  # the RM prefers a wrong sample
    assert [r["accuracy"] for r in curves["pass"]] == [0.5, 1.0, 1.0]
    assert [r["generated_tokens"] for r in curves["majority"]] == [3.0, 6.0, 12.0]


def test_quickstart_reason_runs_every_stage(tmp_path, capsys):
    run = tmp_path / "qs"
    tok = _tokenizer()
    save_model(_tiny(tok.vocab_size, True), run / "pretrain" / "checkpoints" / "step-00000002" / "model", tokenizer=tok)
    save_model(_tiny(tok.vocab_size, True), run / "sft", tokenizer=tok)
    (run / "summary.json").write_text(json.dumps({"checkpoint": str(run / "sft")}))
    # The quickstart's SFT data: its additions must stay out of the held-out set.
    seen = addition_problems(50, seed=10_000, min_digits=1, max_digits=1)  # the draw the held-out set starts from
    write_jsonl(addition_reason_examples(seen, "direct"), run / "data" / "skills_train.jsonl")
    args = ["quickstart-reason", "--run", str(run), "--train-size", "40", "--min-digits", "1", "--max-digits", "1", "--sft-steps", "1", "--batch-size", "4",
            "--test-size", "3", "--max-n", "2", "--caps", "0,4", "--extend", "8", "--rm-prompts", "4",
            "--rm-steps", "1", "--temperature", "1.0"]
    assert main(args) == 0
    out = run / "reason"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["test_size"] == 3 and summary["base"]["vocab_after"] == tok.vocab_size + 2
    assert summary["start"] == "sft" and summary["start_checkpoint"] == str(run / "sft")
    test = [tuple(map(int, r["messages"][0]["content"][8:-1].split(" + ")))
            for r in map(json.loads, (out / "data" / "test.jsonl").read_text().splitlines())]
    assert len(test) == 3 and not set(test) & set(seen)
    assert [r["kind"] for r in summary["budget"]] == ["forced", "forced", "natural", "extended"]
    assert summary["budget"][0]["max_thinking_tokens"] == 0 and summary["budget"][3]["min_thinking_tokens"] == 8
    for r in summary["budget"]:
        assert 0.0 <= r["accuracy"] <= 1.0
    forced = summary["budget"][:2]
    assert forced[0]["thinking_tokens"] == 0.0 and forced[1]["thinking_tokens"] <= 4.0  # the caps hold
    assert [r["n"] for r in summary["curves"]["think"]["majority"]] == [1, 2]
    assert {"majority", "verifier", "pass"} <= set(summary["curves"]["think"])
    assert (out / "budget.png").is_file() and (out / "best_of_n.png").is_file()
    assert "| think: majority@N |" in (out / "report.md").read_text()
    assert "[5/5]" in capsys.readouterr().out

    assert main(["quickstart-reason", "--run", str(tmp_path / "missing")]) == 2
    assert "lmforge quickstart" in capsys.readouterr().err
    assert main(args + ["--max-n", "3"]) == 2
    # --base pretrained starts from the last pretraining checkpoint.
    assert main(args + ["--base", "pretrained", "--out", str(tmp_path / "from_pretrained")]) == 0
    assert json.loads((tmp_path / "from_pretrained" / "summary.json").read_text())["start"] == "pretrained"

"""Budget forcing (s1): the rule itself (``ThinkingState`` on plain ids, no model), its bad inputs, and
``generate`` with it on a tiny model whose behaviour at the delimiters is fixed by its weights."""

from __future__ import annotations

import pytest
import torch

from lmforge.errors import LmforgeError
from lmforge.models.generate import generate
from lmforge.models.thinking import ThinkingBudget, check_budget_numbers

from .thinking_model import END, START, closing, thinking_model, thinking_tokenizer

S, E = 900, 901  # delimiter ids for the rule tests
WAIT = (700, 701, 702)  # a three-token extension
ANS = (800, 801)


def run(budget: ThinkingBudget, prompt: list[int], sampled: list[int]) -> list[int]:
    """What the rule makes of a model that would emit ``sampled`` one after another (forced tokens take the
    place of model steps, as in ``generate``)."""
    state, out, pending = budget.start(prompt), [], []
    for token in sampled:
        if not pending:
            pending = state.advance(token)
        out.append(pending.pop(0))
    return out + pending


# ---- the rule -------------------------------------------------------------------------------------
def test_the_end_delimiter_comes_exactly_after_max_thinking_tokens_then_the_answer_prefix():
    budget = ThinkingBudget((S,), (E,), max_tokens=5, answer_prefix_ids=ANS)
    out = run(budget, [1, 2, S], list(range(10, 30)))
    assert out[:5] == [10, 11, 12, 13, 14]
    assert out[5:8] == [E, *ANS]
    assert out[8:] == list(range(18, 30))  # the model's later choices are its own again (the forced steps skipped)


def test_the_thinking_is_counted_from_the_output_when_the_prompt_does_not_open_it():
    budget = ThinkingBudget((S,), (E,), max_tokens=3)
    out = run(budget, [1, 2], [10, 11, S, 12, 13, 14, 15, 16])
    assert out == [10, 11, S, 12, 13, 14, E, 16]  # 3 tokens after the model's own <think>


def test_a_closed_think_in_the_prompt_does_not_open_the_output():
    budget = ThinkingBudget((S,), (E,), max_tokens=2)
    assert run(budget, [S, 5, E, 6], [10, 11, 12, 13]) == [10, 11, 12, 13]
    assert run(budget, [S, 5, E, S, 7], [10, 11, 12, 13]) == [10, 11, E, 13]  # the last one is open
    assert not budget.opens_in([]) and not budget.opens_in([E, 1]) and budget.opens_in([E, S])


def test_cap_zero_with_an_open_prompt_closes_before_the_model_writes_anything():
    budget = ThinkingBudget((S,), (E,), max_tokens=0, answer_prefix_ids=ANS)
    assert run(budget, [S], [10, 11, 12, 13]) == [E, *ANS, 13]


def test_below_the_minimum_the_end_delimiter_is_replaced_by_the_extension_counted_in_tokens():
    budget = ThinkingBudget((S,), (E,), min_tokens=4, extension_ids=WAIT)
    # the model wants to close at once and at every step after
    out = run(budget, [S], [E] * 12)
    # E at count 0 -> WAIT (count 3); E at count 3 < 4 -> WAIT (count 6); E at count 6 is kept
    assert out[:7] == [*WAIT, *WAIT, E]
    state = budget.start([S])
    state.advance(E)
    assert state.count == 3 and state.inside
    assert state.advance(E) == list(WAIT) and state.count == 6
    assert state.advance(E) == [E] and not state.inside and state.count == 6


def test_at_or_above_the_minimum_the_model_closes_by_itself_and_nothing_is_added():
    budget = ThinkingBudget((S,), (E,), min_tokens=2, max_tokens=10, extension_ids=WAIT, answer_prefix_ids=ANS)
    out = run(budget, [S], [10, 11, E, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22])
    assert out == [10, 11, E, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22]  # the answer is not thinking


def test_the_cap_cuts_an_extension_short():
    budget = ThinkingBudget((S,), (E,), min_tokens=5, max_tokens=5, extension_ids=WAIT, answer_prefix_ids=ANS)
    state = budget.start([S])
    assert state.advance(E) == list(WAIT)  # count 3
    assert state.advance(E) == [WAIT[0], WAIT[1], E, *ANS]  # count 5 after two of three: the cap wins


def test_a_model_that_never_closes_is_closed_at_the_cap_and_a_reopening_is_closed_at_once():
    budget = ThinkingBudget((S,), (E,), max_tokens=2)
    out = run(budget, [S], [10, 11, 12, S, 13, 14])
    assert out == [10, 11, E, S, E, 14]


def test_multi_token_delimiters_across_the_prompt_boundary_and_a_partly_written_end():
    budget = ThinkingBudget((S, 1), (S, 2), min_tokens=1, max_tokens=3, extension_ids=WAIT[:1])
    assert budget.opens_in([5, S, 1]) and not budget.opens_in([S, 1, 7, S, 2])
    # the prompt ends with the start's first token; the output's first token completes it
    state = budget.start([5, S])
    assert not state.inside and state.advance(1) == [1] and state.inside
    # below the minimum the end's first token is what gets replaced
    assert state.advance(S) == [WAIT[0]] and state.count == 1
    assert state.advance(10) == [10] and state.count == 2
    # the model starts the end delimiter as the cap is reached: only its missing token is forced
    assert state.advance(S) == [S, 2]
    assert not state.inside


def test_a_natural_multi_token_close_does_not_count_the_delimiter():
    budget = ThinkingBudget((S, 1), (S, 2), max_tokens=10)
    state = budget.start([S, 1])
    for t in (10, 11, S, 2):
        assert state.advance(t) == [t]
    assert not state.inside and state.count == 2


# ---- bad input ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, message", [
    (dict(max_tokens=-1), "max_thinking_tokens must be an integer >= 0, got -1"),
    (dict(min_tokens=-2, extension_ids=WAIT), "min_thinking_tokens must be an integer >= 0, got -2"),
    (dict(min_tokens=5, max_tokens=4, extension_ids=WAIT),
     "min_thinking_tokens (5) is larger than max_thinking_tokens (4)"),
    (dict(min_tokens=1), "needs a non-empty extension"),
    (dict(min_tokens=1, extension_ids=(E,)), "must not contain the end delimiter"),
    (dict(max_tokens=True), "max_thinking_tokens must be an integer"),
    (dict(max_tokens=3, answer_prefix_ids=(7, S)), "the answer prefix must not contain the start thinking delimiter"),
])
def test_bad_budgets_are_one_clear_error(kwargs, message):
    with pytest.raises(LmforgeError) as e:
        ThinkingBudget((S,), (E,), **kwargs)
    assert message in str(e.value)


def test_budgets_at_or_past_the_output_length_are_refused():
    check_budget_numbers(0, 15, 16)
    with pytest.raises(LmforgeError, match=r"max_thinking_tokens \(16\) must be below max_tokens \(16\)"):
        check_budget_numbers(0, 16, 16)
    with pytest.raises(LmforgeError, match=r"min_thinking_tokens \(20\) must be below max_new_tokens \(8\)"):
        check_budget_numbers(20, None, 8, "max_new_tokens")


def test_delimiters_from_the_tokenizer_and_a_tokenizer_without_them():
    tok = thinking_tokenizer()
    budget = ThinkingBudget.from_tokenizer(tok, max_tokens=4, min_tokens=1, answer_prefix=" the answer is")
    assert budget.start_ids == (tok.backend.token_to_id(START),) and budget.end_ids == (tok.backend.token_to_id(END),)
    assert budget.extension_ids == tuple(tok.encode("Wait", add_special_tokens=False))
    assert budget.answer_prefix_ids == tuple(tok.encode(" the answer is", add_special_tokens=False))
    with pytest.raises(LmforgeError, match=r"the tokenizer has no token '<think>' \(the start thinking delimiter\)"):
        ThinkingBudget.from_tokenizer(thinking_tokenizer(delimiters=False), max_tokens=4)
    with pytest.raises(LmforgeError, match=r"has no token '</reasoning>' \(the end thinking delimiter\)"):
        ThinkingBudget.from_tokenizer(tok, max_tokens=4, delimiters=(START, "</reasoning>"))
    with pytest.raises(LmforgeError, match="thinking_delimiters must be two non-empty strings"):
        ThinkingBudget.from_tokenizer(tok, max_tokens=4, delimiters=(START,))

    class NoLookup:
        def encode(self, text):
            return [1]

    with pytest.raises(LmforgeError, match="needs a tokenizer that can look up tokens"):
        ThinkingBudget.from_tokenizer(NoLookup(), max_tokens=4)


# ---- generate on a tiny model -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny():
    tok = thinking_tokenizer()
    return tok, thinking_model(tok)


def chat_prompt(tok, text: str = "hello") -> list[int]:
    return tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)


def test_generate_closes_thinking_exactly_at_the_cap(tiny):
    tok, model = tiny
    end = tok.backend.token_to_id(END)
    ids = chat_prompt(tok)
    assert tok.decode(ids[-2:], skip_special_tokens=False) == "<think>\n"  # the template opened it
    free = generate(model, torch.tensor([ids]), max_new_tokens=30, eos_ids=())[0].tolist()
    assert end not in free  # the model never closes by itself: the budget is the only way out
    budget = ThinkingBudget.from_tokenizer(tok, max_tokens=8, answer_prefix=" the answer is")
    out = generate(model, torch.tensor([ids]), max_new_tokens=30, eos_ids=(), thinking_budget=budget)[0].tolist()
    prefix = list(budget.answer_prefix_ids)
    assert out[:8] == free[:8]  # thinking untouched up to the cap
    assert out[8] == end and out.count(end) == 1
    assert out[9:9 + len(prefix)] == prefix
    assert len(out) == 30


def test_generate_extends_thinking_below_the_minimum(tiny):
    tok, model = tiny
    end = tok.backend.token_to_id(END)
    eager, steering = closing(model, end)
    ids = chat_prompt(tok)
    free = generate(eager, torch.tensor([ids]), max_new_tokens=4, eos_ids=(), steering=steering)[0].tolist()
    assert free == [end] * 4  # this model wants to stop thinking at once, every time
    budget = ThinkingBudget.from_tokenizer(tok, min_tokens=5, max_tokens=9)
    wait = list(budget.extension_ids)
    assert len(wait) == 2  # "Wait" is two tokens here, so the counts below are in tokens, not words
    out = generate(eager, torch.tensor([ids]), max_new_tokens=10, eos_ids=(), steering=steering,
                   thinking_budget=budget)[0].tolist()
    # counts 0, 2, 4 are below 5: three extensions (6 tokens), then the model's own </think> is kept
    assert out == wait * 3 + [end] * 4


def test_generate_budget_is_inert_when_nothing_opens_thinking(tiny):
    tok, model = tiny
    ids = tok.encode("the quick brown fox")
    budget = ThinkingBudget.from_tokenizer(tok, max_tokens=2, min_tokens=1)
    free = generate(model, torch.tensor([ids]), max_new_tokens=12, eos_ids=())
    assert torch.equal(generate(model, torch.tensor([ids]), max_new_tokens=12, eos_ids=(), thinking_budget=budget),
                       free)


def test_generate_keeps_one_state_per_row_of_a_left_padded_batch(tiny):
    tok, model = tiny
    end = tok.backend.token_to_id(END)
    opened, plain = chat_prompt(tok, "the quick brown fox"), tok.encode("hello")
    width = max(len(opened), len(plain))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in (opened, plain)])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in (opened, plain)])
    budget = ThinkingBudget.from_tokenizer(tok, max_tokens=3)
    free = generate(model, ids, mask, max_new_tokens=10, eos_ids=())
    out = generate(model, ids, mask, max_new_tokens=10, eos_ids=(), thinking_budget=budget)
    assert out[0, :3].tolist() == free[0, :3].tolist() and int(out[0, 3]) == end
    assert torch.equal(out[1], free[1])  # the plain row never opened thinking


def test_generate_refuses_a_cap_that_leaves_no_room_and_ids_outside_the_vocabulary(tiny):
    tok, model = tiny
    ids = torch.tensor([chat_prompt(tok)])
    with pytest.raises(LmforgeError, match=r"max_thinking_tokens \(8\) must be below max_new_tokens \(8\)"):
        generate(model, ids, max_new_tokens=8, thinking_budget=ThinkingBudget.from_tokenizer(tok, max_tokens=8))
    with pytest.raises(LmforgeError, match=r"token ids \[5000\], outside the model's vocabulary"):
        generate(model, ids, max_new_tokens=8, thinking_budget=ThinkingBudget((5000,), (301,), max_tokens=2))
    with pytest.raises(LmforgeError, match="thinking_budget must be a lmforge.models.thinking.ThinkingBudget"):
        generate(model, ids, max_new_tokens=8, thinking_budget={"max_tokens": 2})


# ---- the command line ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from .thinking_model import save_thinking_model

    return save_thinking_model(tmp_path_factory.mktemp("think") / "m")


def test_generate_command_takes_the_budget_flags(model_dir, capsys):
    from lmforge.cli import main
    from lmforge.data.tokenizer import load_tokenizer
    from lmforge.models.checkpoint import load_model

    argv = ["generate", "--model", str(model_dir), "--prompt", "hello", "--chat", "--max-new-tokens", "12",
            "--max-thinking-tokens", "4", "--answer-prefix", " the answer is"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    tok, model = load_tokenizer(model_dir), load_model(model_dir)
    ids = torch.tensor([chat_prompt(tok)])
    budget = ThinkingBudget.from_tokenizer(tok, max_tokens=4, answer_prefix=" the answer is")
    want = generate(model, ids, max_new_tokens=12, thinking_budget=budget)[0].tolist()
    assert want[4] == tok.backend.token_to_id(END)
    assert printed == tok.decode(want) + "\n"
    assert "</think> the answer is" in printed


@pytest.mark.parametrize("flags, message", [
    (["--max-thinking-tokens", "-1"], "max_thinking_tokens must be an integer >= 0, got -1"),
    (["--max-thinking-tokens", "3", "--min-thinking-tokens", "5"], "min_thinking_tokens (5) is larger"),
    (["--max-thinking-tokens", "12"], "max_thinking_tokens (12) must be below --max-new-tokens (12)"),
    (["--max-thinking-tokens", "3", "--thinking-delimiters", "<r>", "</r>"], "the tokenizer has no token '<r>'"),
    (["--min-thinking-tokens", "3", "--thinking-extension", ""], "thinking_extension must be a non-empty string"),
])
def test_generate_command_bad_budgets_are_one_line(model_dir, capsys, flags, message):
    from lmforge.cli import main

    assert main(["generate", "--model", str(model_dir), "--prompt", "hi", "--max-new-tokens", "12", *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lmforge generate: error: ") and message in err and "Traceback" not in err


def test_chat_loop_applies_the_budget_to_every_reply(model_dir):
    import io

    from lmforge.data.tokenizer import load_tokenizer
    from lmforge.models.checkpoint import load_model
    from lmforge.serve.cli import chat_loop

    tok, model = load_tokenizer(model_dir), load_model(model_dir)
    out = io.StringIO()
    budget = ThinkingBudget.from_tokenizer(tok, max_tokens=3)
    lines = iter(["hello", "again"])

    def read_lines(prompt: str) -> str:
        try:
            return next(lines)
        except StopIteration:  # the end of input, as a terminal's Ctrl-D
            raise EOFError from None

    assert chat_loop(model, tok, read=read_lines, out=out, temperature=0.0, max_new_tokens=8,
                     thinking_budget=budget) == 0
    replies = out.getvalue().split("model> ")[1:]
    assert len(replies) == 2 and all(r.count(END) == 1 for r in replies)  # this model never closes by itself

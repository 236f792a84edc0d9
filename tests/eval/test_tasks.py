"""Task files: validation errors name the file and field; prompts, few-shot and answer extraction."""

from __future__ import annotations

import json

import pytest

from lmforge.errors import ConfigError, LmforgeError
from lmforge.eval.tasks import builtin_tasks, load_task, parse_task_options, resolve_task, resolve_tasks

DOCS = [{"q": f"What is {i} + 1?", "a": str(i + 1), "choices": ["x", "y"], "gold": i % 2} for i in range(6)]
BASE = {"name": "t", "type": "generate", "data": "d.jsonl", "prompt": "Q: {q}\nA:", "target": "a"}


def write(tmp_path, docs=DOCS, **fields):
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    raw = {**BASE, **fields}
    raw = {k: v for k, v in raw.items() if v is not None}
    import yaml

    path = tmp_path / "task.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize("missing", ["name", "data", "prompt", "target"])
def test_missing_field_names_field_and_file(tmp_path, missing):
    path = write(tmp_path, **{missing: None})
    with pytest.raises(ConfigError, match=rf"task\.yaml: missing required field '{missing}'"):
        load_task(path)


def test_multiple_choice_needs_choices_and_valid_type(tmp_path):
    with pytest.raises(ConfigError, match="task.yaml: missing required field 'choices'"):
        load_task(write(tmp_path, type="multiple_choice"))
    with pytest.raises(ConfigError, match="task.yaml: missing required field 'type'"):
        load_task(write(tmp_path, type=None))
    with pytest.raises(ConfigError, match="field 'type' must be one of"):
        load_task(write(tmp_path, type="qa"))


def test_bad_regex_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match=r"task\.yaml: field 'answer_regex': regex '\(\\d\+' does not compile"):
        load_task(write(tmp_path, answer_regex="(\\d+"))


@pytest.mark.parametrize("fields,match", [
    ({"metrics": ["acc"]}, "not available for generate tasks"),
    ({"colour": "red"}, "unknown field"),
    ({"fewshot": "two"}, "field 'fewshot' must be int"),
    ({"fewshot": True}, "field 'fewshot' must be int"),
    ({"prompt": "Q: {question}"}, "prompt uses field 'question'"),
    ({"prompt": "Q: {{ question }}"}, "prompt template: 'question' is undefined"),
    ({"prompt": "{% if %}"}, "not a valid jinja2 template"),
    ({"target": "answer"}, "no field 'answer'"),
    ({"data": "nope.jsonl"}, "data file .*nope.jsonl does not exist"),
    ({"fewshot": 6}, "fewshot=6 needs more than 6 records"),
    ({"type": "code", "samples": 4}, "temperature"),
    ({"type": "code", "samples": 2, "temperature": 0.8, "k": [1, 5]}, "field 'k'"),
    ({"answer_pick": "middle"}, "answer_pick"),
])
def test_invalid_fields(tmp_path, fields, match):
    with pytest.raises(ConfigError, match=match):
        load_task(write(tmp_path, **fields))


def test_bad_jsonl_line_and_yaml(tmp_path):
    path = write(tmp_path)
    (tmp_path / "d.jsonl").write_text('{"q": "a", "a": "1"}\n{oops\n')
    with pytest.raises(ConfigError, match=r"d\.jsonl:2: not valid JSON"):
        load_task(path)
    path.write_text("name: [unclosed")
    with pytest.raises(ConfigError, match="task.yaml: not valid YAML"):
        load_task(path)
    with pytest.raises(ConfigError, match="unknown task 'nope'"):
        resolve_task("nope")


def test_fewshot_from_same_file_excludes_current_doc_and_is_deterministic(tmp_path):
    task = load_task(write(tmp_path, fewshot=3, fewshot_seed=7))
    for i in range(len(DOCS)):
        shots = task.shots(i)
        assert len(shots) == 3 and DOCS[i] not in shots
        assert shots == task.shots(i)  # per-doc seeding: the same shots on every call
    ctx = task.context(0)
    assert ctx.endswith("Q: What is 0 + 1?\nA:") and ctx.count("\n\n") == 3
    first = task.shots(0)[0]
    assert ctx.startswith(f"Q: {first['q']}\nA: {first['a']}\n\n")


def test_fewshot_from_separate_split_and_jinja(tmp_path):
    (tmp_path / "train.jsonl").write_text(json.dumps({"q": "train q", "a": "T"}) + "\n")
    task = load_task(write(tmp_path, fewshot=1, fewshot_data="train.jsonl", prompt="Q: {{ q | upper }}\nA:"))
    assert task.context(2) == "Q: TRAIN Q\nA: T\n\nQ: WHAT IS 2 + 1?\nA:"


def test_multiple_choice_gold_as_index_or_text(tmp_path):
    task = load_task(write(tmp_path, type="multiple_choice", choices="choices", target="gold"))
    assert [task.gold_index(d) for d in DOCS[:2]] == [0, 1]
    assert task.gold_text(DOCS[1]) == "y"
    assert task.gold_index({**DOCS[0], "gold": "y"}) == 1
    with pytest.raises(ConfigError, match="neither an index nor one of the choices"):
        task.gold_index({**DOCS[0], "gold": 5})


def test_answer_extraction(tmp_path):
    first = load_task(write(tmp_path, answer_regex=r"(-?\d+)"))
    last = load_task(write(tmp_path, answer_regex=r"(-?\d+)", answer_pick="last"))
    whole = load_task(write(tmp_path, answer_regex=r"-?\d+"))
    assert first.extract(" 3 + 4 = 7") == "3" and last.extract(" 3 + 4 = -7") == "-7"
    assert whole.extract("x -12 y") == "-12" and first.extract("no digits") is None
    assert load_task(write(tmp_path)).extract("  42 \n") == "42"


class ChatMLTokenizer:
    """Just what a chat task asks of a tokenizer: a template and ``apply_chat_template``."""

    chat_template = "chatml"

    def apply_chat_template(self, messages, add_generation_prompt=False, tokenize=True):
        assert tokenize is False and add_generation_prompt is True
        return "".join(f"<{m['role']}>{m['content']}</{m['role']}>" for m in messages) + "<assistant>"


def test_builtin_tasks_load():
    names = builtin_tasks()
    assert {"arithmetic", "arithmetic_chat", "larger", "larger_chat", "stdlib_heldout", "code",
            "code_chat"} <= set(names)
    for name in names:
        task = resolve_task(name)
        image_token = "<image>" if task.image is not None else None  # the shapes tasks: a processor's placeholder
        assert task.docs and task.context(0, ChatMLTokenizer(), image_token) is not None
    # the toy tasks' prompts are what they were
    assert resolve_task("larger").context(0) == ("Which is larger, 46 or 4?\nAnswer: 46\n\nWhich is larger, 64 or 70?"
                                                 "\nAnswer: 70\n\nWhich is larger, 55 or 78?\nAnswer: 78\n\n"
                                                 "Which is larger, 72 or 80?\nAnswer:")
    code = resolve_task("code")
    assert code.context(0) == code.docs[0]["prompt"] and code.program_prefix(code.docs[0]) == code.docs[0]["prompt"]
    assert resolve_task("larger").target_delimiter == " "


def test_chat_task_renders_turns_through_the_chat_template(tmp_path):
    task = load_task(write(tmp_path, chat=True, fewshot=2, fewshot_seed=7, system="Be brief."))
    shots = task.shots(0)
    assert task.messages(0) == [{"role": "system", "content": "Be brief."},
                                {"role": "user", "content": f"Q: {shots[0]['q']}\nA:"},
                                {"role": "assistant", "content": shots[0]["a"]},
                                {"role": "user", "content": f"Q: {shots[1]['q']}\nA:"},
                                {"role": "assistant", "content": shots[1]["a"]},
                                {"role": "user", "content": "Q: What is 0 + 1?\nA:"}]
    assert task.context(0, ChatMLTokenizer()) == (
        f"<system>Be brief.</system><user>Q: {shots[0]['q']}\nA:</user><assistant>{shots[0]['a']}</assistant>"
        f"<user>Q: {shots[1]['q']}\nA:</user><assistant>{shots[1]['a']}</assistant>"
        "<user>Q: What is 0 + 1?\nA:</user><assistant>")
    assert task.target_delimiter == ""  # a choice is the start of the reply, not " choice"
    with pytest.raises(LmforgeError, match="uses chat: true, which needs a tokenizer with a chat template"):
        task.context(0)
    with pytest.raises(ConfigError, match="field 'system' needs chat: true"):
        load_task(write(tmp_path, system="Be brief."))
    with pytest.raises(ConfigError, match="'chat' does not apply to perplexity"):
        load_task(write(tmp_path, type="perplexity", prompt=None, target="q", chat=True))


def test_builtin_chat_variants():
    larger = resolve_task("larger_chat")
    assert larger.context(0, ChatMLTokenizer()) == (
        "<user>Which is larger, 72 or 80? Answer with the number only.</user><assistant>")
    assert larger.docs == resolve_task("larger").docs and larger.target_delimiter == ""
    code = resolve_task("code_chat")
    doc = code.docs[0]
    assert code.context(0, ChatMLTokenizer()) == (
        "<user>Complete the following Python function. Reply with the whole function in one ```python code "
        f"block.\n\n```python\n{doc['prompt']}```</user><assistant>")
    assert code.program_prefix(doc) == doc["prompt"] and not code.stop  # no stop string cuts a fenced reply


def test_run_options_override_fields_and_rename_the_task(tmp_path):
    task = resolve_task("larger", {"chat": True, "fewshot": 1})
    assert task.name == "larger[chat=true,fewshot=1]" and task.chat and task.fewshot == 1
    assert task.context(0, ChatMLTokenizer()) == ("<user>Which is larger, 46 or 4?\nAnswer:</user><assistant>46"
                                                  "</assistant><user>Which is larger, 72 or 80?\nAnswer:</user>"
                                                  "<assistant>")
    opts = parse_task_options(["chat=true", "code:max_new_tokens=512", "larger:system=Be brief: digits only",
                               "code:stop=[]"])
    assert opts == {"chat": True, "code": {"max_new_tokens": 512, "stop": []},
                    "larger": {"system": "Be brief: digits only"}}
    larger, heldout, code = resolve_tasks(["larger", "stdlib_heldout", "code"], opts)
    assert larger.name == "larger[chat=true,system='Be brief: digits only']" and larger.system.endswith("only")
    assert heldout.name == "stdlib_heldout" and not heldout.chat  # chat does not apply to perplexity
    assert (code.name, code.max_new_tokens, code.stop, code.chat) == ("code[chat=true,max_new_tokens=512,stop=[]]",
                                                                      512, [], True)
    assert [t.name for t in resolve_tasks(["larger", "code"])] == ["larger", "code"]


@pytest.mark.parametrize("names,items,match", [
    (["larger"], ["colour=red"], r"unknown task option 'colour' \(options: chat, system, fewshot"),
    (["larger"], ["larger:prompt=hi"], "unknown task option 'prompt'"),
    (["larger"], ["chat"], "'chat' is not KEY=VALUE or TASK:KEY=VALUE"),
    (["larger"], [":chat=true"], "empty task name"),
    (["larger"], ["code:chat=true"], "task options for 'code', which is not among the tasks"),
    (["larger"], ["max_new_tokens=5"], "'max_new_tokens' apply to none of the tasks"),
    (["larger"], ["larger:max_new_tokens=5"], "'max_new_tokens' does not apply to larger.yaml, a multiple_choice"),
    (["stdlib_heldout"], ["stdlib_heldout:chat=true"], "'chat' does not apply to stdlib_heldout.yaml, a perplexity"),
    (["larger"], ["chat=maybe"], "field 'chat' must be bool, got 'maybe'"),
    (["larger"], ["fewshot=-1"], "field 'fewshot' must be >= 0"),
])
def test_bad_run_options_are_refused(names, items, match):
    with pytest.raises(ConfigError, match=match):
        resolve_tasks(names, parse_task_options(items))


def test_unknown_option_in_python_api():
    with pytest.raises(ConfigError, match="unknown task option 'chats'"):
        resolve_tasks(["larger"], {"chats": True})
    with pytest.raises(ConfigError, match="unknown task option 'bogus'"):
        resolve_task("larger", {"bogus": 1})

"""Task files: validation errors name the file and field; prompts, few-shot and answer extraction."""

from __future__ import annotations

import json

import pytest

from lmforge.errors import ConfigError
from lmforge.eval.tasks import builtin_tasks, load_task, resolve_task

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


def test_builtin_tasks_load():
    names = builtin_tasks()
    assert {"arithmetic", "arithmetic_chat", "larger", "stdlib_heldout", "code"} <= set(names)
    for name in names:
        task = resolve_task(name)
        assert task.docs and task.context(0) is not None
    assert resolve_task("larger").context(0).endswith("?\nAnswer:")

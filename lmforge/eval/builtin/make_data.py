"""Regenerate the built-in task data (``python -m lmforge.eval.builtin.make_data``); the files are shipped."""

from __future__ import annotations

import random
import sysconfig
from pathlib import Path

from lmforge.data.synthetic import arithmetic_examples, write_jsonl

HERE = Path(__file__).parent
# Sorted after the quickstart's pretraining corpus (which stops in logging/), so they are held out from it.
HELDOUT_FILES = ("sched.py", "shlex.py", "textwrap.py", "tabnanny.py", "zipapp.py")
HELDOUT_CHARS = 3000


def arithmetic(n: int, seed: int) -> list[dict]:
    return [{"question": r["messages"][0]["content"], "worked": r["messages"][1]["content"], "answer": r["answer"]}
            for r in arithmetic_examples(n, seed=seed, max_operand=50, ops="+-")]


def larger(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.sample(range(100), 2)
        out.append({"a": a, "b": b, "choices": [str(a), str(b)], "gold": 0 if a > b else 1})
    return out


def heldout() -> list[dict]:
    root = Path(sysconfig.get_paths()["stdlib"])
    return [{"text": (root / name).read_text(encoding="utf-8")[:HELDOUT_CHARS], "source": name}
            for name in HELDOUT_FILES]


def shapes(n: int, seed: int) -> None:
    """``shapes/``: held-out drawn-shapes VQA (``lmforge.data.shapes``, 48 px, the quickstart-vision setting; another
    seed than its data) as flat records: image path, question, answer, question type and the type's choices."""
    import json
    import shutil
    import tempfile

    from lmforge.data.shapes import ANSWERS, write_shapes_dataset

    out = HERE / "shapes"
    with tempfile.TemporaryDirectory() as tmp:
        made = write_shapes_dataset(tmp, n_train=0, n_test=n, seed=seed)
        shutil.rmtree(out, ignore_errors=True)
        shutil.copytree(made["images"] / "test", out / "images")
        records = []
        for line in made["test"].read_text().splitlines():
            rec = json.loads(line)
            records.append({"image": rec["images"][0].removeprefix("test/").replace("images/test/", "images/"),
                            "question": rec["messages"][0]["content"][0]["text"], "answer": rec["answer"],
                            "type": rec["type"], "choices": list(ANSWERS[rec["type"]])})
    write_jsonl(records, out / "shapes.jsonl")


def main() -> None:
    write_jsonl(arithmetic(100, seed=9001), HERE / "arithmetic.jsonl")
    write_jsonl(arithmetic(20, seed=9002), HERE / "arithmetic_fewshot.jsonl")
    write_jsonl(larger(100, seed=9003), HERE / "larger.jsonl")
    write_jsonl(larger(20, seed=9004), HERE / "larger_fewshot.jsonl")
    write_jsonl(heldout(), HERE / "stdlib_heldout.jsonl")
    shapes(150, seed=9005)


if __name__ == "__main__":
    main()

"""Shapes VQA: deterministic, balanced, answerable only from the pixels, and written/read back faithfully."""

from __future__ import annotations

import collections
import hashlib
import json
import random
import re
import types

import numpy as np
import pytest
from PIL import Image

from lmforge.data import shapes
from lmforge.data.shapes import (
    ANSWERS,
    BACKGROUNDS,
    COLOUR_RGB,
    COLOURS,
    QUESTION_TYPES,
    SHAPES,
    ShapesExample,
    chance,
    make_example,
    read_shapes_jsonl,
    score_answer,
    write_shapes_dataset,
)
from lmforge.errors import LmforgeError


def solve(question: str, objects, side: int) -> str:
    """An independent oracle: the answer to ``question`` read off the object list (not off the generator's
    bookkeeping), asserting that the question is unambiguous about the scene."""
    def one(**kw):
        hits = [o for o in objects if all(getattr(o, k) == v for k, v in kw.items())]
        assert len(hits) == 1, (question, kw, objects)
        return hits[0]

    if m := re.fullmatch(r"What colour is the (\w+)\?", question):
        return one(shape=m[1]).colour
    if m := re.fullmatch(r"What shape is (\w+)\?", question):
        return one(colour=m[1]).shape
    if m := re.fullmatch(r"How many (\w+)s are there\?", question):
        return str(sum(o.shape == m[1] for o in objects))
    m = re.fullmatch(r"Is the (\w+) (\w+) (left or right of|above or below) the (\w+) (\w+)\?", question)
    assert m, question
    a, b = one(colour=m[1], shape=m[2]), one(colour=m[4], shape=m[5])
    axis = "x" if m[3].startswith("left") else "y"
    d = getattr(a, axis) - getattr(b, axis)
    assert abs(d) >= side / 4, "the two centres are too close for a clear answer"
    return ("left", "right")[d > 0] if axis == "x" else ("above", "below")[d > 0]


def shape_from_pixels(px: np.ndarray, o) -> str:
    """Which shape is drawn in ``o``'s box, from its corners: a square fills its top-left corner, a triangle
    (apex up) only its bottom ones, a circle none of them."""
    x0, y0, x1, y1 = o.box
    filled = lambda x, y: tuple(px[y, x]) == COLOUR_RGB[o.colour]
    if filled(x0, y0) and filled(x1, y0):
        return "square"
    top_mid = filled(int(o.x), y0) or filled(int(o.x + 0.5), y0)  # the apex: one of the middle two when even
    if filled(x0, y1) and filled(x1, y1) and top_mid and not filled(x0, y0):
        return "triangle"
    assert not filled(x0, y1) and filled(x0, int(o.y)) and top_mid, o
    return "circle"


def components(mask: np.ndarray) -> int:
    """4-connected components of a boolean mask (a plain flood fill; the images are tiny)."""
    seen, n = np.zeros_like(mask), 0
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        n, stack = n + 1, [start]
        seen[start] = True
        while stack:
            y, x = stack.pop()
            for q in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                if 0 <= q[0] < mask.shape[0] and 0 <= q[1] < mask.shape[1] and mask[q] and not seen[q]:
                    seen[q] = True
                    stack.append(q)
    return n


def check_example(ex: ShapesExample, side: int) -> None:
    """Everything that makes an example valid: the scene is legal, answers the question, and is what is drawn."""
    assert ex.image.size == (side, side) and ex.image.mode == "RGB"
    assert ex.answer in ANSWERS[ex.qtype] and 1 <= len(ex.objects) <= 4
    assert solve(ex.question, ex.objects, side) == ex.answer
    if ex.qtype in ("colour", "shape"):  # every object a possible referent: the image alone does not single one out
        assert 2 <= len(ex.objects) <= 3
        assert len({o.shape for o in ex.objects}) == len({o.colour for o in ex.objects}) == len(ex.objects)
    if ex.qtype == "count":
        assert len(ex.objects) in (3, 4)  # whatever the count
    margin = max(2, side // 24)
    for i, o in enumerate(ex.objects):
        assert 0 <= o.box[0] and o.box[2] < side and 0 <= o.box[1] and o.box[3] < side
        assert 0.22 * side - 0.5 <= o.size <= 0.30 * side + 0.5  # 22-30% of the side, rounded
        for p in ex.objects[i + 1:]:  # boxes apart by the margin along x or along y
            assert (o.box[2] + margin < p.box[0] or p.box[2] + margin < o.box[0]
                    or o.box[3] + margin < p.box[1] or p.box[3] + margin < o.box[1]), (o, p)
    px = np.asarray(ex.image)
    background = tuple(px[0, 0])
    assert background in BACKGROUNDS
    for o in ex.objects:
        assert tuple(px[round(o.y), round(o.x)]) == COLOUR_RGB[o.colour]  # the centre pixel has the object's colour
        assert shape_from_pixels(px, o) == o.shape
    # Nothing but the listed objects is drawn: one blob per object, the rest is background.
    ink = np.any(px != background, axis=-1)
    assert components(ink) == len(ex.objects)
    inside = np.zeros_like(ink)
    for o in ex.objects:
        inside[o.box[1]:o.box[3] + 1, o.box[0]:o.box[2] + 1] = True
    assert not (ink & ~inside).any()


def test_constants_and_chance():
    assert set(ANSWERS) == set(QUESTION_TYPES) and ANSWERS["colour"] == COLOURS and ANSWERS["shape"] == SHAPES
    rgb = [COLOUR_RGB[c] for c in COLOURS]
    assert len(set(rgb) | set(BACKGROUNDS)) == len(rgb) + len(BACKGROUNDS)
    assert all(max(c) - min(c) > 120 for c in rgb)  # saturated: far from any grey
    assert [chance(t) for t in QUESTION_TYPES] == [0.25, 1 / 3, 0.25, 0.5, 0.5]
    with pytest.raises(LmforgeError):
        chance("size")


def test_same_seed_same_examples_and_different_seed_differs():
    def run(seed):
        rng = random.Random(seed)
        return [make_example(rng) for _ in range(40)]
    a, b, c = run(3), run(3), run(4)
    assert [(x.image.tobytes(), x.question, x.answer, x.objects) for x in a] == \
           [(x.image.tobytes(), x.question, x.answer, x.objects) for x in b]
    assert [x.image.tobytes() for x in a] != [x.image.tobytes() for x in c]
    assert [x.question for x in a] != [x.question for x in c]


@pytest.mark.parametrize("side", [32, 48, 128])
def test_every_example_is_answered_by_its_image(side):
    rng = random.Random(side)
    for qtype in QUESTION_TYPES:
        for answer in ANSWERS[qtype]:
            for _ in range(8 if side == 128 else 12):
                ex = make_example(rng, side, qtype, answer)
                assert (ex.qtype, ex.answer) == (qtype, answer)
                check_example(ex, side)


def test_sampled_answers_are_uniform_within_each_type():
    rng = random.Random(1)
    examples = [make_example(rng) for _ in range(2000)]
    per_type = collections.Counter(ex.qtype for ex in examples)
    assert all(abs(per_type[t] / 2000 - 0.2) < 0.04 for t in QUESTION_TYPES), per_type
    for t in QUESTION_TYPES:
        answers = collections.Counter(ex.answer for ex in examples if ex.qtype == t)
        assert set(answers) == set(ANSWERS[t])
        for a in ANSWERS[t]:
            assert abs(answers[a] / per_type[t] - chance(t)) < 0.3 * chance(t), (t, answers)
    for ex in examples[:300]:
        check_example(ex, 48)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes")
    return out, write_shapes_dataset(out, n_train=2000, n_test=1000, seed=5)


def test_written_splits_are_exactly_balanced_and_disjoint(dataset):
    _, paths = dataset
    keys = {}
    for split, n in (("train", 2000), ("test", 1000)):
        records = read_shapes_jsonl(paths[split])
        assert len(records) == n
        per_type = collections.Counter(r["type"] for r in records)
        assert set(per_type.values()) == {n // 5}
        for t in QUESTION_TYPES:
            answers = collections.Counter(r["answer"] for r in records if r["type"] == t)
            assert set(answers) == set(ANSWERS[t]) and max(answers.values()) - min(answers.values()) <= 1
        keys[split] = {(hashlib.sha1(Image.open(r["images"][0]).tobytes()).digest(),
                        r["messages"][0]["content"][0]["text"]) for r in records}
    assert not keys["train"] & keys["test"]


def test_text_only_baseline_is_at_chance(dataset):
    """The best a model without the image can do is learn question -> answer; on held-out data that is chance."""
    _, paths = dataset
    train, test = read_shapes_jsonl(paths["train"]), read_shapes_jsonl(paths["test"])
    question = lambda r: r["messages"][0]["content"][0]["text"]
    table = collections.defaultdict(collections.Counter)
    for r in train:
        table[question(r)][r["answer"]] += 1
    majority = {t: collections.Counter(r["answer"] for r in train if r["type"] == t).most_common(1)[0][0]
                for t in QUESTION_TYPES}
    for t in QUESTION_TYPES:
        rows = [r for r in test if r["type"] == t]
        guess = [table[question(r)].most_common(1)[0][0] if question(r) in table else majority[t] for r in rows]
        acc = sum(g == r["answer"] for g, r in zip(guess, rows)) / len(rows)
        assert acc < chance(t) + 0.1, (t, acc)


def test_round_trip_through_files(dataset):
    out, paths = dataset
    assert paths == {"train": out / "train.jsonl", "test": out / "test.jsonl", "images": out / "images"}
    raw = json.loads(paths["test"].read_text().splitlines()[0])
    assert raw["images"] == ["images/test/00000.png"]  # relative to the JSONL's directory
    user, assistant = raw["messages"]
    assert user["role"] == "user" and user["content"][1] == {"type": "image"} and user["content"][0]["type"] == "text"
    assert assistant == {"role": "assistant", "content": raw["answer"]}
    records = read_shapes_jsonl(paths["test"])
    for r in records[:200]:
        (image,) = r["images"]
        assert image.is_absolute() and image.parent == (out / "images" / "test").resolve()
        with Image.open(image) as im:
            assert im.size == (48, 48) and im.mode == "RGB"
            px = np.asarray(im)
        assert tuple(px[0, 0]) in BACKGROUNDS
    assert sorted(p.name for p in (out / "images" / "train").iterdir()) == [f"{i:05d}.png" for i in range(2000)]
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp files left behind


def test_rewrite_is_deterministic_and_replaces_the_old_images(tmp_path):
    a = write_shapes_dataset(tmp_path / "a", n_train=30, n_test=10, image_size=32, seed=9)
    write_shapes_dataset(tmp_path / "b", n_train=50, n_test=10, image_size=32, seed=9)
    b = write_shapes_dataset(tmp_path / "b", n_train=30, n_test=10, image_size=32, seed=9)
    for split in ("train", "test"):
        assert a[split].read_text() == b[split].read_text()
        assert [p.read_bytes() for p in sorted((a["images"] / split).iterdir())] == \
               [p.read_bytes() for p in sorted((b["images"] / split).iterdir())]
    assert len(list((b["images"] / "train").iterdir())) == 30  # the 50-example run's extra images are gone
    c = write_shapes_dataset(tmp_path / "c", n_train=30, n_test=10, image_size=32, seed=10)
    assert a["train"].read_text() != c["train"].read_text()


def test_train_examples_that_repeat_a_test_example_are_redrawn(tmp_path, monkeypatch):
    # Give both splits the same random stream: every train example would be a copy of a test one.
    monkeypatch.setattr(shapes, "random", types.SimpleNamespace(Random=lambda seed: random.Random(0)))
    paths = write_shapes_dataset(tmp_path, n_train=25, n_test=25)
    key = lambda r: (Image.open(r["images"][0]).tobytes(), r["messages"][0]["content"][0]["text"])
    train, test = read_shapes_jsonl(paths["train"]), read_shapes_jsonl(paths["test"])
    assert not {key(r) for r in train} & {key(r) for r in test}
    assert [(r["type"], r["answer"]) for r in train] == [(r["type"], r["answer"]) for r in test]  # schedule kept


def test_bad_records_name_the_file_and_line(tmp_path):
    paths = write_shapes_dataset(tmp_path, n_train=5, n_test=3)
    lines = paths["test"].read_text().splitlines()
    broken = tmp_path / "broken.jsonl"
    for bad, why in [({k: v for k, v in json.loads(lines[1]).items() if k != "answer"}, "answer"),
                     ({k: v for k, v in json.loads(lines[1]).items() if k != "images"}, "images"),
                     ({**json.loads(lines[1]), "images": ["images/test/99999.png"]}, "99999.png"),
                     ("[1, 2]", "JSON object")]:
        broken.write_text("\n".join([lines[0], "", bad if isinstance(bad, str) else json.dumps(bad), lines[2]]) + "\n")
        with pytest.raises(LmforgeError, match=rf"{re.escape(str(broken))}:3\b.*{re.escape(why)}"):
            read_shapes_jsonl(broken)
    broken.write_text(lines[0] + "\n{not json\n")
    with pytest.raises(LmforgeError, match=rf"{re.escape(str(broken))}:2\b"):
        read_shapes_jsonl(broken)


def test_invalid_arguments():
    rng = random.Random(0)
    with pytest.raises(LmforgeError, match="size"):
        make_example(rng, qtype="size")
    with pytest.raises(LmforgeError, match="purple"):
        make_example(rng, qtype="colour", answer="purple")
    with pytest.raises(LmforgeError, match="image_size"):
        make_example(rng, image_size=16)


def test_score_answer_normalises_then_matches_exactly():
    assert score_answer("red", "red")
    assert score_answer("  Red.  ", "red")
    assert score_answer("LEFT!", "left")
    assert score_answer("right of the blue square", "right")
    assert score_answer("3\n", "3")
    assert score_answer("circle, I think", "circle")
    assert not score_answer("reddish", "red")
    assert not score_answer("the red one", "red")  # first word only: no hunting for the answer in a sentence
    assert not score_answer("3", "2")
    assert not score_answer("", "red") and not score_answer("   ", "red") and not score_answer("...", "red")

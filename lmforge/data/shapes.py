"""Synthetic shapes VQA: small drawn scenes with one question each, for training tiny vision-language models on CPU.

Every question is answerable only from the image, so a model that reads only the question scores chance:

* The generator samples the question type, then the answer (uniformly over the type's options), then the words
  of the question independently of the answer, and only then draws a scene consistent with both: answers are
  balanced by construction and the question text says nothing about them. ``write_shapes_dataset`` goes further
  and schedules (type, answer) pairs so each split holds every type and every answer in equal numbers (+-1).
* What a question names is unique by that description in the scene (the shape for "colour", the colour for
  "shape", the colour-and-shape pair for the relations); distractors never match it. The image alone does not
  give the answer away either: colour and shape scenes hold 2-3 objects of all-different shapes and colours
  (any of them could be the one asked about), and count scenes hold 3-4 objects whatever the count.
* Objects never overlap (boxes separated by a margin), are drawn without anti-aliasing in exact ``COLOUR_RGB``,
  and are 22-30% of the side, so circle, square and triangle stay distinct at 48 px.
* The two objects of a relation have centres at least a quarter of the side apart along the asked axis; the
  layout is drawn first and the answer only decides which named object takes which box.

Count questions ask "0".."3": absence is a useful skill, and four options keep chance at 25%. (A model that
ignores the question can still beat chance on them by answering the size of the largest same-shape group; with
at most four objects in three shapes no scene distribution avoids that.)
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from lmforge.errors import LmforgeError
from lmforge.io import atomic_directory, atomic_file, iter_jsonl

COLOURS = ("red", "green", "blue", "yellow")
COLOUR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30), "green": (20, 160, 40), "blue": (30, 60, 220), "yellow": (245, 205, 0)}
SHAPES = ("circle", "square", "triangle")
BACKGROUNDS: tuple[tuple[int, int, int], ...] = ((255, 255, 255), (215, 215, 215))  # white, light grey
QUESTION_TYPES = ("colour", "shape", "count", "left_right", "top_bottom")
ANSWERS: dict[str, tuple[str, ...]] = {
    "colour": COLOURS, "shape": SHAPES, "count": ("0", "1", "2", "3"),
    "left_right": ("left", "right"), "top_bottom": ("above", "below")}
MAX_OBJECTS = 4
MIN_IMAGE_SIZE = 24  # below this a 22%-of-side triangle is a few pixels and stops looking like one


def chance(qtype: str) -> float:
    """Accuracy of guessing: the answers of each type are uniform over its options."""
    if qtype not in ANSWERS:
        raise LmforgeError(f"unknown question type {qtype!r}; expected one of {QUESTION_TYPES}")
    return 1.0 / len(ANSWERS[qtype])


@dataclass(frozen=True)
class ShapeObject:
    """One drawn object: its bounding box is ``size`` pixels square with its top-left corner at (left, top)."""
    shape: str
    colour: str
    left: int
    top: int
    size: int

    @property
    def x(self) -> float:  # centre of the box's pixels
        return self.left + (self.size - 1) / 2

    @property
    def y(self) -> float:
        return self.top + (self.size - 1) / 2

    @property
    def box(self) -> tuple[int, int, int, int]:  # inclusive, as ImageDraw takes it
        return self.left, self.top, self.left + self.size - 1, self.top + self.size - 1


@dataclass
class ShapesExample:
    """One VQA item: ``answer`` is a single lowercase word from ``ANSWERS[qtype]``."""
    image: Image.Image
    question: str
    answer: str
    qtype: str
    objects: tuple[ShapeObject, ...]  # the scene, for debugging and tests


def _apart(a: tuple[int, int, int], b: tuple[int, int, int], margin: int) -> bool:
    """(left, top, size) boxes separated by at least ``margin`` empty pixels along some axis."""
    return any(a[i] + a[2] + margin <= b[i] or b[i] + b[2] + margin <= a[i] for i in (0, 1))


def _centre(box: tuple[int, int, int], axis: int) -> float:
    """Centre of a (left, top, size) box along axis 0 (x) or 1 (y)."""
    return box[axis] + (box[2] - 1) / 2


def _layout(rng: random.Random, n: int, side: int, axis: int | None) -> list[tuple[int, int, int]]:
    """``n`` non-overlapping boxes (left, top, size); with ``axis`` (0: x, 1: y) the first two centres differ
    along it by at least a quarter of the side. Rejection sampling; a rare dead end restarts the layout."""
    lo, hi = round(0.22 * side), round(0.30 * side)
    pad, margin, gap = 1, max(2, side // 24), side / 4
    while True:
        boxes: list[tuple[int, int, int]] = []
        for _ in range(100):
            size = rng.randint(lo, hi)
            cand = (rng.randint(pad, side - pad - size), rng.randint(pad, side - pad - size), size)
            if not all(_apart(cand, b, margin) for b in boxes):
                continue
            if axis is not None and len(boxes) == 1 and abs(_centre(cand, axis) - _centre(boxes[0], axis)) < gap:
                continue
            boxes.append(cand)
            if len(boxes) == n:
                return boxes


def _distractors(rng: random.Random, k: int, allowed: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """``k`` (shape, colour) pairs from ``allowed``: those that cannot be mistaken for what the question names."""
    return [rng.choice(allowed) for _ in range(k)]


def _others(rng: random.Random, k: int, shape: str, colour: str) -> list[tuple[str, str]]:
    """``k`` objects whose shapes and colours differ from each other and from (shape, colour). In a colour or
    shape scene every object is then a valid referent with its own answer, so a model that looks at the image
    but ignores the question is right only 1 time in n, not by picking the odd one out or the commonest colour."""
    return list(zip(rng.sample([x for x in SHAPES if x != shape], k), rng.sample([c for c in COLOURS if c != colour], k)))


def make_example(rng: random.Random, image_size: int = 48, qtype: str | None = None,
                 answer: str | None = None) -> ShapesExample:
    """One scene and question. ``qtype`` and ``answer`` are sampled uniformly when not given (a caller that
    wants exact balance, like ``write_shapes_dataset``, passes both)."""
    if image_size < MIN_IMAGE_SIZE:
        raise LmforgeError(f"image_size {image_size} is too small for legible shapes (minimum {MIN_IMAGE_SIZE})")
    qtype = qtype if qtype is not None else rng.choice(QUESTION_TYPES)
    chance(qtype)  # validates qtype
    if answer is None:
        answer = rng.choice(ANSWERS[qtype])
    elif answer not in ANSWERS[qtype]:
        raise LmforgeError(f"answer {answer!r} is not one of {ANSWERS[qtype]} for {qtype!r} questions")
    pairs = [(s, c) for s in SHAPES for c in COLOURS]
    axis: int | None = None  # set for the relation types: the axis along which the two named objects differ
    # The words of the question are drawn independently of the answer: the text alone says nothing about it.
    if qtype == "colour":
        shape = rng.choice(SHAPES)
        question = f"What colour is the {shape}?"
        specs = [(shape, answer)] + _others(rng, rng.randint(1, 2), shape, answer)
    elif qtype == "shape":
        colour = rng.choice(COLOURS)
        question = f"What shape is {colour}?"
        specs = [(answer, colour)] + _others(rng, rng.randint(1, 2), answer, colour)
    elif qtype == "count":
        shape, k = rng.choice(SHAPES), int(answer)
        question = f"How many {shape}s are there?"
        n = rng.randint(3, MAX_OBJECTS)  # the same for every count: the number of objects says nothing about it
        specs = ([(shape, rng.choice(COLOURS)) for _ in range(k)]
                 + _distractors(rng, n - k, [p for p in pairs if p[0] != shape]))
    else:
        (s1, c1), (s2, c2) = rng.sample(pairs, 2)
        if qtype == "left_right":
            axis, question = 0, f"Is the {c1} {s1} left or right of the {c2} {s2}?"
        else:
            axis, question = 1, f"Is the {c1} {s1} above or below the {c2} {s2}?"
        n = rng.randint(2, MAX_OBJECTS)
        specs = [(s1, c1), (s2, c2)] + _distractors(rng, n - 2, [p for p in pairs if p not in ((s1, c1), (s2, c2))])
    boxes = _layout(rng, len(specs), image_size, axis)
    # The layout is answer-blind; the answer picks which named object takes which of the first two boxes.
    if axis is not None and (_centre(boxes[0], axis) < _centre(boxes[1], axis)) != (answer in ("left", "above")):
        boxes[0], boxes[1] = boxes[1], boxes[0]
    objects = [ShapeObject(s, c, *b) for (s, c), b in zip(specs, boxes)]
    rng.shuffle(objects)  # drawing order and list position carry no hint either
    return ShapesExample(_draw(objects, image_size, rng.choice(BACKGROUNDS)), question, answer, qtype, tuple(objects))


def _draw(objects: list[ShapeObject], side: int, background: tuple[int, int, int]) -> Image.Image:
    image = Image.new("RGB", (side, side), background)
    draw = ImageDraw.Draw(image)  # no anti-aliasing: every object pixel is exactly its COLOUR_RGB
    for o in objects:
        fill, (x0, y0, x1, y1) = COLOUR_RGB[o.colour], o.box
        if o.shape == "circle":
            draw.ellipse(o.box, fill=fill)
        elif o.shape == "square":
            draw.rectangle(o.box, fill=fill)
        else:  # apex up, base along the bottom of the box
            draw.polygon([((x0 + x1) / 2, y0), (x0, y1), (x1, y1)], fill=fill)
    return image


def _record(ex: ShapesExample, image: str) -> dict[str, Any]:
    # The question before the image (LLaVA's data has it on either side): the image's positions can then read the
    # question, which a small decoder learns to use far sooner than a lookup from the answer position back.
    return {"messages": [{"role": "user", "content": [{"type": "text", "text": ex.question}, {"type": "image"}]},
                         {"role": "assistant", "content": ex.answer}],
            "images": [image], "type": ex.qtype, "answer": ex.answer}


def _schedule(rng: random.Random, n: int) -> list[tuple[str, str]]:
    """(type, answer) for ``n`` examples: types cycle, each type's answers cycle, then the order is shuffled."""
    seen = dict.fromkeys(QUESTION_TYPES, 0)
    out = []
    for i in range(n):
        t = QUESTION_TYPES[i % len(QUESTION_TYPES)]
        out.append((t, ANSWERS[t][seen[t] % len(ANSWERS[t])]))
        seen[t] += 1
    rng.shuffle(out)
    return out


def _key(ex: ShapesExample) -> bytes:
    return hashlib.sha1(ex.image.tobytes() + ex.question.encode()).digest()


def write_shapes_dataset(out_dir: str | os.PathLike, n_train: int, n_test: int, image_size: int = 48,
                         seed: int = 0) -> dict[str, Path]:
    """Write ``images/{train,test}/NNNNN.png`` and ``{train,test}.jsonl`` (image paths relative to ``out_dir``).

    The splits come from separate random streams, and a train example whose (image, question) also occurs in
    test is redrawn (rare, but a one-object scene can repeat). Each split's images go to a temp directory that
    replaces the old one (and its stale files) in one rename, then its JSONL is renamed into place: a crash never
    leaves a JSONL pointing at missing or half-written images.
    """
    out = Path(out_dir)
    test_keys: set[bytes] = set()
    for split, n in (("test", n_test), ("train", n_train)):  # test first: train is checked against it
        rng = random.Random(f"lmforge-shapes-{seed}-{split}")  # str seeds are hashed stably (not PYTHONHASHSEED)
        records = []
        with atomic_directory(out / "images" / split) as tmp:
            for i, (qtype, answer) in enumerate(_schedule(rng, n)):
                ex = make_example(rng, image_size, qtype, answer)
                while split == "train" and _key(ex) in test_keys:
                    ex = make_example(rng, image_size, qtype, answer)
                if split == "test":
                    test_keys.add(_key(ex))
                name = f"{i:05d}.png"
                ex.image.save(tmp / name)
                records.append(_record(ex, f"images/{split}/{name}"))
        with atomic_file(out / f"{split}.jsonl") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
    return {"train": out / "train.jsonl", "test": out / "test.jsonl", "images": out / "images"}


def patch_labels(example: ShapesExample, patch_size: int) -> tuple[list[int], list[int]]:
    """What covers each ``patch_size`` square of the image, row-major (a vision encoder's patch order): the colour
    (1 + index in COLOURS; 0: background) drawn on at least an eighth of its pixels, most pixels winning, and the
    shape (1 + index in SHAPES; 0: none) of the object of that colour overlapping it most. Dense labels to
    pretrain a vision tower on (the stand-in for a pretrained CLIP, which cannot be downloaded here)."""
    import numpy as np

    pixels = np.asarray(example.image.convert("RGB"), dtype=np.int16)
    grid = pixels.shape[0] // patch_size
    colour_ids, shape_ids = [], []
    for row in range(grid):
        for col in range(grid):
            y0, x0 = row * patch_size, col * patch_size
            patch = pixels[y0:y0 + patch_size, x0:x0 + patch_size]
            counts = [int((patch == COLOUR_RGB[c]).all(-1).sum()) for c in COLOURS]
            best = max(range(len(COLOURS)), key=counts.__getitem__)
            if counts[best] * 8 < patch_size * patch_size:
                colour_ids.append(0)
                shape_ids.append(0)
                continue

            def overlap(o: ShapeObject) -> int:
                left, top, right, bottom = o.box
                return (max(0, min(right + 1, x0 + patch_size) - max(left, x0))
                        * max(0, min(bottom + 1, y0 + patch_size) - max(top, y0)))

            owner = max((o for o in example.objects if o.colour == COLOURS[best]), key=overlap)
            colour_ids.append(best + 1)
            shape_ids.append(SHAPES.index(owner.shape) + 1)
    return colour_ids, shape_ids


def score_answer(prediction: str, answer: str) -> bool:
    """Exact match after normalising both: strip, lowercase, first word, trailing punctuation dropped."""
    def norm(s: str) -> str:
        words = s.strip().lower().split()
        return words[0].rstrip(string.punctuation) if words else ""
    p = norm(prediction)
    return bool(p) and p == norm(answer)


def read_shapes_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Records of a shapes JSONL with ``images`` resolved to absolute Paths (relative to the file's directory).

    A record without messages/images/answer/type, or naming an image that does not exist, raises
    ``LmforgeError`` naming file:line.
    """
    base = Path(path).resolve().parent
    out = []
    for where, rec in iter_jsonl(path):
        if not isinstance(rec, dict):
            raise LmforgeError(f"{where}: expected a JSON object, got {type(rec).__name__}")
        missing = [k for k in ("messages", "images", "answer", "type") if k not in rec]
        if missing:
            raise LmforgeError(f"{where}: record has no {', '.join(missing)}")
        if not isinstance(rec["images"], list) or not all(isinstance(p, str) for p in rec["images"]):
            raise LmforgeError(f"{where}: 'images' must be a list of paths")
        images = [base / p for p in rec["images"]]
        for rel, p in zip(rec["images"], images):
            if not p.is_file():
                raise LmforgeError(f"{where}: image {rel!r} not found (looked for {p})")
        out.append({**rec, "images": images})
    return out

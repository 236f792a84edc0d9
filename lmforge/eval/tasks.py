"""Evaluation tasks as data: a YAML file naming a local JSONL file, a prompt template and metrics.

A task file looks like::

    name: larger
    type: multiple_choice            # multiple_choice | generate | perplexity | code
    data: larger.jsonl               # relative to the YAML file
    fewshot_data: larger_train.jsonl # optional; without it shots come from `data`, never the current doc
    prompt: "Which is larger, {a} or {b}?\\nAnswer:"   # str.format over the record, or jinja2 if it has {{ }}
    choices: choices                 # record field holding the list of choices (multiple_choice)
    target: gold                     # record field: gold index/choice, reference answer, text, or tests
    fewshot: 3
    fewshot_seed: 1234
    metrics: [acc, acc_norm]

``generate`` tasks add ``answer_regex`` (first capture group, or the whole match), ``answer_pick``
(first|last match), ``max_new_tokens`` and ``stop``; ``code`` tasks add ``entry_point``, ``samples``,
``k``, ``timeout_s``, ``memory_mb`` and ``code_prefix`` (the template of the code the completion is
appended to; default: the prompt).

``image: FIELD`` (``generate`` and ``multiple_choice`` tasks) makes a task multimodal: the record field holds an image
path relative to the data file, and the prompt holds the model's image placeholder before the text
(``image_position: after`` puts it after); such a task runs on a vision-language model (LLaVA, Mllama) through its
processor, and has no few-shot examples.

``chat: true`` renders the model input through the tokenizer's chat template
(``apply_chat_template(..., add_generation_prompt=True)``): an optional ``system`` message, each few-shot
example as a user turn and an assistant turn holding its answer, then the prompt as the last user turn.
Multiple-choice answers are then scored as the start of the assistant's reply (``target_delimiter``
defaults to ``""``).

A run can override some fields of any task without editing its file (:data:`RUN_OPTIONS`;
``lmforge eval --task-option [TASK:]KEY=VALUE``); the task's name then records them, e.g.
``larger[chat=true]``.
"""

from __future__ import annotations

import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import jinja2
import yaml
from jinja2.sandbox import ImmutableSandboxedEnvironment

from lmforge.errors import ConfigError, LmforgeError
from lmforge.io import iter_jsonl

TaskType = Literal["multiple_choice", "generate", "perplexity", "code"]
TASK_TYPES: tuple[str, ...] = ("multiple_choice", "generate", "perplexity", "code")
BUILTIN_DIR = Path(__file__).parent / "builtin"

# Metrics each type can compute; listing another one is a config error rather than a silent no-op.
METRICS: dict[str, tuple[str, ...]] = {
    "multiple_choice": ("acc", "acc_norm"),
    "generate": ("exact_match",),
    "perplexity": ("word_perplexity", "byte_perplexity", "bits_per_byte"),
    "code": ("pass@k",),
}
_REQUIRED: dict[str, tuple[str, ...]] = {
    "multiple_choice": ("name", "type", "data", "prompt", "choices", "target"),
    "generate": ("name", "type", "data", "prompt", "target"),
    "perplexity": ("name", "type", "data", "target"),
    "code": ("name", "type", "data", "prompt", "target"),
}
_KNOWN = {"name", "type", "data", "fewshot_data", "prompt", "choices", "target", "fewshot", "fewshot_seed",
          "fewshot_delimiter", "target_delimiter", "metrics", "answer_regex", "answer_pick", "max_new_tokens",
          "stop", "chat", "entry_point", "samples", "k", "timeout_s", "memory_mb", "temperature", "description",
          "system", "code_prefix", "image", "image_position"}
_NOT_PERPLEXITY = ("multiple_choice", "generate", "code")
_GENERATIVE = ("generate", "code")
# Fields a run may override (``--task-option``), and the task types each one means something for.
RUN_OPTIONS: dict[str, tuple[str, ...]] = {
    "chat": _NOT_PERPLEXITY, "system": _NOT_PERPLEXITY, "fewshot": _NOT_PERPLEXITY,
    "fewshot_seed": _NOT_PERPLEXITY, "max_new_tokens": _GENERATIVE, "stop": _GENERATIVE,
    "temperature": _GENERATIVE, "samples": ("code",), "k": ("code",), "timeout_s": ("code",),
    "memory_mb": ("code",),
}

_JINJA = ImmutableSandboxedEnvironment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)


@dataclass
class Task:
    """A validated task; ``docs`` are the evaluation records, ``fewshot_docs`` the pool for shots."""

    name: str
    type: TaskType
    source: Path
    docs: list[dict[str, Any]]
    prompt: str | None
    target: str
    choices: str | None = None
    fewshot: int = 0
    fewshot_seed: int = 1234
    fewshot_docs: list[dict[str, Any]] | None = None  # None: draw from ``docs`` excluding the current one
    fewshot_delimiter: str = "\n\n"
    target_delimiter: str = " "
    metrics: list[str] = field(default_factory=list)
    answer_regex: re.Pattern | None = None
    answer_pick: Literal["first", "last"] = "first"
    max_new_tokens: int = 32
    stop: list[str] = field(default_factory=list)
    chat: bool = False
    entry_point: str | None = None
    samples: int = 1
    k: list[int] = field(default_factory=lambda: [1])
    temperature: float = 0.0
    timeout_s: float = 5.0
    memory_mb: int = 512
    description: str = ""
    system: str | None = None  # chat tasks: a system message before the turns
    code_prefix: str | None = None  # code tasks: template of the code the completion continues (default: prompt)
    image: str | None = None  # multimodal tasks: the record field holding an image path (relative to the data file)
    image_position: Literal["before", "after"] = "before"  # where the image placeholder goes around the prompt
    data_file: str = ""  # the data path as the task file names it (relative to the task file)

    # ---- prompts -------------------------------------------------------------------------------
    def render(self, doc: dict[str, Any]) -> str:
        """The prompt text of one record (no few-shot examples)."""
        return render_template(self.prompt or "", doc, self.source)

    def gold_text(self, doc: dict[str, Any]) -> str:
        """The reference continuation of a record, used for few-shot answers."""
        value = _field(doc, self.target, self.source)
        if self.type == "multiple_choice":
            return self.choice_list(doc)[self.gold_index(doc)]
        return str(value)

    def choice_list(self, doc: dict[str, Any]) -> list[str]:
        value = _field(doc, self.choices or "", self.source)
        if not isinstance(value, list) or not value:
            raise ConfigError(f"{self.source}: field {self.choices!r} must be a non-empty list of choices")
        return [str(c) for c in value]

    def gold_index(self, doc: dict[str, Any]) -> int:
        """The target as an index into the choices (an int, or the text of one choice)."""
        value, choices = _field(doc, self.target, self.source), self.choice_list(doc)
        if isinstance(value, int) and 0 <= value < len(choices):
            return value
        if str(value) in choices:
            return choices.index(str(value))
        raise ConfigError(f"{self.source}: target {value!r} (field {self.target!r}) is neither an index "
                          f"nor one of the choices {choices}")

    def shots(self, index: int) -> list[dict[str, Any]]:
        """Few-shot records for ``docs[index]``.

        Seeded per document (not one stream across the run) so a doc gets the same shots whatever
        ``--limit`` or order is used; from the same file the current doc is never its own example.
        """
        if self.fewshot <= 0:
            return []
        rng = random.Random(f"{self.fewshot_seed}:{index}")
        if self.fewshot_docs is not None:
            pool = self.fewshot_docs
        else:
            pool = [d for i, d in enumerate(self.docs) if i != index]
        if len(pool) < self.fewshot:
            raise ConfigError(f"{self.source}: fewshot={self.fewshot} but only {len(pool)} examples available")
        return rng.sample(pool, self.fewshot)

    def context(self, index: int, tokenizer: Any = None, image_token: str | None = None) -> str:
        """The model input for ``docs[index]``: few-shot examples then its prompt, joined as lm-eval joins
        them; for a chat task, :meth:`messages` rendered by ``tokenizer``'s chat template. A multimodal task's
        prompt carries ``image_token`` (the model processor's placeholder) before or after its text."""
        if self.chat:
            if tokenizer is None or getattr(tokenizer, "chat_template", None) is None:
                raise LmforgeError(f"task {self.name} ({self.source}) uses chat: true, which needs a tokenizer "
                                   "with a chat template")
            return tokenizer.apply_chat_template(self.messages(index, image_token), add_generation_prompt=True,
                                                 tokenize=False)
        parts = [self.render(s) + self.target_delimiter + self.gold_text(s) for s in self.shots(index)]
        parts.append(self._prompt_with_image(self.docs[index], image_token))
        return self.fewshot_delimiter.join(parts)

    def messages(self, index: int, image_token: str | None = None) -> list[dict[str, str]]:
        """The chat of ``docs[index]``: system message, one user/assistant exchange per shot, the prompt."""
        msgs = [{"role": "system", "content": self.system}] if self.system else []
        for shot in self.shots(index):
            msgs += [{"role": "user", "content": self.render(shot)},
                     {"role": "assistant", "content": self.gold_text(shot)}]
        msgs.append({"role": "user", "content": self._prompt_with_image(self.docs[index], image_token)})
        return msgs

    def _prompt_with_image(self, doc: dict[str, Any], image_token: str | None) -> str:
        text = self.render(doc)
        if self.image is None:
            return text
        if not image_token:
            raise LmforgeError(f"task {self.name} ({self.source}) has images (field 'image'): it needs a "
                               "vision-language model and its processor's image placeholder")
        return image_token + text if self.image_position == "before" else text + image_token

    def image_path(self, doc: dict[str, Any]) -> Path:
        """A multimodal task's image file for ``doc`` (relative paths are relative to the data file)."""
        return self.data_dir / str(_field(doc, self.image or "", self.source))

    @property
    def data_dir(self) -> Path:
        return self.source.parent / Path(self.data_file).parent

    def program_prefix(self, doc: dict[str, Any]) -> str:
        """Code tasks: the code a completion is appended to (``code_prefix``, else the prompt)."""
        if self.code_prefix is not None:
            return render_template(self.code_prefix, doc, self.source)
        return self.render(doc)

    def extract(self, text: str) -> str | None:
        """The answer in a generation: the regex's first group (or whole match), else the stripped text."""
        if self.answer_regex is None:
            return text.strip()
        found = list(self.answer_regex.finditer(text))
        if not found:
            return None
        m = found[0] if self.answer_pick == "first" else found[-1]
        return m.group(1) if m.re.groups else m.group(0)


# ---- helpers -----------------------------------------------------------------------------------
def _field(doc: dict[str, Any], name: str, source: Path) -> Any:
    if name not in doc:
        raise ConfigError(f"{source}: a record has no field {name!r} (fields: {sorted(doc)})")
    return doc[name]


def render_template(template: str, doc: dict[str, Any], source: Path | str = "<task>") -> str:
    """jinja2 when the template has ``{{``/``{%``, else ``str.format(**doc)``."""
    try:
        if "{{" in template or "{%" in template:
            return _JINJA.from_string(template).render(**doc)
        return template.format(**doc)
    except KeyError as e:
        raise ConfigError(f"{source}: prompt uses field {e.args[0]!r} that a record lacks "
                          f"(fields: {sorted(doc)})") from None
    except jinja2.UndefinedError as e:
        raise ConfigError(f"{source}: prompt template: {e} (fields: {sorted(doc)})") from None
    except jinja2.TemplateError as e:
        raise ConfigError(f"{source}: prompt is not a valid jinja2 template: {e}") from None
    except (IndexError, ValueError, AttributeError) as e:
        raise ConfigError(f"{source}: prompt is not a valid format string: {e}") from None


def read_jsonl(path: Path, source: Path | None = None) -> list[dict[str, Any]]:
    """Records of a JSONL file; errors name the file and line."""
    where = f"{source}: " if source else ""
    if not path.is_file():
        raise ConfigError(f"{where}data file {path} does not exist")
    docs = []
    for line_at, doc in iter_jsonl(path, error=ConfigError):
        if not isinstance(doc, dict):
            raise ConfigError(f"{line_at}: each line must be a JSON object")
        docs.append(doc)
    if not docs:
        raise ConfigError(f"{where}data file {path} has no records")
    return docs


def _typed(raw: dict, key: str, kind: type | tuple[type, ...], source: Path, default: Any) -> Any:
    value = raw.get(key, default)
    if value is default:
        return value
    kinds = kind if isinstance(kind, tuple) else (kind,)
    # bool is an int subclass; `fewshot: true` is a mistake, not 1.
    if not isinstance(value, kind) or (isinstance(value, bool) and bool not in kinds):
        raise ConfigError(f"{source}: field {key!r} must be {_kind_name(kind)}, got {value!r}")
    return value


def _kind_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(k.__name__ for k in kinds)


def compile_regex(pattern: Any, source: Path, key: str = "answer_regex") -> re.Pattern:
    if not isinstance(pattern, str):
        raise ConfigError(f"{source}: field {key!r} must be a string, got {pattern!r}")
    try:
        return re.compile(pattern)
    except re.error as e:
        raise ConfigError(f"{source}: field {key!r}: regex '{pattern}' does not compile ({e})") from None


# ---- loading -----------------------------------------------------------------------------------
def load_task(path: str | Path, options: Mapping[str, Any] | None = None) -> Task:
    """Read and validate one task YAML file (and its data); ``options`` override fields of the file (only
    :data:`RUN_OPTIONS`, each for the task types it applies to); those that change it extend the task's name."""
    source = Path(path)
    if not source.is_file():
        raise ConfigError(f"task file {source} does not exist")
    try:
        raw = yaml.safe_load(source.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: not valid YAML ({e})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: a task file must be a YAML mapping")
    options = dict(options or {})
    _check_options(options, raw.get("type"), source)
    changed = {k: v for k, v in options.items() if k not in raw or raw[k] != v}  # what the name records
    raw.update(options)
    kind = raw.get("type")
    if kind not in TASK_TYPES:
        if "type" not in raw:
            raise ConfigError(f"{source}: missing required field 'type' (one of {', '.join(TASK_TYPES)})")
        raise ConfigError(f"{source}: field 'type' must be one of {', '.join(TASK_TYPES)}, got {kind!r}")
    for key in _REQUIRED[kind]:
        if raw.get(key) in (None, ""):
            raise ConfigError(f"{source}: missing required field {key!r} for a {kind} task")
    unknown = sorted(set(raw) - _KNOWN)
    if unknown:
        raise ConfigError(f"{source}: unknown field(s) {', '.join(map(repr, unknown))}")

    metrics = _typed(raw, "metrics", list, source, None) or list(METRICS[kind])
    bad = [m for m in metrics if m not in METRICS[kind]]
    if bad:
        raise ConfigError(f"{source}: field 'metrics': {bad} not available for {kind} tasks "
                          f"(choose from {list(METRICS[kind])})")
    fewshot = _typed(raw, "fewshot", int, source, 0)
    if fewshot < 0:
        raise ConfigError(f"{source}: field 'fewshot' must be >= 0")
    samples = _typed(raw, "samples", int, source, 1)
    ks = _typed(raw, "k", (list, int), source, [1])
    ks = [ks] if isinstance(ks, int) else ks
    if samples < 1 or not ks or any(not isinstance(k, int) or not 1 <= k <= samples for k in ks):
        raise ConfigError(f"{source}: field 'k' must list integers in [1, samples={samples}], got {ks}")
    temperature = float(_typed(raw, "temperature", (int, float), source, 0.0))
    if samples > 1 and temperature <= 0:
        raise ConfigError(f"{source}: samples={samples} with temperature 0 repeats one greedy sample; "
                          "set field 'temperature' > 0")
    pick = raw.get("answer_pick", "first")
    if pick not in ("first", "last"):
        raise ConfigError(f"{source}: field 'answer_pick' must be 'first' or 'last', got {pick!r}")
    stop = _typed(raw, "stop", (list, str), source, [])
    stop = [stop] if isinstance(stop, str) else [str(s) for s in stop]
    chat = _typed(raw, "chat", bool, source, False)
    if chat and kind == "perplexity":
        raise ConfigError(f"{source}: field 'chat' does not apply to perplexity tasks (they score raw text)")
    system = _typed(raw, "system", str, source, None)
    if system is not None and not chat:
        raise ConfigError(f"{source}: field 'system' needs chat: true")
    code_prefix = _typed(raw, "code_prefix", str, source, None)
    if code_prefix is not None and kind != "code":
        raise ConfigError(f"{source}: field 'code_prefix' is for code tasks only")
    image = _typed(raw, "image", str, source, None)
    if image is not None and kind not in ("generate", "multiple_choice"):
        raise ConfigError(f"{source}: field 'image' is for generate and multiple_choice tasks, not {kind}")
    if image is not None and fewshot:
        raise ConfigError(f"{source}: a task with images (field 'image') takes no few-shot examples "
                          f"(fewshot={fewshot})")
    image_position = raw.get("image_position", "before")
    if image_position not in ("before", "after"):
        raise ConfigError(f"{source}: field 'image_position' must be 'before' or 'after', got {image_position!r}")
    name = str(raw["name"])
    if changed:
        name += "[" + ",".join(f"{k}={_option_text(v)}" for k, v in sorted(changed.items())) + "]"

    data = source.parent / str(raw["data"])
    docs = read_jsonl(data, source)
    fewshot_docs = None
    if raw.get("fewshot_data"):
        fewshot_docs = read_jsonl(source.parent / str(raw["fewshot_data"]), source)

    task = Task(
        name=name, type=kind, source=source, docs=docs,
        prompt=_typed(raw, "prompt", str, source, None), target=str(raw["target"]),
        choices=raw.get("choices"), fewshot=fewshot, fewshot_seed=_typed(raw, "fewshot_seed", int, source, 1234),
        fewshot_docs=fewshot_docs, fewshot_delimiter=_typed(raw, "fewshot_delimiter", str, source, "\n\n"),
        target_delimiter=_typed(raw, "target_delimiter", str, source, "" if chat else " "), metrics=list(metrics),
        answer_regex=compile_regex(raw["answer_regex"], source) if raw.get("answer_regex") is not None else None,
        answer_pick=pick, max_new_tokens=_typed(raw, "max_new_tokens", int, source, 32), stop=stop,
        chat=chat, entry_point=_typed(raw, "entry_point", str, source, None),
        samples=samples, k=ks, temperature=temperature,
        timeout_s=float(_typed(raw, "timeout_s", (int, float), source, 5.0)),
        memory_mb=_typed(raw, "memory_mb", int, source, 512),
        description=_typed(raw, "description", str, source, ""), system=system, code_prefix=code_prefix,
        image=image, image_position=image_position, data_file=str(raw["data"]),
    )
    _check_first_doc(task)
    return task


def _check_first_doc(task: Task) -> None:
    """Render the first record now, so a template/field mistake fails at load time, not mid-run."""
    doc = task.docs[0]
    if task.prompt is not None:
        task.render(doc)
    if task.code_prefix is not None:
        task.program_prefix(doc)
    _field(doc, task.target, task.source)
    if task.type == "multiple_choice":
        task.gold_index(doc)
    if task.type == "perplexity" and not isinstance(doc[task.target], str):
        raise ConfigError(f"{task.source}: field {task.target!r} must hold the document text")
    if task.image is not None:  # every image, now: a missing file fails before any model runs
        for n, d in enumerate(task.docs, 1):
            if not task.image_path(d).is_file():
                raise ConfigError(f"{task.source}: record {n} of {task.data_file}: image {task.image_path(d)} "
                                  "does not exist")
    if task.fewshot and task.fewshot_docs is None and len(task.docs) <= task.fewshot:
        raise ConfigError(f"{task.source}: fewshot={task.fewshot} needs more than {task.fewshot} records "
                          "in the data file (or a fewshot_data file)")


def builtin_tasks() -> dict[str, Path]:
    """Names of the tasks shipped with lmforge -> their YAML files."""
    return {p.stem: p for p in sorted(BUILTIN_DIR.glob("*.yaml"))}


def resolve_task(name_or_path: str, options: Mapping[str, Any] | None = None) -> Task:
    """A built-in task name or a path to a task YAML file, with run ``options`` (see :func:`load_task`)."""
    builtin = builtin_tasks()
    if name_or_path in builtin:
        return load_task(builtin[name_or_path], options)
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        return load_task(path, options)
    raise ConfigError(f"unknown task {name_or_path!r}: not a built-in task ({', '.join(builtin) or 'none'}) "
                      "nor a task YAML file")


# ---- run options -------------------------------------------------------------------------------
def _check_options(options: Mapping[str, Any], kind: Any, source: Path) -> None:
    for key in options:
        if key not in RUN_OPTIONS:
            raise ConfigError(f"unknown task option {key!r} for {source.name} (options: {', '.join(RUN_OPTIONS)})")
        if kind in TASK_TYPES and kind not in RUN_OPTIONS[key]:
            raise ConfigError(f"task option {key!r} does not apply to {source.name}, a {kind} task "
                              f"(it applies to {', '.join(RUN_OPTIONS[key])} tasks)")


def _option_text(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix("\n...").strip()


def parse_task_options(items: Sequence[str]) -> dict[str, Any]:
    """``KEY=VALUE`` (every task it applies to) or ``TASK:KEY=VALUE`` strings, values read as YAML
    (``true``, ``3``, ``[]``, text; ``system`` is taken as text) -> the ``options`` of :func:`resolve_tasks`."""
    out: dict[str, Any] = {}
    for item in items:
        left, eq, text = item.partition("=")
        task, colon, key = left.strip().rpartition(":")
        if not eq or not key:
            raise ConfigError(f"task option {item!r} is not KEY=VALUE or TASK:KEY=VALUE")
        if key not in RUN_OPTIONS:
            raise ConfigError(f"unknown task option {key!r} (options: {', '.join(RUN_OPTIONS)})")
        if key == "system" or not text.strip():  # free text: "Be brief: no prose" is not a mapping
            value: Any = text
        else:
            try:
                value = yaml.safe_load(text)
            except yaml.YAMLError:
                value = text
        if colon:
            if not task:
                raise ConfigError(f"task option {item!r}: empty task name before ':'")
            per_task = out.setdefault(task, {})
            if not isinstance(per_task, dict):
                raise ConfigError(f"task option {item!r}: {task!r} is an option name, not a task")
            per_task[key] = value
        else:
            out[key] = value
    return out


def resolve_tasks(names: Sequence[str], options: Mapping[str, Any] | None = None) -> list[Task]:
    """Tasks with run options. ``options`` maps option names to values for every task they apply to
    (an option that applies to none of them is an error), and task names (as given in ``names``) to
    mappings of options for that task alone, which win over the run-wide ones; e.g.
    ``{"chat": True, "code": {"max_new_tokens": 512}}``."""
    options = dict(options or {})
    shared = {k: v for k, v in options.items() if not isinstance(v, Mapping)}
    per_task = {k: dict(v) for k, v in options.items() if isinstance(v, Mapping)}
    for key in shared:
        if key not in RUN_OPTIONS:
            raise ConfigError(f"unknown task option {key!r} (options: {', '.join(RUN_OPTIONS)}; "
                              f"or a task name mapped to options: {', '.join(names)})")
    missing = sorted(set(per_task) - set(names))
    if missing:
        raise ConfigError(f"task options for {', '.join(map(repr, missing))}, which is not among the tasks "
                          f"({', '.join(names)})")
    tasks, used = [], set()
    for name in names:
        kind = _peek_type(name)
        mine = {k: v for k, v in shared.items() if kind is None or kind in RUN_OPTIONS[k]}
        used |= set(mine)
        mine.update(per_task.get(name, {}))
        tasks.append(resolve_task(name, mine))
    unused = sorted(set(shared) - used)
    if unused:
        raise ConfigError(f"task option(s) {', '.join(map(repr, unused))} apply to none of the tasks "
                          f"({', '.join(names)})")
    return tasks


def _peek_type(name_or_path: str) -> Any:
    """The ``type`` of a task file, or None when it cannot be read (then loading reports why)."""
    path = builtin_tasks().get(name_or_path, Path(name_or_path))
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return None
    return raw.get("type") if isinstance(raw, dict) else None

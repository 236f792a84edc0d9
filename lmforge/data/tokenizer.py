"""Tokenizer: a thin wrapper over the Rust ``tokenizers`` library plus HF-compatible chat templates.

A tokenizer directory is the Hugging Face layout: ``tokenizer.json`` (required) and optionally
``tokenizer_config.json`` (special tokens, chat template), ``special_tokens_map.json``,
``chat_template.jinja`` and ``generation_config.json`` (extra stop ids). Encoding, decoding and chat
rendering are meant to give exactly what ``transformers.AutoTokenizer`` gives on the same directory,
so a model trained here can be served by anything in that ecosystem and vice versa.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache, wraps
from pathlib import Path
from typing import Any, ClassVar

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
import jinja2.visitor
from jinja2.sandbox import MAX_RANGE, ImmutableSandboxedEnvironment
from tokenizers import AddedToken, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as _RustTokenizer

from lmforge.data.chat import validate_messages
from lmforge.errors import CheckpointError, LmforgeError
from lmforge.io import atomic_directory, atomic_file

# The named special tokens transformers passes to chat templates (its SPECIAL_TOKENS_ATTRIBUTES).
SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")

# ChatML. The generation block covers the assistant's content *and* its end marker, so the assistant
# mask teaches the model to stop; the newline after the marker is template glue, not generated.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}"
    "{{ message['content'] + '<|im_end|>' + '\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

DEFAULT_EOS_TOKEN = "<|endoftext|>"
DEFAULT_PAD_TOKEN = "<|pad|>"
DEFAULT_SPECIAL_TOKENS: tuple[str, ...] = (DEFAULT_EOS_TOKEN, "<|im_start|>", "<|im_end|>", DEFAULT_PAD_TOKEN)

# Same test transformers uses to decide whether a template marks assistant spans.
_GENERATION_TAG = re.compile(r"\{\%-?\s*generation\s*-?\%\}")


# ---- chat template environment ------------------------------------------------------------------
class _GenerationTracker(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}``: renders its body and records its character span.

    Spans are measured against the chunks ``Template.generate`` has yielded so far, which is how
    transformers measures them too, so the two agree even for odd templates.
    """

    tags: ClassVar[set[str]] = {"generation"}
    # (chunks yielded so far, spans found); None outside ``Tokenizer.render_chat``.
    _tracking: ClassVar[ContextVar[tuple[list[str], list[tuple[int, int]]] | None]] = ContextVar(
        "lmforge_generation_spans", default=None)

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render_block"), [], [], body).set_lineno(lineno)

    def _render_block(self, caller: Any) -> str:
        text = caller()
        tracking = self._tracking.get()
        if tracking is not None:
            chunks, spans = tracking
            start = sum(len(c) for c in chunks)
            spans.append((start, start + len(text)))
        return text


class _SafeNamespace(jinja2.utils.Namespace):
    """``namespace()`` that refuses underscore names, closing a route to Python internals."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # self is args[0], as in jinja's Namespace
        self, rest = args[0], args[1:]
        attrs = dict(*rest, **kwargs)
        for name in attrs:
            _SafeNamespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _SafeNamespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: object) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates may not set namespace attribute {name!r}")


def _raise_exception(message: str) -> None:
    # Templates use this to reject conversations they cannot format (e.g. non-alternating roles).
    raise LmforgeError(f"chat template rejected the conversation: {message}")


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    # Unlike jinja's own filter this does not HTML-escape, matching what models were trained on.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


# ---- chat template cost bounds ------------------------------------------------------------------
@dataclass(frozen=True)
class TemplateLimits:
    """What rendering one chat template may cost. The sandbox stops a template (it comes with a model
    directory) from escaping; these stop it, or a conversation fed to it, from burning unbounded CPU time or
    memory: string/list repetition and concatenation, nested loops, huge format widths."""

    max_seconds: float = 10.0  # wall time of one render
    max_steps: int = 2_000_000  # loop iterations + calls + guarded operators in one render
    max_output_chars: int = 20_000_000  # characters rendered (captured blocks and expression output count)
    max_value_chars: int = 20_000_000  # longest string, list or dict any one operation may build
    max_int_arg: int = MAX_RANGE  # largest integer a string method or filter takes (widths, counts)


_DEFAULT_TEMPLATE_LIMITS = TemplateLimits()
_TEMPLATE_LIMITS: ContextVar[TemplateLimits | None] = ContextVar("lmforge_template_limits", default=None)


@contextlib.contextmanager
def chat_template_limits(limits: TemplateLimits) -> Iterator[None]:
    """Render chat templates under ``limits`` inside this block (this thread / task only)."""
    token = _TEMPLATE_LIMITS.set(limits)
    try:
        yield
    finally:
        _TEMPLATE_LIMITS.reset(token)


class TemplateCostError(LmforgeError):
    """A chat template went past its TemplateLimits while rendering."""


class _Budget:
    """One render's running costs against its limits."""

    def __init__(self, limits: TemplateLimits) -> None:
        self.limits = limits
        self.deadline = time.monotonic() + limits.max_seconds
        self.steps = 0
        self.output = 0

    def fail(self, what: str) -> None:
        raise TemplateCostError(f"chat template rendering stopped: {what} (the model's chat template, or this "
                                "conversation, is too costly to render)")

    def step(self) -> None:
        self.steps += 1
        if self.steps & 31:  # the clock every 32 steps: each step is size-bounded, so this overruns little
            return
        if self.steps > self.limits.max_steps:
            self.fail(f"more than {self.limits.max_steps} loop iterations, calls and operations")
        if time.monotonic() > self.deadline:
            self.fail(f"it took longer than {self.limits.max_seconds:g} s")

    def size(self, n: int, what: str = "a value") -> None:
        if n > self.limits.max_value_chars:
            self.fail(f"{what} of {n} items/characters would exceed {self.limits.max_value_chars}")

    def emit(self, n: int) -> None:
        self.output += n
        if self.output > self.limits.max_output_chars:
            self.fail(f"it rendered more than {self.limits.max_output_chars} characters")

    def ints(self, args: Iterable[Any], what: str) -> None:
        for a in args:
            if isinstance(a, int) and not isinstance(a, bool) and abs(a) > self.limits.max_int_arg:
                self.fail(f"{what} was given the integer {a} (at most {self.limits.max_int_arg})")

    def result(self, value: Any) -> Any:
        if isinstance(value, (str, list, tuple, dict, set, bytes)):
            self.size(len(value))
        return value


_BUDGET: ContextVar[_Budget | None] = ContextVar("lmforge_template_budget", default=None)
_FORMAT_NUMBER = re.compile(r"\d+")


def _sized(x: Any) -> int:
    return len(x) if isinstance(x, (str, list, tuple, dict, set, bytes)) else 0


class _CountedIterable:
    """A for-loop's iterable that charges one step per item (``len`` still works, for ``loop.length``)."""

    def __init__(self, iterable: Any, budget: _Budget) -> None:
        self._iterable, self._budget = iterable, budget

    def __len__(self) -> int:
        return len(self._iterable)

    def __iter__(self) -> Iterator[Any]:
        for item in self._iterable:
            self._budget.step()
            yield item


class _CostGuard(jinja2.ext.Extension):
    """Helpers the rewritten template calls: every for-loop's iterable and every ``~`` concatenation pass
    through here (see ``_GuardRewrite``), so nested loops and doubling strings are counted."""

    def _iterate(self, iterable: Any) -> Any:
        budget = _BUDGET.get()
        return iterable if budget is None else _CountedIterable(iterable, budget)

    def _concat(self, *parts: Any) -> str:
        strs = [str(p) for p in parts]
        budget = _BUDGET.get()
        if budget is not None:
            budget.size(sum(map(len, strs)), "a ~ concatenation")
        return "".join(strs)


class _GuardRewrite(jinja2.visitor.NodeTransformer):
    def __init__(self, guard: _CostGuard) -> None:
        self.guard = guard

    def visit_For(self, node: jinja2.nodes.For) -> jinja2.nodes.Node:
        node = self.generic_visit(node)
        node.iter = self.guard.call_method("_iterate", [node.iter], lineno=node.lineno)
        return node

    def visit_Concat(self, node: jinja2.nodes.Concat) -> jinja2.nodes.Node:
        node = self.generic_visit(node)
        return self.guard.call_method("_concat", list(node.nodes), lineno=node.lineno)


def _guard_filter(name: str, func: Callable) -> Callable:
    @wraps(func)  # keeps jinja's pass_context/pass_eval_context marker
    def guarded(*args: Any, **kwargs: Any) -> Any:
        # No render running: jinja is folding a constant filter call at compile time; check it all the same
        # (a refusal here only stops the folding, and the render then refuses it with the render's budget).
        budget = _BUDGET.get() or _Budget(_TEMPLATE_LIMITS.get() or _DEFAULT_TEMPLATE_LIMITS)
        budget.step()
        # The parameters, not the value filtered (``{{ 10**9 | string }}`` is fine, ``center(10**9)`` is not).
        params = args[2 if getattr(func, "jinja_pass_arg", None) is not None else 1:]
        budget.ints([*params, *kwargs.values()], f"the {name} filter")
        if name == "join":  # the result's size is known before it is built
            items = [a for a in args if isinstance(a, (list, tuple))]
            sep = kwargs.get("d", next((a for a in args[2:3] if isinstance(a, str)), ""))
            if items:
                budget.size(sum(_sized(x) for x in items[0]) + len(sep) * len(items[0]), "the join filter's result")
        return budget.result(func(*args, **kwargs))

    return guarded


class _TemplateEnvironment(ImmutableSandboxedEnvironment):
    """The sandbox plus cost bounds (TemplateLimits), active while ``Tokenizer.render_chat`` renders."""

    # Not constant-folded at compile time either: jinja skips folding intercepted operators.
    intercepted_binops = frozenset({"*", "**", "+", "%"})

    def _parse(self, source: str, name: str | None, filename: str | None) -> jinja2.nodes.Template:
        tree = super()._parse(source, name, filename)
        return _GuardRewrite(self.extensions[_CostGuard.identifier]).visit(tree)

    def call_binop(self, context: jinja2.runtime.Context, operator_: str, left: Any, right: Any) -> Any:
        budget = _BUDGET.get()
        if budget is None:
            return self.binop_table[operator_](left, right)
        budget.step()
        if operator_ == "*":  # a repetition's size is known before it is built
            for seq, times in ((left, right), (right, left)):
                if isinstance(times, int) and _sized(seq):
                    budget.size(_sized(seq) * max(times, 0), "a repetition")
        elif operator_ == "**":
            if isinstance(left, int) and isinstance(right, int) and abs(left) > 1 and right > 4096:
                budget.fail(f"the power {left} ** {right} is too large")
        elif operator_ == "%" and isinstance(left, str):
            self._check_format(budget, left, right if isinstance(right, tuple) else (right,))
        # "+": both sides are within the size bound already, so checking the sum after building it suffices
        return budget.result(self.binop_table[operator_](left, right))

    def _check_format(self, budget: _Budget, fmt: str, args: Iterable[Any]) -> None:
        # Widths and precisions ("%0999999999d", "{:>999999999}") build strings of that size.
        budget.ints((int(n) for n in _FORMAT_NUMBER.findall(fmt) if len(n) < 20), "a format width")
        if any(len(n) >= 20 for n in _FORMAT_NUMBER.findall(fmt)):
            budget.fail("a format width is too large")
        budget.ints(args, "a format")

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        wrapped = super().wrap_str_format(value)
        if wrapped is None:
            return None
        fmt = value.__self__

        @wraps(wrapped)
        def checked(*args: Any, **kwargs: Any) -> str:
            budget = _BUDGET.get()
            if budget is not None:
                self._check_format(budget, fmt, [*args, *kwargs.values()])
                return budget.result(wrapped(*args, **kwargs))
            return wrapped(*args, **kwargs)

        return checked

    def call(__self, __context: jinja2.runtime.Context, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: PYI063
        # (jinja's own signature: double underscores so no keyword argument of the call can clash)
        budget = _BUDGET.get()
        if budget is None:
            return super().call(__context, __obj, *args, **kwargs)
        budget.step()
        owner = getattr(__obj, "__self__", None)
        if isinstance(owner, str):  # string methods that grow the string: check the size before building it
            budget.ints([*args, *kwargs.values()], f"str.{getattr(__obj, '__name__', '?')}")
            name = getattr(__obj, "__name__", "")
            if name == "join" and args and isinstance(args[0], (list, tuple)):
                budget.size(sum(_sized(x) for x in args[0]) + len(owner) * len(args[0]), "a join")
            elif name == "replace" and len(args) >= 2 and isinstance(args[1], str):
                budget.size(len(owner) + (len(owner) + 1) * len(args[1]), "a replace")
            elif name == "expandtabs":
                width = args[0] if args else kwargs.get("tabsize", 8)
                budget.size(len(owner) * max(int(width), 1), "expandtabs")
        return budget.result(super().call(__context, __obj, *args, **kwargs))


def _count_output(value: Any) -> Any:
    # jinja's finalize: sees every {{ expression }}'s value, captured blocks ({% set x %}) included
    budget = _BUDGET.get()
    if budget is not None:
        budget.emit(len(value) if isinstance(value, str) else len(str(value)))
    return value


@lru_cache(maxsize=32)
def _compile_template(template: str) -> jinja2.Template:
    env = _TemplateEnvironment(trim_blocks=True, lstrip_blocks=True, finalize=_count_output,
                               extensions=[_GenerationTracker, jinja2.ext.loopcontrols, _CostGuard])
    env.filters["tojson"] = _tojson
    env.filters = {name: _guard_filter(name, f) for name, f in env.filters.items()}
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = lambda *a, **k: dict(*a, **k)  # a plain callable, no class attributes to abuse
    env.globals["namespace"] = _SafeNamespace
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise LmforgeError(f"chat template does not compile: {e.message} (template line {e.lineno})") from None


def _template_messages(messages: Any) -> list[dict]:
    """Validated records (chat.validate_messages) as shallow copies without None values (as transformers drops them)."""
    out = []
    for m in validate_messages(messages, template=True):  # an assistant turn that only calls tools has no text
        msg = {k: v for k, v in m.items() if v is not None}
        # transformers exposes reasoning under both names templates read (Qwen: reasoning_content, gpt-oss: thinking).
        reasoning = next((msg[k] for k in _REASONING_FIELDS if k in msg), None)
        if reasoning is not None:
            msg = {"thinking": reasoning, **msg, "reasoning_content": reasoning}
        out.append(msg)
    return out


# ---- file loading -------------------------------------------------------------------------------
def _read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: malformed JSON ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _token_content(value: Any) -> str | None:
    # Configs store tokens as plain strings or as serialized AddedToken dicts.
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _pick_template(value: Any, source: Path) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):  # the older "named templates" form: [{"name": ..., "template": ...}]
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        if "default" in named:
            return named["default"]
    raise CheckpointError(f"{source}: chat_template must be a string or a list with a 'default' entry")


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a tokenizer directory (or a ``tokenizer.json`` path) as transformers would."""
    path = Path(path)
    if path.is_file() and path.name == "tokenizer.json":
        path = path.parent
    tok_file = path / "tokenizer.json"
    if path.is_file() and path.suffix.lower() == ".gguf":
        return _load_gguf_tokenizer(path)
    if path.is_file():
        raise CheckpointError(f"{path} is a file, not a tokenizer directory (expected a directory with tokenizer.json)")
    if not path.is_dir():
        raise CheckpointError(f"tokenizer directory {path} does not exist")
    if not tok_file.is_file():
        raise CheckpointError(f"{path} has no tokenizer.json (only the fast 'tokenizers' format is supported)")
    try:
        backend = _RustTokenizer.from_file(str(tok_file))
    except Exception as e:  # noqa: BLE001 - the Rust side raises a bare Exception with a serde message
        raise CheckpointError(f"{tok_file}: not a valid tokenizer file ({e})") from None

    config = _read_json(path / "tokenizer_config.json") or {}
    token_map = _read_json(path / "special_tokens_map.json") or {}
    special: dict[str, str] = {}
    for key in SPECIAL_TOKEN_KEYS:
        # tokenizer_config.json wins over the legacy special_tokens_map.json, as in transformers.
        value = _token_content(config.get(key, token_map.get(key)))
        if value is not None:
            special[key] = value
    extra = config.get("extra_special_tokens") or config.get("additional_special_tokens") or []
    extra_tokens = [t for t in (_token_content(v) for v in (extra.values() if isinstance(extra, dict) else extra)) if t]

    template_file = path / "chat_template.jinja"
    if template_file.is_file():  # transformers gives the standalone file priority over the config entry
        chat_template = template_file.read_text(encoding="utf-8")
    else:
        chat_template = _pick_template(config.get("chat_template"), path / "tokenizer_config.json")
    if chat_template is not None:
        _compile_template(chat_template)  # fail at load time, naming the problem, not mid-training

    gen = _read_json(path / "generation_config.json") or {}
    gen_eos = gen.get("eos_token_id")
    gen_eos_ids = [gen_eos] if isinstance(gen_eos, int) else [i for i in gen_eos or [] if isinstance(i, int)]

    max_len = config.get("model_max_length")
    return Tokenizer(backend, special_tokens=special, extra_special_tokens=extra_tokens,
                     chat_template=chat_template, extra_eos_ids=gen_eos_ids,
                     model_max_length=int(max_len) if isinstance(max_len, (int, float)) and max_len < 2**62 else None,
                     clean_up_tokenization_spaces=bool(config.get("clean_up_tokenization_spaces", False)))


def _load_gguf_tokenizer(path: Path) -> Tokenizer:
    """The tokenizer and chat template in a GGUF file's metadata (rebuilt as transformers' GGUF loader does)."""
    from lmforge.models.gguf import read_gguf_tokenizer

    parts = read_gguf_tokenizer(path)
    if parts.chat_template is not None:
        try:
            _compile_template(parts.chat_template)
        except LmforgeError as e:
            raise CheckpointError(f"{path}: tokenizer.chat_template: {e}") from None
    return Tokenizer(parts.backend, special_tokens=parts.special_tokens, chat_template=parts.chat_template,
                     extra_eos_ids=parts.eos_ids)


# ---- the tokenizer ------------------------------------------------------------------------------
class Tokenizer:
    """Encode/decode text and render chats; see the module docstring for the on-disk format."""

    def __init__(self, backend: _RustTokenizer, *, special_tokens: Mapping[str, str] | None = None,
                 extra_special_tokens: Sequence[str] = (), chat_template: str | None = None,
                 extra_eos_ids: Sequence[int] = (), model_max_length: int | None = None,
                 clean_up_tokenization_spaces: bool = False) -> None:
        self.backend = backend
        self.special_tokens = {k: v for k, v in (special_tokens or {}).items() if k in SPECIAL_TOKEN_KEYS and v}
        self.extra_special_tokens = list(extra_special_tokens)
        # transformers adds named special tokens missing from the vocab; do the same so ids agree.
        missing = [t for t in [*self.special_tokens.values(), *self.extra_special_tokens]
                   if backend.token_to_id(t) is None]
        if missing:
            backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in dict.fromkeys(missing)])
        self.chat_template = chat_template
        self.model_max_length = model_max_length
        self.clean_up_tokenization_spaces = clean_up_tokenization_spaces
        self.bos_id = self._id_of("bos_token")
        self.eos_id = self._id_of("eos_token")
        self.pad_id = self._id_of("pad_token")
        self.eos_ids: list[int] = list(dict.fromkeys(i for i in (self.eos_id, *extra_eos_ids) if i is not None))
        self._special_ids = frozenset(i for i, t in backend.get_added_tokens_decoder().items() if t.special)

    def _id_of(self, key: str) -> int | None:
        token = self.special_tokens.get(key)
        return None if token is None else self.backend.token_to_id(token)

    @property
    def pad_id_or_eos(self) -> int:
        """The id to pad batches with: the pad token, else the first end-of-sequence id, else 0. Padding is
        always masked out, so only its being a valid id matters."""
        for i in (self.pad_id, *self.eos_ids):
            if i is not None:
                return i
        return 0

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def bos_token(self) -> str | None:
        return self.special_tokens.get("bos_token")

    @property
    def eos_token(self) -> str | None:
        return self.special_tokens.get("eos_token")

    @property
    def pad_token(self) -> str | None:
        return self.special_tokens.get("pad_token")

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return (f"Tokenizer(vocab_size={self.vocab_size}, bos_id={self.bos_id}, eos_ids={self.eos_ids}, "
                f"pad_id={self.pad_id}, chat_template={'yes' if self.chat_template else 'no'})")

    # -- text <-> ids
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = True) -> list[list[int]]:
        # The Rust side splits the batch over threads (TOKENIZERS_PARALLELISM / RAYON_NUM_THREADS).
        return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=add_special_tokens)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        text = self.backend.decode(_as_id_list(ids), skip_special_tokens=skip_special_tokens)
        # transformers only applies this WordPiece-era cleanup to non-BPE models.
        if self.clean_up_tokenization_spaces and type(self.backend.model).__name__ != "BPE":
            text = _clean_up_tokenization(text)
        return text

    def incremental_decoder(self, skip_special_tokens: bool = True) -> IncrementalDecoder:
        return IncrementalDecoder(lambda ids: self.backend.decode(ids, skip_special_tokens=skip_special_tokens),
                                  self._special_ids if skip_special_tokens else frozenset())

    # -- chat
    def render_chat(self, messages: Sequence[Mapping], add_generation_prompt: bool = False,
                    chat_template: str | None = None, **template_kwargs: Any) -> tuple[str, list[tuple[int, int]]]:
        """Render ``messages`` to text; also return the character spans of ``{% generation %}`` blocks."""
        template = chat_template or self.chat_template
        if template is None:
            raise LmforgeError("this tokenizer has no chat template (set chat_template in tokenizer_config.json)")
        msgs = _template_messages(messages)
        compiled = _compile_template(template)
        # Special-token strings come first so explicit kwargs can override them, as in transformers.
        variables = {**self.special_tokens, "tools": None, "documents": None, **template_kwargs,
                     "messages": msgs, "add_generation_prompt": add_generation_prompt}
        chunks: list[str] = []
        spans: list[tuple[int, int]] = []
        token = _GenerationTracker._tracking.set((chunks, spans))
        budget = _Budget(_TEMPLATE_LIMITS.get() or _DEFAULT_TEMPLATE_LIMITS)
        budget_token = _BUDGET.set(budget)
        rendered = 0
        try:
            # Appending one chunk at a time is what lets the generation tracker measure offsets.
            for chunk in compiled.generate(**variables):
                chunks.append(chunk)
                rendered += len(chunk)
                if rendered > budget.limits.max_output_chars:
                    budget.fail(f"it rendered more than {budget.limits.max_output_chars} characters")
        except LmforgeError:
            raise
        except MemoryError:
            raise TemplateCostError("chat template rendering ran out of memory") from None
        except RecursionError:
            raise TemplateCostError("chat template rendering recursed too deeply") from None
        except jinja2.TemplateError as e:
            raise LmforgeError(f"chat template failed to render: {e}") from None
        except (TypeError, ValueError, KeyError, AttributeError) as e:
            raise LmforgeError(f"chat template failed to render: {type(e).__name__}: {e}") from None
        finally:
            _BUDGET.reset(budget_token)
            _GenerationTracker._tracking.reset(token)
        return "".join(chunks), spans

    def apply_chat_template(self, messages: Sequence[Mapping], add_generation_prompt: bool = False,
                            tokenize: bool = True, return_assistant_mask: bool = False,
                            **template_kwargs: Any) -> str | list[int] | tuple[list[int], list[int]]:
        """Render a chat like ``transformers`` does: text, ids, or ``(ids, assistant_mask)``.

        The mask is 1 on tokens the assistant generates. With ``{% generation %}`` blocks it is exactly
        transformers' ``assistant_masks``. Without them it is inferred by rendering each prefix of the
        chat (see ``_prefix_assistant_spans``), which assumes the template renders a conversation as the
        concatenation of its turns.
        """
        text, spans = self.render_chat(messages, add_generation_prompt, **template_kwargs)
        if not tokenize:
            if return_assistant_mask:
                raise LmforgeError("return_assistant_mask=True needs tokenize=True")
            return text
        # The template writes its own bos/eos, so the post-processor must not add them again.
        enc = self.backend.encode(text, add_special_tokens=False)
        if not return_assistant_mask:
            return enc.ids
        template = template_kwargs.get("chat_template") or self.chat_template
        if not _GENERATION_TAG.search(template or ""):
            spans = self._prefix_assistant_spans(messages, text, **template_kwargs)
        return enc.ids, _spans_to_mask(enc.offsets, spans)

    def _prefix_assistant_spans(self, messages: Sequence[Mapping], full: str,
                                **template_kwargs: Any) -> list[tuple[int, int]]:
        """Locate assistant turns for templates without generation blocks.

        For assistant message ``i``: its text starts where ``messages[:i]`` rendered with the generation
        prompt ends and stops where ``messages[:i+1]`` ends, minus trailing whitespace (template glue
        such as the newline after an end-of-turn marker). Both renders must be prefixes of the full
        chat; templates that rewrite earlier turns depending on what follows are refused.
        """
        spans = []
        for i, m in enumerate(messages):
            if m.get("role") != "assistant":
                continue
            try:
                before, _ = self.render_chat(messages[:i], add_generation_prompt=True, **template_kwargs)
                upto, _ = self.render_chat(messages[:i + 1], add_generation_prompt=False, **template_kwargs)
            except LmforgeError as e:
                raise LmforgeError(f"cannot locate assistant message {i} for the assistant mask: rendering the "
                                   f"conversation prefix failed ({e}); add {{% generation %}} markers to the "
                                   "chat template") from None
            if not (full.startswith(upto) and upto.startswith(before)):
                raise LmforgeError(f"cannot locate assistant message {i} for the assistant mask: the chat template "
                                   "does not render conversations as the concatenation of their turns; add "
                                   "{% generation %} markers to the chat template")
            start, end = len(before), len(upto)
            while end > start and upto[end - 1].isspace():
                end -= 1
            if end > start:
                spans.append((start, end))
        return spans

    # -- persistence
    def save(self, path: str | Path) -> None:
        """Write ``tokenizer.json`` + ``tokenizer_config.json`` that ``AutoTokenizer`` loads identically.

        A new directory appears atomically; into an existing one (e.g. a model checkpoint being
        assembled) each file is replaced atomically so other files there are left alone.
        """
        path = Path(path)
        if path.is_dir():
            self._write_files(path)
        else:
            with atomic_directory(path) as tmp:
                self._write_files(tmp)

    def _write_files(self, directory: Path) -> None:
        config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast",
                                  "clean_up_tokenization_spaces": self.clean_up_tokenization_spaces}
        config.update(self.special_tokens)
        if self.extra_special_tokens:
            config["extra_special_tokens"] = list(self.extra_special_tokens)
        if self.model_max_length is not None:
            config["model_max_length"] = self.model_max_length
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        with atomic_file(directory / "tokenizer.json") as f:
            f.write(self.backend.to_str(pretty=True))
        with atomic_file(directory / "tokenizer_config.json") as f:
            json.dump(config, f, indent=2, ensure_ascii=False)
        # A stale standalone template would take priority over the one just written to the config.
        stale = directory / "chat_template.jinja"
        if stale.exists():
            stale.unlink()


def _as_id_list(ids: Iterable[int]) -> list[int]:
    # Accept tensors/arrays without importing torch here.
    if hasattr(ids, "tolist"):
        ids = ids.tolist()  # type: ignore[union-attr]
    return [int(i) for i in ids]


def _clean_up_tokenization(text: str) -> str:
    for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                 (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(a, b)
    return text


def _spans_to_mask(offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]) -> list[int]:
    """1 for each token overlapping a span; spans and offsets are both sorted (transformers' rule)."""
    mask = [0] * len(offsets)
    s = 0
    for t, (start, end) in enumerate(offsets):
        while s < len(spans) and start >= spans[s][1]:
            s += 1
        if s == len(spans):
            break
        if end > spans[s][0]:
            mask[t] = 1
    return mask


# ---- streaming decode ---------------------------------------------------------------------------
class IncrementalDecoder:
    """Turn a token stream into text pieces whose concatenation equals ``decode(all ids)``.

    Each step decodes a short window ``ids[prefix:]`` and emits what it adds beyond ``ids[prefix:read]``.
    Decoding with one token of left context keeps SentencePiece's word-initial space (a lone "▁the"
    would decode as "the"), and text ending in U+FFFD is held back because the rest of a multi-byte
    character is still to come.
    """

    def __init__(self, decode: Callable[[list[int]], str], skipped_ids: frozenset[int] = frozenset()) -> None:
        self._decode = decode  # ids -> text (any tokenizer's decode)
        self._skipped = skipped_ids  # ids that decode to nothing (special tokens when they are skipped)
        self._ids: list[int] = []
        self._prefix = 0  # window start: the last token already emitted (context for the next one)
        self._read = 0  # everything before this index has been emitted

    def add(self, token_id: int) -> str:
        token_id = int(token_id)
        # A skipped special token decodes to nothing, and keeping it out of the window stops it from
        # acting as the "first token" whose leading space a SentencePiece decoder strips.
        if token_id in self._skipped:
            return ""
        self._ids.append(token_id)
        before = self._decode(self._ids[self._prefix:self._read])
        now = self._decode(self._ids[self._prefix:])
        if len(now) <= len(before) or now.endswith("\ufffd") or not now.startswith(before):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return now[len(before):]

    def flush(self) -> str:
        """Emit whatever is held back (possibly U+FFFD for truly incomplete bytes) and reset."""
        before = self._decode(self._ids[self._prefix:self._read])
        now = self._decode(self._ids[self._prefix:])
        self._ids, self._prefix, self._read = [], 0, 0
        if now.startswith(before):
            return now[len(before):]
        # Not expected for byte-level or SentencePiece decoders; emit what differs rather than repeat text.
        return now[len(os.path.commonprefix([before, now])):]


# ---- training -----------------------------------------------------------------------------------
def _names_file(text: str) -> bool:
    try:  # a long text is not a path; the OS says so with an error rather than False
        return len(text) < 4096 and "\n" not in text and Path(text).is_file()
    except OSError:
        return False


def train_bpe_tokenizer(files: Sequence[str | Path] | Iterable[str], vocab_size: int,
                        special_tokens: Sequence[str] = DEFAULT_SPECIAL_TOKENS,
                        chat_template: str | None = DEFAULT_CHAT_TEMPLATE, min_frequency: int = 2, *,
                        eos_token: str = DEFAULT_EOS_TOKEN, pad_token: str | None = DEFAULT_PAD_TOKEN,
                        model_max_length: int | None = None, split_digits: bool = True) -> Tokenizer:
    """Train a GPT-2-style byte-level BPE tokenizer.

    ``split_digits``: every digit is its own token (as in Llama 1/2), so numbers are spelled digit by
    digit and arithmetic is learnable instead of a lookup over multi-digit tokens.

    ``files`` is a list of paths (read by the Rust trainer, in parallel) or an iterable of text
    strings. ``eos_token`` separates documents and doubles as ``bos_token`` (GPT-2 convention: nothing
    is added automatically). Every byte is in the base vocabulary, so any text round-trips losslessly.
    The result is deterministic for the same input.
    """
    specials = list(dict.fromkeys([*special_tokens, eos_token, *([pad_token] if pad_token else [])]))
    if vocab_size < 256 + len(specials):
        raise LmforgeError(f"vocab_size {vocab_size} is too small: byte-level BPE needs at least "
                           f"{256 + len(specials)} (256 bytes + {len(specials)} special tokens)")
    backend = _RustTokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.pre_tokenizer = (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
                             if split_digits else byte_level)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    if isinstance(files, (str, Path)):
        files = [files]
    # A list holding Paths, or strings that all name files, is read from disk; anything else is text.
    is_paths = isinstance(files, (list, tuple)) and bool(files) and (
        any(isinstance(f, Path) for f in files) or all(isinstance(f, str) and _names_file(f) for f in files))
    if is_paths:
        for p in files:
            if not Path(p).is_file():
                raise LmforgeError(f"training file {p} does not exist")
        backend.train([str(p) for p in files], trainer)
    else:
        backend.train_from_iterator(iter(files), trainer)
    tokens = {"bos_token": eos_token, "eos_token": eos_token}
    if pad_token:
        tokens["pad_token"] = pad_token
    return Tokenizer(backend, special_tokens=tokens, chat_template=chat_template, model_max_length=model_max_length)


__all__ = ["DEFAULT_CHAT_TEMPLATE", "DEFAULT_SPECIAL_TOKENS", "IncrementalDecoder", "Tokenizer", "load_tokenizer",
           "train_bpe_tokenizer"]

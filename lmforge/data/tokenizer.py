"""Tokenizer: a thin wrapper over the Rust ``tokenizers`` library plus HF-compatible chat templates.

A tokenizer directory is the Hugging Face layout: ``tokenizer.json`` (required) and optionally
``tokenizer_config.json`` (special tokens, chat template), ``special_tokens_map.json``,
``chat_template.jinja`` and ``generation_config.json`` (extra stop ids). Encoding, decoding and chat
rendering are meant to give exactly what ``transformers.AutoTokenizer`` gives on the same directory,
so a model trained here can be served by anything in that ecosystem and vice versa.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextvars import ContextVar
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any, ClassVar

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment
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


@lru_cache(maxsize=32)
def _compile_template(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTracker, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
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
        raise CheckpointError(f"{path} is a file, not a model directory: GGUF files are not supported yet; give a "
                              "Hugging Face model directory (config.json, safetensors, tokenizer.json)")
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
        try:
            # Appending one chunk at a time is what lets the generation tracker measure offsets.
            for chunk in compiled.generate(**variables):
                chunks.append(chunk)  # noqa: PERF402
        except LmforgeError:
            raise
        except jinja2.TemplateError as e:
            raise LmforgeError(f"chat template failed to render: {e}") from None
        except (TypeError, ValueError, KeyError, AttributeError) as e:
            raise LmforgeError(f"chat template failed to render: {type(e).__name__}: {e}") from None
        finally:
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

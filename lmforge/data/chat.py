"""Chat data: the roles, the one message validator, and the chat-prompt file reader.

Every reader of chat messages (SFT data, preference pairs, sampling prompts, the chat-template renderer)
validates through ``validate_messages``, so a conversation is judged by the same rules and its problems
are reported in the same words (naming ``file:line``, the field and the message) wherever it is read.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from lmforge.errors import LmforgeError
from lmforge.io import iter_jsonl

ROLES = ("system", "user", "assistant", "tool")
Messages = list[dict[str, str]]


def validate_messages(messages: Any, where: str | None = None, *, field: str = "messages",
                      needs_assistant: bool = False, ends: Literal["answer", "prompt"] | None = None,
                      template: bool = False) -> Any:
    """``messages`` itself if it is a well-formed conversation, else LmforgeError naming what is wrong.

    Every message is a dict with a ``role`` in ROLES and string ``content``. Errors are prefixed with
    ``where`` (``file:line``) and, when ``field`` is not "messages", with the record field's name.

    * ``needs_assistant``: at least one assistant message (SFT data: something to learn from);
    * ``ends="answer"``: the last message is a non-empty assistant message (a preference completion);
    * ``ends="prompt"``: the last message is not an assistant message (the answer is what gets sampled);
    * ``template``: what a chat template renders (transformers' rules): any list or tuple, possibly
      empty, of mappings, where an assistant turn that only calls tools may have no content.
    """
    named = where is not None  # else the renderer's words: "chat message 3 ..."
    head = f"{where}: " if named else ""
    name = f"'{field}'" if named else "chat messages"
    label = (f"'{field}' message" if field != "messages" else "message") if named else "chat message"
    if not isinstance(messages, (list, tuple) if template else list):
        kind = "a list" if template else "a non-empty list"
        raise LmforgeError(f"{head}{name} must be {kind} of messages, got {type(messages).__name__}")
    if not messages and not template:
        raise LmforgeError(f"{head}{name} must be a non-empty list of messages, got an empty list")
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping if template else dict):
            raise LmforgeError(f"{head}{label} {i} must be a dict (an object with 'role' and 'content'), "
                               f"got {type(m).__name__}")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise LmforgeError(f"{head}{label} {i} has role {role!r}; expected one of {', '.join(ROLES)}")
        tool_call = template and role == "assistant" and content is None and m.get("tool_calls")
        if isinstance(content, str) or tool_call:
            continue
        if "content" not in m:
            raise LmforgeError(f"{head}{label} {i} ({role}) is missing 'content' (a string)")
        rule = " (non-string 'content' is allowed only as None on an assistant turn with 'tool_calls')" * template
        raise LmforgeError(f"{head}{label} {i} ({role}) needs string 'content', got {type(content).__name__}{rule}")
    if needs_assistant and not any(m["role"] == "assistant" for m in messages):
        raise LmforgeError(f"{head}no assistant message, so nothing to learn from")
    if ends == "answer":
        last = messages[-1]
        if last["role"] != "assistant":
            raise LmforgeError(f"{head}{name} must end with an assistant message, not {last['role']!r}")
        if not last["content"].strip():
            raise LmforgeError(f"{head}{name} has an empty assistant message")
    elif ends == "prompt" and messages[-1]["role"] == "assistant":
        raise LmforgeError(f"{head}{name} must not end with an assistant turn (the answer is what gets sampled)")
    return messages


def prompt_messages(record: object, where: str) -> Messages:
    """The chat prompt of a record ``{"messages": [...], "answer"?: ...}``, validated; errors name ``where``."""
    if not isinstance(record, dict) or "messages" not in record:
        raise LmforgeError(f"{where}: needs a 'messages' list")
    return validate_messages(record["messages"], where, ends="prompt")


def read_prompt_jsonl(path: str | Path, needs_answer: bool = False) -> list[dict]:
    """Prompt records from JSONL: ``messages`` (a final assistant turn, e.g. an SFT answer, is dropped)
    and a reference ``answer`` (required with ``needs_answer``: a verifiable reward compares against it).
    A bad record raises LmforgeError naming ``file:line``."""
    path = Path(path)
    if not path.is_file():
        raise LmforgeError(f"prompt file {path} does not exist")
    records = []
    for where, rec in iter_jsonl(path):
        if needs_answer and not (isinstance(rec, dict) and "messages" in rec and "answer" in rec):
            raise LmforgeError(f"{where}: needs 'messages' and 'answer'")
        msgs = rec.get("messages") if isinstance(rec, dict) else None
        if isinstance(msgs, list) and msgs and isinstance(msgs[-1], dict) and msgs[-1].get("role") == "assistant":
            rec = {**rec, "messages": msgs[:-1]}
        messages = prompt_messages(rec, where)
        records.append({"messages": messages, **({"answer": str(rec["answer"])} if "answer" in rec else {})})
    if not records:
        raise LmforgeError(f"prompt file {path} holds no records")
    return records


__all__ = ["Messages", "ROLES", "prompt_messages", "read_prompt_jsonl", "validate_messages"]

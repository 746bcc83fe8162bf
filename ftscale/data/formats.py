"""Turn one raw row of any supported format into a normalised example, or explain why it cannot be one."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ftscale.config.data import DataFormat
from ftscale.data.sources import DataError

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class ChatExample:
    """A conversation rendered with the chat template; assistant turns carry the loss by default."""

    messages: list[dict[str, str]]


@dataclass(frozen=True)
class TextExample:
    """Raw text: `prompt` (no loss unless train_on=all) followed by `completion` (loss)."""

    prompt: str
    completion: str


FORMAT_KEYS: dict[str, tuple[str, ...]] = {
    "messages": ("messages",),
    "prompt_completion": ("prompt", "completion"),
    "alpaca": ("instruction", "output"),
    "text": ("text",),
}


def detect_format(row: dict) -> str | None:
    for name, keys in FORMAT_KEYS.items():
        if all(k in row for k in keys):
            return name
    return None


def _check_messages(messages: Any, where: str, field: str = "messages") -> list[dict[str, str]]:
    if not isinstance(messages, list):
        raise DataError(f"{where}: '{field}' must be a list of {{role, content}} objects, got {type(messages).__name__}")
    if not messages:
        raise DataError(f"{where}: empty conversation: '{field}' has no messages")
    clean = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise DataError(f"{where}: message {i} must be an object with 'role' and 'content'")
        if m["role"] not in ROLES:
            raise DataError(f"{where}: message {i} has role {m['role']!r}; expected one of {', '.join(ROLES)}")
        if not isinstance(m["content"], str):
            raise DataError(f"{where}: message {i} content must be a string, got {type(m['content']).__name__}")
        clean.append({"role": m["role"], "content": m["content"]})
    return clean


def _string(row: dict, key: str, where: str, allow_empty: bool = False) -> str:
    value = row.get(key)
    if value is None:
        raise DataError(f"{where}: missing field '{key}'")
    if not isinstance(value, str):
        raise DataError(f"{where}: field '{key}' must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise DataError(f"{where}: field '{key}' is empty")
    return value


def to_example(row: Any, fmt: DataFormat, where: str) -> ChatExample | TextExample:
    if not isinstance(row, dict):
        raise DataError(f"{where}: a row must be a JSON object, got {type(row).__name__}")
    name = detect_format(row) if fmt == "auto" else fmt
    if name is None:
        raise DataError(
            f"{where}: cannot tell the row's format from its keys {sorted(row)}; expected one of "
            + "; ".join(f"{n}: {', '.join(k)}" for n, k in FORMAT_KEYS.items())
        )
    if name == "messages":
        if "messages" not in row:
            raise DataError(f"{where}: missing field 'messages'")
        messages = _check_messages(row["messages"], where)
        if not any(m["role"] == "assistant" for m in messages):
            raise DataError(f"{where}: conversation has no assistant message, so nothing to learn from")
        return ChatExample(messages)
    if name == "prompt_completion":
        prompt, completion = row.get("prompt"), row.get("completion")
        if isinstance(prompt, list):  # conversational prompt/completion, as TRL writes them
            return ChatExample(_check_messages(prompt, where, "prompt") + _check_messages(completion, where, "completion"))
        return TextExample(_string(row, "prompt", where, allow_empty=True), _string(row, "completion", where))
    if name == "alpaca":
        instruction = _string(row, "instruction", where)
        extra = row.get("input") or ""
        if not isinstance(extra, str):
            raise DataError(f"{where}: field 'input' must be a string, got {type(extra).__name__}")
        user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        return ChatExample([{"role": "user", "content": user}, {"role": "assistant", "content": _string(row, "output", where)}])
    return TextExample("", _string(row, "text", where))

"""Training-row formats, shared by the API (inline records, uploaded files) and the worker (every row it
trains on), so a row is judged the same way everywhere:

  text                {"text": ...}                      loss on every token
  prompt_completion   {"prompt": ..., "completion": ...} loss on the completion only
  messages            {"messages": [{role, content}...]} chat template; loss on assistant turns only

Detected from the fields (in that order), or fixed per dataset with ``format``. Row numbers are 0-based,
like the API's ``dataset.records.<i>``. Pure Python: the API imports this without torch.
"""

from __future__ import annotations

from typing import Any, Literal

from core.errors import InvalidRequest

FORMATS = ("text", "prompt_completion", "messages")
FormatName = Literal["text", "prompt_completion", "messages"]
EXPECTED = "expected 'text', 'prompt'+'completion' or 'messages'"


class BadRow(InvalidRequest):
    """A row that fits no format (or not the one asked for); ``row`` is its 0-based index."""

    def __init__(self, message: str, *, row: int, param: str) -> None:
        super().__init__(message, param=param, code="invalid_row")
        self.row = row


def detect_format(row: Any, index: int, expected: str | None = None, *, param_prefix: str = "dataset.records") -> str:
    """'text', 'prompt_completion' or 'messages'; anything else raises ``BadRow`` naming the row and field.
    With ``expected`` the row must be of that format."""
    param = f"{param_prefix}.{index}"

    def bad(what: str, sub: str = "") -> BadRow:
        hint = f"expected format {expected!r}" if expected else EXPECTED
        return BadRow(f"dataset row {index}: {what} ({hint})", row=index, param=param + sub)

    if not isinstance(row, dict):
        raise bad(f"is a {type(row).__name__}, not an object")
    present = {k for k, v in row.items() if v is not None}  # CSV/Parquet fill missing columns with None
    kind = expected or _guess(present)
    if kind == "text":
        if "text" not in present:
            raise bad("missing field 'text'")
        if not isinstance(row["text"], str) or not row["text"]:
            raise bad("field 'text' must be a non-empty string", ".text")
    elif kind == "prompt_completion":
        for key in ("prompt", "completion"):
            if key not in present:
                raise bad(f"missing field {key!r}")
            if not isinstance(row[key], str):
                raise bad(f"field {key!r} must be a string", f".{key}")
        if not row["completion"]:
            raise bad("field 'completion' is empty: there is nothing to learn", ".completion")
    elif kind == "messages":
        messages = row.get("messages")
        if not isinstance(messages, list) or not messages:
            raise bad("field 'messages' must be a non-empty list", ".messages")
        for turn, message in enumerate(messages):
            if not (
                isinstance(message, dict)
                and isinstance(message.get("role"), str)
                and isinstance(message.get("content"), str)
            ):
                raise bad(f"messages[{turn}] needs string 'role' and 'content'", f".messages.{turn}")
        if not any(m["role"] == "assistant" for m in messages):
            raise bad("'messages' has no assistant turn: there is nothing to learn", ".messages")
    else:
        raise bad("missing field 'text'")
    return kind


def _guess(present: set[str]) -> str | None:
    if "text" in present:
        return "text"
    if "prompt" in present or "completion" in present:
        return "prompt_completion"
    if "messages" in present:
        return "messages"
    return None

"""Preference records (DESIGN.md "Preference records"): parsing and validation, nothing stored.

Validation is strict on the fields we use and ignores fields we do not know, so that exports from
other tools (which often carry extra columns) load as they are.
"""
from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import orjson

from copl_common.settings import LIMITS


def content_hash(text: str) -> str:
    """The id of a prompt or response: the same text is one node however many users label it."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclass(frozen=True, slots=True)
class PreferenceRecord:
    user_id: str
    prompt: str
    chosen: str
    rejected: str
    group: str | None = None
    controversial: bool | None = None
    created_at: datetime | None = None  # timezone-aware UTC


@dataclass(frozen=True, slots=True)
class RecordError:
    path: str
    line: int
    reason: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.reason}"


def _text(obj: dict, key: str, limit: int, required: bool = True) -> str | None:
    value = obj.get(key)
    if type(value) is str and 0 < len(value) <= limit and not value.isspace():
        return value  # the common case, checked without allocating (ingest calls this 4x a line)
    if value is None:
        if required:
            raise ValueError(f"missing required field '{key}'")
        return None
    if not isinstance(value, str):
        raise ValueError(f"'{key}' must be a string, got {type(value).__name__}")
    if not value.strip():
        raise ValueError(f"'{key}' is empty")
    if len(value) > limit:
        raise ValueError(f"'{key}' is {len(value)} characters, over the limit of {limit}")
    return value


def _timestamp(value) -> datetime | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError("'created_at' must be an ISO-8601 string")
    try:
        ts = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"'created_at' is not ISO-8601: {value!r}") from None
    # A time without a zone is taken as UTC.
    return ts.replace(tzinfo=timezone.utc) if ts.tzinfo is None else ts.astimezone(timezone.utc)


def parse_record(obj) -> PreferenceRecord:
    """One decoded JSON value -> a record, or ValueError saying what is wrong."""
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    chosen = _text(obj, "chosen", LIMITS.max_response_chars)
    rejected = _text(obj, "rejected", LIMITS.max_response_chars)
    if chosen == rejected:
        raise ValueError("'chosen' and 'rejected' are the same text")
    controversial = obj.get("controversial")
    if controversial is not None and not isinstance(controversial, bool):
        raise ValueError("'controversial' must be a boolean")
    return PreferenceRecord(
        user_id=_text(obj, "user_id", LIMITS.max_user_id_chars),
        prompt=_text(obj, "prompt", LIMITS.max_prompt_chars),
        chosen=chosen,
        rejected=rejected,
        group=_text(obj, "group", LIMITS.max_group_chars, required=False),
        controversial=controversial,
        created_at=_timestamp(obj.get("created_at")),
    )


def iter_jsonl(path: str | Path) -> Iterator[PreferenceRecord | RecordError]:
    """Each non-blank line of a file as a record or as the error that makes it invalid."""
    with open(path, "rb") as fh:
        for number, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            try:
                yield parse_record(orjson.loads(raw))
            except orjson.JSONDecodeError as exc:  # also raised for invalid UTF-8
                yield RecordError(str(path), number, f"invalid JSON: {exc}")
            except ValueError as exc:
                yield RecordError(str(path), number, str(exc))

"""Preference records (DESIGN.md "Preference records"): parsing and validation, nothing stored.

`parse_record` is THE validator: `copl ingest` calls it on every line and GraphService.AddPreferences on
every record of a request (a plain dict per record), so both accept and refuse exactly the same input.
A refused record raises `InvalidRecord` whose message is the one-line reason.

The rules. They keep out everything that would pass one layer and break a later one (a newline in a
user id broke every checkpoint save after the GNN had trained; a NUL broke PostgreSQL's COPY half way
through a file; a lone surrogate cannot be encoded as UTF-8 by either database):

- `user_id` (required) and `group` (optional, null = none): strings of 1..128 and 1..64 characters,
  every character printable (`str.isprintable`: no control, format, line/paragraph separator, surrogate or
  unassigned code point, so no newline, tab or NUL; the ASCII space is allowed inside), not starting or
  ending with a space. Ids are compared exactly, and a stray space would silently make another user, so it
  is refused rather than trimmed.
- `prompt`, `chosen`, `rejected` (required): strings of 1..16,000 characters that are not whitespace
  only, valid Unicode text: no lone surrogate (valid JSON as "\\ud800", but not text) and no control
  character other than tab, LF and CR (C0, DEL and C1 controls are refused). Stored verbatim, never
  trimmed: the text is what the model reads and its hash is the node's id. `chosen` != `rejected`.
- `controversial` (optional): a boolean or null.
- `created_at` (optional, null = the time of ingestion): an ISO-8601 string; without a zone it is UTC;
  from 1970-01-01 to at most one day ahead of the validator's clock (a later time would hide the record
  from every snapshot until then).
- Any other field is ignored, so exports from other tools with extra columns load as they are.
  Values are never coerced: a number where a string belongs is refused.
"""
from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import orjson

from copl_common.settings import LIMITS

EARLIEST_CREATED_AT = datetime(1970, 1, 1, tzinfo=timezone.utc)
MAX_CREATED_AT_AHEAD = timedelta(days=1)

# Characters a text may not hold: C0 controls except tab, LF, CR; DEL; C1 controls; surrogates.
_NOT_TEXT = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ud800-\udfff]")


class InvalidRecord(ValueError):
    """A record that breaks the rules above; the message is the reason, one line."""


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


def _describe(char: str) -> str:
    return f"U+{ord(char):04X}"


def _string(obj: dict, key: str, limit: int, required: bool) -> str | None:
    value = obj.get(key)
    if value is None:
        if required:
            raise InvalidRecord(f"missing required field '{key}'")
        return None
    if type(value) is not str:
        raise InvalidRecord(f"'{key}' must be a string, got {type(value).__name__}")
    if len(value) > limit:
        raise InvalidRecord(f"'{key}' is {len(value)} characters, over the limit of {limit}")
    if not value or value.isspace():
        raise InvalidRecord(f"'{key}' is empty")
    return value


def _identifier(obj: dict, key: str, limit: int, required: bool = True, plain: bool = False) -> str | None:
    """user_id / group. `plain`: the caller knows every string of the record is printable ASCII."""
    value = obj.get(key)
    if type(value) is str and 0 < len(value) <= limit and (plain or value.isprintable()) \
            and value[0] != " " and value[-1] != " ":
        return value  # the common case, decided without allocating
    value = _string(obj, key, limit, required)
    if value is None:
        return None
    for i, char in enumerate(value):
        if not char.isprintable():
            raise InvalidRecord(f"'{key}' contains the non-printable character {_describe(char)} at position {i}")
    raise InvalidRecord(f"'{key}' starts or ends with a space")


def _text(obj: dict, key: str, limit: int, plain: bool = False) -> str:
    value = obj.get(key)
    if type(value) is str and 0 < len(value) <= limit and not value.isspace() \
            and (plain or _NOT_TEXT.search(value) is None):
        return value  # the common case (ingest checks four strings a line, and reads every line twice)
    value = _string(obj, key, limit, required=True)
    bad = _NOT_TEXT.search(value)
    kind = "a lone surrogate" if "\ud800" <= bad.group() <= "\udfff" else "the control character"
    raise InvalidRecord(f"'{key}' contains {kind} {_describe(bad.group())} at position {bad.start()} "
                        "(text must be valid Unicode; of the control characters only tab, LF and CR are allowed)")


def _timestamp(value) -> datetime | None:
    if value is None:
        return None
    if type(value) is not str:
        raise InvalidRecord(f"'created_at' must be an ISO-8601 string, got {type(value).__name__}")
    try:
        ts = datetime.fromisoformat(value)
    except ValueError:
        raise InvalidRecord(f"'created_at' is not ISO-8601: {value[:40]!r}") from None
    now = datetime.now(timezone.utc)
    # The year first: converting year 1 or 9999 with an offset to UTC would overflow.
    if EARLIEST_CREATED_AT.year <= ts.year <= now.year + 1:
        ts = ts.replace(tzinfo=timezone.utc) if ts.tzinfo is None else ts.astimezone(timezone.utc)  # no zone: UTC
        if EARLIEST_CREATED_AT <= ts <= now + MAX_CREATED_AT_AHEAD:
            return ts
    raise InvalidRecord(f"'created_at' {value!r} is outside 1970-01-01 .. one day from now")


def parse_record(obj, plain: bool = False) -> PreferenceRecord:
    """One decoded JSON value (or any dict) -> a record, or InvalidRecord saying what is wrong.

    `plain` is for iter_jsonl only: the raw line was ASCII with no escape, so every string in it is
    printable ASCII and the per-character checks can be skipped."""
    if not isinstance(obj, dict):
        raise InvalidRecord(f"expected a JSON object, got {type(obj).__name__}")
    user_id = _identifier(obj, "user_id", LIMITS.max_user_id_chars, plain=plain)
    prompt = _text(obj, "prompt", LIMITS.max_prompt_chars, plain)
    chosen = _text(obj, "chosen", LIMITS.max_response_chars, plain)
    rejected = _text(obj, "rejected", LIMITS.max_response_chars, plain)
    if chosen == rejected:
        raise InvalidRecord("'chosen' and 'rejected' are the same text")
    group = _identifier(obj, "group", LIMITS.max_group_chars, required=False, plain=plain)
    controversial = obj.get("controversial")
    if controversial is not None and type(controversial) is not bool:
        raise InvalidRecord(f"'controversial' must be a boolean, got {type(controversial).__name__}")
    return PreferenceRecord(user_id, prompt, chosen, rejected, group, controversial,
                            _timestamp(obj.get("created_at")))


def iter_jsonl(path: str | Path) -> Iterator[PreferenceRecord | RecordError]:
    """Each non-blank line of a file as a record or as the error that makes it invalid."""
    with open(path, "rb") as fh:
        for number, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            # JSON forbids raw control characters in strings, so in a line that is ASCII, has no
            # backslash (no escape) and no DEL, every string is printable ASCII: the common case, checked
            # in one pass over the bytes instead of a pass over every string.
            plain = raw.isascii() and b"\\" not in raw and b"\x7f" not in raw
            try:
                yield parse_record(orjson.loads(raw), plain)
            except orjson.JSONDecodeError as exc:  # also raised for invalid UTF-8 and lone surrogates
                yield RecordError(str(path), number, f"invalid JSON: {exc}")
            except InvalidRecord as exc:
                yield RecordError(str(path), number, str(exc))

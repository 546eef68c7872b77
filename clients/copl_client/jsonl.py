"""Resumable batch scoring from a JSONL file to a JSONL file.

Input: one row a line, {"id"?, "user_id" | "embedding", "prompt", "responses", "context"?}. A row's identity
is its "id" (a string or an integer, unique in the file) or, for a row without one, its line number.

Output: one line per input row, in input order:
    {"line": 3, "id": "r3", "scores": [0.12, -0.4], "release_id": "...", "embedding_source": "TRAINED"}
    {"line": 4, "id": "r4", "error": {"code": "INVALID_ARGUMENT", "message": "..."}}

Each line is written whole with one write(2) on a file opened O_APPEND, and fsync'd at least every
`FSYNC_INTERVAL_S` and at the end, so a killed job leaves whole lines, at most followed by one cut line
that was never counted as done. A re-run reads the output first: it drops a cut last line, counts the rows
already there as done and scores only the others, so every row ends up in the output exactly once. An
exclusive lock on the output file keeps two jobs from writing it at the same time.
"""
from __future__ import annotations

import fcntl
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from copl_client.results import ItemResult, ScoreItem

FSYNC_INTERVAL_S = 1.0


class JobFileError(ValueError):
    """The input or output file cannot be used as it is; `errors` lists the problems (line numbers first).
    Nothing was written."""

    def __init__(self, message: str, errors: list[str] = ()):
        super().__init__(message)
        self.errors = list(errors)


@dataclass(frozen=True)
class FileJobSummary:
    """What a `score_file` run did: `rows` in the input, `already_done` by earlier runs, `scored` and `failed`
    by this one, and `repaired` when it dropped a cut last line left by a killed run."""

    rows: int
    already_done: int
    scored: int
    failed: int
    repaired: bool
    output: str


def _row_key(row_id, line: int) -> str:
    return f"line:{line}" if row_id is None else f"id:{json.dumps(row_id)}"


def _valid_id(row_id) -> bool:
    return row_id is None or (isinstance(row_id, (str, int)) and not isinstance(row_id, bool))


def _read_rows(path: Path) -> Iterator[tuple[int, object]]:
    """(line number, parsed JSON or the JSON error) for each non-blank line."""
    with open(path, encoding="utf-8") as fh:
        for line_no, text in enumerate(fh, 1):
            if text.strip():
                try:
                    yield line_no, json.loads(text)
                except json.JSONDecodeError as exc:
                    yield line_no, exc


def scan_input(path: Path, limit: int = 20) -> tuple[list[str], list[str]]:
    """(row keys in order, problems): every row is parsed and checked before anything is sent."""
    if not path.is_file():
        raise JobFileError(f"input file not found: {path}")
    keys, errors, seen = [], [], {}
    for line, row in _read_rows(path):
        try:
            if isinstance(row, Exception):
                raise ValueError(f"not JSON ({row})")
            item = ScoreItem.from_json(row)
            if not _valid_id(item.id):
                raise ValueError("'id' must be a string or an integer")
        except ValueError as exc:
            errors.append(f"line {line}: {exc}")
            continue
        key = _row_key(item.id, line)
        if key in seen:
            errors.append(f"line {line}: id {item.id!r} already on line {seen[key]}")
            continue
        seen[key] = line
        keys.append(key)
    return keys, errors


def _done_rows(fd: int, output: Path, input_keys: set[str]) -> tuple[set[str], bool]:
    """The keys of the rows in the output; a cut last line is truncated away (returns repaired=True)."""
    done: set[str] = set()
    whole = 0                              # bytes up to the end of the last complete line
    with open(output, "rb") as fh:
        for line_no, text in enumerate(fh, 1):
            if not text.endswith(b"\n"):
                break                      # cut by a killed run: never counted as done
            try:
                row = json.loads(text)
                key = _row_key(row.get("id"), row["line"])
            except (ValueError, KeyError, TypeError, AttributeError):
                raise JobFileError(f"{output} line {line_no} is not a result row: not the output of this job?") from None
            if key not in input_keys:
                raise JobFileError(f"{output} line {line_no} is a row the input does not have ({key}): "
                                   f"the output of another input?")
            done.add(key)
            whole += len(text)
    repaired = whole < os.fstat(fd).st_size
    if repaired:
        os.ftruncate(fd, whole)
        os.fsync(fd)
    return done, repaired


def _result_line(result: ItemResult) -> bytes:
    line, row_id = result.id
    row = {"line": line} if row_id is None else {"line": line, "id": row_id}
    if result.ok:
        row.update(scores=list(result.scores), release_id=result.release_id,
                   embedding_source=result.embedding_source.value)
    else:
        row["error"] = {"code": result.error.code, "message": result.error.message}
    return (json.dumps(row, ensure_ascii=False) + "\n").encode()


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


async def score_file(client, input_path: Path, output_path: Path, *, concurrency: int, progress: bool,
                     max_stall_s: float) -> FileJobSummary:
    keys, errors = scan_input(input_path)
    if errors:
        raise JobFileError(f"{len(errors)} invalid row(s) in {input_path}", errors)
    fd = os.open(output_path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise JobFileError(f"another job is writing {output_path}") from None
        done, repaired = _done_rows(fd, output_path, set(keys))

        def todo() -> Iterator[ScoreItem]:
            for line, row in _read_rows(input_path):
                item = ScoreItem.from_json(row)
                if _row_key(item.id, line) not in done:
                    yield ScoreItem(prompt=item.prompt, responses=item.responses, user_id=item.user_id,
                                    embedding=item.embedding, context=item.context,
                                    require_known=item.require_known, id=(line, item.id))

        scored = failed = 0
        last_sync = time.monotonic()
        try:
            async for result in client.iter_score_many(todo(), concurrency=concurrency, progress=progress,
                                                       total=len(keys) - len(done), max_stall_s=max_stall_s):
                _write_all(fd, _result_line(result))
                scored, failed = scored + result.ok, failed + (not result.ok)
                if time.monotonic() - last_sync >= FSYNC_INTERVAL_S:
                    os.fsync(fd)
                    last_sync = time.monotonic()
        finally:
            os.fsync(fd)
    finally:
        os.close(fd)   # closing the descriptor releases the lock
    return FileJobSummary(rows=len(keys), already_done=len(done), scored=scored, failed=failed,
                          repaired=repaired, output=str(output_path))

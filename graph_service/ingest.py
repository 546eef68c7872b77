"""Loading JSONL preference files into the store: validate everything first, then write in batches.

A file with bad lines is rejected whole (every bad line reported with its number) unless
skip_invalid, which loads the good lines and reports the rest. Files are read twice (validate,
then write) so memory stays bounded by one batch however large the file.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from graph_service.records import PreferenceRecord, RecordError, iter_jsonl
from graph_service.store import DEFAULT_BATCH_SIZE, IngestResult, PreferenceStore, utcnow


class InvalidInput(ValueError):
    """Some lines are invalid and skip_invalid was not given: nothing was written."""

    def __init__(self, errors: list[RecordError]):
        self.errors = errors
        super().__init__(f"{len(errors)} invalid line(s); nothing was stored")


@dataclass
class IngestReport:
    valid: int = 0
    inserted: int = 0
    duplicates: int = 0
    invalid: list[RecordError] = field(default_factory=list)


def validate_files(paths: Sequence[str | Path]) -> tuple[int, list[RecordError]]:
    """(number of valid records, errors) over all files, storing nothing."""
    valid, errors = 0, []
    for path in paths:
        for item in iter_jsonl(path):
            if isinstance(item, RecordError):
                errors.append(item)
            else:
                valid += 1
    return valid, errors


def read_valid_records(paths: Sequence[str | Path]) -> list[PreferenceRecord]:
    """All records of small files (test sets) in memory; InvalidInput if any line is bad."""
    _check_exist(paths)
    records, errors = [], []
    for path in paths:
        for item in iter_jsonl(path):
            (errors if isinstance(item, RecordError) else records).append(item)
    if errors:
        raise InvalidInput(errors)
    return records


def _check_exist(paths: Sequence[str | Path]) -> None:
    for path in paths:
        if not Path(path).is_file():
            raise FileNotFoundError(f"no such file: {path}")


def _batches(paths: Sequence[str | Path], size: int) -> Iterator[list[PreferenceRecord]]:
    batch: list[PreferenceRecord] = []
    for path in paths:
        for item in iter_jsonl(path):
            if isinstance(item, PreferenceRecord):
                batch.append(item)
                if len(batch) == size:
                    yield batch
                    batch = []
    if batch:
        yield batch


def ingest_files(store: PreferenceStore, paths: Sequence[str | Path], skip_invalid: bool = False,
                 batch_size: int = DEFAULT_BATCH_SIZE, progress: bool = True) -> IngestReport:
    _check_exist(paths)
    valid, errors = validate_files(paths)
    if errors and not skip_invalid:
        raise InvalidInput(errors)
    report = IngestReport(valid=valid, invalid=errors)
    now = utcnow()
    with tqdm(total=valid, unit="rec", desc="ingest", disable=not progress) as bar:
        for batch in _batches(paths, batch_size):
            result: IngestResult = store.add_batch(batch, now)
            report.inserted += result.inserted
            report.duplicates += result.duplicates
            bar.update(len(batch))
    return report

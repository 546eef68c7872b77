"""The preference store on real SQLite files and a real PostgreSQL server."""
from __future__ import annotations

import multiprocessing
import time
from datetime import datetime, timedelta, timezone

import pytest
import sqlalchemy as sa
import torch

from graph_service.ingest import InvalidInput, ingest_files
from graph_service.records import content_hash, parse_record
from graph_service.store import PreferenceStore
from tests.conftest import make_records, write_jsonl


def test_migrations_from_empty_and_back(store_url):
    store = PreferenceStore(store_url, migrate=False)
    assert store.schema_revision() is None
    store.migrate()
    assert store.schema_revision() == "0002"
    tables = set(sa.inspect(store.engine).get_table_names())
    assert {"users", "prompts", "responses", "preferences", "alembic_version"} <= tables
    store.migrate()  # current: a no-op
    store.downgrade("base")
    assert "preferences" not in sa.inspect(store.engine).get_table_names()
    store.migrate()
    assert store.stats() == {"users": 0, "prompts": 0, "responses": 0, "preferences": 0}
    store.close()


def _open_store_when_released(url: str, go) -> None:
    go.wait()
    PreferenceStore(url).close()


def test_simultaneous_first_opens_migrate_once(store_url):
    """Processes released at the same instant all migrate or wait; none fails with 'locked'."""
    ctx = multiprocessing.get_context("spawn")
    go = ctx.Event()
    procs = [ctx.Process(target=_open_store_when_released, args=(store_url, go)) for _ in range(4)]
    for p in procs:
        p.start()
    time.sleep(3)  # let every process import the store and block on the event
    go.set()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]
    with PreferenceStore(store_url, migrate=False) as store:
        assert store.schema_revision() is not None


def test_reingest_is_idempotent(store_url, tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", make_records(500))
    with PreferenceStore(store_url) as store:
        first = ingest_files(store, [path], batch_size=64, progress=False)
        stats = store.stats()
        second = ingest_files(store, [path], batch_size=64, progress=False)
        assert (first.inserted, first.duplicates) == (500, 0)
        assert (second.inserted, second.duplicates) == (0, 500)
        assert store.stats() == stats
        assert stats["preferences"] == 500 and stats["users"] == 50
        # 4 shared responses per prompt: a response text is one node however many users label it
        assert stats["responses"] == 4 * stats["prompts"]


def test_duplicate_lines_inside_one_batch_are_stored_once(store_url, tmp_path):
    rec = make_records(3)
    path = write_jsonl(tmp_path / "dup.jsonl", rec + rec)
    with PreferenceStore(store_url) as store:
        report = ingest_files(store, [path], progress=False)
        assert (report.inserted, report.duplicates) == (3, 3)
        assert store.stats()["preferences"] == 3


BAD_LINES = [
    ('{"user_id": "u1", "prompt": "p", "chosen": "a", "rejected": "b"}', None),
    ('{"user_id": "u1", "prompt": "p", "chosen": "a"', "invalid JSON"),
    ('{"user_id": "u1", "prompt": "p", "chosen": "a"}', "missing required field 'rejected'"),
    ('{"user_id": "u1", "prompt": "p", "chosen": "  ", "rejected": "b"}', "'chosen' is empty"),
    ('{"user_id": "u1", "prompt": "p", "chosen": "same", "rejected": "same"}', "same text"),
    ('{"user_id": 7, "prompt": "p", "chosen": "a", "rejected": "b"}', "'user_id' must be a string"),
    ('[1, 2]', "expected a JSON object"),
    ('{"user_id": "u2", "prompt": "p", "chosen": "a", "rejected": "b", "controversial": "yes"}', "boolean"),
    ('{"user_id": "u3", "prompt": "p", "chosen": "a", "rejected": "b", "created_at": "yesterday"}', "ISO-8601"),
    ('{"user_id": "' + "x" * 129 + '", "prompt": "p", "chosen": "a", "rejected": "b"}', "over the limit of 128"),
    ('{"user_id": "u4", "prompt": "p", "chosen": "c", "rejected": "d", "created_at": "2026-01-01T00:00:00+02:00"}', None),
]


def _bad_file(tmp_path):
    lines = [line for line, _ in BAD_LINES]
    lines.insert(1, "")  # blank lines are skipped, but still count for line numbers
    return write_jsonl(tmp_path / "bad.jsonl", lines)


def test_bad_file_is_rejected_whole_with_line_numbers(store_url, tmp_path):
    path = _bad_file(tmp_path)
    with PreferenceStore(store_url) as store:
        with pytest.raises(InvalidInput) as info:
            ingest_files(store, [path], progress=False)
        assert store.stats()["preferences"] == 0  # nothing half-applied
    got = {e.line: e.reason for e in info.value.errors}
    expected = {i + 2 if i >= 1 else i + 1: reason for i, (_, reason) in enumerate(BAD_LINES) if reason}
    assert sorted(got) == sorted(expected)
    for line, reason in expected.items():
        assert reason in got[line], (line, got[line])


def test_skip_invalid_loads_the_good_lines(store_url, tmp_path):
    path = _bad_file(tmp_path)
    with PreferenceStore(store_url) as store:
        report = ingest_files(store, [path], skip_invalid=True, progress=False)
        assert report.inserted == 2 and len(report.invalid) == 9
        assert store.stats()["preferences"] == 2
        # the zoned timestamp was converted to UTC
        snap = store.snapshot(datetime(2025, 12, 31, 22, 30, tzinfo=timezone.utc))
        assert snap.user_ids == ["u4"]


def test_snapshot_tensors_and_cutoff(store_url, tmp_path):
    early = [dict(r, created_at="2026-01-01T00:00:00Z") for r in make_records(40, users=10)]
    late = [dict(r, created_at="2026-03-01T00:00:00Z") for r in make_records(20, users=10, offset=40)]
    path = write_jsonl(tmp_path / "t.jsonl", early + late)
    with PreferenceStore(store_url) as store:
        ingest_files(store, [path], progress=False)
        full = store.snapshot()
        cut = store.snapshot(datetime(2026, 2, 1, tzinfo=timezone.utc))
    assert full.triples.shape == (60, 3) and cut.triples.shape == (40, 3)
    assert full.user_ids == sorted(full.user_ids) and full.num_users == 10
    assert full.user_groups[full.user_ids.index("u00001")] == "type1"
    # every triple maps back to a record through the index maps
    expect = {(r["user_id"], content_hash(r["chosen"]), content_hash(r["rejected"])) for r in early + late}
    got = {(full.user_ids[u], full.response_ids[c], full.response_ids[j]) for u, c, j in full.triples.tolist()}
    assert got == expect
    with PreferenceStore(store_url) as store:
        same, texts = store.snapshot_with_texts()
    assert torch.equal(same.triples, full.triples)
    by_key = {(r["user_id"], content_hash(r["chosen"])): (r["prompt"], r["chosen"], r["rejected"]) for r in early + late}
    for (u, c, _), text in zip(full.triples.tolist(), texts):
        assert by_key[(full.user_ids[u], full.response_ids[c])] == text
    pos = full.positive_edges()
    assert pos.shape[0] == 2 and torch.equal(pos, torch.unique(full.triples[:, [0, 1]], dim=0).T)


def test_pairs_of_users(store_url):
    recs = [parse_record(r) for r in make_records(30, users=3)]
    with PreferenceStore(store_url) as store:
        store.add(recs)
        pairs = store.pairs_of(["u00000", "u00002", "nobody"])
    assert len(pairs["u00000"]) == 10 and pairs["nobody"] == []
    assert (content_hash(recs[0].chosen), content_hash(recs[0].rejected)) in pairs["u00000"]


def test_empty_snapshot_is_an_error(sqlite_url):
    with PreferenceStore(sqlite_url) as store:
        with pytest.raises(ValueError, match="no preferences"):
            store.snapshot(datetime.now(timezone.utc) - timedelta(days=1))


def test_migrations_match_the_models(store_url):
    """The SQLModel classes and the Alembic migrations describe the same schema."""
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext
    from sqlmodel import SQLModel
    with PreferenceStore(store_url) as store, store.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), SQLModel.metadata)
    assert diff == []

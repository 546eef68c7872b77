"""The one validator (graph_service/records.py): its rules, and a property test on both stores: whatever
arrives, a record is either stored, snapshotted and trainable, or reported with its line and reason,
and nothing is half-applied."""
from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import orjson
import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from graph_service.embeddings import GNNCheckpoint
from graph_service.gnn import GNNConfig
from graph_service.gnn_training import GNNTrainConfig, train_gnn
from graph_service.ingest import InvalidInput, ingest_files
from graph_service.records import InvalidRecord, RecordError, content_hash, iter_jsonl, parse_record
from graph_service.store import PreferenceStore
from tests.conftest import write_jsonl

BASE = {"user_id": "u1", "prompt": "p", "chosen": "a", "rejected": "b"}
SOON = (datetime.now(timezone.utc) + timedelta(hours=1)).isoformat()
LATE = (datetime.now(timezone.utc) + timedelta(days=2)).isoformat()

RULES = [  # (fields over BASE, None if valid else a fragment of the reason)
    ({"user_id": "user 7 (ü)"}, None),
    ({"user_id": "u\n1"}, "'user_id' contains the non-printable character U+000A at position 1"),
    ({"user_id": "u\t1"}, "U+0009"),
    ({"user_id": "u\x001"}, "U+0000"),
    ({"user_id": "u\u00a01"}, "U+00A0"),          # no-break space: a separator, not printable
    ({"user_id": "u\u20281"}, "U+2028"),          # line separator
    ({"user_id": "u\u200d1"}, "U+200D"),          # zero-width joiner: invisible
    ({"user_id": "\ud800"}, "U+D800"),
    ({"user_id": " u1"}, "'user_id' starts or ends with a space"),
    ({"user_id": "u1 "}, "starts or ends with a space"),
    ({"user_id": ""}, "'user_id' is empty"),
    ({"user_id": "   "}, "'user_id' is empty"),
    ({"user_id": "x" * 128}, None),
    ({"user_id": "x" * 129}, "over the limit of 128"),
    ({"user_id": 7}, "'user_id' must be a string, got int"),
    ({"user_id": True}, "must be a string, got bool"),
    ({"user_id": None}, "missing required field 'user_id'"),
    ({"prompt": "line one\n\tline two\r\n"}, None),  # tab, LF, CR are text
    ({"prompt": "  leading and trailing spaces are kept  "}, None),
    ({"prompt": "emoji 👩\u200d💻 and ZWJ"}, None),
    ({"prompt": "a\x00b"}, "'prompt' contains the control character U+0000 at position 1"),
    ({"chosen": "bell \x07"}, "U+0007"),
    ({"chosen": "form feed \x0c"}, "U+000C"),
    ({"rejected": "del \x7f"}, "U+007F"),
    ({"rejected": "c1 \x85"}, "U+0085"),
    ({"chosen": "\ud800"}, "'chosen' contains a lone surrogate U+D800 at position 0"),
    ({"chosen": "x\udfffy"}, "lone surrogate U+DFFF"),
    ({"chosen": " \n\t"}, "'chosen' is empty"),
    ({"chosen": "b"}, "same text"),
    ({"chosen": "x" * 16_001}, "over the limit of 16000"),
    ({"prompt": ["p"]}, "'prompt' must be a string, got list"),
    ({"group": None}, None),
    ({"group": "type a"}, None),
    ({"group": "x" * 65}, "over the limit of 64"),
    ({"group": "g\n"}, "'group' contains the non-printable character U+000A"),
    ({"group": "g "}, "'group' starts or ends with a space"),
    ({"group": 3}, "'group' must be a string"),
    ({"controversial": False}, None),
    ({"controversial": 1}, "'controversial' must be a boolean, got int"),
    ({"controversial": "true"}, "must be a boolean"),
    ({"created_at": "2026-01-01"}, None),
    ({"created_at": "2026-01-01T12:00:00+02:00"}, None),
    ({"created_at": SOON}, None),
    ({"created_at": LATE}, "outside 1970-01-01 .. one day from now"),
    ({"created_at": "1969-12-31T23:59:59Z"}, "outside"),
    ({"created_at": "0001-01-01T00:00:00+05:00"}, "outside"),   # would overflow on conversion to UTC
    ({"created_at": "9999-12-31T23:59:59-05:00"}, "outside"),
    ({"created_at": "yesterday"}, "'created_at' is not ISO-8601"),
    ({"created_at": 1700000000}, "'created_at' must be an ISO-8601 string, got int"),
]


def _verdict(fn):
    try:
        return fn()
    except InvalidRecord as exc:
        return str(exc)


@pytest.mark.parametrize("fields,reason", RULES, ids=[repr(f)[:40] for f, _ in RULES])
def test_rules_on_a_dict_and_on_a_jsonl_line(fields, reason, tmp_path):
    record = {**BASE, **fields}
    got = _verdict(lambda: parse_record(record))
    if reason is None:
        assert isinstance(got, type(parse_record(BASE))), got
    else:
        assert isinstance(got, str) and reason in got, got
    # The same verdict through ingest's JSONL reader, escaped and raw (a lone surrogate cannot be written
    # as UTF-8: orjson refuses its escape, so the line is invalid JSON, which is also a refusal).
    for ensure_ascii in (True, False):
        path = tmp_path / f"r{ensure_ascii}.jsonl"
        path.write_bytes(json.dumps(record, ensure_ascii=ensure_ascii).encode("utf-8", "surrogatepass"))
        [item] = list(iter_jsonl(path))
        if reason is None:
            assert item == got
        elif any("\ud800" <= ch <= "\udfff" for v in record.values() if isinstance(v, str) for ch in v):
            assert isinstance(item, RecordError) and ("invalid JSON" in item.reason or reason in item.reason)
        else:
            assert isinstance(item, RecordError) and item.reason == got and item.line == 1


def test_created_at_is_utc():
    record = parse_record({**BASE, "created_at": "2026-01-01T12:00:00+02:00"})
    assert record.created_at == datetime(2026, 1, 1, 10, tzinfo=timezone.utc)
    assert parse_record({**BASE, "created_at": "2026-01-01T10:00"}).created_at == record.created_at


# -- the property ------------------------------------------------------------------------------

# Characters that broke or could break a layer behind the validator, mixed into arbitrary text.
AWKWARD = st.sampled_from(["\x00", "\n", "\r", "\t", "\x0b", "\x1f", "\x7f", "\x85", "\ud800", "\udfff", "\u2028",
                           "\u200d", "\ufeff", "\uffff", "\U0010ffff", " ", "\\", '"', "é", "😀", "\u0301"])
ANY_TEXT = st.text(st.one_of(st.characters(exclude_categories=()), AWKWARD), max_size=12)


def json_values(text):
    return st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
                        | text, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(text, inner, max_size=3),
                        max_leaves=6)


JSON_VALUE = json_values(ANY_TEXT)
# JSON that orjson reads: a lone surrogate anywhere in a line, even in a field we ignore, is not UTF-8 text.
SURROGATE_FREE = st.text(st.characters(exclude_categories=("Cs",)), max_size=12)
FIELDS = ("user_id", "prompt", "chosen", "rejected", "group", "controversial", "created_at")
# Values built to satisfy the rules without asking the validator: every one of these must be stored.
ID = st.text(st.characters(exclude_categories=("C", "Z")), min_size=1, max_size=20)
TEXT = st.text(st.characters(exclude_categories=("Cc", "Cs")) | st.sampled_from("\t\n\r "), min_size=1, max_size=30) \
    .filter(lambda s: not s.isspace())


@st.composite
def valid_records(draw):
    chosen = draw(TEXT)
    return {"user_id": draw(ID), "prompt": draw(TEXT), "chosen": chosen,
            "rejected": draw(TEXT.filter(lambda s: s != chosen)),
            "group": draw(st.none() | ID), "controversial": draw(st.none() | st.booleans()),
            "created_at": draw(st.none() | st.datetimes(datetime(1970, 1, 2), datetime(2026, 1, 1))
                               .map(lambda d: d.isoformat())),
            draw(SURROGATE_FREE.filter(lambda k: k not in FIELDS)): draw(json_values(SURROGATE_FREE))}  # ignored


@st.composite
def awkward_records(draw):
    """A record with one or more fields replaced by arbitrary JSON values or awkward strings."""
    record = draw(valid_records())
    for key in draw(st.lists(st.sampled_from(FIELDS), min_size=1, max_size=3)):
        record[key] = draw(JSON_VALUE | ANY_TEXT)
    return record


@st.composite
def poisoned_records(draw):
    """A valid record with one awkward character put into one of its strings."""
    record = draw(valid_records())
    key = draw(st.sampled_from(["user_id", "prompt", "chosen", "rejected", "group"]))
    value = record[key] or "g"
    at = draw(st.integers(0, len(value)))
    record[key] = value[:at] + draw(AWKWARD) + value[at:]
    return record


LINE = st.one_of(
    valid_records().map(lambda r: ("valid", r)),
    poisoned_records().map(lambda r: ("awkward", r)),
    poisoned_records().map(lambda r: ("awkward", r)),
    awkward_records().map(lambda r: ("awkward", r)),
    JSON_VALUE.map(lambda v: ("awkward", v)),
    st.sampled_from(['{"user_id": "u"', "not json", "\x00", '{"a": "\\ud800"}']).map(lambda s: ("raw", s)),
)

# A small valid graph under every example, so that the GNN always has something to train on.
GROUND = [{"user_id": f"g{u}", "prompt": f"ground {p}", "chosen": f"ground {p} {(u + p) % 3}",
           "rejected": f"ground {p} {(u + p + 1) % 3}"} for u in range(3) for p in range(2)]
TINY_GNN = GNNTrainConfig(model=GNNConfig(dim=8, layers=1), max_steps=2, warmup_steps=0, eval_every=1)


def _line(kind: str, value, ensure_ascii: bool) -> bytes:
    if kind == "raw":
        return value.encode("utf-8", "surrogatepass")
    return json.dumps(value, ensure_ascii=ensure_ascii).encode("utf-8", "surrogatepass")


def _empty(store: PreferenceStore) -> None:
    with store.engine.begin() as conn:
        for table in ("preferences", "users", "prompts", "responses"):
            conn.execute(sa.text(f"DELETE FROM {table}"))


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def shared_store(request, tmp_path_factory):
    """One store per database for every example (emptied between them): a database per example is slow."""
    if request.param == "sqlite":
        with PreferenceStore(f"sqlite:///{tmp_path_factory.mktemp('prop') / 'store.db'}") as store:
            yield store
        return
    import uuid

    import psycopg

    from tests.conftest import PG_ADMIN
    name = f"copl_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    store = PreferenceStore(f"{PG_ADMIN.rsplit('/', 1)[0]}/{name}")
    yield store
    store.close()
    with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@settings(max_examples=40, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large])
@given(lines=st.lists(LINE, min_size=1, max_size=6), ensure_ascii=st.booleans())
def test_whatever_arrives_is_stored_and_trainable_or_reported(shared_store, tmp_path_factory, lines, ensure_ascii):
    store = shared_store
    _empty(store)
    store.add([parse_record(r) for r in GROUND])
    before = store.stats()
    path = tmp_path_factory.mktemp("lines") / "in.jsonl"
    path.write_bytes(b"\n".join(_line(kind, value, ensure_ascii) for kind, value in lines) + b"\n")

    # Without --skip-invalid: all or nothing.
    try:
        report = ingest_files(store, [path], progress=False)
        refused = []
    except InvalidInput as exc:
        refused = exc.errors
        assert store.stats() == before, "a rejected file must leave the store as it was"
        report = ingest_files(store, [path], skip_invalid=True, progress=False)
    assert [(e.line, e.reason) for e in report.invalid] == [(e.line, e.reason) for e in refused]
    bad_lines = {e.line for e in refused}
    for error in refused:
        assert error.reason and "\n" not in error.reason and str(error).startswith(f"{path}:{error.line}: ")
    for number, (kind, _) in enumerate(lines, start=1):
        if kind == "valid":
            assert number not in bad_lines, [str(e) for e in refused]

    # Every line that passed is in the store, exactly as written.
    accepted = [parse_record(orjson.loads(_line(kind, v, ensure_ascii))) for n, (kind, v) in enumerate(lines, start=1)
                if n not in bad_lines]
    assert report.valid == len(accepted)
    snapshot, texts = store.snapshot_with_texts()
    stored = {(snapshot.user_ids[u], snapshot.response_ids[c], snapshot.response_ids[r], text)
              for (u, c, r), text in zip(snapshot.triples.tolist(), texts)}
    for rec in accepted:
        if rec.created_at is None or rec.created_at <= snapshot.snapshot_time:
            assert (rec.user_id, content_hash(rec.chosen), content_hash(rec.rejected),
                    (rec.prompt, rec.chosen, rec.rejected)) in stored

    # ... and trainable: a GNN step on the snapshot, and its checkpoint saves and loads (a newline in a
    # user id used to break exactly this, after the GNN had run).
    run = train_gnn(snapshot, TINY_GNN, progress=False)
    saved = run.checkpoint.save(tmp_path_factory.mktemp("ck"))
    assert GNNCheckpoint.load(saved).user_ids == snapshot.user_ids


def test_regression_nul_in_text_never_reaches_copy(store_url, tmp_path):
    """A NUL broke PostgreSQL's COPY half way through a file, after earlier batches had committed."""
    good = [{**BASE, "user_id": f"u{i}", "chosen": f"a{i}"} for i in range(5)]
    path = write_jsonl(tmp_path / "nul.jsonl", good + [{**BASE, "prompt": "before\u0000after"}] + good)
    with PreferenceStore(store_url) as store:
        with pytest.raises(InvalidInput) as info:
            ingest_files(store, [path], batch_size=2, progress=False)
        assert [(e.line, "U+0000" in e.reason) for e in info.value.errors] == [(6, True)]
        assert store.stats()["preferences"] == 0
        report = ingest_files(store, [path], batch_size=2, skip_invalid=True, progress=False)
        assert (report.inserted, report.duplicates, len(report.invalid)) == (5, 5, 1)


def test_regression_newline_in_user_id_is_refused(store_url, tmp_path):
    """A user id with a newline was stored and then broke every `copl train` when the GNN checkpoint was saved."""
    path = write_jsonl(tmp_path / "nl.jsonl", [BASE, {**BASE, "user_id": "alice\nbob"}])
    with PreferenceStore(store_url) as store:
        report = ingest_files(store, [path], skip_invalid=True, progress=False)
        assert report.inserted == 1
        assert [str(e) for e in report.invalid] == [
            f"{path}:2: 'user_id' contains the non-printable character U+000A at position 5"]
        assert store.snapshot().user_ids == ["u1"]


def test_a_later_batch_updates_the_users_group_and_first_time(store_url):
    def batch(**fields):
        return [parse_record({**BASE, "chosen": f"c{len(fields)}{sorted(fields.items())}", **fields})]

    def row(store, user_id="u1"):
        with store.engine.connect() as conn:
            group, created = conn.execute(sa.text('SELECT "group", created_at FROM users WHERE id = :u'),
                                          {"u": user_id}).one()
        if isinstance(created, str):  # SQLite: naive UTC text
            created = datetime.fromisoformat(created)
        return group, created.astimezone(timezone.utc).replace(tzinfo=None) if created.tzinfo else created

    with PreferenceStore(store_url) as store:
        store.add_batch(batch(created_at="2026-02-01T00:00:00Z"))
        assert row(store) == (None, datetime(2026, 2, 1))
        store.add_batch(batch(created_at="2026-01-01T00:00:00Z", group="type a"))
        assert row(store) == ("type a", datetime(2026, 1, 1))  # labelled by a later batch, and an earlier time
        store.add_batch(batch(created_at="2026-03-01T00:00:00Z"))
        assert row(store) == ("type a", datetime(2026, 1, 1))  # no label never erases one; later never moves it
        store.add_batch(batch(created_at="2026-03-02T00:00:00Z", group="type b"))
        assert row(store) == ("type b", datetime(2026, 1, 1))  # the last label wins
        # within one batch: the earliest time and the last non-null label
        store.add_batch([parse_record({**BASE, "user_id": "u2", "chosen": f"x{i}", **fields}) for i, fields in enumerate(
            [{"group": "g1", "created_at": "2026-05-01"}, {"created_at": "2026-04-01"}, {"group": "g2"}])])
        assert row(store, "u2") == ("g2", datetime(2026, 4, 1))


def test_pairs_of_until(store_url):
    records = [parse_record({**BASE, "chosen": f"c{m}", "created_at": f"2026-0{m}-01T00:00:00Z"}) for m in (1, 2, 3)]
    with PreferenceStore(store_url) as store:
        store.add(records)
        assert len(store.pairs_of(["u1"])["u1"]) == 3
        cut = store.pairs_of(["u1"], until=datetime(2026, 2, 1, tzinfo=timezone.utc))["u1"]
        assert sorted(cut) == sorted((content_hash(f"c{m}"), content_hash("b")) for m in (1, 2))
        # another zone, the same instant
        assert store.pairs_of(["u1"], until=datetime(2026, 2, 1, 1, tzinfo=timezone(timedelta(hours=1))))["u1"] == cut

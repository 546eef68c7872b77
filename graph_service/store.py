"""The preference store: SQLite (embedded default) or PostgreSQL through one SQLModel schema.

Writes are idempotent batches (INSERT ... ON CONFLICT DO NOTHING on content-hash keys), one
transaction each, so an interrupted ingest re-run completes with nothing lost and nothing doubled.
Reads export the bipartite graph as tensors for training (see snapshot.py).
"""
from __future__ import annotations

import hashlib
import sqlite3
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib.resources import files
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from alembic import command
from alembic.config import Config
import sqlalchemy.exc
from sqlalchemy import Connection, Engine, create_engine, event, func, select

from graph_service.records import PreferenceRecord, content_hash
from graph_service.schema import Preference, Prompt, Response, User

if TYPE_CHECKING:
    from graph_service.snapshot import GraphSnapshot

# Records per transaction. Keys are random hashes, so every batch dirties pages all over four B-trees, and each
# commit writes them to the WAL: 1M records into SQLite took 51 s in batches of 10k, 34 s in batches of 100k
# (peak RSS 0.17 -> 0.33 GB). An interrupted ingest still loses nothing: a re-run stores the missing batches.
DEFAULT_BATCH_SIZE = 100_000
_PREFERENCE_COLUMNS = ("id", "user_id", "prompt_id", "chosen_id", "rejected_id", "controversial", "created_at")


@dataclass
class IngestResult:
    inserted: int = 0
    duplicates: int = 0

    def __iadd__(self, other: "IngestResult") -> "IngestResult":
        self.inserted += other.inserted
        self.duplicates += other.duplicates
        return self


def preference_id(user_id: str, prompt_id: str, chosen_id: str, rejected_id: str) -> str:
    return hashlib.sha256("\x1f".join((user_id, prompt_id, chosen_id, rejected_id)).encode()).hexdigest()


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def _sqlite_time(ts: datetime) -> str:
    # SQLAlchemy's SQLite DateTime text format, so ORM reads and range filters see the same values.
    return ts.astimezone(timezone.utc).replace(tzinfo=None).isoformat(sep=" ", timespec="microseconds")


# A user's row keeps the earliest created_at of their preferences and the last non-null group label
# ingested (a later batch may label a user first, or relabel them); written only when that changes it.
_USER_UPSERT = {
    "sqlite": '(id) DO UPDATE SET "group" = coalesce(excluded."group", users."group"), '
              'created_at = min(users.created_at, excluded.created_at) '
              'WHERE excluded.created_at < users.created_at '
              'OR (excluded."group" IS NOT NULL AND excluded."group" IS NOT users."group")',
    "postgresql": '(id) DO UPDATE SET "group" = COALESCE(EXCLUDED."group", users."group"), '
                  'created_at = LEAST(users.created_at, EXCLUDED.created_at) '
                  'WHERE EXCLUDED.created_at < users.created_at '
                  'OR (EXCLUDED."group" IS NOT NULL AND EXCLUDED."group" IS DISTINCT FROM users."group")',
}


def _write_sqlite(cursor, table: str, columns: tuple[str, ...], rows: list[tuple], conflict: str | None) -> int:
    """executemany of INSERT ... ON CONFLICT DO NOTHING (or `conflict`); returns the rows written."""
    if "created_at" in columns:
        at = columns.index("created_at")
        texts = {ts: _sqlite_time(ts) for ts in {row[at] for row in rows}}  # a batch shares few times
        rows = [row[:at] + (texts[row[at]],) + row[at + 1:] for row in rows]
    names = ", ".join(f'"{c}"' for c in columns)
    marks = ", ".join("?" * len(columns))
    cursor.executemany(f"INSERT INTO {table} ({names}) VALUES ({marks}) ON CONFLICT {conflict or 'DO NOTHING'}", rows)
    return cursor.rowcount


def _write_postgres(cursor, table: str, columns: tuple[str, ...], rows: list[tuple], conflict: str | None) -> int:
    """COPY into a temporary table, then one INSERT ... SELECT ... ON CONFLICT DO NOTHING (or `conflict`).

    COPY is PostgreSQL's fast bulk path; the final INSERT's rowcount is the exact number inserted.
    An upsert locks the rows it updates, so it takes them in key order: concurrent ingesters then
    cannot deadlock on each other's users.
    """
    names = ", ".join(f'"{c}"' for c in columns)
    staging = f"_ingest_{table}"
    cursor.execute(f"CREATE TEMP TABLE IF NOT EXISTS {staging} "
                   f"(LIKE {table} INCLUDING DEFAULTS) ON COMMIT DELETE ROWS")
    with cursor.copy(f"COPY {staging} ({names}) FROM STDIN") as copy:
        for row in rows:
            copy.write_row(row)
    order = " ORDER BY id" if conflict else ""
    cursor.execute(f"INSERT INTO {table} ({names}) SELECT {names} FROM {staging}{order} "
                   f"ON CONFLICT {conflict or 'DO NOTHING'}")
    return cursor.rowcount


def _enable_wal(cursor, wait_s: float = 60.0) -> None:
    """Switching a new file to WAL needs a moment alone with it, and SQLite reports 'locked' at once
    instead of calling the busy handler, so concurrent first opens retry here."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    cur = dbapi_connection.cursor()
    _enable_wal(cur)                            # readers never block the writer
    cur.execute("PRAGMA synchronous=NORMAL")    # durable at checkpoints; safe with WAL
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA cache_size=-262144")     # 256 MiB, allocated as used: random-key inserts thrash small caches
    # (1M records: 34 s at 64 MiB, 29 s at 256 MiB; the 2 MiB default is far slower)
    cur.close()


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).expanduser().parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 60})  # busy timeout: concurrent writers wait
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url.removeprefix("postgresql://")  # psycopg 3, not psycopg2
    engine = create_engine(url, pool_pre_ping=True)
    if engine.dialect.name != "postgresql":
        raise ValueError(f"unsupported database '{engine.dialect.name}': use SQLite or PostgreSQL")
    return engine


class PreferenceStore:
    def __init__(self, url: str, migrate: bool = True):
        self.url = url
        self.engine = make_engine(url)
        if migrate:
            self.migrate()

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> "PreferenceStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @contextmanager
    def _writing(self) -> Iterator[Connection]:
        """A write transaction. On SQLite it takes the write lock up front (BEGIN IMMEDIATE): a
        transaction that reads first and then writes cannot wait for a concurrent writer (SQLite
        answers 'database is locked' at once instead of calling the busy handler)."""
        with self.engine.begin() as conn:
            if self.engine.dialect.name == "sqlite":
                conn.exec_driver_sql("BEGIN IMMEDIATE")
            yield conn

    # -- schema ---------------------------------------------------------------------------------
    def _alembic_config(self, connection) -> Config:
        cfg = Config()
        cfg.set_main_option("script_location", str(files("graph_service") / "migrations"))
        cfg.attributes["connection"] = connection
        return cfg

    def migrate(self, revision: str = "head") -> None:
        """Create or upgrade the schema (a no-op when it is current)."""
        if revision == "head" and self.schema_revision() == self._head_revision():
            return  # the common case: opening a current store takes no write lock
        with self._writing() as conn:
            command.upgrade(self._alembic_config(conn), revision)

    def downgrade(self, revision: str) -> None:
        with self._writing() as conn:
            command.downgrade(self._alembic_config(conn), revision)

    def _head_revision(self) -> str | None:
        from alembic.script import ScriptDirectory
        return ScriptDirectory.from_config(self._alembic_config(None)).get_current_head()

    def schema_revision(self) -> str | None:
        from alembic.runtime.migration import MigrationContext
        with self.engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()

    # -- writes ---------------------------------------------------------------------------------
    def add(self, records: Sequence[PreferenceRecord], batch_size: int = DEFAULT_BATCH_SIZE) -> IngestResult:
        """Store records in batches of one transaction each; returns inserted / duplicate counts."""
        total = IngestResult()
        now = utcnow()
        for start in range(0, len(records), batch_size):
            total += self.add_batch(records[start:start + batch_size], now)
        return total

    def add_batch(self, batch: Sequence[PreferenceRecord], now: datetime | None = None) -> IngestResult:
        """Store one batch in one transaction; records without created_at get `now`."""
        now = now or utcnow()
        hashes: dict[str, str] = {}  # texts repeat heavily within a batch (shared responses)

        def hash_of(text: str) -> str:
            h = hashes.get(text)
            if h is None:
                h = hashes[text] = content_hash(text)
            return h

        users: dict[str, tuple] = {}
        prompts: dict[str, str] = {}
        responses: dict[str, str] = {}
        prefs: dict[str, tuple] = {}
        for r in batch:
            ts = r.created_at or now
            p, c, j = hash_of(r.prompt), hash_of(r.chosen), hash_of(r.rejected)
            prompts[p] = r.prompt
            responses[c] = r.chosen
            responses[j] = r.rejected
            u = users.get(r.user_id)
            if u is None:
                users[r.user_id] = (r.user_id, r.group, ts)
            elif ts < u[2] or (r.group is not None and r.group != u[1]):
                users[r.user_id] = (r.user_id, u[1] if r.group is None else r.group, min(ts, u[2]))
            pid = preference_id(r.user_id, p, c, j)
            prefs[pid] = (pid, r.user_id, p, c, j, r.controversial, ts)
        dialect = self.engine.dialect.name
        tables = (
            ("users", ("id", "group", "created_at"), list(users.values()), _USER_UPSERT[dialect]),
            ("prompts", ("id", "text"), list(prompts.items()), None),
            ("responses", ("id", "text"), list(responses.items()), None),
            ("preferences", _PREFERENCE_COLUMNS, list(prefs.values()), None),
        )
        with self._writing() as conn:
            cursor = conn.connection.cursor()
            write = _write_postgres if dialect == "postgresql" else _write_sqlite
            try:
                inserted = [write(cursor, *table) for table in tables][-1]
            except self.engine.dialect.loaded_dbapi.OperationalError as exc:
                # The raw cursor skips SQLAlchemy's translation: raise what every other store call raises for
                # the same fault (a read-only file, a dropped connection), so callers see one kind of error.
                raise sqlalchemy.exc.OperationalError(None, None, exc) from exc
        return IngestResult(inserted=inserted, duplicates=len(batch) - inserted)

    # -- reads ----------------------------------------------------------------------------------
    def stats(self) -> dict[str, int]:
        with self.engine.connect() as conn:
            return {
                name: conn.execute(select(func.count()).select_from(table.__table__)).scalar_one()
                for name, table in (("users", User), ("prompts", Prompt),
                                    ("responses", Response), ("preferences", Preference))
            }

    def snapshot(self, until: datetime | None = None) -> "GraphSnapshot":
        """The bipartite graph of preferences created up to `until` (all when None).

        Indices are the sorted ids, so the same data gives the same snapshot on any database.
        """
        return self._snapshot(until, with_texts=False)[0]

    def snapshot_with_texts(self, until: datetime | None = None) -> tuple["GraphSnapshot", list[tuple[str, str, str]]]:
        """The snapshot plus (prompt, chosen, rejected) texts, row for row with `snapshot.triples`,
        from one query (the reward model trains on exactly the pairs the GNN saw)."""
        return self._snapshot(until, with_texts=True)

    def _snapshot(self, until: datetime | None, with_texts: bool):
        import torch  # here, not at module level: ingest and stats should not pay for importing torch

        from graph_service.snapshot import GraphSnapshot

        until = (until or utcnow()).astimezone(timezone.utc)
        t = Preference.__table__
        columns = [t.c.user_id, t.c.chosen_id, t.c.rejected_id]
        query = select(*columns)
        if with_texts:
            chosen, rejected = Response.__table__.alias("chosen"), Response.__table__.alias("rejected")
            prompt = Prompt.__table__
            query = (select(*columns, prompt.c.text, chosen.c.text, rejected.c.text)
                     .join(prompt, prompt.c.id == t.c.prompt_id)
                     .join(chosen, chosen.c.id == t.c.chosen_id)
                     .join(rejected, rejected.c.id == t.c.rejected_id))
        query = query.where(t.c.created_at <= until).order_by(t.c.id)
        users = User.__table__
        with self.engine.connect() as conn:
            rows = conn.execute(query).all()
            if not rows:
                raise ValueError("the store holds no preferences up to the snapshot time")
            groups = dict(conn.execute(select(users.c.id, users.c.group).where(users.c.created_at <= until)).all())
        ids = np.array([row[:3] for row in rows], dtype=object).T  # (3, P)
        user_ids, user_idx = np.unique(ids[0].astype(str), return_inverse=True)
        response_ids, resp_idx = np.unique(ids[1:].astype(str).ravel(), return_inverse=True)
        resp_idx = resp_idx.reshape(2, -1)
        triples = torch.from_numpy(np.stack([user_idx, resp_idx[0], resp_idx[1]], axis=1).astype(np.int64))
        user_list = user_ids.tolist()
        labels = [groups.get(u) for u in user_list]
        snapshot = GraphSnapshot(user_ids=user_list, response_ids=response_ids.tolist(), triples=triples,
                                 user_groups=labels if any(g is not None for g in labels) else [],
                                 snapshot_time=until)
        return snapshot, ([tuple(row[3:]) for row in rows] if with_texts else None)

    def now(self) -> datetime:
        """The database's clock (the one that fills preferences.stored_at), timezone-aware UTC."""
        with self.engine.connect() as conn:
            now = conn.execute(select(func.current_timestamp())).scalar_one()
        return now.replace(tzinfo=timezone.utc) if now.tzinfo is None else now.astimezone(timezone.utc)

    def users_stored_since(self, since: datetime) -> list[str]:
        """Users with a preference the store received after `since` (by the database's clock)."""
        t = Preference.__table__
        with self.engine.connect() as conn:
            return list(conn.execute(select(t.c.user_id).where(t.c.stored_at > since).distinct()).scalars())

    def preferences_stored_since(self, since: datetime) -> int:
        """How many preferences the store received after `since` (by the database's clock)."""
        t = Preference.__table__
        with self.engine.connect() as conn:
            return conn.execute(select(func.count()).select_from(t).where(t.c.stored_at > since)).scalar_one()

    def pair_counts(self, user_ids: Sequence[str]) -> dict[str, int]:
        """Number of stored preferences of each given user (0 for a user with none)."""
        t = Preference.__table__
        out = dict.fromkeys(user_ids, 0)
        with self.engine.connect() as conn:
            for start in range(0, len(user_ids), 1000):  # bounded IN lists
                chunk = list(user_ids[start:start + 1000])
                out.update(conn.execute(select(t.c.user_id, func.count()).where(t.c.user_id.in_(chunk))
                                        .group_by(t.c.user_id)).all())
        return out

    def pairs_of(self, user_ids: Sequence[str], until: datetime | None = None) -> dict[str, list[tuple[str, str]]]:
        """(chosen_id, rejected_id) pairs of each given user created up to `until` (all when None),
        in a stable order."""
        t = Preference.__table__
        out: dict[str, list[tuple[str, str]]] = {u: [] for u in user_ids}
        with self.engine.connect() as conn:
            for start in range(0, len(user_ids), 1000):  # bounded IN lists
                chunk = list(user_ids[start:start + 1000])
                query = select(t.c.user_id, t.c.chosen_id, t.c.rejected_id).where(t.c.user_id.in_(chunk))
                if until is not None:
                    query = query.where(t.c.created_at <= until.astimezone(timezone.utc))
                for u, c, r in conn.execute(query.order_by(t.c.id)):
                    out[u].append((c, r))
        return out

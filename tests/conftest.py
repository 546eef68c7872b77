"""Shared fixtures: real SQLite files and real PostgreSQL databases (one fresh database per test)."""
from __future__ import annotations

import json
import os
import uuid
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

PG_ADMIN = os.environ.get("COPL_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'store.db'}"


@contextmanager
def new_postgres_database():
    """A new, empty PostgreSQL database's URL, dropped afterwards. The server is part of this machine
    kind and of CI, so an unreachable server fails the test rather than skipping it."""
    import psycopg
    name = f"copl_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    base = PG_ADMIN.rsplit("/", 1)[0]
    try:
        yield f"{base}/{name}"
    finally:
        with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def postgres_url():
    with new_postgres_database() as url:
        yield url


@pytest.fixture(params=["sqlite", "postgres"])
def store_url(request) -> str:
    return request.getfixturevalue(f"{request.param}_url")


def make_records(n: int, users: int = 50, offset: int = 0):
    """Records offset..offset+n-1, all distinct; record i is the same whatever offset/n (overlaps are
    exact). Prompt i // users is labelled by `users` users from a pool of 4 shared responses."""
    out = []
    for i in range(offset, offset + n):
        p = i // users
        a = i % 4
        b = (a + 1 + (i // 4) % 3) % 4
        out.append({"user_id": f"u{i % users:05d}", "prompt": f"prompt {p}: say something",
                    "chosen": f"response {p}-{a}", "rejected": f"response {p}-{b}",
                    "group": f"type{i % users % 4}", "note": i})
    return out


def write_jsonl(path: Path, records) -> Path:
    with open(path, "w") as fh:
        for r in records:
            fh.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return path


@pytest.fixture(scope="session")
def tiny_release(tmp_path_factory):
    """ONE release trained by `copl train`'s code (profile tiny) for every test that needs one, on a
    PostgreSQL store: uf-p-2 with 200 users (seed 1); the seen users' pairs before training, the unseen
    users' pairs stored after it (they get ADAPTED embeddings). About a minute on 2 cores."""
    from graph_service.ingest import ingest_files
    from graph_service.store import PreferenceStore
    from trainer.pipeline import TrainRequest, train_release
    from trainer.synth import SynthConfig, generate, write

    root = tmp_path_factory.mktemp("tiny-release")
    dataset = generate(SynthConfig(preset="uf-p-2", users=200, seed=1))
    write(dataset, root / "dataset")
    with new_postgres_database() as url:
        with PreferenceStore(url) as store:
            ingest_files(store, [root / "dataset" / "train_seen.jsonl"], progress=False)
            release = train_release(TrainRequest(db_url=url, registry=root / "registry", profile="tiny",
                                                 progress=False))
            ingest_files(store, [root / "dataset" / "train_unseen.jsonl"], progress=False)
        yield SimpleNamespace(db_url=url, registry=root / "registry", release=release, dataset=dataset,
                              data_dir=root / "dataset")


@pytest.fixture(scope="session")
def ray_local():
    """ONE private in-process Ray for the whole test run (2 CPUs, its own temp dir, loopback), stopped at the
    end; trainer code that finds Ray already running uses it and leaves it running (trainer/ray_runtime.py)."""
    from trainer.ray_runtime import ray_session
    with ray_session(num_cpus=2):
        yield

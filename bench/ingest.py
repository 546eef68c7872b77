"""Ingest throughput and peak memory: `copl ingest`'s path (validate, then batched
INSERT ... ON CONFLICT DO NOTHING / COPY) into SQLite and PostgreSQL, beside a plain row-at-a-time
ORM insert (one session.add per row, existence checks with session.get) as the baseline.

    .venv/bin/python bench/ingest.py            # 1M records (baseline on 20k)
    .venv/bin/python bench/ingest.py --quick    # 50k records (baseline on 5k)

Each measurement runs in its own process, so peak RSS is that run's alone. Records are realistic
UltraFeedback-P-like text from `copl synth`. Last line: one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PG_ADMIN = os.environ.get("COPL_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")


def make_file(path: Path, n: int) -> int:
    """n records of uf-p-4 text (16 pairs a user), written as one JSONL file."""
    from trainer.synth import SynthConfig, generate
    data = generate(SynthConfig(preset="uf-p-4", users=max(8, -(-n // 16)), seed=0, unseen_fraction=0.0))
    with open(path, "w") as fh:
        for record in data.train_seen[:n]:
            fh.write(json.dumps(record) + "\n")
    return min(n, len(data.train_seen))


def run_copl_ingest(url: str, path: str) -> dict:
    from graph_service.ingest import ingest_files
    from graph_service.store import PreferenceStore
    with PreferenceStore(url) as store:
        start = time.perf_counter()
        report = ingest_files(store, [path], progress=False)
        seconds = time.perf_counter() - start
    return {"records": report.valid, "inserted": report.inserted, "seconds": seconds}


def run_orm_baseline(url: str, path: str, limit: int) -> dict:
    from sqlmodel import Session

    from graph_service.records import content_hash, iter_jsonl
    from graph_service.schema import Preference, Prompt, Response, User
    from graph_service.store import PreferenceStore, preference_id, utcnow
    with PreferenceStore(url) as store:
        start = time.perf_counter()
        n = 0
        with Session(store.engine) as session:
            for record in iter_jsonl(path):
                if n == limit:
                    break
                now = utcnow()
                if session.get(User, record.user_id) is None:
                    session.add(User(id=record.user_id, group=record.group, created_at=now))
                ids = []
                for model, text in ((Prompt, record.prompt), (Response, record.chosen), (Response, record.rejected)):
                    key = content_hash(text)
                    if session.get(model, key) is None:
                        session.add(model(id=key, text=text))
                    ids.append(key)
                pid = preference_id(record.user_id, *ids)
                if session.get(Preference, pid) is None:
                    session.add(Preference(id=pid, user_id=record.user_id, prompt_id=ids[0], chosen_id=ids[1],
                                           rejected_id=ids[2], controversial=record.controversial, created_at=now))
                session.flush()
                n += 1
                if n % 1000 == 0:
                    session.commit()
            session.commit()
        seconds = time.perf_counter() - start
    return {"records": n, "inserted": n, "seconds": seconds}


def peak_rss_gb() -> float:
    """This process's high-water RSS. VmHWM, not ru_maxrss: ru_maxrss survives exec, so a child would
    report the parent's peak (the parent holds the generated dataset)."""
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    raise RuntimeError("no VmHWM in /proc/self/status")


def child(args) -> None:
    """Runs one measurement and prints its JSON (called as a subprocess)."""
    if args.child == "copl":
        out = run_copl_ingest(args.url, args.file)
    else:
        out = run_orm_baseline(args.url, args.file, args.limit)
    out["peak_rss_gb"] = peak_rss_gb()
    print(json.dumps(out))


def measure(kind: str, url: str, path: Path, limit: int = 0) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, "--url", url, "--file", str(path), "--limit", str(limit)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{kind} on {url} failed:\n{proc.stderr}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["records_per_s"] = out["records"] / out["seconds"]
    return out


def fresh_postgres_db() -> tuple[str, str]:
    import psycopg
    name = f"copl_bench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    return name, f"{PG_ADMIN.rsplit('/', 1)[0]}/{name}"


def drop_postgres_db(name: str) -> None:
    import psycopg
    with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="50k records, baseline on 5k")
    parser.add_argument("--records", type=int, default=None)
    parser.add_argument("--baseline-records", type=int, default=None)
    parser.add_argument("--child", choices=["copl", "orm"], help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--file", help=argparse.SUPPRESS)
    parser.add_argument("--limit", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)

    n = args.records or (50_000 if args.quick else 1_000_000)
    n_base = args.baseline_records or (5_000 if args.quick else 20_000)
    with tempfile.TemporaryDirectory(prefix="copl-bench-") as tmp:
        tmp = Path(tmp)
        t = time.perf_counter()
        n = make_file(tmp / "records.jsonl", n)
        print(f"generated {n:,} records ({(tmp / 'records.jsonl').stat().st_size / 2**20:.0f} MiB) "
              f"in {time.perf_counter() - t:.1f}s", file=sys.stderr)

        rows = {}
        rows["copl ingest -> SQLite"] = measure("copl", f"sqlite:///{tmp / 'copl.db'}", tmp / "records.jsonl")
        pg_name, pg_url = fresh_postgres_db()
        try:
            rows["copl ingest -> PostgreSQL"] = measure("copl", pg_url, tmp / "records.jsonl")
        finally:
            drop_postgres_db(pg_name)
        rows["baseline: ORM row-at-a-time -> SQLite"] = measure(
            "orm", f"sqlite:///{tmp / 'orm.db'}", tmp / "records.jsonl", limit=n_base)

    base = rows["baseline: ORM row-at-a-time -> SQLite"]["records_per_s"]
    print(f"\n{'path':42s} {'records':>10s} {'seconds':>9s} {'records/s':>11s} {'x baseline':>11s} {'peak RSS GB':>12s}")
    for name, r in rows.items():
        print(f"{name:42s} {r['records']:>10,d} {r['seconds']:>9.1f} {r['records_per_s']:>11,.0f} "
              f"{r['records_per_s'] / base:>11.1f} {r['peak_rss_gb']:>12.2f}")
    print(json.dumps({
        "records": n,
        "sqlite_records_per_s": round(rows["copl ingest -> SQLite"]["records_per_s"]),
        "postgres_records_per_s": round(rows["copl ingest -> PostgreSQL"]["records_per_s"]),
        "baseline_records_per_s": round(base),
        "sqlite_peak_rss_gb": round(rows["copl ingest -> SQLite"]["peak_rss_gb"], 3),
        "postgres_peak_rss_gb": round(rows["copl ingest -> PostgreSQL"]["peak_rss_gb"], 3),
        "baseline_peak_rss_gb": round(rows["baseline: ORM row-at-a-time -> SQLite"]["peak_rss_gb"], 3),
    }))


if __name__ == "__main__":
    main()

"""Ingest throughput and peak memory: `copl ingest`'s path (validate, then batched
INSERT ... ON CONFLICT DO NOTHING / COPY) into SQLite and PostgreSQL, beside a plain row-at-a-time
ORM insert (one session.add per row, existence checks with session.get) as the baseline.

    .venv/bin/python bench/ingest.py            # ours at 20k and 1M records, the baseline at 20k
    .venv/bin/python bench/ingest.py --quick    # ours at 5k and 50k records, the baseline at 5k

The baseline is too slow to run at the large size (about 1,300 records/s), so ours also runs at the
baseline's size: "x baseline" compares the two at the same size only. Four more rows time validation
alone (parse + the record rules, graph_service/records.py, which ingest runs on every line twice)
beside its baseline, parsing alone, on up to 100,000 records as written (ASCII, no escapes: the fast
path) and with every text given a newline and non-ASCII characters (the per-character check). Each measurement runs in its own process, so peak RSS
is that run's alone. Records are realistic UltraFeedback-P-like text from `copl synth`. Last line: one
JSON object.
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

VALIDATE_SAMPLE = 100_000  # records validated alone (the rate does not depend on the file's size)
PG_ADMIN = os.environ.get("COPL_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")


def make_file(path: Path, n: int) -> int:
    """n records of uf-p-4 text (16 pairs a user), written as one JSONL file."""
    from trainer.synth import SynthConfig, generate
    data = generate(SynthConfig(preset="uf-p-4", users=max(8, -(-n // 16)), seed=0, unseen_fraction=0.0))
    with open(path, "w") as fh:
        for record in data.train_seen[:n]:
            fh.write(json.dumps(record) + "\n")
    return min(n, len(data.train_seen))


def make_escaped_copy(src: Path, dest: Path) -> None:
    """The same records with a newline and non-ASCII characters in every text (UTF-8, as exports are)."""
    with open(src) as fin, open(dest, "w") as fout:
        for line in fin:
            record = json.loads(line)
            for key in ("prompt", "chosen", "rejected"):
                record[key] = record[key].replace(". ", ".\n", 1) + " (café, naïve)"
            fout.write(json.dumps(record, ensure_ascii=False) + "\n")


def run_copl_ingest(url: str, path: str) -> dict:
    from graph_service.ingest import ingest_files
    from graph_service.store import PreferenceStore
    with PreferenceStore(url) as store:
        start = time.perf_counter()
        report = ingest_files(store, [path], progress=False)
        seconds = time.perf_counter() - start
    return {"records": report.valid, "inserted": report.inserted, "seconds": seconds}


def run_validate(path: str) -> dict:
    from graph_service.ingest import validate_files
    start = time.perf_counter()
    valid, errors = validate_files([path])
    if errors:
        raise SystemExit(f"{len(errors)} invalid records in {path}: {errors[0]}")
    return {"records": valid, "inserted": 0, "seconds": time.perf_counter() - start}


def run_parse(path: str) -> dict:
    """The validation rows' baseline: reading and decoding the lines with no rule checked."""
    import orjson
    start = time.perf_counter()
    with open(path, "rb") as fh:
        n = sum(1 for raw in fh if isinstance(orjson.loads(raw), dict))
    return {"records": n, "inserted": 0, "seconds": time.perf_counter() - start}


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
    elif args.child == "validate":
        out = run_validate(args.file)
    elif args.child == "parse":
        out = run_parse(args.file)
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
    parser.add_argument("--quick", action="store_true", help="ours at 5k and 50k records, the baseline at 5k")
    parser.add_argument("--records", type=int, default=None)
    parser.add_argument("--baseline-records", type=int, default=None)
    parser.add_argument("--child", choices=["copl", "orm", "validate", "parse"], help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--file", help=argparse.SUPPRESS)
    parser.add_argument("--limit", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)

    n = args.records or (50_000 if args.quick else 1_000_000)
    n_base = min(n, args.baseline_records or (5_000 if args.quick else 20_000))
    with tempfile.TemporaryDirectory(prefix="copl-bench-") as tmp:
        tmp = Path(tmp)
        t = time.perf_counter()
        big, small = tmp / "records.jsonl", tmp / "small.jsonl"
        sample, escaped = tmp / "sample.jsonl", tmp / "escaped.jsonl"
        n = make_file(big, n)
        n_sample = min(n, VALIDATE_SAMPLE)
        for path, size in ((small, n_base), (sample, n_sample)):
            with open(big) as fin, open(path, "w") as fout:
                fout.writelines(line for _, line in zip(range(size), fin))
        make_escaped_copy(sample, escaped)
        print(f"generated {n:,} records ({big.stat().st_size / 2**20:.0f} MiB) in {time.perf_counter() - t:.1f}s",
              file=sys.stderr)

        rows = {}  # (path, records) -> measurement
        for size, path in ((n_base, small), (n, big)):
            rows[("copl ingest -> SQLite", size)] = measure("copl", f"sqlite:///{tmp / f'copl-{size}.db'}", path)
            pg_name, pg_url = fresh_postgres_db()
            try:
                rows[("copl ingest -> PostgreSQL", size)] = measure("copl", pg_url, path)
            finally:
                drop_postgres_db(pg_name)
        rows[("baseline: ORM row-at-a-time -> SQLite", n_base)] = measure("orm", f"sqlite:///{tmp / 'orm.db'}", small, limit=n_base)
        for label, path in (("ASCII, no escapes", sample), ("newlines, non-ASCII", escaped)):
            rows[(f"validate: parse + rules ({label})", n_sample)] = measure("validate", "", path)
            rows[(f"baseline: parse only ({label})", n_sample)] = measure("parse", "", path)

    base = rows[("baseline: ORM row-at-a-time -> SQLite", n_base)]["records_per_s"]
    print(f"\n{'path':48s} {'records':>10s} {'seconds':>9s} {'records/s':>11s} {'x baseline':>11s} {'peak RSS GB':>12s}")
    for (name, size), r in rows.items():
        same = size == n_base and "parse" not in name  # ratios only at the ingest baseline's size
        print(f"{name:48s} {r['records']:>10,d} {r['seconds']:>9.2f} {r['records_per_s']:>11,.0f} "
              f"{format(r['records_per_s'] / base, '.1f') if same else '-':>11s} {r['peak_rss_gb']:>12.2f}")
    print("(x baseline: ingest rows at the ORM baseline's size only; the larger size shows how the rate holds up.\n"
          " validate rows: the cost of the record rules is the gap to 'parse only' on the same file)")

    def rate(name: str, size: int) -> int:
        return round(rows[(name, size)]["records_per_s"])

    print(json.dumps({
        "records": n,
        "baseline_records": n_base,
        "sqlite_records_per_s": rate("copl ingest -> SQLite", n),
        "postgres_records_per_s": rate("copl ingest -> PostgreSQL", n),
        "sqlite_records_per_s_at_baseline_size": rate("copl ingest -> SQLite", n_base),
        "postgres_records_per_s_at_baseline_size": rate("copl ingest -> PostgreSQL", n_base),
        "baseline_records_per_s": round(base),
        "sqlite_x_baseline_same_size": round(rows[("copl ingest -> SQLite", n_base)]["records_per_s"] / base, 2),
        "postgres_x_baseline_same_size": round(rows[("copl ingest -> PostgreSQL", n_base)]["records_per_s"] / base, 2),
        "validate_records_per_s": rate("validate: parse + rules (ASCII, no escapes)", n_sample),
        "parse_only_records_per_s": rate("baseline: parse only (ASCII, no escapes)", n_sample),
        "validate_escaped_records_per_s": rate("validate: parse + rules (newlines, non-ASCII)", n_sample),
        "parse_only_escaped_records_per_s": rate("baseline: parse only (newlines, non-ASCII)", n_sample),
        "sqlite_peak_rss_gb": round(rows[("copl ingest -> SQLite", n)]["peak_rss_gb"], 3),
        "postgres_peak_rss_gb": round(rows[("copl ingest -> PostgreSQL", n)]["peak_rss_gb"], 3),
        "baseline_peak_rss_gb": round(rows[("baseline: ORM row-at-a-time -> SQLite", n_base)]["peak_rss_gb"], 3),
    }))


if __name__ == "__main__":
    main()

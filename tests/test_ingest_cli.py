"""`copl ingest` / `copl stats` as separate processes against real SQLite and PostgreSQL:
bad input, concurrent ingesters of overlapping files, and an ingest killed half way."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from graph_service.store import PreferenceStore
from tests.conftest import make_records, write_jsonl

COPL = [sys.executable, "-m", "copl_cli.main"]


def copl(*args, check=True):
    proc = subprocess.run([*COPL, *args], capture_output=True, text=True, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"copl {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


def test_cli_rejects_bad_file_then_skip_invalid(store_url, tmp_path):
    good = make_records(3)
    path = write_jsonl(tmp_path / "f.jsonl", [good[0], '{"user_id": "u"', good[1], {"user_id": "u", "prompt": "p"}, good[2]])
    proc = copl("ingest", str(path), "--db", store_url, "--no-progress", check=False)
    assert proc.returncode == 1
    assert f"{path}:2: invalid JSON" in proc.stderr
    assert f"{path}:4: missing required field 'chosen'" in proc.stderr
    assert "nothing was stored" in proc.stderr and "--skip-invalid" in proc.stderr
    assert json.loads(copl("stats", "--db", store_url, "--json").stdout)["preferences"] == 0

    proc = copl("ingest", str(path), "--db", store_url, "--no-progress", "--skip-invalid")
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"valid": 3, "inserted": 3, "duplicates": 0, "invalid": 2}
    assert "skipped" in proc.stderr and ":4:" in proc.stderr
    assert json.loads(copl("stats", "--db", store_url, "--json").stdout) == {
        "users": 3, "prompts": 1, "responses": 4, "preferences": 3}


def test_cli_missing_file_and_bad_url(tmp_path, sqlite_url):
    proc = copl("ingest", str(tmp_path / "nope.jsonl"), "--db", sqlite_url, check=False)
    assert proc.returncode == 1 and "no such file" in proc.stderr
    proc = copl("stats", "--db", "postgresql://postgres@127.0.0.1:1/none", check=False)
    assert proc.returncode == 1 and "cannot use the preference store" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_concurrent_ingesters_of_overlapping_files(store_url, tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", make_records(6000, offset=0))
    b = write_jsonl(tmp_path / "b.jsonl", make_records(6000, offset=3000))  # 3000 records in common
    PreferenceStore(store_url).close()  # schema first, so both processes race on data, not DDL
    procs = [subprocess.Popen([*COPL, "ingest", str(p), "--db", store_url, "--batch-size", "200", "--no-progress"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for p in (a, b)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1] for o in outs]
    reports = [json.loads(o[0].strip().splitlines()[-1]) for o in outs]
    assert sum(r["inserted"] for r in reports) == 9000
    assert sum(r["duplicates"] for r in reports) == 3000
    assert json.loads(copl("stats", "--db", store_url, "--json").stdout)["preferences"] == 9000


def test_concurrent_first_runs_migrate_once(store_url, tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", make_records(100))
    procs = [subprocess.Popen([*COPL, "ingest", str(a), "--db", store_url, "--no-progress"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1] for o in outs]
    assert json.loads(copl("stats", "--db", store_url, "--json").stdout)["preferences"] == 100


def test_interrupted_ingest_rerun_completes(store_url, tmp_path):
    n = 60_000
    path = write_jsonl(tmp_path / "big.jsonl", make_records(n, users=500))
    store = PreferenceStore(store_url)
    proc = subprocess.Popen([*COPL, "ingest", str(path), "--db", store_url, "--batch-size", "100", "--no-progress"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    stored = 0
    while time.time() < deadline and proc.poll() is None:
        stored = store.stats()["preferences"]
        if stored >= 1000:
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.01)
    proc.wait()
    stored = store.stats()["preferences"]
    assert 0 < stored < n, f"the ingest was not interrupted half way ({stored} of {n} stored)"
    assert stored % 100 == 0  # whole batches only: a transaction is all or nothing

    rerun = json.loads(copl("ingest", str(path), "--db", store_url, "--no-progress").stdout.strip().splitlines()[-1])
    assert rerun["inserted"] == n - stored and rerun["duplicates"] == stored
    assert store.stats()["preferences"] == n
    store.close()

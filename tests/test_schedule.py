"""`copl schedule`'s decisions and the one-run-at-a-time lock, on a real registry and a real store."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from datetime import datetime, timedelta

import pytest

from copl_common.registry import Registry
from graph_service.store import PreferenceStore
from graph_service.records import PreferenceRecord
from tests.conftest import make_records
from tests.service_harness import copy_registry
from trainer.run_lock import RunInProgress, lock_holder, run_lock
from trainer.schedule import Policy, decide, log_line, parse_duration


def test_parse_duration():
    assert [parse_duration(t) for t in ("90", "90s", "15m", "2h", "1d", "0.5h")] == [90, 90, 900, 7200, 86400, 1800]
    for bad in ("", "soon", "-5m", "0", "5 weeks"):
        with pytest.raises(ValueError):
            parse_duration(bad)
    with pytest.raises(ValueError):
        Policy()


def test_decisions_by_age_and_new_preferences(tiny_release, tmp_path):
    registry = copy_registry(tiny_release.registry, tmp_path / "registry")
    release = registry.current()
    made = datetime.fromisoformat(release.created_at)
    snapshot = datetime.fromisoformat(release.manifest["snapshot_time"])
    assert not decide(Policy(every_s=3600), registry, lambda t: 0, now=made + timedelta(minutes=5)).run
    due = decide(Policy(every_s=3600), registry, lambda t: 0, now=made + timedelta(hours=2))
    assert due.run and "7200s old" in due.reason

    asked = []
    def arrived(since):
        asked.append(since)
        return 7
    assert not decide(Policy(new_preferences=8), registry, arrived).run
    assert decide(Policy(new_preferences=7), registry, arrived).reason.startswith("7 new preferences")
    assert asked[0] == snapshot
    assert decide(Policy(every_s=60), Registry(tmp_path / "empty"), arrived).reason == "no current release"
    assert log_line("wait", "why", now=made).endswith(" wait why")


def test_preferences_stored_since_counts_the_store(sqlite_url):
    with PreferenceStore(sqlite_url) as store:
        store.add([PreferenceRecord(**{k: v for k, v in r.items() if k != "note"}) for r in make_records(20)])
        time.sleep(1.1)   # SQLite's clock has one-second steps
        mark = store.now()
        time.sleep(1.1)
        store.add([PreferenceRecord(**{k: v for k, v in r.items() if k != "note"}) for r in make_records(5, offset=20)])
        assert store.preferences_stored_since(mark) == 5
        assert store.preferences_stored_since(mark - timedelta(days=1)) == 25


def test_run_lock_one_at_a_time_and_released_by_a_killed_holder(tmp_path):
    with run_lock(tmp_path):
        with pytest.raises(RunInProgress, match=f"pid {os.getpid()}"):
            with run_lock(tmp_path):
                pass
    assert lock_holder(tmp_path) is None
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from trainer.run_lock import run_lock\n"
                               f"with run_lock({str(tmp_path)!r}):\n    print('held', flush=True); time.sleep(600)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert f"pid {holder.pid}" in lock_holder(tmp_path)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(10)
    assert lock_holder(tmp_path) is None   # the kernel dropped it: nothing stale to clean up

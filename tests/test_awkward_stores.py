"""`train_release` on stores a real deployment meets: empty, one user, nobody with two pairs, a user whose
pairs are all one pair repeated. Real SQLite store, real registry, the real backbone, profile tiny."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from graph_service.ingest import ingest_files
from graph_service.store import PreferenceStore
from tests.conftest import write_jsonl
from trainer.pipeline import TrainRequest, train_release
from trainer.profiles import profile


def _record(user: str, k: int, prompt: int | None = None) -> dict:
    """User's k-th pair; responses are distinct per k, prompts too unless given."""
    p = k if prompt is None else prompt
    return {"user_id": user, "prompt": f"Question {p}: how do tides work?",
            "chosen": f"Answer {k}: the moon pulls the oceans.", "rejected": f"Answer {k}: tides are random."}


def _train(tmp_path, records: list[dict]):
    url = f"sqlite:///{tmp_path / 'store.db'}"
    with PreferenceStore(url) as store:
        if records:
            ingest_files(store, [write_jsonl(tmp_path / "records.jsonl", records)], progress=False)
    release = train_release(TrainRequest(db_url=url, registry=tmp_path / "registry", profile="tiny", progress=False))
    assert json.loads((release.path / "metrics.json").read_text()) == release.manifest["metrics"]
    return release.manifest["metrics"]


def test_empty_store_fails_in_one_line_before_anything_runs(tmp_path):
    with pytest.raises(ValueError, match="no preferences"):
        _train(tmp_path, [])
    assert not (tmp_path / "registry").exists()           # nothing staged, so no GNN or backbone ran
    proc = subprocess.run([sys.executable, "-m", "copl_cli.main", "train", "--db", f"sqlite:///{tmp_path / 'store.db'}",
                           "--registry", str(tmp_path / "registry"), "--profile", "tiny", "--no-progress"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error:") and "no preferences" in proc.stderr


def test_one_user_has_a_selection_part_and_no_report_part(tmp_path):
    metrics = _train(tmp_path, [_record("alice", k) for k in range(6)])
    assert metrics["holdout"] == {"train_pairs": 5, "selection_pairs": 1, "selection_users": 1,
                                  "report_pairs": 0, "report_users": 0}
    assert metrics["report_accuracy"] is None and metrics["report_pairs"] == 0
    assert metrics["gnn"]["report_accuracy"] is None and metrics["gnn"]["selection_accuracy"] is not None
    assert metrics["reward"]["selection_pairs"] == 1 and metrics["reward"]["selection_accuracy"] is not None


def test_no_user_with_two_pairs_trains_without_early_stopping(tmp_path):
    metrics = _train(tmp_path, [_record(f"user{i}", i) for i in range(6)])
    assert metrics["holdout"]["train_pairs"] == 6 and metrics["holdout"]["selection_pairs"] == 0
    assert metrics["report_accuracy"] is None
    assert metrics["gnn"]["selection_accuracy"] is None and metrics["gnn"]["steps"] == profile("tiny").gnn.max_steps
    reward = metrics["reward"]
    assert reward["selection_accuracy"] is None and reward["selection_pairs"] == 0
    assert reward["steps"] == profile("tiny").reward_training.max_steps and not reward["stopped_early"]


def test_a_user_whose_pairs_are_all_one_pair_is_never_held_out(tmp_path):
    repeated = [_record("bob", 0, prompt=p) for p in range(4)]          # one (chosen, rejected), four prompts
    others = [_record(f"user{i}", k) for i in range(4) for k in range(3)]
    metrics = _train(tmp_path, repeated + repeated + others)           # the second copy is stored once
    # bob's four records are one block: holding any out would leave its edges in the training graph
    assert metrics["holdout"]["train_pairs"] == 4 + 4 * 2
    assert metrics["holdout"]["selection_users"] + metrics["holdout"]["report_users"] == 4

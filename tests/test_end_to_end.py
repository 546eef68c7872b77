"""The main path through the real command line, on SQLite and the real MiniLM backbone:
synth -> ingest seen users -> train (tiny) -> ingest users who arrive later -> eval."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from trainer.synth import majority_bound

COPL = [sys.executable, "-m", "copl_cli.main"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    home = tmp_path_factory.mktemp("copl-home")
    env = {"COPL_HOME": str(home), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}

    def copl(*args):
        proc = subprocess.run([*COPL, *args], capture_output=True, text=True, env=env, timeout=900)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    data = home / "ds"
    # uf-p-2 (helpfulness vs honesty users): the tiny profile learns both cues within the suite's time
    copl("synth", "--preset", "uf-p-2", "--users", "200", "--seed", "1", "--out", str(data))
    copl("ingest", str(data / "train_seen.jsonl"), "--no-progress")
    release_id = copl("train", "--profile", "tiny", "--no-progress").strip().splitlines()[-1]
    copl("ingest", str(data / "train_unseen.jsonl"), "--no-progress")
    metrics = json.loads(copl("eval", str(data / "test.jsonl"), "--json", "--no-progress"))
    return {"home": home, "data": data, "release": release_id, "metrics": metrics, "copl": copl}


def test_release_is_published_and_current(trained):
    listed = [json.loads(line) for line in trained["copl"]("releases", "list", "--json").splitlines()]
    assert [r["id"] for r in listed if r["current"]] == [trained["release"]]
    release = trained["home"] / "registry" / "releases" / trained["release"]
    manifest = json.loads((release / "release.json").read_text())
    assert manifest["profile"] == "tiny" and manifest["data"]["users"] == 180
    for part in ("gnn/manifest.json", "reward/manifest.json", "plots/gnn_training_curve.png",
                 "plots/gnn_user_embeddings.png", "plots/reward_training_curve.png"):
        assert (release / part).stat().st_size > 0, part
    reward = json.loads((release / "reward" / "manifest.json").read_text())
    assert reward["extra"]["gnn_checkpoint"]["path"] == "../gnn"


def test_eval_json_and_personalization(trained):
    m = trained["metrics"]
    assert m["release"] == trained["release"]
    assert m["n_pairs"] == 800 and m["seen"]["n_pairs"] == 720 and m["unseen"]["n_pairs"] == 80
    assert m["users_by_source"].get("TRAINED") == 180
    assert m["users_by_source"].get("ADAPTED", 0) + m["users_by_source"].get("DEFAULT", 0) == 20
    assert set(m["by_group"]) == {"helpfulness", "honesty"}
    assert sum(g["n_pairs"] for g in m["by_group"].values()) == 800
    assert m["controversial_accuracy"] == pytest.approx(m["accuracy"])  # every synthetic pair is controversial
    test = [json.loads(line) for line in open(trained["data"] / "test.jsonl")]
    bound = majority_bound(test)
    assert m["seen"]["accuracy"] > bound + 0.05, (m, bound)

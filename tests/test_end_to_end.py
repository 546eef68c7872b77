"""The main path through the real command line, on SQLite and the real MiniLM backbone:
synth -> ingest seen users -> train (tiny) -> ingest users who arrive later -> eval; and `copl eval`
on releases that are broken in the ways a shared filesystem breaks them."""
from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from dataclasses import replace
from datetime import datetime, timezone

import pytest
import torch

from graph_service.embeddings import GNNCheckpoint
from trainer.synth import majority_bound

COPL = [sys.executable, "-m", "copl_cli.launcher"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    home = tmp_path_factory.mktemp("copl-home")
    env = {"COPL_HOME": str(home), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}

    def run(*args):
        return subprocess.run([*COPL, *args], capture_output=True, text=True, env=env, timeout=900)

    def copl(*args):
        proc = run(*args)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    data = home / "ds"
    # uf-p-2 (helpfulness vs honesty users): the tiny profile learns both cues within the suite's time
    copl("synth", "--preset", "uf-p-2", "--users", "200", "--seed", "1", "--out", str(data))
    copl("ingest", str(data / "train_seen.jsonl"), "--no-progress")
    release_id = copl("train", "--profile", "tiny", "--no-progress").strip().splitlines()[-1]
    before_unseen = datetime.now(timezone.utc)
    copl("ingest", str(data / "train_unseen.jsonl"), "--no-progress")
    metrics = json.loads(copl("eval", str(data / "test.jsonl"), "--json", "--no-progress"))
    return {"home": home, "data": data, "release": release_id, "metrics": metrics, "copl": copl, "run": run,
            "before_unseen": before_unseen}


def _records(path):
    return [json.loads(line) for line in open(path)]


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
    assert set(m["by_group"]) == {"helpfulness", "honesty"}
    assert sum(g["n_pairs"] for g in m["by_group"].values()) == 800
    test = _records(trained["data"] / "test.jsonl")
    bound = majority_bound(test)
    assert m["seen"]["accuracy"] > bound + 0.05, (m, bound)


def test_unseen_users_are_adapted_and_beat_the_majority_bound(trained):
    """Every user who arrived after training gets an adapted embedding (none falls back to DEFAULT), and
    their accuracy beats what ignoring the user can reach on their pairs by more than luck explains."""
    m = trained["metrics"]
    assert m["users_by_source"] == {"ADAPTED": 20, "TRAINED": 180}
    test = _records(trained["data"] / "test.jsonl")
    unseen_users = {r["user_id"] for r in _records(trained["data"] / "train_unseen.jsonl")}
    unseen_test = [r for r in test if r["user_id"] in unseen_users]
    assert len(unseen_test) == m["unseen"]["n_pairs"] == 80
    bound = majority_bound(unseen_test, votes_from=test)  # each pair oriented as most of all its labels go
    # three standard errors of an accuracy of `bound` on 80 pairs: chance passes this about once in 700
    margin = 3 * math.sqrt(bound * (1 - bound) / len(unseen_test))
    assert m["unseen"]["accuracy"] > bound + margin, (m["unseen"], bound, margin)


def test_controversial_accuracy_is_over_the_controversial_pairs(trained, tmp_path):
    """Every pair of the training data is controversial (the paper's setting), so controversial accuracy is
    all of accuracy there. The same seed with a share of non-controversial pairs gives the same users,
    types and held-out prompts with other test pairs, a quarter of them ones no two types disagree on."""
    m = trained["metrics"]
    assert m["controversial_accuracy"] == pytest.approx(m["accuracy"])
    mixed = tmp_path / "mixed"
    trained["copl"]("synth", "--preset", "uf-p-2", "--users", "200", "--seed", "1",
                    "--non-controversial-fraction", "0.25", "--out", str(mixed))
    test = _records(mixed / "test.jsonl")
    controversial = [r for r in test if r["controversial"]]
    assert len(controversial) == 600 and len(test) == 800
    only = tmp_path / "controversial.jsonl"
    only.write_text("".join(json.dumps(r) + "\n" for r in controversial))
    both = json.loads(trained["copl"]("eval", str(mixed / "test.jsonl"), "--json", "--no-progress"))
    sub = json.loads(trained["copl"]("eval", str(only), "--json", "--no-progress", "--as-of", both["as_of"]))
    assert sub["n_pairs"] == 600 and sub["controversial_accuracy"] == pytest.approx(sub["accuracy"])
    # the same 600 pairs scored in other batches: equal up to a pair whose margin sits at float precision
    assert both["controversial_accuracy"] == pytest.approx(sub["accuracy"], abs=1.01 / 600)
    assert both["controversial_accuracy"] != both["accuracy"], "the split must separate something to be tested"


def test_eval_as_of_a_time_before_the_later_users_arrived(trained):
    """As of a time before their pairs were stored, the later users have no context: DEFAULT."""
    as_of = trained["before_unseen"].isoformat()
    m = json.loads(trained["copl"]("eval", str(trained["data"] / "test.jsonl"), "--json", "--no-progress",
                                   "--as-of", as_of))
    assert m["users_by_source"] == {"DEFAULT": 20, "TRAINED": 180}
    assert datetime.fromisoformat(m["as_of"]) == trained["before_unseen"]
    proc = trained["run"]("eval", str(trained["data"] / "test.jsonl"), "--as-of", "2000-01-01T00:00:00")
    assert proc.returncode == 1 and "before release" in proc.stderr and "Traceback" not in proc.stderr


def _broken_copy(trained, tmp_path, damage) -> subprocess.CompletedProcess:
    """`copl eval` against a copy of the trained registry, damaged by `damage(release_dir)`."""
    registry = tmp_path / "registry"
    shutil.copytree(trained["home"] / "registry", registry)
    damage(registry / "releases" / trained["release"])
    return trained["run"]("eval", str(trained["data"] / "test.jsonl"), "--registry", str(registry), "--no-progress")


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _retrained_gnn(release):
    """Replace gnn/ by a valid checkpoint that is not the one the reward model was trained with."""
    checkpoint = GNNCheckpoint.load(release / "gnn")
    other = torch.nn.functional.normalize(checkpoint.user_embeddings.flip(0), dim=1)
    replace(checkpoint, user_embeddings=other).save(release / "gnn")


@pytest.mark.parametrize("damage, message", [
    (lambda r: _truncate(r / "gnn" / "tables.safetensors"), "sha256 does not match"),
    (lambda r: _truncate(r / "reward" / "weights.safetensors"), "checksum mismatch"),
    (lambda r: (r / "reward" / "manifest.json").unlink(), "no reward/manifest.json"),
    (lambda r: _truncate(r / "release.json"), "release.json is unreadable"),
    (_retrained_gnn, "trained with another GNN"),
], ids=["truncated-gnn-tables", "truncated-reward-weights", "no-reward-manifest", "truncated-release-json",
        "swapped-gnn"])
def test_eval_refuses_a_broken_release_in_one_line(trained, tmp_path, damage, message):
    proc = _broken_copy(trained, tmp_path, damage)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], proc.stderr
    assert trained["release"] in lines[0]


def test_eval_with_an_unreachable_database_is_one_line(trained):
    proc = trained["run"]("eval", str(trained["data"] / "test.jsonl"), "--db", "postgresql://postgres@127.0.0.1:1/x")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "cannot use the preference store" in proc.stderr

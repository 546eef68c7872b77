"""The client library against the real graph and reward services (the session's tiny release on PostgreSQL):
every call and its typed errors, `copl eval --target` beside the in-process eval, a process that cannot
import torch, transformers, peft or ray, and a fresh virtual environment with the base install only."""
from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

from copl_cli.main import app
from copl_client import (Client, EmbeddingSource, InvalidArgument, InvalidRecords, NotFound, PermissionDenied,
                         ReleaseMismatch, Unauthenticated, UserEmbedding)
from tests.service_harness import TOKEN, ServiceLoop, copy_registry, settings_for

HEAVY = ("torch", "transformers", "peft", "ray")


@pytest.fixture(scope="module")
def live(tiny_release, tmp_path_factory):
    loop = ServiceLoop()
    registry = copy_registry(tiny_release.registry, tmp_path_factory.mktemp("client-live") / "registry")
    settings = settings_for(tiny_release.db_url, registry.root)
    graph = loop.graph(settings)
    reward = loop.reward(settings.with_overrides(graph_target=f"127.0.0.1:{graph.port}"))
    yield SimpleNamespace(graph=f"grpc://127.0.0.1:{graph.port}", reward=f"grpc://127.0.0.1:{reward.port}",
                          release=tiny_release.release, data=tiny_release.dataset, data_dir=tiny_release.data_dir,
                          db_url=tiny_release.db_url, registry=registry.root)
    loop.close()


@pytest.fixture
def client(live):
    with Client(reward=live.reward, graph=live.graph, token=TOKEN) as c:
        yield c


def test_scores_embeddings_and_release_info(live, client):
    seen = live.data.train_seen[0]
    late = live.data.train_unseen[0]["user_id"]
    donor_pairs = [r for r in live.data.train_seen if r["user_id"] == live.data.train_seen[-1]["user_id"]]
    newcomer = f"inline-{uuid.uuid4().hex[:8]}"
    embs = client.embeddings([seen["user_id"], late, newcomer, "nobody"],
                             context={newcomer: [(r["prompt"], r["chosen"], r["rejected"]) for r in donor_pairs]})
    assert [e.source for e in embs] == [EmbeddingSource.TRAINED, EmbeddingSource.ADAPTED, EmbeddingSource.ADAPTED,
                                        EmbeddingSource.DEFAULT]
    assert all(e.release_id == live.release.id for e in embs)
    responses = [seen["chosen"], seen["rejected"]]
    by_id = client.score(seen["user_id"], seen["prompt"], responses)
    by_embedding = client.score(embs[0], seen["prompt"], responses)
    assert by_id.release_id == by_embedding.release_id == live.release.id
    assert by_id.embedding_source is EmbeddingSource.TRAINED
    assert by_embedding.scores == pytest.approx(by_id.scores, abs=1e-4)
    info = client.release_info()
    assert info.release_id == live.release.id and info.embedding_dim == len(embs[0].vector) and info.metrics
    assert client.release_info("graph").release_id == live.release.id
    assert [(r.service, r.release_id, r.swapped) for r in client.reload()] == [
        ("graph", live.release.id, False), ("reward", live.release.id, False)]


def test_add_preferences_counts_and_lists_invalid_records(client):
    user = f"client-{uuid.uuid4().hex[:8]}"
    records = [{"user_id": user, "prompt": f"p{i}", "chosen": "yes", "rejected": "no"} for i in range(3)]
    assert client.add_preferences(records).inserted == 3
    again = client.add_preferences(records)
    assert (again.inserted, again.duplicates) == (0, 3)
    bad = records + [{"user_id": user, "prompt": "", "chosen": "a", "rejected": "b"},
                     {"user_id": user, "prompt": "q", "chosen": "same", "rejected": "same"}]
    with pytest.raises(InvalidRecords) as err:
        client.add_preferences(bad)
    assert [index for index, _ in err.value.violations] == [3, 4]
    kept = client.add_preferences(bad, skip_invalid=True)
    assert kept.duplicates == 3 and [index for index, _ in kept.rejected] == [3, 4]


def test_errors_are_typed(live, client):
    record = {"user_id": "x", "prompt": "p", "chosen": "a", "rejected": "b"}
    with Client(reward=live.reward, graph=live.graph, token="") as anonymous:
        with pytest.raises(Unauthenticated):
            anonymous.add_preferences([record])
    with Client(reward=live.reward, graph=live.graph, token="not-the-token-at-all") as wrong:
        with pytest.raises(PermissionDenied):
            wrong.reload()
    with pytest.raises(NotFound):
        client.score("nobody-" + uuid.uuid4().hex, "p", ["a"], require_known=True)
    emb = client.embeddings([live.data.train_seen[0]["user_id"]])[0]
    stale = UserEmbedding(emb.user_id, emb.vector, emb.source, "some-other-release")
    with pytest.raises(ReleaseMismatch):
        client.score(stale, "p", ["a"])
    with pytest.raises(InvalidArgument):
        client.score(emb, "p", [""])


def test_score_many_through_the_stream_reports_item_errors(live, client):
    pairs = live.data.test[:40]
    items = [{"id": i, "user_id": r["user_id"], "prompt": r["prompt"], "responses": [r["chosen"], r["rejected"]]}
             for i, r in enumerate(pairs)]
    items[7]["responses"] = [""]                        # invalid alone: an item error, the job goes on
    results = client.score_many(items, concurrency=8)
    assert [r.id for r in results] == list(range(40))
    assert results[7].error.code == "INVALID_ARGUMENT"
    assert all(r.ok and len(r.scores) == 2 and r.release_id == live.release.id for i, r in enumerate(results) if i != 7)
    one = client.score(pairs[3]["user_id"], pairs[3]["prompt"], [pairs[3]["chosen"], pairs[3]["rejected"]])
    # bf16 with other batch neighbours: rounding of the hidden states, so an error that grows with the scores' scale
    # (a kept user head can raise it: reward_service/training.py)
    scale = max(abs(s) for s in one.scores)
    assert results[3].scores == pytest.approx(one.scores, rel=0.02, abs=0.05 + 0.01 * scale)


def test_copl_eval_through_the_service_prints_what_the_in_process_eval_prints(live):
    test_file = live.data_dir / "test.jsonl"
    runner = CliRunner()
    remote = runner.invoke(app, ["eval", str(test_file), "--target", live.reward, "--json", "--no-progress"])
    assert remote.exit_code == 0, remote.output
    local = runner.invoke(app, ["eval", str(test_file), "--db", live.db_url, "--registry", str(live.registry),
                                "--json", "--no-progress"])
    assert local.exit_code == 0, local.output
    remote, local = json.loads(remote.stdout.strip().splitlines()[-1]), json.loads(local.stdout.strip().splitlines()[-1])
    assert remote.keys() == local.keys()
    assert remote["release"] == local["release"] == live.release.id
    assert remote["n_pairs"] == local["n_pairs"] and remote["users_by_source"] == local["users_by_source"]
    for part in ("seen", "unseen"):
        assert remote[part]["n_pairs"] == local[part]["n_pairs"]
        assert remote[part]["accuracy"] == pytest.approx(local[part]["accuracy"], abs=0.02)
    assert remote["accuracy"] == pytest.approx(local["accuracy"], abs=0.02)
    bad = runner.invoke(app, ["eval", str(test_file), "--target", "http://nowhere", "--json"])
    assert bad.exit_code == 1 and "unsupported target" in bad.output


_LIGHT_SCRIPT = """
import sys
for name in {heavy!r}:
    sys.modules[name] = None          # any import of it now raises ImportError
from copl_client import Client, EmbeddingSource
with Client(reward={reward!r}, graph={graph!r}, token={token!r}) as client:
    emb = client.embeddings([{user!r}])[0]
    assert emb.source is EmbeddingSource.TRAINED, emb
    assert len(client.score(emb, "a prompt", ["an answer", "another"]).scores) == 2
    assert client.add_preferences([dict(user_id="light-client", prompt="p", chosen="a", rejected="b")]).inserted in (0, 1)
    results = client.score_many([dict(user_id={user!r}, prompt="p", responses=["a"])] * 20, concurrency=4)
    assert all(r.ok for r in results)
loaded = sorted(m for m in sys.modules if m.split(".")[0] in {heavy!r} and sys.modules[m] is not None)
assert not loaded, loaded
print("light client ok")
"""


def test_the_client_runs_without_torch_transformers_peft_or_ray(live):
    script = _LIGHT_SCRIPT.format(heavy=HEAVY, reward=live.reward, graph=live.graph, token=TOKEN,
                                  user=live.data.train_seen[0]["user_id"])
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "light client ok" in done.stdout, done.stderr


def test_base_install_in_a_fresh_virtual_environment(live, tmp_path):
    """`pip install .` (no extras) into a new venv: no torch there, and the client works against the services.
    About 25 s on 2 cores (grpcio, protobuf and two small packages from the registry), so it is in `make test`."""
    root = __import__("pathlib").Path(__file__).resolve().parents[1]
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    start = time.monotonic()
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", str(root)], check=True, timeout=600)
    print(f"base install: {time.monotonic() - start:.0f} s")
    probe = subprocess.run([str(python), "-c", "import importlib.util as u; print([m for m in {!r} if u.find_spec(m)])"
                            .format(HEAVY)], capture_output=True, text=True, check=True)
    assert probe.stdout.strip() == "[]"
    script = _LIGHT_SCRIPT.format(heavy=(), reward=live.reward, graph=live.graph, token=TOKEN,
                                  user=live.data.train_seen[0]["user_id"])
    done = subprocess.run([str(python), "-c", script], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 0 and "light client ok" in done.stdout, done.stderr

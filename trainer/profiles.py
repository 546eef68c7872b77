"""Training profiles: one name picks the GNN and the reward-model settings together, so the reward
model's gate always takes the GNN's embedding width.

  tiny   tests and smoke runs: under a minute on 2 CPU cores
  small  accuracy runs: about 1,000 users in at most 15 minutes on 2 CPU cores
  paper  the paper's reference sizes (GNN 4 x 512; MoLE E=8, k=1, r=8, alpha=16 on every block), for a GPU
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from graph_service.gnn_training import GNN_PROFILES, GNNTrainConfig
from reward_service.training import RM_PROFILES, RMProfile


@dataclass(frozen=True)
class Profile:
    name: str
    gnn: GNNTrainConfig
    reward: RMProfile


def profile(name: str, device: str | None = None) -> Profile:
    if name not in GNN_PROFILES:
        raise ValueError(f"unknown profile {name!r}: choose one of {', '.join(GNN_PROFILES)}")
    gnn, rm = GNN_PROFILES[name], RM_PROFILES[name]
    model = replace(rm.model, mole=replace(rm.model.mole, user_dim=gnn.model.dim))
    if device is not None:
        model = replace(model, device=device)
    return Profile(name, gnn, RMProfile(model=model, train=rm.train))


PROFILE_NAMES = tuple(GNN_PROFILES)

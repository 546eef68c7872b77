"""Checks that a release's parts belong together, from the manifests alone (no tensors loaded).

Both services run these before loading a release: the reward model must have been trained on this
release's GNN (its manifest records the sha256 of the GNN manifest it was trained with) and its gate must
read embeddings of the GNN's width. The per-file checksums are verified by the loaders themselves
(GNNCheckpoint.load, RewardModel.load).
"""
from __future__ import annotations

import json
from pathlib import Path

from copl_common.checksums import sha256_file
from copl_common.registry import Release


def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{path} is missing") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from None


def check_release_parts(release: Release) -> None:
    """ValueError naming the first problem: wrong id, missing part, reward model of another GNN, width mismatch."""
    if release.manifest.get("id") != release.id:
        raise ValueError(f"release.json names id {release.manifest.get('id')!r}, the directory is {release.id}")
    gnn_manifest = release.gnn_dir / "manifest.json"
    gnn = _json(gnn_manifest)
    reward = _json(release.reward_dir / "manifest.json")
    recorded = reward.get("extra", {}).get("gnn_checkpoint", {}).get("manifest_sha256")
    if recorded != sha256_file(gnn_manifest):
        raise ValueError(f"release {release.id}: the reward model was not trained on this release's GNN "
                         "(GNN manifest checksum differs from the one the reward model recorded)")
    mole = reward.get("config", {}).get("mole", {})
    if mole.get("personalized", True) and mole.get("user_dim") != gnn.get("dim"):
        raise ValueError(f"release {release.id}: the reward model's gate reads {mole.get('user_dim')}-d embeddings, "
                         f"the GNN makes {gnn.get('dim')}-d ones")

"""Checks that a release's parts belong together, from the manifests alone (no tensors loaded).

Both services run these before loading a release: every GNN file matches the checksum in the GNN's
manifest, the reward model was trained on this release's GNN (its manifest records the sha256 of the GNN
manifest it was trained with), and its gate reads embeddings of the GNN's width. The reward service checks
the GNN's files too, although it never loads them: a release whose graph side is damaged is refused by both
services alike, so neither swaps to a release the other cannot serve. The reward model's own weights are
verified by RewardModel.load.
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
    for name, entry in gnn.get("files", {}).items():
        path = release.gnn_dir / name
        if not path.is_file() or sha256_file(path) != entry.get("sha256"):
            raise ValueError(f"release {release.id}: {path} is missing or does not match its checksum")
    reward = _json(release.reward_dir / "manifest.json")
    recorded = reward.get("extra", {}).get("gnn_checkpoint", {}).get("manifest_sha256")
    if recorded != sha256_file(gnn_manifest):
        raise ValueError(f"release {release.id}: the reward model was not trained on this release's GNN "
                         "(GNN manifest checksum differs from the one the reward model recorded)")
    mole = reward.get("config", {}).get("mole", {})
    if mole.get("personalized", True) and mole.get("user_dim") != gnn.get("dim"):
        raise ValueError(f"release {release.id}: the reward model's gate reads {mole.get('user_dim')}-d embeddings, "
                         f"the GNN makes {gnn.get('dim')}-d ones")

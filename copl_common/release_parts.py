"""Checks that a release's parts belong together, from the manifests alone (no tensors loaded).

Both services run these before loading a release: the reward model was trained on this release's GNN
(registry.check_parts, which `Registry.get` ran when the release was opened: it runs again here, since the
files may have changed since), every GNN file matches the checksum in the GNN's manifest, and the gate
reads embeddings of the GNN's width. The reward service checks
the GNN's files too, although it never loads them: a release whose graph side is damaged is refused by both
services alike, so neither swaps to a release the other cannot serve. The reward model's own weights are
verified by RewardModel.load.
"""
from __future__ import annotations

import json
from pathlib import Path

from copl_common.checksums import sha256_file
from copl_common.registry import Release, RegistryError, check_parts


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
    try:
        check_parts(release.path)
    except RegistryError as exc:
        raise ValueError(f"release {exc}") from None
    gnn = _json(release.gnn_dir / "manifest.json")
    for name, entry in gnn.get("files", {}).items():
        path = release.gnn_dir / name
        if not path.is_file() or sha256_file(path) != entry.get("sha256"):
            raise ValueError(f"release {release.id}: {path} is missing or fails its checksum (its sha256 does not match the manifest)")
    reward = _json(release.reward_dir / "manifest.json")
    mole = reward.get("config", {}).get("mole", {})
    if mole.get("personalized", True) and mole.get("user_dim") != gnn.get("dim"):
        raise ValueError(f"release {release.id}: the reward model's gate reads {mole.get('user_dim')}-d embeddings, "
                         f"the GNN makes {gnn.get('dim')}-d ones")

"""Checksums for artefacts on disk (checkpoints, releases)."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def read_manifest(directory: str | Path, name: str, expected_format: str) -> dict:
    """A saved artefact's JSON manifest, after checking that it exists and has the expected format."""
    path = Path(directory) / name
    if not path.is_file():
        raise ValueError(f"no {name} in {directory}")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != expected_format:
        raise ValueError(f"{path}: format {manifest.get('format')!r}, expected {expected_format!r}")
    return manifest

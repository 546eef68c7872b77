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
    """A saved artefact's JSON manifest, after checking that it exists, has the expected format, and that
    every file it lists (`"files": {file name: {"sha256": hex digest, ...}}`, names inside `directory`)
    is there with that digest. Raises ValueError naming the first problem."""
    directory = Path(directory)
    path = directory / name
    if not path.is_file():
        raise ValueError(f"no {name} in {directory}")
    try:
        manifest = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != expected_format:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        raise ValueError(f"{path}: format {found!r}, expected {expected_format!r}")
    for file_name, entry in manifest.get("files", {}).items():
        file = directory / file_name
        if Path(file_name).name != file_name or not file.is_file():
            raise ValueError(f"{file} is missing (listed in {path})")
        if sha256_file(file) != entry["sha256"]:
            raise ValueError(f"{file}: checksum mismatch (its sha256 does not match {path})")
    return manifest


def load_tensors(path: str | Path, device: str = "cpu") -> dict:
    """The tensors of a safetensors file; ValueError when it is not one (safetensors parses a header and raw
    bytes, and never runs code from the file: a pickle under this name is refused, not unpickled)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    try:
        return load_file(path, device=device)
    except SafetensorError as exc:
        raise ValueError(f"{path} is not a safetensors file: {exc}") from None

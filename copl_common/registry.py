"""The release registry: immutable release directories plus one pointer to the current release.

    REGISTRY/
      releases/<release_id>/release.json   manifest: id, created_at, parts, metrics, ...
      releases/<release_id>/gnn/           the GNN checkpoint (graph_service)
      releases/<release_id>/reward/        the reward model trained on that GNN's embeddings
      CURRENT                              the current release id

A release is staged in a temporary directory, fsynced, then renamed into releases/ (a reader never
sees half a release); CURRENT is replaced by writing a temporary file, fsync and rename (never a
symlink flip). Rollback is pointing CURRENT at an older release.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

RELEASE_ID = re.compile(r"^[0-9]{8}T[0-9]{6}Z-[0-9a-f]{8}$")


class RegistryError(RuntimeError):
    pass


@dataclass(frozen=True)
class Release:
    id: str
    path: Path
    manifest: dict

    @property
    def gnn_dir(self) -> Path:
        return self.path / "gnn"

    @property
    def reward_dir(self) -> Path:
        return self.path / "reward"

    @property
    def created_at(self) -> str:
        return self.manifest["created_at"]


def new_release_id(now: datetime | None = None) -> str:
    """Sortable by time, unique across concurrent trainers."""
    now = now or datetime.now(timezone.utc)
    return f"{now:%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:8]}"


def _fsync_tree(root: Path) -> None:
    for dirpath, _dirs, names in os.walk(root):
        for name in names:
            with open(Path(dirpath) / name, "rb") as fh:
                os.fsync(fh.fileno())
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Registry:
    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser()
        self.releases_dir = self.root / "releases"
        self.pointer = self.root / "CURRENT"

    @contextmanager
    def stage(self) -> Iterator[Path]:
        """A scratch directory inside the registry (same filesystem, so publishing is a rename).
        Removed if the block raises or publishes nothing."""
        self.releases_dir.mkdir(parents=True, exist_ok=True)
        path = Path(tempfile.mkdtemp(prefix=".staging-", dir=self.root))
        try:
            yield path
        finally:
            shutil.rmtree(path, ignore_errors=True)

    def publish(self, staged: Path, manifest: dict, make_current: bool = True) -> Release:
        """Write release.json into the staged directory and move it into place, atomically."""
        release_id = manifest.setdefault("id", new_release_id())
        manifest.setdefault("created_at", datetime.now(timezone.utc).isoformat(timespec="seconds"))
        (staged / "release.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))
        _fsync_tree(staged)
        final = self.releases_dir / release_id
        if final.exists():
            raise RegistryError(f"release {release_id} exists; releases are immutable")
        os.rename(staged, final)
        _fsync_dir(self.releases_dir)
        release = Release(release_id, final, manifest)
        if make_current:
            self.set_current(release_id)
        return release

    def set_current(self, release_id: str) -> Release:
        release = self.get(release_id)
        tmp = self.root / f".CURRENT.{uuid.uuid4().hex}"
        with open(tmp, "w") as fh:
            fh.write(release_id + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.pointer)
        _fsync_dir(self.root)
        return release

    def current_id(self) -> str | None:
        try:
            return self.pointer.read_text().strip() or None
        except FileNotFoundError:
            return None

    def current(self) -> Release | None:
        release_id = self.current_id()
        return self.get(release_id) if release_id else None

    def get(self, release_id: str) -> Release:
        if not RELEASE_ID.match(release_id):
            raise RegistryError(f"not a release id: {release_id!r}")
        path = self.releases_dir / release_id
        try:
            manifest = json.loads((path / "release.json").read_text())
        except FileNotFoundError:
            raise RegistryError(f"no release {release_id} in {self.root}") from None
        return Release(release_id, path, manifest)

    def list(self) -> list[Release]:
        if not self.releases_dir.is_dir():
            return []
        ids = sorted(p.name for p in self.releases_dir.iterdir() if RELEASE_ID.match(p.name))
        return [self.get(i) for i in ids]

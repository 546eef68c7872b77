"""The release registry: immutable release directories plus one pointer to the current release.

    REGISTRY/
      releases/<release_id>/release.json   manifest: id, created_at, parts, metrics, ...
      releases/<release_id>/gnn/           the GNN checkpoint (graph_service)
      releases/<release_id>/reward/        the reward model trained on that GNN's embeddings
      CURRENT                              the current release id
      status/<release_id>.json             the quality gate's decision on it (trainer/gate.py): accepted or
                                           rejected, with the reason; absent for a release nobody judged

A release is staged in a scratch directory inside the registry, fsynced, then renamed into releases/
(a reader never sees half a release); CURRENT is replaced by writing a temporary file, fsync and rename
(never a symlink flip). Rollback is pointing CURRENT at an older release.

Integrity: a release opens (`Registry.get`, and so `current`, `list`, `set_current`) only when its
release.json is readable, names the directory's id and a creation time, and its reward model belongs to
its GNN: reward/manifest.json records the sha256 of the gnn/manifest.json it was trained with, and that
manifest holds the sha256 of every GNN file (checked again when the parts load). A release whose gnn/
was swapped or retrained is refused, and never published.

Permissions: directories and files follow the process umask (mkdtemp's 0700 would keep a service
running as another user on a shared filesystem from reading the release).

Crashed runs leave scratch entries behind: `.staging-HOST-PID-RANDOM` directories and
`.CURRENT.HOST-PID-RANDOM` / `.status.HOST-PID-RANDOM` files. Every `stage()` first removes those that are stale: made on this host
by a process that no longer runs, or (any host, any name) unmodified for `STALE_AFTER_S`, 24 hours, far
longer than a training run leaves its staging directory untouched (entries from other hosts are judged
by age alone; host names are assumed unique among the machines that share a registry).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from copl_common.checksums import sha256_file

RELEASE_ID = re.compile(r"^[0-9]{8}T[0-9]{6}Z-[0-9a-f]{8}$")
GNN_MANIFEST = Path("gnn") / "manifest.json"
REWARD_MANIFEST = Path("reward") / "manifest.json"
STALE_AFTER_S = 24 * 3600
_SCRATCH_PREFIXES = (".staging-", ".CURRENT.", ".status.")
_SCRATCH = re.compile(r"^\.(?:staging-|CURRENT\.|status\.)(?P<host>.+)-(?P<pid>[0-9]+)-[0-9a-f]+$")


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


@dataclass(frozen=True)
class BrokenRelease:
    """A directory under releases/ that does not open, and why."""
    id: str
    path: Path
    reason: str


def new_release_id(now: datetime | None = None) -> str:
    """Sortable by time, unique across concurrent trainers."""
    now = now or datetime.now(timezone.utc)
    return f"{now:%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:8]}"


def check_parts(path: Path) -> None:
    """RegistryError unless the release directory's reward model was trained with its GNN."""
    try:
        reward = json.loads((path / REWARD_MANIFEST).read_text())
        recorded = reward["extra"]["gnn_checkpoint"]["manifest_sha256"]
    except FileNotFoundError:
        raise RegistryError(f"{path.name}: no {REWARD_MANIFEST}") from None
    except (ValueError, KeyError, TypeError):
        raise RegistryError(f"{path.name}: {REWARD_MANIFEST} does not record the GNN it was trained with") from None
    if not (path / GNN_MANIFEST).is_file():
        raise RegistryError(f"{path.name}: no {GNN_MANIFEST}")
    if sha256_file(path / GNN_MANIFEST) != recorded:
        raise RegistryError(f"{path.name}: the reward model was trained with another GNN "
                            f"({GNN_MANIFEST} does not match the sha256 in {REWARD_MANIFEST})")


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname()) or "host"


def _scratch_name(prefix: str) -> str:
    return f"{prefix}{_host()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


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
        Removed if the block raises or publishes nothing. Stale scratch entries go first."""
        self.releases_dir.mkdir(parents=True, exist_ok=True)
        self.remove_stale()
        path = self.root / _scratch_name(".staging-")
        path.mkdir()  # the umask's mode, unlike mkdtemp's 0700
        try:
            yield path
        finally:
            shutil.rmtree(path, ignore_errors=True)

    def publish(self, staged: Path, manifest: dict, make_current: bool = True) -> Release:
        """Write release.json into the staged directory and move it into place, atomically."""
        release_id = manifest.setdefault("id", new_release_id())
        if not isinstance(release_id, str) or not RELEASE_ID.match(release_id):
            raise RegistryError(f"not a release id: {release_id!r}")
        # microseconds: releases made within one second still list in the order they were made
        manifest.setdefault("created_at", datetime.now(timezone.utc).isoformat(timespec="microseconds"))
        check_parts(staged)
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

    def publish_copy(self, source: Release, make_current: bool = True) -> Release:
        """`source`'s parts published again under a new id (`copied_from` in its manifest): the same model
        rolled out as a new release, which running services load, validate and warm like any other."""
        with self.stage() as staged:
            shutil.copytree(source.path, staged, dirs_exist_ok=True, ignore=shutil.ignore_patterns("release.json"))
            manifest = {k: v for k, v in source.manifest.items() if k not in ("id", "created_at")}
            return self.publish(staged, {**manifest, "copied_from": source.id}, make_current=make_current)

    def set_current(self, release_id: str) -> Release:
        release = self.get(release_id)
        self._write_atomically(self.pointer, release_id + "\n", ".CURRENT.")
        return release

    def _write_atomically(self, target: Path, text: str, scratch_prefix: str) -> None:
        tmp = self.root / _scratch_name(scratch_prefix)
        with open(tmp, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
        _fsync_dir(target.parent)

    @property
    def status_dir(self) -> Path:
        return self.root / "status"

    def status(self, release_id: str) -> dict | None:
        """The recorded decision on a release ({"status": "accepted" | "rejected", "reason": ..., ...}), or None."""
        try:
            return json.loads((self.status_dir / f"{release_id}.json").read_text())
        except FileNotFoundError:
            return None
        except ValueError as exc:
            raise RegistryError(f"{release_id}: status file is unreadable ({exc})") from None

    def set_status(self, release_id: str, status: dict) -> None:
        """Record a decision on a release (releases themselves are immutable), atomically."""
        self.get(release_id)
        self.status_dir.mkdir(exist_ok=True)
        self._write_atomically(self.status_dir / f"{release_id}.json", json.dumps(status, indent=2, sort_keys=True),
                               ".status.")

    def current_id(self) -> str | None:
        try:
            return self.pointer.read_text().strip() or None
        except FileNotFoundError:
            return None

    def current(self) -> Release | None:
        release_id = self.current_id()
        return self.get(release_id) if release_id else None

    def get(self, release_id: str) -> Release:
        """The release, checked (see the module's "Integrity"); RegistryError if it does not open."""
        if not RELEASE_ID.match(release_id):
            raise RegistryError(f"not a release id: {release_id!r}")
        path = self.releases_dir / release_id
        if not path.is_dir():
            raise RegistryError(f"no release {release_id} in {self.root}")
        try:
            manifest = json.loads((path / "release.json").read_text())
            if manifest["id"] != release_id:
                raise RegistryError(f"{release_id}: release.json names another release, {manifest['id']!r}")
            datetime.fromisoformat(manifest["created_at"])
        except FileNotFoundError:
            raise RegistryError(f"{release_id}: no release.json (an incomplete copy?)") from None
        except (ValueError, KeyError, TypeError) as exc:  # truncated or hand-edited
            raise RegistryError(f"{release_id}: release.json is unreadable ({type(exc).__name__}: {exc})") from None
        check_parts(path)
        return Release(release_id, path, manifest)

    def scan(self) -> tuple[list[Release], list[BrokenRelease]]:
        """Every release that opens, oldest first (by creation time, then id), and every entry of
        releases/ that does not, by name."""
        if not self.releases_dir.is_dir():
            return [], []
        good, bad = [], []
        for path in sorted(self.releases_dir.iterdir()):
            if path.name.startswith("."):
                continue
            try:
                good.append(self.get(path.name))
            except RegistryError as exc:
                bad.append(BrokenRelease(path.name, path, str(exc)))
        good.sort(key=lambda r: (datetime.fromisoformat(r.created_at).astimezone(timezone.utc), r.id))
        return good, bad

    def list(self) -> list[Release]:
        return self.scan()[0]

    def remove_stale(self, now: float | None = None) -> list[Path]:
        """Remove the scratch entries of crashed runs (the rule is in the module docstring)."""
        now = time.time() if now is None else now
        host = _host()
        removed = []
        for path in self.root.iterdir():
            if not path.name.startswith(_SCRATCH_PREFIXES):
                continue
            match = _SCRATCH.match(path.name)
            try:
                dead = match is not None and match["host"] == host and not _pid_alive(int(match["pid"]))
                if not dead and now - path.lstat().st_mtime <= STALE_AFTER_S:
                    continue
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
                else:
                    path.unlink()
                removed.append(path)
            except FileNotFoundError:  # another process removed it first
                continue
        return removed

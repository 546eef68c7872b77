"""The trained GNN artefact: embedding tables, index maps, weights, and their on-disk form.

A checkpoint directory holds
  weights.safetensors  the SignedGCN state dict (layer weights and layer-0 ID embeddings)
  tables.safetensors   user_embeddings (U, d) L2-normalized, response_embeddings (R, d),
                       response_content (R, k), only with a content tower: the last k columns of a user's
                       embedding are the unit mean of A f_chosen - A f_rejected over their pairs (content_tower.py),
                       type_log_prior (k,), only with latent types (latent_types.py): then response_content
                       holds each type's score of the response and the last k columns of a user's embedding are
                       their unit-norm posterior over the types,
                       positive_indptr (R+1,) / positive_users (E+,): response -> users who chose it (CSR),
                       user_ids_utf8 / response_ids_utf8: the index maps, newline-joined UTF-8 bytes
  manifest.json        format, settings, shapes and dtypes, data snapshot time, metrics, sha256 per file
load() verifies every checksum (copl_common.checksums.read_manifest) and shape before it returns, and raises
ValueError on any mismatch.

The population default embedding (for a user with no usable neighbour) is the L2-normalized mean of
the trained user embeddings: the direction shared by the population, on the same unit sphere the
reward model's gate was trained on.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from copl_common.checksums import load_tensors, read_manifest, sha256_file
from graph_service.content_tower import user_vectors
from graph_service.latent_types import posteriors

FORMAT = "copl-gnn-checkpoint/1"
WEIGHTS_FILE, TABLES_FILE, MANIFEST_FILE = "weights.safetensors", "tables.safetensors", "manifest.json"


class Source(StrEnum):
    """Where a user's embedding came from (the API's EmbeddingSource)."""
    TRAINED = "TRAINED"   # the user is in the release's GNN: their row of the embedding table
    ADAPTED = "ADAPTED"   # optimization-free adaptation from 2-hop neighbours (adaptation.py)
    DEFAULT = "DEFAULT"   # no usable neighbour, or no pairs at all: the population default embedding


@dataclass
class GNNCheckpoint:
    settings: dict                          # GNNTrainConfig as plain JSON data
    model_state: dict[str, torch.Tensor]    # SignedGCN.state_dict()
    user_embeddings: torch.Tensor           # (U, d) float, L2-normalized
    response_embeddings: torch.Tensor       # (R, d) float
    user_ids: list[str]                     # index -> user_id
    response_ids: list[str]                 # index -> response content hash
    positive_indptr: torch.Tensor           # (R+1,) int64: users who chose response r are
    positive_users: torch.Tensor            # (E+,) int64    positive_users[indptr[r]:indptr[r+1]]
    snapshot_time: datetime | None = None
    metrics: dict = field(default_factory=dict)
    response_content: torch.Tensor | None = None   # (R, k) A f_r of the content tower, or the latent types' scores
                                                   # S (with type_log_prior); None: graph only
    type_log_prior: torch.Tensor | None = None     # (k,) latent types' log prior (-inf past K); None: a tower

    def __post_init__(self):
        u, r = self.user_embeddings, self.response_embeddings
        if u.dim() != 2 or r.dim() != 2 or u.shape[1] != r.shape[1]:
            raise ValueError(f"embedding tables must be (U, d) and (R, d), got {tuple(u.shape)}, {tuple(r.shape)}")
        if u.shape[0] != len(self.user_ids) or r.shape[0] != len(self.response_ids):
            raise ValueError("embedding tables and index maps disagree on the number of users or responses")
        if self.positive_indptr.shape != (r.shape[0] + 1,) or \
                int(self.positive_indptr[-1]) != self.positive_users.numel():
            raise ValueError("positive_indptr must be (R+1,) and end at len(positive_users)")
        c = self.response_content
        if c is not None and (c.dim() != 2 or c.shape[0] != r.shape[0] or not 0 < c.shape[1] < u.shape[1]):
            raise ValueError(f"response_content must be (R, k) with 0 < k < d, got {tuple(c.shape)}")
        p = self.type_log_prior
        if p is not None and (c is None or p.shape != (c.shape[1],)):
            raise ValueError("type_log_prior must be (k,) and come with response_content (R, k)")

    @property
    def dim(self) -> int:
        return self.user_embeddings.shape[1]

    @property
    def content_dim(self) -> int:
        """k: the trailing columns of a user embedding that come from the content half (0: none)."""
        return 0 if self.response_content is None else self.response_content.shape[1]

    def content_users(self, triples: torch.Tensor, num_users: int) -> torch.Tensor:
        """(num_users, k) unit-norm content halves from (P, 3) (user 0..num_users-1, chosen, rejected) triples over
        this checkpoint's responses, as training computed the trained users' (the tower's mean, or the types'
        posterior)."""
        if self.type_log_prior is None:
            return user_vectors(self.response_content, triples, num_users)
        return posteriors(self.response_content, self.type_log_prior, triples, num_users)

    @property
    def num_users(self) -> int:
        return self.user_embeddings.shape[0]

    @property
    def num_responses(self) -> int:
        return self.response_embeddings.shape[0]

    @cached_property
    def default_embedding(self) -> torch.Tensor:
        """(d,) L2-normalized mean of the trained user embeddings."""
        return F.normalize(self.user_embeddings.mean(dim=0), dim=0)

    @cached_property
    def _user_index(self) -> dict[str, int]:
        return dict(zip(self.user_ids, range(len(self.user_ids))))

    @cached_property
    def _response_index(self) -> dict[str, int]:
        return dict(zip(self.response_ids, range(len(self.response_ids))))

    def user_indices(self, user_ids: list[str]) -> torch.Tensor:
        """(n,) int64 indices; -1 for a user the GNN was not trained on."""
        get = self._user_index.get
        return torch.tensor([get(i, -1) for i in user_ids], dtype=torch.int64)

    def response_indices(self, response_ids: list[str]) -> torch.Tensor:
        """(n,) int64 indices; -1 for a response (content hash) that is not in the trained graph."""
        get = self._response_index.get
        return torch.tensor([get(i, -1) for i in response_ids], dtype=torch.int64)

    def score(self, user_idx: torch.Tensor, response_idx: torch.Tensor) -> torch.Tensor:
        """s(u, r) = <user_u, response_r> elementwise over broadcast index tensors."""
        return (self.user_embeddings[user_idx] * self.response_embeddings[response_idx]).sum(dim=-1)

    def save(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tables = {
            "user_embeddings": self.user_embeddings, "response_embeddings": self.response_embeddings,
            "positive_indptr": self.positive_indptr, "positive_users": self.positive_users,
            "user_ids_utf8": _encode_ids(self.user_ids), "response_ids_utf8": _encode_ids(self.response_ids),
        }
        if self.response_content is not None:
            tables["response_content"] = self.response_content
        if self.type_log_prior is not None:
            tables["type_log_prior"] = self.type_log_prior
        weights = {k: v.detach() for k, v in self.model_state.items()}
        files = {WEIGHTS_FILE: weights, TABLES_FILE: tables}
        manifest = {
            "format": FORMAT, "dim": self.dim, "num_users": self.num_users, "num_responses": self.num_responses,
            "snapshot_time": self.snapshot_time.isoformat() if self.snapshot_time else None,
            "settings": self.settings, "metrics": self.metrics, "files": {},
        }
        for name, tensors in files.items():
            tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
            save_file(tensors, directory / name)
            manifest["files"][name] = {
                "sha256": sha256_file(directory / name),
                "tensors": {k: {"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch.")}
                            for k, v in tensors.items()},
            }
        (directory / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=True))
        return directory

    @classmethod
    def load(cls, directory: str | Path, device: torch.device | str = "cpu") -> GNNCheckpoint:
        directory = Path(directory)
        manifest = read_manifest(directory, MANIFEST_FILE, FORMAT)
        loaded = {}
        for name in (WEIGHTS_FILE, TABLES_FILE):
            entry = manifest["files"].get(name)
            if entry is None:
                raise ValueError(f"{directory}: {name} is missing from the manifest")
            tensors = load_tensors(directory / name, device=str(device))
            expected = {k: (v["shape"], v["dtype"]) for k, v in entry["tensors"].items()}
            actual = {k: (list(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in tensors.items()}
            if actual != expected:
                raise ValueError(f"{directory / name}: tensors do not match the manifest's shapes and dtypes")
            loaded[name] = tensors
        tables = loaded[TABLES_FILE]
        snapshot_time = manifest["snapshot_time"]
        checkpoint = cls(
            settings=manifest["settings"], model_state=loaded[WEIGHTS_FILE],
            user_embeddings=tables["user_embeddings"], response_embeddings=tables["response_embeddings"],
            user_ids=_decode_ids(tables["user_ids_utf8"]), response_ids=_decode_ids(tables["response_ids_utf8"]),
            positive_indptr=tables["positive_indptr"], positive_users=tables["positive_users"],
            snapshot_time=datetime.fromisoformat(snapshot_time) if snapshot_time else None,
            metrics=manifest["metrics"], response_content=tables.get("response_content"),
            type_log_prior=tables.get("type_log_prior"))
        if (checkpoint.dim, checkpoint.num_users, checkpoint.num_responses) != \
                (manifest["dim"], manifest["num_users"], manifest["num_responses"]):
            raise ValueError(f"{directory}: tables disagree with the manifest's dim / user / response counts")
        return checkpoint


def _encode_ids(ids: list[str]) -> torch.Tensor:
    """Index map as newline-joined UTF-8 bytes: one tensor, decoded by one split on load."""
    joined = "\n".join(ids)
    if "" in ids or (len(ids) and joined.count("\n") != len(ids) - 1):
        raise ValueError("ids must be non-empty and must not contain a newline")
    return torch.from_numpy(np.frombuffer(joined.encode("utf-8"), dtype=np.uint8).copy())


def _decode_ids(data: torch.Tensor) -> list[str]:
    text = data.numpy().tobytes().decode("utf-8")
    return text.split("\n") if text else []


"""Typed inputs and results of the client: plain dataclasses, converted from and to the protobufs here.

Every result carries the release id it was computed with; scores and embeddings also say where the user's
embedding came from (`EmbeddingSource`).
"""
from __future__ import annotations

import enum
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Union

from copl.v1 import common_pb2, graph_pb2, reward_pb2


class EmbeddingSource(str, enum.Enum):
    """How a user's embedding was obtained."""

    UNSPECIFIED = "UNSPECIFIED"
    TRAINED = "TRAINED"    # the user was in the graph the release's GNN was trained on
    ADAPTED = "ADAPTED"    # unseen user: weighted mean of graph neighbours' embeddings, no training
    DEFAULT = "DEFAULT"    # no usable neighbour: the release's population embedding

    @classmethod
    def from_proto(cls, value: int) -> "EmbeddingSource":
        name = common_pb2.EmbeddingSource.Name(value)
        return cls.UNSPECIFIED if name == "EMBEDDING_SOURCE_UNSPECIFIED" else cls(name)

    def to_proto(self) -> int:
        return common_pb2.EmbeddingSource.Value(
            "EMBEDDING_SOURCE_UNSPECIFIED" if self is EmbeddingSource.UNSPECIFIED else self.value)


@dataclass(frozen=True)
class Pair:
    """One labelled pair: the user preferred `chosen` over `rejected` for `prompt`."""

    prompt: str
    chosen: str
    rejected: str


PairLike = Union[Pair, Mapping[str, str], Sequence[str]]


def pair_proto(pair: PairLike) -> common_pb2.PreferencePair:
    """A Pair, a {"prompt", "chosen", "rejected"} mapping or a (prompt, chosen, rejected) tuple."""
    if isinstance(pair, Pair):
        return common_pb2.PreferencePair(prompt=pair.prompt, chosen=pair.chosen, rejected=pair.rejected)
    if isinstance(pair, Mapping):
        return common_pb2.PreferencePair(prompt=pair["prompt"], chosen=pair["chosen"], rejected=pair["rejected"])
    prompt, chosen, rejected = pair
    return common_pb2.PreferencePair(prompt=prompt, chosen=chosen, rejected=rejected)


@dataclass(frozen=True)
class UserEmbedding:
    """A user's embedding in one release's space. Pass it to `score()` to skip the graph-service lookup; the
    reward service refuses it (ReleaseMismatch) once it serves another release."""

    user_id: str
    vector: tuple[float, ...]
    source: EmbeddingSource
    release_id: str

    def to_proto(self) -> reward_pb2.UserEmbeddingInput:
        return reward_pb2.UserEmbeddingInput(vector=self.vector, release_id=self.release_id,
                                             source=self.source.to_proto())

    def to_json(self) -> dict:
        return {"user_id": self.user_id, "vector": list(self.vector), "source": self.source.value,
                "release_id": self.release_id}

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> "UserEmbedding":
        """From {"vector": [...], "release_id": "...", "source"?: "TRAINED", "user_id"?: "..."}."""
        vector = obj["vector"]
        if not isinstance(vector, list) or not all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                                   for x in vector):
            raise ValueError("embedding.vector must be a list of numbers")
        if not isinstance(obj.get("release_id"), str) or not obj["release_id"]:
            raise ValueError("embedding.release_id must be a non-empty string")
        return cls(user_id=str(obj.get("user_id", "")), vector=tuple(float(x) for x in vector),
                   source=EmbeddingSource(obj.get("source", "UNSPECIFIED")), release_id=obj["release_id"])


@dataclass(frozen=True)
class Scores:
    """Rewards for one prompt's responses, in the order given."""

    scores: tuple[float, ...]
    release_id: str                    # the release of both the embedding and the model
    embedding_source: EmbeddingSource


@dataclass(frozen=True)
class ScoreItem:
    """One request of a batch job: a user (id or embedding), a prompt and its responses. `id` is yours:
    it comes back on the result (and names the row in `score_file` outputs)."""

    prompt: str
    responses: Sequence[str]
    user_id: str | None = None
    embedding: UserEmbedding | None = None
    context: Sequence[PairLike] = ()
    require_known: bool = False
    id: Any = None

    @classmethod
    def from_json(cls, row: Any) -> "ScoreItem":
        """From a row {"id"?, "user_id" | "embedding", "prompt", "responses", "context"?, "require_known"?};
        ValueError says what is wrong with it. The server checks the texts' lengths and the vector's size."""
        if not isinstance(row, Mapping):
            raise ValueError("a row must be a JSON object")
        if not isinstance(row.get("prompt"), str):
            raise ValueError("'prompt' must be a string")
        responses = row.get("responses")
        if not isinstance(responses, list) or not responses or not all(isinstance(r, str) for r in responses):
            raise ValueError("'responses' must be a non-empty list of strings")
        if ("user_id" in row) == ("embedding" in row):
            raise ValueError("a row needs exactly one of 'user_id' and 'embedding'")
        if "user_id" in row and not isinstance(row["user_id"], str):
            raise ValueError("'user_id' must be a string")
        embedding = row.get("embedding")
        if embedding is not None:
            if not isinstance(embedding, Mapping) or "vector" not in embedding:
                raise ValueError("'embedding' must be an object with 'vector' and 'release_id'")
            embedding = UserEmbedding.from_json(embedding)
        context = row.get("context", [])
        if not isinstance(context, list) or not all(
                isinstance(p, Mapping) and all(isinstance(p.get(k), str) for k in ("prompt", "chosen", "rejected"))
                for p in context):
            raise ValueError("'context' must be a list of {prompt, chosen, rejected} objects")
        if not isinstance(row.get("require_known", False), bool):
            raise ValueError("'require_known' must be true or false")
        return cls(prompt=row["prompt"], responses=responses, user_id=row.get("user_id"), embedding=embedding,
                   context=[Pair(p["prompt"], p["chosen"], p["rejected"]) for p in context],
                   require_known=row.get("require_known", False), id=row.get("id"))

    def to_proto(self) -> reward_pb2.ScoreRequest:
        if (self.user_id is None) == (self.embedding is None):
            raise ValueError("a score request needs exactly one of user_id and embedding")
        request = reward_pb2.ScoreRequest(prompt=self.prompt, responses=list(self.responses),
                                          context=[pair_proto(p) for p in self.context],
                                          require_known=self.require_known)
        if self.user_id is not None:
            request.user_id = self.user_id
        else:
            request.embedding.CopyFrom(self.embedding.to_proto())
        return request


@dataclass(frozen=True)
class ItemError:
    """Why one item of a batch failed: a gRPC status code name and the server's message."""

    code: str
    message: str


@dataclass(frozen=True)
class ItemResult:
    """The outcome of one batch item: `scores` (with release and embedding source), or `error`."""

    index: int                         # position in the input
    id: Any                            # the item's id, if it had one
    scores: tuple[float, ...] | None = None
    release_id: str = ""
    embedding_source: EmbeddingSource = EmbeddingSource.UNSPECIFIED
    error: ItemError | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(frozen=True)
class Preference:
    """A preference record for `add_preferences` (a mapping with the same keys works too)."""

    user_id: str
    prompt: str
    chosen: str
    rejected: str
    group: str = ""
    controversial: bool | None = None
    created_at: str = ""               # RFC 3339; empty: the time of ingestion


def record_proto(record: Preference | Mapping[str, Any]) -> graph_pb2.PreferenceRecord:
    get = record.get if isinstance(record, Mapping) else lambda key, default=None: getattr(record, key, default)
    proto = graph_pb2.PreferenceRecord(user_id=get("user_id", ""), prompt=get("prompt", ""),
                                       chosen=get("chosen", ""), rejected=get("rejected", ""),
                                       group=get("group", "") or "", created_at=get("created_at", "") or "")
    if (controversial := get("controversial")) is not None:
        proto.controversial = bool(controversial)
    return proto


@dataclass(frozen=True)
class AddResult:
    """What `add_preferences` stored: `inserted` new records, `duplicates` already stored, and (with
    skip_invalid) the `rejected` records as (index in the request, reason)."""

    inserted: int
    duplicates: int
    rejected: tuple[tuple[int, str], ...] = ()


@dataclass(frozen=True)
class ReleaseInfo:
    """The release a server serves: id, time, backbone, sizes, metrics, and the releases it still answers for."""

    release_id: str
    created_at: str
    backbone: str
    embedding_dim: int
    num_users: int
    metrics: dict = field(default_factory=dict)
    snapshot_time: str = ""
    serving_release_ids: tuple[str, ...] = ()

    @classmethod
    def from_proto(cls, info: common_pb2.ReleaseInfo) -> "ReleaseInfo":
        return cls(release_id=info.release_id, created_at=info.created_at, backbone=info.backbone,
                   embedding_dim=info.embedding_dim, num_users=info.num_users,
                   metrics=json.loads(info.metrics_json) if info.metrics_json else {},
                   snapshot_time=info.snapshot_time, serving_release_ids=tuple(info.serving_release_ids))


@dataclass(frozen=True)
class ReloadResult:
    """One server's answer to `reload()`: the release it serves now and whether it swapped."""

    address: str
    service: str                       # "graph" or "reward"
    release_id: str
    swapped: bool
    previous_release_id: str

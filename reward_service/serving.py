"""The reward service's logic, free of gRPC (reward_service/server.py translates): ScoreResponses.

A request is scored entirely with the release that is current when it starts: its model (through the
dynamic batcher) and a user embedding of that same release, either fetched from the graph service by user
id (graph_client.py asks for this release explicitly) or given by the caller with its release id, which
must match (FAILED_PRECONDITION otherwise: never a silently wrong score).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from copl_common.errors import FailedPrecondition, InvalidArgument, summarize
from copl_common.registry import Release
from copl_common.release_holder import ReleaseHolder
from copl_common.release_parts import check_release_parts
from copl_common.service_settings import ServiceSettings
from copl_common.settings import LIMITS
from reward_service.batcher import DynamicBatcher, ScoreJob
from reward_service.graph_client import GraphClient
from reward_service.reward_model import RewardModel


@dataclass(eq=False)
class RewardRelease:
    """A loaded reward model, owned by the batcher's worker thread once it serves."""
    model: RewardModel

    @property
    def personalized(self) -> bool:
        return self.model.personalized

    @property
    def user_dim(self) -> int:
        return self.model.cfg.mole.user_dim

    @torch.inference_mode()
    def forward(self, jobs: Sequence[ScoreJob]) -> torch.Tensor:
        """One pass over the jobs' pairs, users mixed: (total pairs,) fp32 scores on the CPU."""
        enc = self.model.collate([j.encoding for j in jobs])
        users = None
        if self.personalized:
            users = torch.cat([j.user_emb.expand(j.pairs, -1) for j in jobs])   # (B, d_user)
        return self.model(**enc, user_emb=users).float().cpu()


def load_reward_release(release: Release, device: str = "auto", dtype: str = "auto") -> RewardRelease:
    """Load, validate (parts belong together, checksums, a smoke score) and warm; ValueError says why not."""
    check_release_parts(release)
    model = RewardModel.load(release.reward_dir, device=device, dtype=dtype)   # verifies the weights' sha256
    model.merge_shared()   # inference only: the shared LoRA folded into the frozen weights
    loaded = RewardRelease(model)
    user = F.normalize(torch.ones(loaded.user_dim, dtype=torch.float32), dim=0)  # dtype: see user_embeddings.py
    for n in (1, 8):  # smoke score, and warm-up of the kernels for one and for several pairs
        enc = model.encode_texts(["How do I keep basil alive?"] * n, [f"Water it when the soil is dry ({i})."
                                                                     for i in range(n)])
        job = ScoreJob(loaded, enc, user if loaded.personalized else None, n, max(map(len, enc["input_ids"])))
        scores = loaded.forward([job])
        if scores.shape != (n,) or not torch.isfinite(scores).all():
            raise ValueError(f"release {release.id}: the smoke score is not {n} finite numbers")
    return loaded


@dataclass(frozen=True)
class ScoreInput:
    prompt: str
    responses: Sequence[str]
    user_id: str = ""
    embedding: Sequence[float] | None = None    # with embedding_release_id, instead of user_id
    embedding_release_id: str = ""
    embedding_source: str = ""
    context: Sequence = field(default_factory=tuple)  # inline PreferencePair messages, passed to the graph service
    require_known: bool = False


@dataclass(frozen=True)
class ScoreOutput:
    scores: list[float]
    release_id: str
    embedding_source: str   # TRAINED | ADAPTED | DEFAULT, or "" for a non-personalized release


class RewardCore:
    def __init__(self, settings: ServiceSettings, holder: ReleaseHolder[RewardRelease], batcher: DynamicBatcher,
                 graph: GraphClient):
        self.settings = settings
        self.holder = holder
        self.batcher = batcher
        self.graph = graph

    def _check(self, req: ScoreInput) -> None:
        problems: list[tuple[str, str]] = []

        def text(name: str, value: str, limit: int) -> None:
            if not value.strip():
                problems.append((name, "is empty"))
            elif len(value) > limit:
                problems.append((name, f"is {len(value)} characters, over the limit of {limit}"))

        text("prompt", req.prompt, LIMITS.max_prompt_chars)
        if not req.responses:
            problems.append(("responses", "no responses to score"))
        elif len(req.responses) > self.settings.max_responses_per_request:
            problems.append(("responses", f"{len(req.responses)} responses, over the limit of "
                                          f"{self.settings.max_responses_per_request}; split the request"))
        else:
            for i, response in enumerate(req.responses):
                text(f"responses[{i}]", response, LIMITS.max_response_chars)
        if req.embedding is None and not req.user_id:
            problems.append(("user", "set user_id or embedding"))
        if req.user_id and len(req.user_id) > LIMITS.max_user_id_chars:
            problems.append(("user_id", f"over the limit of {LIMITS.max_user_id_chars} characters"))
        if req.embedding is not None and req.context:
            problems.append(("context", "context goes with user_id, not with an embedding"))
        if len(req.context) > self.settings.max_context_pairs:
            problems.append(("context", f"{len(req.context)} pairs, over the limit of {self.settings.max_context_pairs}"))
        if problems:
            raise InvalidArgument(f"invalid request: {summarize([f'{f} {d}' for f, d in problems])}", problems)

    def _given_embedding(self, req: ScoreInput, release_id: str, user_dim: int) -> torch.Tensor:
        if not req.embedding_release_id:
            raise InvalidArgument("embedding.release_id is empty: pass the release_id GetUserEmbedding returned",
                                  [("embedding.release_id", "is empty")])
        if req.embedding_release_id != release_id:
            raise FailedPrecondition(f"the embedding is from release {req.embedding_release_id}, this service serves "
                                     f"{release_id}: get the embedding again with GetUserEmbedding(release_id="
                                     f"{release_id})")
        if len(req.embedding) != user_dim:
            raise InvalidArgument(f"the embedding has {len(req.embedding)} values, release {release_id} takes "
                                  f"{user_dim}", [("embedding.vector", f"must have {user_dim} values")])
        if not all(math.isfinite(v) for v in req.embedding):
            raise InvalidArgument("the embedding has NaN or infinite values",
                                  [("embedding.vector", "NaN or infinite values")])
        return torch.tensor(req.embedding, dtype=torch.float32)

    async def score(self, req: ScoreInput, caller_remaining: float | None = None) -> ScoreOutput:
        self._check(req)
        loaded = self.holder.require()   # this request's release, start to finish
        release: RewardRelease = loaded.value
        user_emb, source = None, ""
        if req.embedding is not None:
            user_emb = self._given_embedding(req, loaded.id, release.user_dim)
            source = req.embedding_source
        elif release.personalized:
            user_emb, source = await self.graph.embedding(req.user_id, loaded.id, req.context, req.require_known,
                                                          caller_remaining)
            if user_emb.shape != (release.user_dim,):
                raise FailedPrecondition(f"the graph service gave a {user_emb.shape[0]}-d embedding for release "
                                         f"{loaded.id}, whose model takes {release.user_dim}")
        if not release.personalized:
            user_emb = None
        encoding = release.model.encode_texts([req.prompt] * len(req.responses), list(req.responses))
        scores = await self.batcher.score(release, encoding, user_emb)
        return ScoreOutput(scores, loaded.id, source)

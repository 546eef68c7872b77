"""The graph service's logic, free of gRPC (graph_service/server.py translates): AddPreferences and
GetUserEmbedding over the preference store and the releases the service holds.

Embeddings (user_embeddings.py): TRAINED from the release's table; ADAPTED (or DEFAULT, no usable
neighbour) from a user's stored pairs, computed on first use and cached per (release, user); inline
context pairs give an adapted embedding without storing anything (and without caching).

A user's new preferences invalidate their cached entries: at once when written through this replica,
and within `store_poll_s` when written through another replica over the same database. Each look asks
the store which users received preferences since the last look (preferences.stored_at, the database's
clock, reaching `store_poll_overlap_s` further back for transactions that commit late) and drops the
entries whose pair count no longer matches the store's. Preferences are only ever added, so the count is
an exact version of a user's pairs.

CPU work (adaptation) and database calls run off the event loop; the cache is touched only on it.
"""
from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import sqlalchemy.exc
import torch
from prometheus_client import CollectorRegistry, Counter

from copl_common.errors import InvalidArgument, NotFound, Unavailable, summarize
from copl_common.registry import Release
from copl_common.release_holder import ReleaseHolder
from copl_common.release_parts import check_release_parts
from copl_common.service_settings import ServiceSettings
from copl_common.settings import LIMITS
from graph_service.embeddings import GNNCheckpoint
from graph_service.records import PreferenceRecord, content_hash, parse_record
from graph_service.store import PreferenceStore
from graph_service.embeddings import Source
from graph_service.user_embeddings import UserEmbeddingResolver

log = logging.getLogger("copl.graph")

# Failures of the database connection itself: the caller may retry (UNAVAILABLE).
DATABASE_DOWN = (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError, sqlalchemy.exc.TimeoutError,
                 sqlalchemy.exc.DisconnectionError)


def database_unavailable(exc: Exception) -> Unavailable:
    # The driver's own first line ("connection refused", "database is locked"); never SQLAlchemy's text, which
    # carries the statement's parameters (user texts).
    reason = str(getattr(exc, "orig", None) or type(exc).__name__).strip().splitlines()[0]
    return Unavailable(f"the preference store is unavailable: {reason}")


@dataclass(frozen=True)
class GraphRelease:
    checkpoint: GNNCheckpoint
    resolver: UserEmbeddingResolver


def load_graph_release(release: Release) -> GraphRelease:
    """Load, validate and warm a release's graph side; ValueError says why it cannot be served."""
    check_release_parts(release)
    checkpoint = GNNCheckpoint.load(release.gnn_dir)   # verifies every file's sha256, shapes and dtypes
    if checkpoint.num_users == 0 or checkpoint.num_responses < 2:
        raise ValueError(f"release {release.id}: the GNN has no users or fewer than two responses")
    resolver = UserEmbeddingResolver(checkpoint)
    # Smoke test (also warms the index maps): a trained user, and an unseen one adapted from a stored pair.
    newcomer = "smoke-test"
    while checkpoint.user_indices([newcomer])[0] >= 0:
        newcomer += "'"
    pair = [(checkpoint.response_ids[0], checkpoint.response_ids[1])]
    smoke = resolver.resolve([checkpoint.user_ids[0], newcomer], context={newcomer: pair})
    norms = smoke.embeddings.norm(dim=1)
    if not torch.isfinite(smoke.embeddings).all() or not torch.allclose(norms, torch.ones_like(norms), atol=1e-3):
        raise ValueError(f"release {release.id}: smoke embeddings are not finite unit vectors")
    if smoke.sources[0] != Source.TRAINED:
        raise ValueError(f"release {release.id}: a trained user did not resolve to its trained embedding")
    return GraphRelease(checkpoint, resolver)


@dataclass(frozen=True)
class UserQuery:
    user_id: str
    context: Sequence[tuple[str, str, str]] = ()   # inline (prompt, chosen, rejected) texts, not stored


@dataclass(frozen=True)
class UserEmbedding:
    user_id: str
    vector: list[float]
    source: str


@dataclass(frozen=True)
class AddResult:
    inserted: int
    duplicates: int
    rejected: list[tuple[int, str]] = field(default_factory=list)   # (index, reason), with skip_invalid


@dataclass(frozen=True)
class _Entry:
    vector: list[float]
    source: str
    n_pairs: int   # the user's stored pairs when computed: the entry's version


class EmbeddingCache:
    """LRU of non-trained users' embeddings by (release id, user id). Event-loop only (no locks)."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._entries: OrderedDict[tuple[str, str], _Entry] = OrderedDict()

    def get(self, release_id: str, user_id: str) -> _Entry | None:
        entry = self._entries.get((release_id, user_id))
        if entry is not None:
            self._entries.move_to_end((release_id, user_id))
        return entry

    def put(self, release_id: str, user_id: str, entry: _Entry) -> None:
        self._entries[(release_id, user_id)] = entry
        self._entries.move_to_end((release_id, user_id))
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)

    def versions(self, release_ids: Sequence[str], user_ids: Sequence[str]) -> dict[tuple[str, str], int]:
        """Pair counts of the cached entries among these releases x users."""
        return {(r, u): e.n_pairs for r in release_ids for u in user_ids if (e := self._entries.get((r, u)))}

    def drop(self, keys) -> int:
        return sum(self._entries.pop(k, None) is not None for k in keys)

    def drop_users(self, user_ids: Sequence[str]) -> int:
        users = set(user_ids)
        return self.drop([k for k in self._entries if k[1] in users])

    def __len__(self) -> int:
        return len(self._entries)


class GraphCore:
    def __init__(self, settings: ServiceSettings, store: PreferenceStore, holder: ReleaseHolder[GraphRelease],
                 registry: CollectorRegistry):
        self.settings = settings
        self.store = store
        self.holder = holder
        self.cache = EmbeddingCache(settings.adapted_cache_size)
        self._watermark: datetime | None = None
        self.embeddings_total = Counter("copl_embeddings_total", "User embeddings answered, by source.",
                                        ("source",), registry=registry)
        self.cache_lookups = Counter("copl_embedding_cache_total", "Cache lookups for non-trained users.",
                                     ("result",), registry=registry)
        self.invalidations = Counter("copl_embedding_invalidations_total",
                                     "Cached embeddings dropped because their user got new preferences.",
                                     registry=registry)
        self.preferences = Counter("copl_preferences_total", "Preference records received, by outcome.",
                                   ("outcome",), registry=registry)

    # -- AddPreferences ------------------------------------------------------------------------------
    async def add_preferences(self, records: Sequence[dict], skip_invalid: bool) -> AddResult:
        """Validate every record (ingest's rules), then store the valid ones in one transaction. Without
        skip_invalid a single invalid record stores nothing (InvalidArgument, one violation per record)."""
        if len(records) > self.settings.max_records_per_request:
            raise InvalidArgument(f"{len(records)} records in one request, over the limit of "
                                  f"{self.settings.max_records_per_request}; split the request")
        valid: list[PreferenceRecord] = []
        rejected: list[tuple[int, str]] = []
        for i, obj in enumerate(records):
            try:
                valid.append(parse_record(obj))
            except ValueError as exc:
                rejected.append((i, str(exc)))
        self.preferences.labels("rejected").inc(len(rejected))
        if rejected and not skip_invalid:
            raise InvalidArgument(
                f"{len(rejected)} invalid record(s), nothing stored: "
                f"{summarize([f'records[{i}]: {reason}' for i, reason in rejected])} "
                "(skip_invalid stores the valid ones)",
                [(f"records[{i}]", reason) for i, reason in rejected])
        if not valid:
            return AddResult(0, 0, rejected)
        try:
            result = await asyncio.to_thread(self.store.add_batch, valid)
        except DATABASE_DOWN as exc:
            raise database_unavailable(exc) from None
        dropped = self.cache.drop_users([r.user_id for r in valid])
        self.invalidations.inc(dropped)
        self.preferences.labels("inserted").inc(result.inserted)
        self.preferences.labels("duplicate").inc(result.duplicates)
        return AddResult(result.inserted, result.duplicates, rejected)

    # -- GetUserEmbedding ----------------------------------------------------------------------------
    def _check_queries(self, queries: Sequence[UserQuery]) -> None:
        if not queries:
            raise InvalidArgument("no users in the request")
        if len(queries) > self.settings.max_users_per_request:
            raise InvalidArgument(f"{len(queries)} users in one request, over the limit of "
                                  f"{self.settings.max_users_per_request}; split the request")
        problems: list[tuple[str, str]] = []
        for i, q in enumerate(queries):
            if not q.user_id or len(q.user_id) > LIMITS.max_user_id_chars:
                problems.append((f"users[{i}].user_id", f"must be 1..{LIMITS.max_user_id_chars} characters"))
            if len(q.context) > self.settings.max_context_pairs:
                problems.append((f"users[{i}].context", f"{len(q.context)} pairs, over the limit of "
                                                        f"{self.settings.max_context_pairs}"))
                continue
            for j, (prompt, chosen, rejected) in enumerate(q.context):
                try:
                    parse_record({"user_id": q.user_id or "-", "prompt": prompt, "chosen": chosen,
                                  "rejected": rejected})
                except ValueError as exc:
                    problems.append((f"users[{i}].context[{j}]", str(exc)))
        if problems:
            raise InvalidArgument(f"invalid users: {summarize([f'{f}: {d}' for f, d in problems])}", problems)

    async def embeddings(self, queries: Sequence[UserQuery], release_id: str = "",
                         require_known: bool = False) -> tuple[str, list[UserEmbedding]]:
        """(release id, one embedding per query in order). NotFound for users with no trained embedding, no
        stored pairs and no context when `require_known`; FailedPrecondition for a release not held here."""
        self._check_queries(queries)
        loaded = self.holder.require(release_id)
        graph: GraphRelease = loaded.value
        checkpoint = graph.checkpoint
        ids = [q.user_id for q in queries]
        idx = checkpoint.user_indices(ids).tolist()
        out: list[UserEmbedding | None] = [None] * len(queries)
        unknown: list[str] = []   # no trained embedding, no stored pairs, no context
        misses: list[str] = []
        inline: dict[str, list[tuple[str, str]]] = {}
        for i, (q, row) in enumerate(zip(queries, idx)):
            if row >= 0:
                out[i] = UserEmbedding(q.user_id, checkpoint.user_embeddings[row].tolist(), Source.TRAINED)
            elif q.context:
                inline[q.user_id] = [(content_hash(c), content_hash(r)) for _p, c, r in q.context]
            elif (entry := self.cache.get(loaded.id, q.user_id)) is not None:
                self.cache_lookups.labels("hit").inc()
                out[i] = UserEmbedding(q.user_id, entry.vector, entry.source)
                if entry.n_pairs == 0:
                    unknown.append(q.user_id)
            else:
                self.cache_lookups.labels("miss").inc()
                misses.append(q.user_id)
        if misses or inline:
            try:
                computed = await asyncio.to_thread(self._compute, graph, list(dict.fromkeys(misses)), inline)
            except DATABASE_DOWN as exc:
                raise database_unavailable(exc) from None
            for user_id in misses:
                self.cache.put(loaded.id, user_id, computed[user_id])
            for i, q in enumerate(queries):
                if out[i] is None:
                    entry = computed[q.user_id]
                    out[i] = UserEmbedding(q.user_id, entry.vector, entry.source)
                    if entry.n_pairs == 0:
                        unknown.append(q.user_id)
        if unknown and require_known:
            raise NotFound(f"{len(unknown)} unknown user(s) with no trained embedding, no stored preferences and "
                           f"no context: {summarize(list(dict.fromkeys(unknown)))}")
        for e in out:
            self.embeddings_total.labels(e.source).inc()
        return loaded.id, out

    def _compute(self, graph: GraphRelease, stored_users: list[str],
                 inline: dict[str, list[tuple[str, str]]]) -> dict[str, _Entry]:
        """In a worker thread: stored pairs from the store, then one batched adaptation."""
        pairs = self.store.pairs_of(stored_users) if stored_users else {}
        pairs.update(inline)
        with_pairs = [u for u, p in pairs.items() if p]
        out = {u: _Entry(graph.checkpoint.default_embedding.tolist(), Source.DEFAULT, 0) for u, p in pairs.items() if not p}
        if with_pairs:
            resolved = graph.resolver.resolve(with_pairs, context={u: pairs[u] for u in with_pairs})
            for u, vector, source in zip(with_pairs, resolved.embeddings.tolist(), resolved.sources):
                out[u] = _Entry(vector, source, len(pairs[u]))
        return out

    # -- replicas: new preferences written elsewhere -------------------------------------------------
    async def poll_store(self) -> int:
        """One look for users who received preferences since the last look; returns entries dropped."""
        serving = self.holder.serving_ids()
        overlap = timedelta(seconds=self.settings.store_poll_overlap_s)

        def recent() -> tuple[datetime, list[str]]:
            now = self.store.now()
            return now, self.store.users_stored_since((self._watermark or now) - overlap)

        now, users = await asyncio.to_thread(recent)
        cached = sorted({u for (_r, u) in self.cache.versions(serving, users)})
        counts = await asyncio.to_thread(self.store.pair_counts, cached) if cached else {}
        self._watermark = now
        stale = [key for key, n in self.cache.versions(serving, cached).items() if counts[key[1]] != n]
        dropped = self.cache.drop(stale)
        self.invalidations.inc(dropped)
        return dropped

    async def watch_store(self) -> None:
        failing = False
        while True:
            try:
                await self.poll_store()
                if failing:
                    log.info("the preference store answers again")
                failing = False
            except DATABASE_DOWN as exc:
                if not failing:
                    log.warning("cannot look for new preferences: %s", database_unavailable(exc).message)
                failing = True
            await asyncio.sleep(self.settings.store_poll_s)

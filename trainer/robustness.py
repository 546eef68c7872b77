"""One data regime, end to end: how much of the personalization gap CoPL closes.

A regime is a synthetic dataset (the uf-p presets or the styles family) of a given size. `run_regime`
writes it, ingests the seen users into a fresh SQLite store and trains three releases through the real
pipeline (trainer.pipeline.train_release, default profile unless told):

  baseline  the non-personalized reward model (one LoRA, no user input)
  copl      the GNN's user embeddings gating the MoLE reward model
  oracle    the same reward model trained with the TRUE type (one-hot of the stored group) as the embedding

then ingests the later users and scores the test pairs (held-out prompts). Baseline and CoPL are scored by
trainer.evaluate.evaluate_release (seen: trained embedding, unseen: adapted from their context pairs, as in
serving); the oracle is given every test user's true type. gap closed = (copl - baseline) / (oracle -
baseline), per seen and unseen users. The GNN's own figures: its held-out context accuracy (report part) and
type separability, the leave-one-out nearest-centroid accuracy of the user embeddings against the true type
(unseen: their adapted embeddings against the seen users' type centroids), beside its ceiling on the styles
family: the accuracy of the generator's own posterior type from the same pairs (synth_styles.bayes_type_accuracy).
"""
from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from copl_common.registry import Registry, Release
from graph_service.adaptation import adapt
from graph_service.gnn_training import GNNTrainConfig, train_gnn
from graph_service.ingest import ingest_files, read_valid_records
from graph_service.records import content_hash
from graph_service.store import PreferenceStore
from graph_service.user_embeddings import UserEmbeddingResolver
from reward_service.training import PreferenceExample, pair_margins
from trainer import synth, synth_styles
from trainer.evaluate import evaluate_release, load_release_parts
from trainer.pipeline import TrainRequest, train_release, type_one_hot
from trainer.response_features import snapshot_features

VARIANTS = {"baseline": {"personalized": False}, "copl": {}, "oracle": {"user_embeddings": "oracle"}}
PARTS = ("seen", "unseen")


@dataclass(frozen=True)
class Regime:
    name: str
    family: str = "styles"          # "styles" or "uf-p"
    users: int = 240
    pairs: int = 8                  # styles: context pairs per user (uf-p: fixed by the preset)
    noise: float = 0.05             # styles only
    types: int = 3                  # styles only
    mixed: bool = True              # styles only: mixed-sign types (False: one attribute per type)
    prompts: int | None = None      # styles only; None: from the data size
    preset: str = "uf-p-2"          # uf-p only
    seed: int = 0

    def _styles(self) -> synth_styles.StylesDataset:
        return synth_styles.generate(synth_styles.StylesConfig(
            users=self.users, types=self.types, pairs_per_user=self.pairs, noise=self.noise, mixed=self.mixed,
            prompts=self.prompts, seed=self.seed))

    def type_ceiling(self) -> dict[str, float | None]:
        """Styles: the separability no embedding can beat from these context pairs (synth_styles.
        bayes_type_accuracy), seen and unseen users; uf-p: None (not computed for that family)."""
        if self.family != "styles":
            return {"seen": None, "unseen": None}
        ceiling = synth_styles.bayes_type_accuracy(self._styles())
        return {"seen": ceiling["train_seen"], "unseen": ceiling["train_unseen"]}

    def write_data(self, out: Path) -> None:
        if self.family == "styles":
            synth_styles.write(self._styles(), out)
        elif self.family == "uf-p":
            synth.write(synth.generate(synth.SynthConfig(preset=self.preset, users=self.users, seed=self.seed,
                                                         unseen_fraction=0.2)), out)
        else:
            raise ValueError(f"family must be styles or uf-p, got {self.family!r}")


def separability(embeddings: torch.Tensor, types: list[str], query: torch.Tensor | None = None,
                 query_types: list[str] | None = None) -> float:
    """Nearest-centroid accuracy of the types: leave-one-out over `embeddings` (U, d), or, given a query,
    the query rows against the centroids of all of `embeddings`."""
    names = sorted(set(types))
    label = torch.tensor([names.index(t) for t in types])
    sums = torch.zeros(len(names), embeddings.shape[1]).index_add_(0, label, embeddings.float())   # (T, d)
    counts = torch.bincount(label, minlength=len(names)).float()                                    # (T,)
    if query is None:
        # per row: centroids of every type, its own type's without the row itself
        centroids = (sums / counts[:, None]).expand(len(label), -1, -1).clone()                     # (U, T, d)
        own = torch.arange(len(label))
        centroids[own, label] = (sums[label] - embeddings) / (counts[label] - 1).clamp(min=1)[:, None]
        points, truth = embeddings.float(), label
    else:
        centroids = (sums / counts[:, None]).expand(len(query), -1, -1)
        points, truth = query.float(), torch.tensor([names.index(t) for t in query_types])
    predicted = (centroids - points[:, None, :]).norm(dim=2).argmin(dim=1)
    return float((predicted == truth).float().mean())


def gap_closed(copl: float | None, baseline: float | None, oracle: float | None, min_gap: float = 0.02) -> float | None:
    """(copl - baseline) / (oracle - baseline); None when the oracle is not min_gap above the baseline."""
    if None in (copl, baseline, oracle) or oracle - baseline < min_gap:
        return None
    return (copl - baseline) / (oracle - baseline)


def run_regime(regime: Regime, work: Path, profile: str = "small", progress: bool = False,
               earlier: dict | None = None, retrain: tuple[str, ...] = ("copl",), reward_seed: int = 0) -> dict:
    """Train and score the three variants on one regime; every figure of the robustness table. Given `earlier`
    (a row of this regime and profile from a previous run), train only the `retrain` variants and take the others'
    figures from it: the regime's data and split are the same (seeded). A change to the user embeddings retrains
    CoPL only (the baseline and the oracle do not read them); a change to the reward model, CoPL and the oracle.
    `reward_seed` seeds the three reward models (the data and the GNN stay the same): rows of several seeds of
    one regime give a run's spread (seed_summary)."""
    if earlier is not None and earlier["regime"] != asdict(regime):
        raise ValueError(f"the earlier row of {regime.name} is of other settings ({earlier['regime']}): its baseline "
                         "and oracle do not apply; run all three variants")
    if earlier is not None and row_seed(earlier) != reward_seed:
        raise ValueError(f"the earlier row of {regime.name} is of reward-model seed {row_seed(earlier)}, not "
                         f"{reward_seed}: its baseline and oracle are other models; run all three variants")
    unknown = set(retrain) - set(VARIANTS)
    if unknown or "copl" not in retrain:
        raise ValueError(f"retrain names variants of {sorted(VARIANTS)}, copl among them; got {sorted(retrain)}")
    data = work / regime.name
    write_and_ingest_seen(regime, data)
    url = f"sqlite:///{data / 'store.db'}"
    variants = {v: VARIANTS[v] for v in (retrain if earlier else VARIANTS)}
    releases = {name: train_release(TrainRequest(db_url=url, registry=data / "registry", profile=profile,
                                                 make_current=False, progress=progress, reward_seed=reward_seed,
                                                 **kwargs))
                for name, kwargs in variants.items()}
    return score_regime(regime, data, releases, profile, earlier, reward_seed)


def row_seed(row: dict) -> int:
    return row.get("reward_seed", 0)     # rows written before seeds were recorded ran the profile's seed, 0


def row_key(row: dict) -> tuple[str, str, int]:
    return row["regime"]["name"], row["profile"], row_seed(row)


def read_rows(results: Path) -> dict[tuple[str, str, int], dict]:
    """The finished regimes in `results` by (regime name, profile, reward-model seed), in file order."""
    rows = {}
    if results.exists():
        for line in results.read_text().splitlines():
            row = json.loads(line)
            rows[row_key(row)] = row
    return rows


def save_row(results: Path, row: dict) -> None:
    """Add `row` to `results`, in place of an earlier row of its regime, profile and seed. The file is read again
    and replaced whole in one rename, so two runs of the grid on one file (other regimes or seeds) keep each
    other's rows."""
    rows = read_rows(results)
    rows[row_key(row)] = row
    results.parent.mkdir(parents=True, exist_ok=True)
    partial = results.with_name(f"{results.name}.{os.getpid()}.partial")
    partial.write_text("".join(json.dumps(r) + "\n" for r in rows.values()))
    partial.replace(results)


def seed_summary(rows: Iterable[dict]) -> list[dict]:
    """One entry per regime and profile (in file order) over the reward-model seeds its rows ran at: each variant's
    accuracy averaged over the seeds, the gap closed of those means, and every seed's own gap closed (the spread).
    A regime run at one seed is that row's figures."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        groups.setdefault(row_key(row)[:2], []).append(row)
    summary = []
    for (name, profile), group in groups.items():
        mean = {v: {part: _mean([r[v][part] for r in group]) for part in PARTS} for v in VARIANTS}
        summary.append({
            "regime": name, "profile": profile, "reward_seeds": [row_seed(r) for r in group], **mean,
            **{f"gap_closed_{part}": gap_closed(*(mean[v][part] for v in ("copl", "baseline", "oracle")))
               for part in PARTS},
            **{f"gap_closed_{part}_per_seed": [r[f"gap_closed_{part}"] for r in group] for part in PARTS}})
    return summary


def _mean(values: list[float | None]) -> float | None:
    return None if None in values else sum(values) / len(values)


def write_and_ingest_seen(regime: Regime, data: Path) -> None:
    """The regime's files in `data`, and its seen users in a fresh SQLite store there (data/store.db): a kept folder
    of an earlier run holds the later users too (score_regime ingests them), and a GNN trained on that store would
    train on them."""
    regime.write_data(data)
    for leftover in (data / name for name in ("store.db", "store.db-wal", "store.db-shm", "store.db-journal")):
        leftover.unlink(missing_ok=True)
    with PreferenceStore(f"sqlite:///{data / 'store.db'}") as store:
        ingest_files(store, [data / "train_seen.jsonl"], progress=False)


def embedding_figures(regime: Regime, work: Path, configs: dict[str, GNNTrainConfig]) -> dict[str, dict]:
    """The user embeddings alone, in seconds to minutes: per named config, train only the GNN (and its content half,
    if the config has one) on the regime's seen users and return its held-out context accuracy and type
    separability, seen and unseen (adapted from their context pairs, as the graph service would); with a content
    half, also the separability of the joined table's graph half alone and its evidence metric
    (gnn_training.graph_half_evidence). The store, the features and the users' types are read once for all."""
    data = work / regime.name
    write_and_ingest_seen(regime, data)
    with PreferenceStore(f"sqlite:///{data / 'store.db'}") as store:
        snapshot, texts = store.snapshot_with_texts()
    features = snapshot_features(snapshot, texts) if any(c.content_dim for c in configs.values()) else None
    unseen: dict[str, list[tuple[str, str]]] = {}
    group_of = {}
    for name in ("train_seen.jsonl", "train_unseen.jsonl"):
        for row in map(json.loads, open(data / name)):
            group_of[row["user_id"]] = row["group"]
            if name == "train_unseen.jsonl":
                unseen.setdefault(row["user_id"], []).append((content_hash(row["chosen"]), content_hash(row["rejected"])))
    ids = sorted(unseen)
    ceiling = regime.type_ceiling()
    figures = {}
    for variant, config in configs.items():
        start = time.perf_counter()
        trained = train_gnn(snapshot, config, progress=False,
                            response_features=features if config.content_dim else None)
        seconds = time.perf_counter() - start
        ck = trained.checkpoint
        seen_types = [group_of[u] for u in ck.user_ids]
        adapted = adapt(ck, [unseen[u] for u in ids]).embeddings if ids else None
        graph_dim = config.model.dim if config.content_dim else None      # the joined table's graph half
        figures[variant] = {
            "gnn_report_accuracy": trained.report_accuracy,
            "graph_half": ck.metrics.get("graph_half"),
            "separability_graph_half": (separability(ck.user_embeddings[:, :graph_dim], seen_types)
                                        if graph_dim else None),
            "separability_seen": separability(ck.user_embeddings, seen_types),
            "separability_unseen": (separability(ck.user_embeddings, seen_types, adapted, [group_of[u] for u in ids])
                                    if ids else None),
            "type_ceiling": ceiling,
            "seconds": round(seconds, 1)}
    return figures


def trained_releases(data: Path) -> dict[str, Release]:
    """The three variants' releases already in data/registry (a run stopped after training), by variant."""
    found = {}
    for release in Registry(data / "registry").list():
        ablation = release.manifest["ablation"]["user_embeddings"]
        found["baseline" if not release.manifest["personalized"] else "oracle" if ablation == "oracle"
              else "copl"] = release
    if set(found) != set(VARIANTS):
        raise ValueError(f"{data}: releases for {sorted(found)} only, need {sorted(VARIANTS)}")
    return found


def score_regime(regime: Regime, data: Path, releases: dict[str, Release], profile: str,
                 earlier: dict | None = None, reward_seed: int = 0) -> dict:
    """Ingest the later users (idempotent) and score the test pairs with each variant's release (the baseline's
    and the oracle's figures from `earlier` when they were not retrained: run_regime)."""
    test_rows = [json.loads(line) for line in open(data / "test.jsonl")]
    test = read_valid_records([data / "test.jsonl"])
    with PreferenceStore(f"sqlite:///{data / 'store.db'}") as store:
        ingest_files(store, [data / "train_unseen.jsonl"], progress=False)
        scored = {name: evaluate_release(releases[name], test, store, progress=False)
                  for name in ("baseline", "copl") if name in releases}
        if "oracle" in releases:
            scored["oracle"] = _oracle_scores(releases["oracle"], test_rows, data / "train_seen.jsonl")
        checkpoint, _ = load_release_parts(releases["copl"])
        group_of = {r["user_id"]: r["group"] for r in test_rows}
        unseen_ids = sorted({r["user_id"] for r in map(json.loads, open(data / "train_unseen.jsonl"))})
        adapted = UserEmbeddingResolver(checkpoint, store).resolve(unseen_ids).embeddings if unseen_ids else None
    seen_types = [group_of[u] for u in checkpoint.user_ids]
    gnn = releases["copl"].manifest["metrics"]["gnn"]
    figures = {v: {"seen": scored[v]["seen"]["accuracy"], "unseen": scored[v]["unseen"]["accuracy"]}
               if v in scored else earlier[v] for v in VARIANTS}
    steps = {v: releases[v].manifest["metrics"]["reward"]["steps"] if v in releases else earlier["reward_steps"][v]
             for v in VARIANTS}
    seconds = {v: round(releases[v].manifest["metrics"]["seconds"], 1) if v in releases
               else earlier["train_seconds"][v] for v in VARIANTS}
    return {
        "regime": asdict(regime), "profile": profile, "reward_seed": reward_seed,
        "majority_bound": synth.majority_bound(test_rows),
        **figures,
        "gap_closed_seen": gap_closed(*(figures[v]["seen"] for v in ("copl", "baseline", "oracle"))),
        "gap_closed_unseen": gap_closed(*(figures[v]["unseen"] for v in ("copl", "baseline", "oracle"))),
        "gnn_report_accuracy": gnn["report_accuracy"],
        "separability_seen": separability(checkpoint.user_embeddings, seen_types),
        "separability_unseen": (separability(checkpoint.user_embeddings, seen_types, adapted,
                                             [group_of[u] for u in unseen_ids]) if adapted is not None else None),
        "type_ceiling": regime.type_ceiling(),
        "reward_steps": steps, "train_seconds": seconds,
        # variants whose figures come from the earlier row (rows written before --retrain say
        # baseline_oracle_from_earlier_run instead)
        "from_earlier_run": sorted(v for v in VARIANTS if v not in releases),
    }


def _oracle_scores(release, test_rows: list[dict], seen_file: Path) -> dict:
    """Seen / unseen accuracy of the oracle release, every test user embedded by their true type."""
    _, model = load_release_parts(release)
    groups = sorted({r["group"] for r in test_rows})
    one_hot = dict(zip(groups, type_one_hot(groups, model.cfg.mole.user_dim)))
    margins = pair_margins(model, [PreferenceExample(one_hot[r["group"]], r["prompt"], r["chosen"], r["rejected"])
                                   for r in test_rows], progress=False)
    seen_users = {json.loads(line)["user_id"] for line in open(seen_file)}
    out = {}
    for part, want in (("seen", True), ("unseen", False)):
        rows = [i for i, r in enumerate(test_rows) if (r["user_id"] in seen_users) == want]
        out[part] = {"accuracy": float((margins[rows] > 0).float().mean()) if rows else None}
    return out

"""Retraining: store snapshot -> GNN -> user embeddings -> reward model -> evaluation -> release.

`train_release` is the one pipeline. Its two training stages are pluggable (`Stages`): `LOCAL_STAGES` runs them
in this process (`copl train`); trainer/ray_stages.py runs the GNN as a Ray task and the reward model through
Ray Train (`copl train --ray`, `copl retrain`). Everything else (snapshot, holdout, evaluation, publishing, the
quality gate of trainer/gate.py) is the same code either way. The GNN and the reward model trained on its
embedding space are published together as one immutable release (copl_common/registry.py).

Held-out pairs (graph_service/holdout.py) have no edge in the graph the GNN trains on and are split by
user into a selection part (early stopping of the GNN and the reward model) and a report part that
nothing looks at before training ends. The release's metrics (metrics.json, and release.json "metrics"):

  report_accuracy   the reward model's pair accuracy on the report part: THE held-out figure of a release,
                    the key releases are compared on (None when the report part is empty)
  report_pairs      its number of pairs
  holdout           train_pairs, selection_pairs, selection_users, report_pairs, report_users
  gnn               selection_accuracy / selection_loss (at the kept step), report_accuracy (GNN scores on
                    the report part), best_step, steps, train_seconds, graph_half (with a content half: does the
                    graph half say who the user is on the selection pairs; gnn_training.graph_half_evidence),
                    latent_types (with latent types: K, ridge, selection_loss, seconds; latent_types.py)
  reward            selection_accuracy / selection_loss (kept weights, whole selection part), report_accuracy,
                    report_loss, selection_pairs, checked_pairs, best_check_accuracy, best_step, steps,
                    stopped_early, user_head (the head's fit after the adapters: best_step (lowest selection
                    loss), gain_z (its per-pair loss drop in standard errors), kept_step (0: left at zero), steps,
                    selection loss and accuracy at zero and kept; None without a head), config
  seconds           wall time of the whole run
A selection_* figure picked the weights, so it is optimistic; only report_* figures are held out.
"""
from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

import torch

from copl_common.checksums import sha256_file
from copl_common.registry import Registry, Release
from graph_service import content_tower, latent_types
from graph_service.gnn_training import GNNTrainConfig, TrainedGNN, train_gnn
from graph_service.holdout import Holdout, holdout_split
from graph_service.snapshot import GraphSnapshot
from graph_service.store import PreferenceStore
from reward_service.reward_model import RewardModel, RewardModelConfig
from reward_service.training import PreferenceExample, RMTrainConfig, evaluate, train_reward_model
from trainer.gate import DEFAULT_MAX_REGRESSION, apply_gate
from trainer.profiles import Profile, profile as get_profile
from trainer.run_lock import run_lock
from trainer.response_features import snapshot_features


@dataclass(frozen=True)
class TrainRequest:
    db_url: str
    registry: str | Path
    profile: str = "small"
    until: datetime | None = None          # snapshot cut-off; None: everything stored now
    personalized: bool = True              # False trains the non-personalized baseline (one LoRA)
    num_experts: int | None = None         # ablation: override the profile's E (e.g. 1)
    user_embeddings: str = "gnn"           # ablation: "random" replaces every trained user embedding by a random
                                           # unit vector, so the gate sees user identity without collaborative signal;
                                           # "oracle" by the one-hot of the user's stored group (the true type on
                                           # synthetic data): the ceiling a perfect user embedding would reach
    reward_max_steps: int | None = None    # smoke runs: fewer reward-model steps than the profile's
    reward_seed: int | None = None         # the reward model's seed (adapter, gate and head init; data order, gate
                                           # noise, dropout); None: the profile's. Same data, other seeds: a run's spread
    device: str | None = None              # reward model device; None: the profile's ("auto")
    make_current: bool = True              # False: publish only (no gate decision, CURRENT untouched)
    max_regression: float = DEFAULT_MAX_REGRESSION  # quality gate: how much worse than the current release's
                                           # report_accuracy a release may be and still become current
    force: bool = False                    # make the release current even if the gate rejects it
    progress: bool = True


@dataclass(frozen=True)
class RewardJob:
    """The reward-model stage's whole input, small and picklable (Ray ships it to its workers): the texts and
    the user table once, and rows of the snapshot per part, rather than one example object per pair."""
    model: RewardModelConfig
    training: RMTrainConfig
    texts: Sequence[tuple[str, str, str]]  # (prompt, chosen, rejected) per snapshot row
    triples: torch.Tensor                  # (P, 3) (user, chosen, rejected) indices per snapshot row
    users: torch.Tensor | None             # (U, d) training-graph user embeddings; None: non-personalized
    train_rows: torch.Tensor
    selection_rows: torch.Tensor
    report_rows: torch.Tensor
    content_side: torch.Tensor | None = None  # (R, k) the checkpoint's response_content, when `users` carry a content
    # half: each training pair then comes with its user's embedding without that pair (content_tower.leave_pair_out)
    type_log_prior: torch.Tensor | None = None  # (k,) with latent types: content_side holds their scores
    manifest_extra: dict = field(default_factory=dict)
    progress: bool = True

    def training_examples(self) -> list[PreferenceExample]:
        """The examples the reward model fits: the train rows, each pair left out of its own user's content half."""
        if self.users is None or self.content_side is None:
            return self.examples(self.train_rows)
        train = self.triples[self.train_rows]
        embeddings = (content_tower.leave_pair_out(self.users, self.content_side, train) if self.type_log_prior is None
                      else latent_types.leave_pair_out(self.users, self.content_side, self.type_log_prior, train))
        return self._examples(self.train_rows, embeddings)

    def examples(self, rows: torch.Tensor) -> list[PreferenceExample]:
        """(user embedding, prompt, chosen, rejected) for the given rows of the snapshot."""
        return self._examples(rows, None if self.users is None else self.users[self.triples[rows, 0]])

    def _examples(self, rows: torch.Tensor, embeddings: torch.Tensor | None) -> list[PreferenceExample]:
        return [PreferenceExample(None if embeddings is None else embeddings[i], *self.texts[row])
                for i, row in enumerate(rows.tolist())]


def type_one_hot(groups: Sequence[str | None], dim: int) -> torch.Tensor:
    """(len(groups), dim) one-hot rows: group g -> column sorted(set(groups)).index(g)."""
    if not groups or any(g is None for g in groups):
        raise ValueError("oracle user embeddings need a group label for every user")
    names = sorted(set(groups))
    if len(names) > dim:
        raise ValueError(f"{len(names)} groups do not fit a one-hot of the embedding width {dim}")
    index = {name: i for i, name in enumerate(names)}
    return torch.nn.functional.one_hot(torch.tensor([index[g] for g in groups]), dim).float()



def run_reward_job(job: RewardJob, out_dir: Path, plots: Path | None,
                   report: Callable[[dict[str, Any]], None] | None = None,
                   sync_gradients: Callable[[list[torch.nn.Parameter]], None] | None = None,
                   model_ready: Callable[[RewardModel], None] | None = None) -> dict[str, Any]:
    """Train the reward model, score the report part once, save the model into `out_dir`; return the reward
    metrics of the release. The hooks are for data-parallel workers: `model_ready` (e.g. copy rank 0's
    initial weights), `sync_gradients` (average the gradients)."""
    model = RewardModel(job.model)
    if model_ready is not None:
        model_ready(model)
    rm_metrics = train_reward_model(model, job.training_examples(), job.examples(job.selection_rows),
                                    job.training, out_dir=plots, report=report, progress=job.progress,
                                    sync_gradients=sync_gradients)
    held_out = job.examples(job.report_rows)
    reported = (evaluate(model, held_out, job.training.eval_batch_size) if held_out
                else {"accuracy": None, "loss": None})
    model.save(out_dir, manifest_extra=job.manifest_extra)
    return {**{k: v for k, v in rm_metrics.items() if k != "history"},
            "report_accuracy": reported["accuracy"], "report_loss": reported["loss"]}


class Stages(Protocol):
    """Where the two training stages run. Both write into the staged release directory they are given."""

    def gnn(self, snapshot: GraphSnapshot, config: GNNTrainConfig, holdout: Holdout, plots: Path,
            progress: bool, response_features: torch.Tensor | None) -> TrainedGNN: ...

    def reward(self, job: RewardJob, out_dir: Path, plots: Path,
               report: Callable[[dict[str, Any]], None] | None) -> dict[str, Any]: ...


class LocalStages:
    """Both stages in this process."""

    def gnn(self, snapshot, config, holdout, plots, progress, response_features):
        return train_gnn(snapshot, config, holdout=holdout, out_dir=plots, progress=progress,
                         response_features=response_features)

    def reward(self, job, out_dir, plots, report):
        return run_reward_job(job, out_dir, plots, report=report)


LOCAL_STAGES = LocalStages()


def train_release(request: TrainRequest, report: Callable[[dict[str, Any]], None] | None = None,
                  stages: Stages = LOCAL_STAGES) -> Release:
    """Snapshot -> holdout -> GNN -> reward model -> release -> quality gate. Raises ValueError before any
    training when the store holds no preferences (up to `request.until`) or a setting is wrong, and
    trainer.run_lock.RunInProgress when another run on the same registry is under way.

    With `request.make_current` the release becomes current only if the gate accepts it (or `force`); the
    decision is recorded in the registry either way (trainer/gate.py)."""
    if request.user_embeddings not in ("gnn", "random", "oracle"):
        raise ValueError(f"user_embeddings must be 'gnn', 'random' or 'oracle', got {request.user_embeddings!r}")
    if request.max_regression < 0:
        raise ValueError(f"max_regression must be >= 0, got {request.max_regression}")
    prof = get_profile(request.profile, device=request.device)
    mole = replace(prof.reward_model.mole, personalized=request.personalized)
    if request.num_experts is not None:
        mole = replace(mole, num_experts=request.num_experts, top_k=min(mole.top_k, request.num_experts))
    rm_model_cfg = replace(prof.reward_model, mole=mole)
    rm_train_cfg = prof.reward_training
    if request.reward_seed is not None:
        rm_model_cfg = replace(rm_model_cfg, seed=request.reward_seed)
        rm_train_cfg = replace(rm_train_cfg, seed=request.reward_seed)
    if request.reward_max_steps is not None:
        rm_train_cfg = replace(rm_train_cfg, max_steps=request.reward_max_steps,
                               warmup_steps=min(rm_train_cfg.warmup_steps, request.reward_max_steps - 1))
    started = time.perf_counter()
    with PreferenceStore(request.db_url) as store:
        snapshot, texts = store.snapshot_with_texts(request.until)   # an empty store raises here, before the registry
    with run_lock(request.registry):                                 # is touched
        return _train_release(request, prof, rm_model_cfg, rm_train_cfg, snapshot, texts, started, report, stages)


def _train_release(request: TrainRequest, prof: Profile, rm_model_cfg: RewardModelConfig, rm_train_cfg: RMTrainConfig,
                   snapshot: GraphSnapshot, texts: list[tuple[str, str, str]], started: float,
                   report: Callable[[dict[str, Any]], None] | None, stages: Stages) -> Release:
    holdout = holdout_split(snapshot.triples, snapshot.num_users, prof.gnn.seed)
    registry = Registry(request.registry)
    with registry.stage() as staged:
        plots = staged / "plots"
        features = None
        if prof.gnn.content_dim:
            features = snapshot_features(snapshot, texts, rm_model_cfg.backbone, progress=request.progress)
        gnn = stages.gnn(snapshot, prof.gnn, holdout, plots, request.progress, features)
        checkpoint, users = gnn.checkpoint, gnn.training_graph_users
        if request.user_embeddings == "random":
            noise = torch.randn(users.shape, generator=torch.Generator().manual_seed(prof.gnn.seed))
            users = torch.nn.functional.normalize(noise, dim=1)
            checkpoint = replace(checkpoint, user_embeddings=users)
        elif request.user_embeddings == "oracle":
            users = type_one_hot(snapshot.user_groups, users.shape[1])
            checkpoint = replace(checkpoint, user_embeddings=users)
        gnn_dir = checkpoint.save(staged / "gnn")
        if report:
            report({"stage": "gnn", "selection_accuracy": gnn.selection_accuracy,
                    "report_accuracy": gnn.report_accuracy, "seconds": gnn.seconds})

        # The reward model trains, early-stops and reports on the training-graph embeddings: held-out users'
        # published (full-graph) embeddings have seen their held-out pairs. Serving uses the published ones.
        # Its training pairs leave themselves out of their user's content half (RewardJob.training_examples).
        own_content = request.user_embeddings == "gnn"
        job = RewardJob(rm_model_cfg, rm_train_cfg, texts, snapshot.triples,
                        users if request.personalized else None, *holdout,
                        content_side=checkpoint.response_content if own_content else None,
                        type_log_prior=checkpoint.type_log_prior if own_content else None,
                        manifest_extra={"gnn_checkpoint": {"path": "../gnn",
                                                           "manifest_sha256": sha256_file(gnn_dir / "manifest.json")}},
                        progress=request.progress)
        reward = stages.reward(job, staged / "reward", plots, report)
        metrics = {
            "report_accuracy": reward["report_accuracy"],
            "report_pairs": len(holdout.report),
            "holdout": holdout.counts(snapshot.triples),
            "gnn": {k: checkpoint.metrics[k] for k in ("selection_accuracy", "selection_loss", "report_accuracy",
                                                        "best_step", "steps", "train_seconds", "graph_half",
                                                        "latent_types")},
            "reward": reward,
            "seconds": time.perf_counter() - started,
        }
        manifest = {
            "profile": request.profile,
            "personalized": request.personalized,
            "ablation": {"num_experts": request.num_experts, "user_embeddings": request.user_embeddings},
            "snapshot_time": snapshot.snapshot_time.isoformat() if snapshot.snapshot_time else None,
            "data": {"users": snapshot.num_users, "responses": snapshot.num_responses,
                     "preferences": int(snapshot.triples.shape[0])},
            "gnn": {"dir": "gnn", "dim": checkpoint.dim, "settings": asdict(prof.gnn)},
            "reward": {"dir": "reward", "backbone": rm_model_cfg.backbone, "seed": rm_train_cfg.seed},
            "metrics": metrics,
        }
        (staged / "metrics.json").write_text(json.dumps(metrics, indent=2))
        # Published but not current yet: a crash from here on leaves the previous release current.
        release = registry.publish(staged, manifest, make_current=False)
    if request.make_current:
        apply_gate(registry, release, request.max_regression, force=request.force)
    return release

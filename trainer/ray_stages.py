"""The training stages of trainer/pipeline.py under Ray: the same pipeline, the same functions, Ray as a thin shell.

  GNN           `train_gnn` as a Ray task with its own CPUs (`RaySettings.gnn_num_cpus`).
  reward model  `run_reward_job` in Ray Train workers (`TorchTrainer`): one worker by default; N workers train
                data-parallel: each takes every N-th training pair, rank 0's initial weights are broadcast,
                and gradients are averaged (all-reduce) after every step, so all workers keep identical
                weights and make the same early-stopping decisions. The effective batch is N x batch_size.
                (Not `prepare_model`'s DDP wrapper: training calls `forward_frozen`, not the module's
                `__call__`, which is where DDP hooks its gradient synchronisation.)
                Rank 0 saves the model and its metrics as a Ray Train checkpoint; the driver copies it into
                the staged release. Ray Train's storage is a directory inside the staged release (never
                ~/ray_results), removed before publishing; on a multi-node cluster the registry must be on a
                filesystem every node shares (DESIGN.md: "the same layout on a shared filesystem").

`train_release_on_ray(request, address=None)` is the entry point (`copl train --ray`, `copl retrain`'s job).
"""
from __future__ import annotations

import json
import shutil
import threading
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from copl_common.registry import Release
from graph_service.gnn_training import train_gnn
from trainer.pipeline import RewardJob, TrainRequest, run_reward_job, train_release
from trainer.ray_runtime import ray_session


@dataclass(frozen=True)
class RaySettings:
    num_cpus: int | None = None            # the in-process Ray's CPUs (None: all); ignored with an address
    gnn_num_cpus: float = 1.0              # the GNN task's CPUs
    reward_workers: int = 1                # Ray Train workers for the reward model (>1: data-parallel)
    reward_cpus_per_worker: float = 1.0
    use_gpu: bool = False                  # one GPU per reward-model worker

    def __post_init__(self):
        if self.reward_workers < 1 or self.gnn_num_cpus <= 0 or self.reward_cpus_per_worker <= 0:
            raise ValueError("reward_workers must be >= 1, gnn_num_cpus and reward_cpus_per_worker > 0")


def _broadcast_from_rank0(model) -> None:
    import torch.distributed as dist
    with torch.no_grad():
        for p in model.trainable_parameters().values():
            dist.broadcast(p.data, src=0)


def _average_gradients(params: list[torch.nn.Parameter]) -> None:
    """One all-reduce over every trainable gradient. A parameter this worker did not use (an expert no
    example of its batch was routed to) contributes zeros, so every worker reduces the same tensor."""
    import torch.distributed as dist
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset:offset + n].view_as(p).clone()
        offset += n


def _reward_worker(config: dict[str, Any]) -> None:
    """Ray Train's per-worker loop."""
    import ray.train
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    job: RewardJob = config["job"]
    hooks = {}
    if world > 1:
        job = replace(job, train_rows=job.train_rows[rank::world], progress=job.progress and rank == 0)
        hooks = {"model_ready": _broadcast_from_rank0, "sync_gradients": _average_gradients}
    with tempfile.TemporaryDirectory(prefix="copl-reward-") as tmp:
        out = Path(tmp)
        metrics = run_reward_job(job, out / "reward", out / "plots" if rank == 0 else None, **hooks)
        (out / "metrics.json").write_text(json.dumps(metrics))
        checkpoint = ray.train.Checkpoint.from_directory(tmp) if rank == 0 else None
        ray.train.report({"report_accuracy": metrics["report_accuracy"]}, checkpoint=checkpoint)


def _fit_interruptibly(trainer):
    """`trainer.fit()` in a helper thread. Called from the main thread, fit() installs a SIGINT handler that
    aborts the run and then exits the process with status 0 (or returns as if nothing happened) and leaves
    that handler installed; in a helper thread it installs none, so Ctrl-C stays a KeyboardInterrupt here
    (`copl demo` turns it into a clean shutdown, and ray_session's shutdown stops the run's workers)."""
    outcome: dict[str, Any] = {}

    def fit() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as exc:   # handed to the caller's thread below
            outcome["error"] = exc

    thread = threading.Thread(target=fit, name="ray-train-fit", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(0.5)   # a timed join lets the main thread take KeyboardInterrupt
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


class RayStages:
    """`trainer.pipeline.Stages` on the connected Ray (trainer/ray_runtime.py)."""

    def __init__(self, settings: RaySettings = RaySettings()):
        self.settings = settings

    def gnn(self, snapshot, config, holdout, plots, progress, response_features):
        import ray
        task = ray.remote(train_gnn).options(num_cpus=self.settings.gnn_num_cpus, max_retries=0)
        return ray.get(task.remote(snapshot, config, holdout=holdout, out_dir=str(plots), progress=progress,
                                   response_features=response_features))

    def reward(self, job: RewardJob, out_dir: Path, plots: Path, report) -> dict[str, Any]:
        from ray.train import RunConfig, ScalingConfig
        from ray.train.torch import TorchTrainer
        s = self.settings
        storage = out_dir.parent / ".ray-train"   # inside the staged release: a crashed run's goes with it
        trainer = TorchTrainer(
            _reward_worker, train_loop_config={"job": job},
            scaling_config=ScalingConfig(num_workers=s.reward_workers, use_gpu=s.use_gpu,
                                         resources_per_worker={"CPU": s.reward_cpus_per_worker}),
            run_config=RunConfig(name="reward", storage_path=str(storage)))
        try:
            result = _fit_interruptibly(trainer)
            if result.checkpoint is None:   # the run failed without raising
                raise RuntimeError(f"reward-model training on Ray ended without a model: {result.error or 'aborted'}")
            with result.checkpoint.as_directory() as checkpoint:
                checkpoint = Path(checkpoint)
                shutil.copytree(checkpoint / "reward", out_dir)
                shutil.copytree(checkpoint / "plots", plots, dirs_exist_ok=True)
                metrics = json.loads((checkpoint / "metrics.json").read_text())
        finally:
            shutil.rmtree(storage, ignore_errors=True)
        if report:
            report({"stage": "reward", "report_accuracy": metrics["report_accuracy"]})
        return metrics


def train_release_on_ray(request: TrainRequest, address: str | None = None,
                         settings: RaySettings = RaySettings()) -> Release:
    """`train_release` with its stages on Ray: a private in-process Ray, or the cluster at `address` ("auto"
    inside a Ray job); a Ray this process is already connected to is used as it is."""
    with ray_session(address, settings.num_cpus):
        return train_release(request, stages=RayStages(settings))

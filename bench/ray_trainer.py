"""What running the trainer under Ray costs: one tiny run through `train_release` in this process (`copl train`)
and the same run on a private in-process Ray (`copl train --ray`: GNN as a Ray task, reward model in a Ray Train
worker), on the same store, side by side. Ray's start-up is part of the Ray figure, as a user sees it.

    .venv/bin/python bench/ray_trainer.py [--quick] [--users N] [--reward-steps S]

Last line: JSON {"users", "reward_steps", "local_s", "ray_s", "ray_overhead_s", "local_accuracy", "ray_accuracy"}.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from graph_service.ingest import ingest_files  # noqa: E402
from graph_service.store import PreferenceStore  # noqa: E402
from trainer.pipeline import TrainRequest, train_release  # noqa: E402
from trainer.ray_stages import RaySettings, train_release_on_ray  # noqa: E402
from trainer.synth import SynthConfig, generate, write  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="60 users, 5 reward-model steps")
    parser.add_argument("--users", type=int, default=200)
    parser.add_argument("--reward-steps", type=int, default=None, help="default: the tiny profile's")
    args = parser.parse_args()
    users, steps = (60, 5) if args.quick else (args.users, args.reward_steps)
    with tempfile.TemporaryDirectory(prefix="copl-bench-ray-") as tmp:
        root = Path(tmp)
        write(generate(SynthConfig(preset="uf-p-2", users=users, seed=1)), root / "data")
        url = f"sqlite:///{root / 'store.db'}"
        with PreferenceStore(url) as store:
            ingest_files(store, [root / "data" / "train_seen.jsonl"], progress=False)
        runs = {}
        for name in ("local", "ray"):
            request = TrainRequest(db_url=url, registry=root / f"registry-{name}", profile="tiny",
                                   reward_max_steps=steps, progress=False)
            start = time.perf_counter()
            release = (train_release(request) if name == "local"
                       else train_release_on_ray(request, settings=RaySettings(num_cpus=os.cpu_count())))
            runs[name] = (time.perf_counter() - start, release.manifest["metrics"]["report_accuracy"])
    print(f"tiny profile, uf-p-2, {users} users, reward steps {steps or 'profile'}, {os.cpu_count()} CPUs")
    print(f"{'run':28s} {'wall s':>8s} {'report acc':>11s}")
    for name, label in (("local", "copl train (no Ray)"), ("ray", "copl train --ray (in-process)")):
        seconds, accuracy = runs[name]
        print(f"{label:28s} {seconds:8.1f} {accuracy if accuracy is None else format(accuracy, '.3f'):>11}")
    print(json.dumps({"users": users, "reward_steps": steps, "local_s": round(runs["local"][0], 1),
                      "ray_s": round(runs["ray"][0], 1), "ray_overhead_s": round(runs["ray"][0] - runs["local"][0], 1),
                      "local_accuracy": runs["local"][1], "ray_accuracy": runs["ray"][1]}))


if __name__ == "__main__":
    main()

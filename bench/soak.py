"""Soak: a steady mixed load on both services for --minutes, with one hot swap, sampling each service
process's resident memory and open file descriptors; reports their growth per hour (the slope of a
least-squares line) beside the noise (the standard deviation of the samples around that line).

The services run as two child processes (`copl serve graph`, `copl serve reward`, one torch thread) on a
tiny release trained once in --workdir (about a minute; reused afterwards), over a SQLite store of the
soak's own. The load, from a few client threads at a bounded rate: AddPreferences of new records (the
store grows), GetUserEmbedding of trained and of new (adapted) users, ScoreResponses by user id. One hot
swap (a copy of the release made current) at the end of the warm-up; the fit covers the samples after it
has settled, so the swap's one-off cost (shown apart) is not read as a trend.

    .venv/bin/python bench/soak.py --quick          # half a minute of load: the mechanics, too short for a trend
    .venv/bin/python bench/soak.py --minutes 10

The last line printed is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402

from copl.v1 import graph_pb2_grpc  # noqa: E402
from copl_common.registry import Registry  # noqa: E402
from testkit.faults import (FaultEnv, Load, Services, Writer, embedding_reader, release_served,  # noqa: E402
                            scorer_by_user)
from testkit.services import copy_release, prepare_release  # noqa: E402


def resources(pid: int) -> tuple[float, int]:
    """(resident MiB, open file descriptors) of a process, from /proc."""
    status = Path(f"/proc/{pid}/status").read_text()
    rss_kib = int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:")))
    return rss_kib / 1024, len(os.listdir(f"/proc/{pid}/fd"))


def trend(times_s: list[float], values: list[float]) -> dict:
    """Slope per hour of a least-squares line, the noise around it, and whether the growth over the window
    stands out of that noise (more than twice the noise's standard deviation)."""
    if len(values) < 3:
        return {"per_hour": None, "noise_sd": None, "growth_beyond_noise": None}
    t = np.asarray(times_s) / 3600.0
    slope, intercept = np.polyfit(t, values, 1)
    noise = float(np.std(np.asarray(values) - (slope * t + intercept)))
    window_growth = slope * (t[-1] - t[0])
    return {"per_hour": round(float(slope), 3), "noise_sd": round(noise, 3),
            "growth_in_window": round(float(window_growth), 3),
            "growth_beyond_noise": bool(window_growth > 2 * noise + 1e-9)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--quick", action="store_true", help="half a minute of load")
    parser.add_argument("--sample-s", type=float, default=2.0, help="seconds between samples")
    parser.add_argument("--threads", type=int, default=3, help="client threads")
    parser.add_argument("--interval-s", type=float, default=0.05, help="least time between calls of a thread")
    parser.add_argument("--distinct-records", type=int, default=None,
                        help="write only this many distinct records, over and over (the store stops growing)")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "copl-bench-soak")
    args = parser.parse_args()
    minutes = 0.5 if args.quick else args.minutes
    args.workdir.mkdir(parents=True, exist_ok=True)
    db_url, registry_root = prepare_release(args.workdir)
    env = FaultEnv(db_url=db_url, registry=registry_root, workdir=args.workdir / "runs")
    scratch = env.scratch("soak")
    registry = Registry(shutil.copytree(registry_root, scratch / "registry"))   # the swap adds a release
    first = registry.current_id()
    users = env.trained_users()

    with Services(scratch, registry.root, release_poll_s=1.0) as services:
        graph, reward = services.graph_and_reward()
        writer = Writer(graph.port, "soak", args.distinct_records)
        newcomers = [f"fault-soak-{i}" for i in range(0, 400, 3)]   # users the writer creates: ADAPTED embeddings
        calls = [("ingest", writer), ("embed", embedding_reader(graph.port, users + newcomers)),
                 ("score", scorer_by_user(reward.port, users + newcomers))]
        samples: dict[str, list[tuple[float, float, int]]] = {"graph": [], "reward": []}
        started = time.monotonic()
        end = started + minutes * 60
        warmup_end = started + min(60.0, minutes * 60 * 0.25)
        swap: dict = {}
        with Load(calls, threads=args.threads, interval_s=args.interval_s) as load:
            while (now := time.monotonic()) < end:
                for name, process in (("graph", graph), ("reward", reward)):
                    rss, fds = resources(process.pid)
                    samples[name].append((now - started, rss, fds))
                if not swap and now >= warmup_end:
                    second = copy_release(registry, first)
                    registry.set_current(second.id)
                    swap = {"release": second.id, "at_s": round(now - started, 1)}
                    while release_served(graph.port, graph_pb2_grpc.GraphServiceStub) != second.id:
                        time.sleep(0.2)
                    swap["graph_swapped_after_s"] = round(time.monotonic() - now, 2)
                    swap["settled_at_s"] = swap["at_s"] + min(20.0, minutes * 6)   # 10% of the run, at most 20 s
                time.sleep(args.sample_s)
        writer.close()
        codes = Counter((r.kind, r.code) for r in load.results)
        releases = Counter(r.release_id for r in load.results if r.code == "OK" and r.release_id)

    settled = swap.get("settled_at_s", 0.0)
    report: dict = {"minutes": minutes, "calls": sum(codes.values()),
                    "errors": sum(n for (_k, c), n in codes.items() if c != "OK"),
                    "calls_by_kind": {k: sum(n for (kk, _c), n in codes.items() if kk == k) for k in
                                      ("ingest", "embed", "score")},
                    "acknowledged_writes": len(writer.acknowledged), "distinct_records": args.distinct_records,
                    "swap": swap,
                    "replies_by_release": dict(releases), "samples": len(samples["graph"]), "fit_from_s": settled}
    print(f"{'process':<8} {'measure':<8} {'start':>9} {'end':>9} {'per hour':>10} {'noise sd':>9}  beyond noise")
    for name, rows in samples.items():
        fitted = [r for r in rows if r[0] >= settled]
        t = [r[0] for r in fitted]
        report[name] = {}
        for measure, column, unit in (("rss_mib", 1, "MiB"), ("fds", 2, "")):
            values = [r[column] for r in fitted]
            fit = trend(t, values)
            before_swap = [r[column] for r in rows if r[0] < swap.get("at_s", 0.0)]
            fit.update(start=values[0] if values else None, end=values[-1] if values else None,
                       before_swap=before_swap[-1] if before_swap else None)
            report[name][measure] = fit
            print(f"{name:<8} {measure:<8} {fit['start'] or 0:>9.1f} {fit['end'] or 0:>9.1f} "
                  f"{fit['per_hour'] if fit['per_hour'] is not None else '-':>10} "
                  f"{fit['noise_sd'] if fit['noise_sd'] is not None else '-':>9}  {fit['growth_beyond_noise']}")
    print(f"calls {report['calls']} ({report['calls_by_kind']}), errors {report['errors']}, "
          f"swap {swap}, replies by release {dict(releases)}")
    print(json.dumps(report))


if __name__ == "__main__":
    main()

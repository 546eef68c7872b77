"""Hot swaps under traffic: failed requests, replies that mixed two releases, and latency p99 during swaps
beside steady state, with both services running as `copl up` runs them (two child processes, loopback).

A tiny release is trained once in --workdir (testkit.services.prepare_release: uf-p-2, 200 users, SQLite; about a
minute) and reused. Each run copies that registry to a scratch directory and starts both services on it.
Client threads (copl_cli/swap_traffic.py, shared with `copl demo`) score without pause, half by user id,
half by embedding fetched from the graph service. Every few seconds the bench publishes a new release (a
copy of the current one under a new id: a full load, validation and warm-up in each service, as a retrained
release costs) and swaps it in: CURRENT pointer, then `AdminService.Reload` on the graph service, then on the
reward service. A swap window runs from the publish to the moment both services answer for the new release;
a request overlapping one counts as "during swap", any other as "steady".

    .venv/bin/python bench/hotswap.py --quick   # 3 swaps, 38 s here once the release exists (first run trains it)
    .venv/bin/python bench/hotswap.py           # 8 swaps

Client and servers share the machine's cores. The last line printed is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from copl_cli.services import ServiceProcesses, free_loopback_ports  # noqa: E402
from testkit.services import prepare_release  # noqa: E402
from copl_cli.swap_traffic import Probe, SwapTraffic, percentile  # noqa: E402
from copl_client import Client  # noqa: E402
from copl_common.registry import Registry  # noqa: E402
from copl_common.service_settings import ServiceSettings  # noqa: E402


def probes_from(dataset: Path, n: int) -> list[Probe]:
    rows = [json.loads(line) for line in open(dataset / "test.jsonl")]
    return [Probe(r["user_id"], r["prompt"], (r["chosen"], r["rejected"])) for r in rows[:n]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="3 swaps, 2 s of traffic between them")
    ap.add_argument("--swaps", type=int, default=None, help="default 8 (--quick: 3)")
    ap.add_argument("--steady-s", type=float, default=None, help="traffic between swaps, seconds (default 5; --quick 3)")
    ap.add_argument("--threads", type=int, default=1, help="client threads per mode (by user id, by embedding)")
    ap.add_argument("--workdir", type=Path, default=ROOT / "data" / "bench-hotswap")
    args = ap.parse_args()
    swaps = args.swaps or (3 if args.quick else 8)
    steady_s = args.steady_s or (2.0 if args.quick else 5.0)
    args.workdir.mkdir(parents=True, exist_ok=True)
    url, cached = prepare_release(args.workdir)

    with tempfile.TemporaryDirectory(prefix="copl-hotswap-") as scratch:
        registry = Registry(shutil.copytree(cached, Path(scratch) / "registry"))
        graph_port, reward_port = free_loopback_ports(2)
        settings = ServiceSettings(host="127.0.0.1", graph_port=graph_port, reward_port=reward_port,
                                   graph_metrics_port=-1, reward_metrics_port=-1, db_url=url,
                                   registry=str(registry.root), token_file=str(Path(scratch) / "write-token"),
                                   torch_threads=1, log_level="WARNING", shutdown_grace_s=2.0)
        services = ServiceProcesses(settings, log_dir=Path(scratch) / "logs")
        started = time.monotonic()
        services.start()
        try:
            services.wait_serving(300)
            print(f"services SERVING after {time.monotonic() - started:.1f} s", file=sys.stderr)
            windows, swap_seconds = [], []
            with Client(reward=services.target("reward"), graph=services.target("graph"), token=services.token,
                        timeout=60.0) as client:
                published = {registry.current_id()}
                traffic = SwapTraffic(client, probes_from(args.workdir / "dataset", 64), threads_per_mode=args.threads,
                                      known_releases=lambda: published).start()
                try:
                    time.sleep(steady_s)
                    for n in range(1, swaps + 1):
                        begin = time.monotonic()
                        release = registry.publish_copy(registry.current(), make_current=False)
                        published.add(release.id)   # before any reply can name it
                        registry.set_current(release.id)
                        client.reload(release.id)   # graph first, then reward; returns once both serve it
                        end = time.monotonic()
                        windows.append((begin, end))
                        swap_seconds.append(end - begin)
                        print(f"swap {n}/{swaps}: {release.id} in {end - begin:.2f} s", file=sys.stderr)
                        time.sleep(steady_s)
                finally:
                    report = traffic.stop()
        finally:
            services.stop()

    p99_swap = percentile(report.latencies_ms(windows, inside=True), 99)
    p99_steady = percentile(report.latencies_ms(windows, inside=False), 99)
    rows = [("swaps", f"{len(windows)}", f"{sum(swap_seconds) / len(windows):.2f} s each (publish -> both serve it)"),
            ("requests", f"{report.requests}", "by user id and by embedding"),
            ("failed", f"{report.failed}", "; ".join(report.errors[:2])),
            ("mixed releases", f"{report.mixed}", f"{report.refetches} ReleaseMismatch refusals answered by a refetch"),
            ("p99 during swaps", f"{p99_swap:.1f} ms" if p99_swap is not None else "-",
             f"{len(report.latencies_ms(windows, inside=True))} requests"),
            ("p99 steady", f"{p99_steady:.1f} ms" if p99_steady is not None else "-",
             f"{len(report.latencies_ms(windows, inside=False))} requests")]
    width = max(len(r[0]) for r in rows)
    for name, value, note in rows:
        print(f"{name:<{width}}  {value:>10}  {note}")
    print(json.dumps({"swaps": len(windows), "requests": report.requests, "failed_requests": report.failed,
                      "mixed_release_replies": report.mixed, "refetches": report.refetches,
                      "p99_swap_ms": p99_swap and round(p99_swap, 1), "p99_steady_ms": p99_steady and round(p99_steady, 1),
                      "p99_ratio": round(p99_swap / p99_steady, 2) if p99_swap and p99_steady else None}))


if __name__ == "__main__":
    main()

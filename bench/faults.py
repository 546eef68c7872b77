"""Fault scenarios under a bounded client load on loopback, each checking its invariants (testkit/faults.py):
acknowledged writes present afterwards, no reply from a wrong release, only the documented status codes,
and how long each service took to answer again once its fault was gone.

Runs on a tiny release it trains once in --workdir (about a minute; reused afterwards). Scenarios that
cannot run on this machine (no root for chattr/tmpfs, no PostgreSQL binaries) are listed as skipped.

    .venv/bin/python bench/faults.py --quick     # the two database scenarios, under a minute
    .venv/bin/python bench/faults.py             # all of them (trains twice more: several minutes)

The baseline of each scenario is its own load before the fault (the same calls, succeeding). The last
line printed is one JSON object: scenarios, passed, acknowledged_writes, lost_writes, max_recovery_s.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from testkit import faults  # noqa: E402
from testkit.services import prepare_release  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"only {', '.join(faults.QUICK)}")
    parser.add_argument("--only", nargs="+", choices=sorted(faults.SCENARIOS), help="run these scenarios")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "copl-bench-faults")
    args = parser.parse_args()
    names = args.only or (faults.QUICK if args.quick else list(faults.SCENARIOS))
    args.workdir.mkdir(parents=True, exist_ok=True)
    db_url, registry = prepare_release(args.workdir)
    env = faults.FaultEnv(db_url=db_url, registry=registry, workdir=args.workdir / "scenarios")

    outcomes = []
    print(f"{'scenario':<26} {'result':<8} {'calls':>6} {'acked':>6} {'lost':>5} {'recovery_s':>10}  codes")
    for name in names:
        started = time.monotonic()
        outcome = faults.SCENARIOS[name](env)
        outcomes.append(outcome)
        result = "skipped" if outcome.skipped else "passed" if outcome.passed else "FAILED"
        recovery = "-" if outcome.recovery_s is None else f"{outcome.recovery_s:.2f}"
        codes = ", ".join(f"{k} {v}" for k, v in Counter(outcome.codes).most_common())
        print(f"{name:<26} {result:<8} {sum(outcome.codes.values()):>6} {outcome.acknowledged_writes:>6} "
              f"{outcome.lost_writes:>5} {recovery:>10}  {codes}  ({time.monotonic() - started:.0f} s)")
        for note in ([outcome.skipped] if outcome.skipped else outcome.notes):
            print(f"{'':<27}{note}")
        if not outcome.passed and not outcome.skipped:
            print(f"{'':<27}failed: {outcome.failed_checks()}")
    print(json.dumps(faults.summary(outcomes)))


if __name__ == "__main__":
    main()

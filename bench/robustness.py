"""Personalization across data regimes: baseline, CoPL and the oracle ceiling, seen and unseen users.

For each regime of the grid (trainer/robustness.py has the method): synth -> ingest -> three releases through
the real pipeline (non-personalized baseline, CoPL, oracle = the reward model trained with the true type as
the embedding) -> test pairs on held-out prompts. The headline per regime is the gap closed,
(CoPL - baseline) / (oracle - baseline), for seen users and for users who arrived after training (adapted,
no training); beside it the GNN's held-out context accuracy and how well its user embeddings separate the
true types (leave-one-out nearest centroid).

Resumable: one JSON line per finished regime is saved in --results; a regime already there (same name
and profile) is skipped, so an interrupted grid continues where it stopped. --retrain copl retrains only CoPL on
the regimes there and keeps their baseline and oracle figures (a change to the user embeddings, which neither
reads); --retrain copl,oracle keeps only the baseline's (a change to the reward model). --reward-seed N trains the
reward models at another seed (same data, same GNN), saved as rows of their own: where the results file holds a
regime at several seeds, the headline figures are the means over them, printed beside every seed's gap closed.

    .venv/bin/python bench/robustness.py --quick                  # one small styles regime (~2 minutes on 1 core)
    .venv/bin/python bench/robustness.py --regimes styles-240x8,styles-240x4
    .venv/bin/python bench/robustness.py                          # the whole grid (hours on CPU)
    .venv/bin/python bench/robustness.py --embeddings-only        # user embeddings alone, whole grid (minutes)
    .venv/bin/python bench/robustness.py --regimes styles-240x4 --reward-seed 1   # a second seed of one regime
Every regime of the results file (this profile) is charted beside it as PNG (docs/robustness.png by default).
Last line: one JSON object with the per-regime figures, min_gap_closed_seen and min_gap_closed_unseen.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from copl_common.plots import save_gap_chart  # noqa: E402
from trainer.profiles import profile  # noqa: E402
from trainer.robustness import (PARTS, VARIANTS, Regime, embedding_figures, read_rows, row_seed, run_regime,  # noqa: E402
                                save_row, score_regime, seed_summary, trained_releases)

# users 100-1,000; context pairs 4 / 8 / 16; noise 0-10%; prompts ~30-300; mixed and one-attribute types;
# both families. Prompts follow the data size unless set (about 16 users label a training response).
GRID = [
    Regime("styles-120x8", users=120, pairs=8),
    Regime("styles-240x8", users=240, pairs=8),
    Regime("styles-240x4", users=240, pairs=4),
    Regime("styles-240x16", users=240, pairs=16),
    Regime("styles-240x8-noise0", users=240, pairs=8, noise=0.0),
    Regime("styles-240x8-noise10", users=240, pairs=8, noise=0.10),
    Regime("styles-240x8-one-attr", users=240, pairs=8, types=4, mixed=False),
    Regime("styles-240x8-5types", users=240, pairs=8, types=5),
    Regime("styles-100x8-p30", users=100, pairs=8, prompts=30),
    Regime("styles-1000x8", users=1000, pairs=8),
    Regime("styles-1000x4-p300", users=1000, pairs=4, prompts=300),
    Regime("uf-p-2-200", family="uf-p", preset="uf-p-2", users=200),
    Regime("uf-p-4-400", family="uf-p", preset="uf-p-4", users=400),
]
QUICK = "styles-120x8"


def fmt(x) -> str:
    return "-" if x is None else f"{x:.3f}"


def table(rows: list[dict]) -> str:
    head = ("| regime | users x pairs | noise | bound | baseline s/u | CoPL s/u | oracle s/u | gap closed s/u "
            "| GNN held-out | separability s/u | type ceiling s/u | RM steps b/c/o | RM seed |")
    lines = [head, "|" + " --- |" * (head.count("|") - 1)]
    for r in rows:
        g = r["regime"]
        pairs = "uf-p" if g["family"] == "uf-p" else g["pairs"]
        su = lambda v: f"{fmt(r[v]['seen'])} / {fmt(r[v]['unseen'])}"  # noqa: E731
        lines.append(f"| {g['name']} | {g['users']} x {pairs} | {g['noise'] if g['family'] == 'styles' else 0} "
                     f"| {fmt(r['majority_bound'])} | {su('baseline')} | {su('copl')} | {su('oracle')} "
                     f"| {fmt(r['gap_closed_seen'])} / {fmt(r['gap_closed_unseen'])} | {fmt(r['gnn_report_accuracy'])} "
                     f"| {fmt(r['separability_seen'])} / {fmt(r['separability_unseen'])} | {ceiling(r)} "
                     f"| {'/'.join(str(r['reward_steps'][v]) for v in ('baseline', 'copl', 'oracle'))} "
                     f"| {row_seed(r)} |")
    return "\n".join(lines)


def seeds_table(summary: list[dict]) -> str:
    """Regimes run at several reward-model seeds: the means, the gap closed of the means, each seed's gap closed."""
    head = ("| regime | RM seeds | baseline s/u | CoPL s/u | oracle s/u | gap closed of the means s/u "
            "| gap closed per seed: seen | unseen |")
    lines = [head, "|" + " --- |" * (head.count("|") - 1)]
    for r in summary:
        su = lambda v: f"{fmt(r[v]['seen'])} / {fmt(r[v]['unseen'])}"  # noqa: E731
        per_seed = lambda part: ", ".join(fmt(g) for g in r[f"gap_closed_{part}_per_seed"])  # noqa: E731
        lines.append(f"| {r['regime']} | {', '.join(map(str, r['reward_seeds']))} | {su('baseline')} | {su('copl')} "
                     f"| {su('oracle')} | {fmt(r['gap_closed_seen'])} / {fmt(r['gap_closed_unseen'])} "
                     f"| {per_seed('seen')} | {per_seed('unseen')} |")
    return "\n".join(lines)


def ceiling(row: dict) -> str:
    c = row.get("type_ceiling") or {"seen": None, "unseen": None}   # rows from before it was measured have none
    return f"{fmt(c['seen'])} / {fmt(c['unseen'])}"


def embeddings_only(args, regimes: list[Regime]) -> None:
    """The profile's GNN with its content half against the same GNN without it, on every regime's data."""
    joined = profile(args.profile).gnn
    if not joined.content_dim:
        sys.exit(f"error: profile {args.profile} has no content half to compare")
    variants = {"graph only": dataclasses.replace(joined, content=None, types=None), "graph + content": joined}
    rows = []
    with tempfile.TemporaryDirectory(prefix="copl-embeddings-") as tmp:
        work = args.keep or Path(tmp)
        for i, regime in enumerate(regimes):
            print(f"[{i + 1}/{len(regimes)}] {regime.name} ...", file=sys.stderr, flush=True)
            rows.append({"regime": regime.name, **embedding_figures(regime, work, variants)})
    print(f"profile {args.profile}; held-out = the GNN's accuracy on held-out context pairs (report part); "
          "separability = leave-one-out nearest-centroid accuracy of the user embeddings against the true type, "
          "seen / unseen (adapted); its graph half = columns 0..d_gnn-1 of the joined embedding alone; z = its "
          "evidence of saying who the user is on the selection pairs (release metric gnn.graph_half)")
    head = ("| regime | " + " | ".join(f"{v}: held-out | {v}: separability s/u | {v}: s" for v in variants)
            + " | its graph half: separability s | its graph half: z | type ceiling s/u |")
    print(head + "\n|" + " --- |" * (head.count("|") - 1))
    for r in rows:
        joined_row = r["graph + content"]
        z = (joined_row["graph_half"] or {}).get("z")
        print(f"| {r['regime']} | " + " | ".join(
            f"{fmt(r[v]['gnn_report_accuracy'])} | {fmt(r[v]['separability_seen'])} / {fmt(r[v]['separability_unseen'])} "
            f"| {r[v]['seconds']}" for v in variants)
            + f" | {fmt(joined_row['separability_graph_half'])} | {fmt(z)} | {ceiling(joined_row)} |")
    print(json.dumps({"profile": args.profile, "regimes": rows}))


def save_chart(done: dict[tuple[str, str, int], dict], profile_name: str, path: Path) -> Path:
    """Gap closed seen / unseen of every regime of `done` trained with this profile (the mean over its seeds), in
    grid order."""
    by_name = {s["regime"]: s for s in seed_summary(r for k, r in done.items() if k[1] == profile_name)}
    rows = [by_name[r.name] for r in GRID if r.name in by_name]
    return save_gap_chart(path, [r["regime"] for r in rows], [r["gap_closed_seen"] for r in rows],
                          [r["gap_closed_unseen"] for r in rows], goals=(0.6, 0.8),
                          title=f"Gap closed per regime, profile {profile_name} (goals 0.8; 0.6 at 4 pairs)\n"
                                "a regime run at several reward-model seeds: of the mean accuracies")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help=f"only {QUICK}")
    parser.add_argument("--regimes", default=None, help="comma-separated regime names (default: the whole grid)")
    parser.add_argument("--profile", default="small")
    parser.add_argument("--results", type=Path, default=None,
                        help="JSONL of finished regimes, appended to and skipped on a rerun "
                             "(default: a temporary file with --quick, else docs/robustness.jsonl)")
    parser.add_argument("--list", action="store_true", help="print the grid's regime names and exit")
    parser.add_argument("--rescore", type=Path, default=None,
                        help="score the releases already trained under DIR/REGIME (a run stopped after training, "
                             "its work folder kept with --keep) instead of training again")
    parser.add_argument("--keep", type=Path, default=None, help="work folder to keep (default: a temporary one)")
    parser.add_argument("--retrain", default=None, metavar="VARIANTS",
                        help="on regimes already in --results, retrain only these variants (copl, or copl,oracle), keep "
                             "the others' figures (same seeded data) and replace the rows; regimes not there yet "
                             "train all three")
    parser.add_argument("--reward-seed", type=int, default=0,
                        help="the reward models' seed (default 0, the profile's); rows of each seed are kept apart")
    parser.add_argument("--embeddings-only", action="store_true",
                        help="train only the profile's GNN, with and without its content half, and print held-out "
                             "accuracy and type separability per regime (no reward model; seconds to minutes a regime)")
    args = parser.parse_args()
    if args.list:
        print("\n".join(r.name for r in GRID))
        return
    retrain = tuple(args.retrain.split(",")) if args.retrain else ()
    if retrain and ("copl" not in retrain or not set(retrain) <= set(VARIANTS)):   # before any regime trains
        sys.exit(f"error: --retrain names variants of {', '.join(VARIANTS)}, copl among them; got {args.retrain!r}")
    by_name = {r.name: r for r in GRID}
    names = [QUICK] if args.quick else (args.regimes.split(",") if args.regimes else list(by_name))
    unknown = [n for n in names if n not in by_name]
    if unknown:
        sys.exit(f"error: unknown regime(s) {', '.join(unknown)}; --list shows the grid")
    if args.embeddings_only:
        embeddings_only(args, [by_name[n] for n in names])
        return
    with tempfile.TemporaryDirectory(prefix="copl-robustness-") as tmp:
        work = args.keep or Path(tmp)
        results = args.results or (Path(tmp) / "results.jsonl" if args.quick else ROOT / "docs" / "robustness.jsonl")
        done = read_rows(results)
        start = time.perf_counter()
        for i, name in enumerate(names):
            earlier = done.get((name, args.profile, args.reward_seed))
            if earlier and not retrain:
                print(f"[{i + 1}/{len(names)}] {name}: already in {results}", file=sys.stderr)
                continue
            print(f"[{i + 1}/{len(names)}] {name} ...", file=sys.stderr, flush=True)
            if args.rescore:
                data = args.rescore / name
                row = score_regime(by_name[name], data, trained_releases(data), args.profile,
                                   reward_seed=args.reward_seed)
            else:
                row = run_regime(by_name[name], work, args.profile, earlier=earlier if retrain else None,
                                 retrain=retrain or ("copl",), reward_seed=args.reward_seed)
            save_row(results, row)
            print(f"[{i + 1}/{len(names)}] {name}: gap closed {fmt(row['gap_closed_seen'])} seen, "
                  f"{fmt(row['gap_closed_unseen'])} unseen", file=sys.stderr, flush=True)
        # read again rather than `done`: another grid run on the same file may have added rows (save_row)
        latest = read_rows(results)
    rows = [latest[n, args.profile, args.reward_seed] for n in names]
    print(f"profile {args.profile}; s/u = seen / unseen users; bound = majority bound of the test pairs; "
          f"{time.perf_counter() - start:.0f} s this run")
    print(table(rows))
    # the headline: each regime over every seed the results file holds of it (one seed: its row)
    summary = seed_summary(r for k, r in latest.items() if k[0] in names and k[1] == args.profile)
    several = [s for s in summary if len(s["reward_seeds"]) > 1]
    if several:
        print(f"\nmean over the reward-model seeds in {results}")
        print(seeds_table(several))
    gaps = {part: [s[f"gap_closed_{part}"] for s in summary if s[f"gap_closed_{part}"] is not None] for part in PARTS}
    if args.results or not args.quick:   # a results file that outlives the run: chart every regime in it
        chart = save_chart(latest, args.profile, results.with_suffix(".png"))
        print(f"chart of the {args.profile} regimes in {results}: {chart}", file=sys.stderr)
    print(json.dumps({"profile": args.profile, "regimes": rows, "seed_means": several,
                      "min_gap_closed_seen": min(gaps["seen"], default=None),
                      "min_gap_closed_unseen": min(gaps["unseen"], default=None)}))


if __name__ == "__main__":
    main()

"""The paper's accuracy table on `copl synth` data: CoPL against the non-personalized baseline, plus ablations.

For each dataset (uf-p-2 / uf-p-4, ALL / AVG): a fresh SQLite store; ingest the seen users; train every
variant through the real pipeline (trainer.pipeline.train_release: GNN -> embeddings -> reward model ->
release); then ingest the users who arrive after training and score test.jsonl (held-out prompts) with
each release through `copl eval`'s code (trainer.evaluate.evaluate_release: seen users use their
trained embedding, later users the adapted one).

  copl       MoLE reward model gated by the GNN embedding (the profile's E, k=1)
  uniform    non-personalized baseline: same backbone, one LoRA, no user input
  E=1        ablation: one expert, so routing cannot differ between users (the  [uf-p-4 ALL]
             profile's user head, where it has one, still reads the embedding)
  random emb ablation: every user embedding replaced by a random unit vector     [uf-p-4 ALL]

The majority bound is the accuracy of the best non-personalized predictor on the test pairs. Nothing that
picked weights saw a test pair (early stopping used the selection part of the held-out context pairs);
"report part" is the release's own held-out figure (metrics.json `report_accuracy`: the held-out context
pairs of seen users that early stopping never looked at, graph_service/holdout.py).
Writes docs/RESULTS.md and docs/accuracy.png. Last line: one JSON object with copl_seen, copl_unseen,
uniform and majority_bound for uf-p-4 ALL.

    .venv/bin/python bench/accuracy.py            # 4 datasets x 1,000 users, profile small
    .venv/bin/python bench/accuracy.py --quick    # uf-p-2 ALL, 60 users, profile tiny with 20 reward-model steps, copl + uniform:
                                                  # a smoke run of the whole path (under a minute, not the table)
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from graph_service.ingest import ingest_files, read_valid_records  # noqa: E402
from graph_service.store import PreferenceStore  # noqa: E402
from trainer.evaluate import evaluate_release  # noqa: E402
from trainer.pipeline import TrainRequest, train_release  # noqa: E402
from trainer.synth import SynthConfig, generate, majority_bound, write  # noqa: E402

DATASETS = [("uf-p-4", False), ("uf-p-4", True), ("uf-p-2", False), ("uf-p-2", True)]
VARIANTS = {
    "copl": {},
    "uniform": {"personalized": False},
    "E=1": {"num_experts": 1},
    "random emb": {"user_embeddings": "random"},
}
ABLATION_DATASET = ("uf-p-4", False)
ROBUSTNESS_HEADING = "# Robustness across data regimes"   # docs/RESULTS.md's hand-kept section (bench/robustness.py)


def dataset_name(preset: str, avg: bool) -> str:
    return f"{preset} {'AVG' if avg else 'ALL'}"


def run_dataset(preset: str, avg: bool, args, work: Path) -> dict:
    name = dataset_name(preset, avg)
    data = work / name.replace(" ", "-")
    write(generate(SynthConfig(preset=preset, avg=avg, users=args.users, seed=args.seed)), data)
    test = read_valid_records([data / "test.jsonl"])
    bound = majority_bound([json.loads(line) for line in open(data / "test.jsonl")])
    url = f"sqlite:///{data / 'store.db'}"
    variants = [v for v in VARIANTS if ((preset, avg) == ABLATION_DATASET or v in ("copl", "uniform"))
                and (args.variants is None or v in args.variants.split(","))]
    releases, seconds = {}, {}
    with PreferenceStore(url) as store:
        ingest_files(store, [data / "train_seen.jsonl"], progress=False)
        for variant in variants:
            start = time.perf_counter()
            releases[variant] = train_release(TrainRequest(
                db_url=url, registry=data / "registry", profile=args.profile, make_current=False,
                reward_max_steps=args.reward_steps, progress=not args.no_progress, **VARIANTS[variant]))
            seconds[variant] = time.perf_counter() - start
            print(f"[{name}] trained {variant} in {seconds[variant]:.0f}s", file=sys.stderr, flush=True)
        ingest_files(store, [data / "train_unseen.jsonl"], progress=False)
        results = {v: evaluate_release(r, test, store, progress=False) for v, r in releases.items()}
    for v in results:
        metrics = releases[v].manifest["metrics"]
        results[v]["train_seconds"] = seconds[v]
        results[v]["report_part"] = {"n_pairs": metrics["report_pairs"], "accuracy": metrics["report_accuracy"]}
    return {"dataset": name, "majority_bound": bound, "results": results}


def fmt(x) -> str:
    return "-" if x is None else f"{x:.3f}"


def render_markdown(runs: list[dict], args, total_s: float) -> str:
    lines = ["# Accuracy on UltraFeedback-P-like synthetic data", "",
             f"`bench/accuracy.py{' --quick' if args.quick else ''}`: {args.users} users a dataset, profile "
             f"`{args.profile}`, seed {args.seed}, {total_s / 60:.0f} minutes on this machine. Test pairs are on "
             "held-out prompts; *seen* users were in the training graph, *unseen* users arrived after training "
             "(adapted embedding, no training). Every pair is controversial, so controversial accuracy equals "
             "overall accuracy. The majority bound is the best any non-personalized predictor can do. *Report "
             "part*: the release's held-out context pairs that early stopping never saw (metrics.json "
             "`report_accuracy`).", ""]
    for run in runs:
        groups = sorted(next(iter(run["results"].values()))["by_group"])
        lines += [f"## {run['dataset']} (majority bound {run['majority_bound']:.3f})", "",
                  "| model | overall | controversial | seen | unseen | " + " | ".join(groups)
                  + " | report part | train s |",
                  "| --- " * (7 + len(groups)) + "|"]
        for variant, m in run["results"].items():
            cells = [fmt(m["accuracy"]), fmt(m["controversial_accuracy"]), fmt(m["seen"]["accuracy"]),
                     fmt(m["unseen"]["accuracy"])] + [fmt(m["by_group"][g]["accuracy"]) for g in groups]
            lines.append(f"| {variant} | " + " | ".join(cells)
                         + f" | {fmt(m['report_part']['accuracy'])} | {m['train_seconds']:.0f} |")
        lines.append("")
    return "\n".join(lines)


def plot(runs: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(runs), figsize=(4.2 * len(runs), 4), squeeze=False)
    for ax, run in zip(axes[0], runs):
        names = list(run["results"])
        seen = [run["results"][v]["seen"]["accuracy"] or 0 for v in names]
        unseen = [run["results"][v]["unseen"]["accuracy"] or 0 for v in names]
        xs = range(len(names))
        ax.bar([x - 0.2 for x in xs], seen, width=0.4, label="seen users")
        ax.bar([x + 0.2 for x in xs], unseen, width=0.4, label="unseen users")
        ax.axhline(run["majority_bound"], color="k", linestyle="--", linewidth=1, label="majority bound")
        ax.set_xticks(list(xs), names)
        ax.set_ylim(0.4, 1.0)
        ax.set_title(run["dataset"])
        ax.set_ylabel("test pair accuracy")
    axes[0][0].legend(loc="lower left", fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="uf-p-2 ALL, 60 users, profile tiny with 20 reward-model steps, copl + uniform")
    parser.add_argument("--users", type=int, default=None)
    parser.add_argument("--profile", default=None)
    parser.add_argument("--datasets", default=None, help="e.g. 'uf-p-4,uf-p-4-avg' (default: all four)")
    parser.add_argument("--variants", default=None, help="e.g. 'copl,uniform' (default: all that apply)")
    parser.add_argument("--reward-steps", type=int, default=None,
                        help="reward-model steps instead of the profile's (--quick: 20)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None,
                        help="where RESULTS.md and accuracy.png go (default: docs/; --quick writes none)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args()
    args.users = args.users or (60 if args.quick else 1000)
    args.profile = args.profile or ("tiny" if args.quick else "small")
    if args.quick:
        args.variants = args.variants or "copl,uniform"
        args.reward_steps = args.reward_steps or 20
    datasets = [("uf-p-2", False)] if args.quick else DATASETS
    if args.datasets:
        wanted = {d.strip() for d in args.datasets.split(",")}
        datasets = [(p, a) for p, a in DATASETS if (p + ("-avg" if a else "")) in wanted]

    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="copl-accuracy-") as work:
        runs = [run_dataset(preset, avg, args, Path(work)) for preset, avg in datasets]
    total = time.perf_counter() - start

    markdown = render_markdown(runs, args, total)
    print(markdown)
    out = args.out or (None if args.quick else ROOT / "docs")
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        results = out / "RESULTS.md"
        previous = results.read_text() if results.exists() else ""
        kept = previous[previous.index(ROBUSTNESS_HEADING):] if ROBUSTNESS_HEADING in previous else ""
        results.write_text(markdown + "\n![accuracy](accuracy.png)\n" + (f"\n{kept}" if kept else ""))
        plot(runs, out / "accuracy.png")
    main_run = next((r for r in runs if r["dataset"] == dataset_name(*ABLATION_DATASET)), runs[0])
    copl, uniform = main_run["results"].get("copl"), main_run["results"].get("uniform")
    print(json.dumps({"dataset": main_run["dataset"], "users": args.users, "profile": args.profile,
                      "copl_seen": copl and copl["seen"]["accuracy"], "copl_unseen": copl and copl["unseen"]["accuracy"],
                      "copl": copl and copl["accuracy"], "uniform": uniform and uniform["accuracy"],
                      "copl_report_part": copl and copl["report_part"]["accuracy"],
                      "uniform_report_part": uniform and uniform["report_part"]["accuracy"],
                      "majority_bound": main_run["majority_bound"], "seconds": round(total)}))


if __name__ == "__main__":
    main()

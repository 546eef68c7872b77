"""GNN quality on `copl synth` data: held-out pair accuracy of the signed GCN's scores s(u, r) for seen
users and for unseen users with adapted embeddings, beside the best non-personalized predictor.

Per dataset (uf-p-2 / uf-p-4, ALL / AVG): synth -> ingest train_seen.jsonl into a fresh SQLite store ->
snapshot -> train_gnn. Test pairs on held-out prompts have responses the graph never saw, so the GNN is
judged on held-out *context* pairs, as in the paper, held out by graph_service/holdout.py (no edge of a
held-out pair in the training graph):
  seen    the REPORT part of the seen users' held-out pairs: early stopping never looked at them (it
          used the selection part, shown beside as "selection": optimistic, it picked the weights);
  unseen  per unseen user, one context pair held out by the same rule; the user is adapted from the
          others (no training) and the held-out pair scored with the adapted embedding. Pairs whose
          responses are not in the trained graph cannot be scored by the GNN and are counted apart.
  majority  each held-out pair oriented the way most of that pair's labels (all users) go: the best a
          predictor that ignores the user can do (the non-personalized bound).

    .venv/bin/python bench/gnn_quality.py           # 4 datasets x 1,000 users, profile small
    .venv/bin/python bench/gnn_quality.py --quick   # uf-p-4 ALL, 300 users
Last line: one JSON object.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from graph_service.adaptation import adapt  # noqa: E402
from graph_service.gnn_eval import evaluate_pairs  # noqa: E402
from graph_service.gnn_training import train_gnn  # noqa: E402
from graph_service.holdout import holdout_split  # noqa: E402
from graph_service.ingest import ingest_files  # noqa: E402
from graph_service.records import content_hash  # noqa: E402
from graph_service.store import PreferenceStore  # noqa: E402
from trainer.profiles import PROFILE_NAMES, profile  # noqa: E402
from trainer.response_features import snapshot_features  # noqa: E402
from trainer.synth import SynthConfig, generate, write  # noqa: E402

DATASETS = [("uf-p-4", False), ("uf-p-4", True), ("uf-p-2", False), ("uf-p-2", True)]


def orientation_votes(records: list[dict]) -> Counter:
    """(low, high) response hash pair -> #labels choosing low minus #labels choosing high."""
    votes: Counter = Counter()
    for r in records:
        c, j = content_hash(r["chosen"]), content_hash(r["rejected"])
        votes[min(c, j), max(c, j)] += 1 if c < j else -1
    return votes


def majority_correct(votes: Counter, chosen: str, rejected: str) -> float:
    """1 if the majority orientation agrees with this label, 0 if not, 0.5 on a tie."""
    v = votes[min(chosen, rejected), max(chosen, rejected)] * (1 if chosen < rejected else -1)
    return 1.0 if v > 0 else 0.0 if v < 0 else 0.5


def run_dataset(preset: str, avg: bool, args, work: Path) -> dict:
    name = f"{preset} {'AVG' if avg else 'ALL'}"
    data = generate(SynthConfig(preset=preset, avg=avg, users=args.users, seed=args.seed))
    out = work / name.replace(" ", "-")
    write(data, out)
    votes = orientation_votes(data.train_seen + data.train_unseen)
    with PreferenceStore(f"sqlite:///{out / 'store.db'}") as store:
        ingest_files(store, [out / "train_seen.jsonl"], progress=False)
        snapshot, texts = store.snapshot_with_texts()
    config = profile(args.profile).gnn
    features = snapshot_features(snapshot, texts) if config.content_dim else None   # cached, not timed
    start = time.perf_counter()
    trained = train_gnn(snapshot, config, progress=not args.no_progress, response_features=features)
    train_s = time.perf_counter() - start
    ck = trained.checkpoint

    held = snapshot.triples[trained.holdout.report]                              # (V, 3)
    seen_majority = sum(majority_correct(votes, snapshot.response_ids[c], snapshot.response_ids[r])
                        for c, r in held[:, 1:].tolist()) / len(held)

    # Unseen users: hold out one context pair each by the seen users' rule, adapt from the rest.
    user_of = {u: i for i, u in enumerate(dict.fromkeys(r["user_id"] for r in data.train_unseen))}
    pairs = [(user_of[r["user_id"]], content_hash(r["chosen"]), content_hash(r["rejected"])) for r in data.train_unseen]
    response_of = {h: i for i, h in enumerate(dict.fromkeys(h for _, c, r in pairs for h in (c, r)))}
    split = holdout_split(torch.tensor([(u, response_of[c], response_of[r]) for u, c, r in pairs]), len(user_of),
                          args.seed, report_share=1.0)
    context: dict[int, list[tuple[str, str]]] = {}
    for row in split.train.tolist():
        context.setdefault(pairs[row][0], []).append(pairs[row][1:])
    tested = sorted({pairs[row][0] for row in split.report.tolist()})          # users with a held-out pair
    test = [pairs[row][1:] for row in split.report.tolist()]
    start = time.perf_counter()
    adapted = adapt(ck, [context[u] for u in tested])
    adapt_s = time.perf_counter() - start
    position = {u: i for i, u in enumerate(tested)}
    embeddings = adapted.embeddings[[position[pairs[row][0]] for row in split.report.tolist()]]   # (T, d)
    idx = ck.response_indices([h for pair in test for h in pair]).view(-1, 2)   # (T, 2), -1 unknown
    known = (idx >= 0).all(dim=1)
    unseen_acc = evaluate_pairs(ck, embeddings[known], idx[known, 0], idx[known, 1])
    unseen_majority = sum(majority_correct(votes, c, r) for (c, r), k in zip(test, known.tolist()) if k) / int(known.sum())
    sources = Counter(str(s) for s in adapted.sources)
    return {"dataset": name, "users": args.users, "seen_pairs": len(held), "seen_accuracy": trained.report_accuracy,
            "seen_majority": seen_majority, "selection_pairs": int(trained.holdout.selection.numel()),
            "selection_accuracy": trained.selection_accuracy, "unseen_pairs": int(known.sum()),
            "unseen_unscorable": int((~known).sum()), "unseen_accuracy": unseen_acc,
            "unseen_majority": unseen_majority, "adapted": sources.get("ADAPTED", 0),
            "default": sources.get("DEFAULT", 0), "train_s": train_s, "steps": len(trained.history["step"]),
            "adapt_batch_ms": 1000 * adapt_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="uf-p-4 ALL, 300 users")
    parser.add_argument("--users", type=int, default=None)
    parser.add_argument("--profile", default="small", choices=PROFILE_NAMES)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args()
    args.users = args.users or (300 if args.quick else 1000)
    datasets = DATASETS[:1] if args.quick else DATASETS
    with tempfile.TemporaryDirectory(prefix="copl-gnn-quality-") as work:
        rows = [run_dataset(p, a, args, Path(work)) for p, a in datasets]
    print(f"\nprofile {args.profile}, {args.users} users a dataset, seed {args.seed}\n")
    print("| dataset | seen (report part) | majority (same pairs) | unseen (adapted) | majority (same pairs) "
          "| seen / unseen pairs scored (unscorable) | selection acc (picked the weights) | adapted / default "
          "| GNN train s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['dataset']} | {r['seen_accuracy']:.3f} | {r['seen_majority']:.3f} | {r['unseen_accuracy']:.3f} | "
              f"{r['unseen_majority']:.3f} | {r['seen_pairs']} / {r['unseen_pairs']} ({r['unseen_unscorable']}) | "
              f"{r['selection_accuracy']:.3f} | {r['adapted']} / {r['default']} | {r['train_s']:.0f} |")
    print(json.dumps({"profile": args.profile, "datasets": rows}))


if __name__ == "__main__":
    main()

"""The robustness bench's parts: type separability, gap closed, oracle embeddings, and one small styles regime
through the real pipeline where CoPL must close most of the gap between the baseline and the oracle."""
from __future__ import annotations

import pytest
import torch

from trainer.pipeline import type_one_hot
from trainer.robustness import Regime, gap_closed, run_regime, separability


def test_separability_by_hand():
    points = torch.tensor([[0.0, 0.0], [0.2, 0.0], [5.0, 5.0], [5.2, 5.0], [0.1, 0.1]])
    assert separability(points, ["a", "a", "b", "b", "a"]) == 1.0
    assert separability(points, ["a", "b", "a", "b", "a"]) < 0.5          # labels that ignore the geometry
    query = torch.tensor([[4.9, 5.1], [0.0, 0.3]])
    assert separability(points, ["a", "a", "b", "b", "a"], query, ["b", "a"]) == 1.0
    assert separability(points, ["a", "a", "b", "b", "a"], query, ["a", "a"]) == 0.5


def test_gap_closed_and_oracle_one_hot():
    assert gap_closed(0.8, 0.6, 1.0) == pytest.approx(0.5)
    assert gap_closed(0.8, 0.6, 0.61) is None and gap_closed(None, 0.6, 0.9) is None
    one_hot = type_one_hot(["y", "x", "y"], 4)
    assert one_hot.tolist() == [[0, 1, 0, 0], [1, 0, 0, 0], [0, 1, 0, 0]]
    with pytest.raises(ValueError, match="group label"):
        type_one_hot(["x", None], 4)
    with pytest.raises(ValueError, match="do not fit"):
        type_one_hot(["a", "b", "c"], 2)


@pytest.mark.slow   # three trainings: ~40 minutes on the shared 2 cores where it was measured
@pytest.mark.xfail(strict=True, reason="issue 8 not met at this size yet: gap closed 0.01 seen / 0.04 unseen measured "
                   "on this regime (docs/RESULTS.md, Robustness; 240 users x 8 pairs close it: 1.31 / 0.92); "
                   "strict, so a fix that makes it pass lifts the mark")
def test_small_styles_regime_copl_closes_most_of_the_gap(tmp_path):
    """120 users x 8 pairs, 3 mixed-sign style types, 5% noise, profile `content`: the oracle is well above the
    baseline, and CoPL closes at least half of that gap for seen and for unseen users (a GNN whose embeddings
    carried no type would leave the gap open: the 'random emb' ablation of bench/accuracy.py)."""
    row = run_regime(Regime("styles-120x8", users=120, pairs=8), tmp_path, "content")
    for part in ("seen", "unseen"):
        assert row["oracle"][part] - row["baseline"][part] >= 0.1, row
        assert row[f"gap_closed_{part}"] >= 0.5, row
    assert row["separability_seen"] >= 0.7, row

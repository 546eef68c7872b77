"""The robustness bench's parts: type separability, gap closed, oracle embeddings, and the grid's smallest styles
regime through the real pipeline, where CoPL must close most of the gap between the baseline and the oracle."""
from __future__ import annotations

import pytest
import torch

from copl_common.plots import save_gap_chart
from trainer.pipeline import type_one_hot
from trainer.robustness import Regime, gap_closed, read_rows, run_regime, save_row, separability


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


def test_results_file_keeps_one_row_per_regime_and_profile(tmp_path):
    """save_row replaces a regime's earlier row in place and keeps the others (a second grid run on the same file)."""
    results = tmp_path / "robustness.jsonl"
    row = lambda name, profile, gap: {"regime": {"name": name}, "profile": profile, "gap": gap}  # noqa: E731
    for r in (row("a", "small", 0.1), row("b", "small", 0.2), row("a", "tiny", 0.3), row("a", "small", 0.9)):
        save_row(results, r)
    assert [(k, r["gap"]) for k, r in read_rows(results).items()] == [
        (("a", "small"), 0.9), (("b", "small"), 0.2), (("a", "tiny"), 0.3)]
    assert [p.name for p in tmp_path.iterdir()] == ["robustness.jsonl"]       # no partial file left behind


def test_retrain_refuses_a_row_of_other_settings_and_unknown_variants(tmp_path):
    """The baseline and oracle of an earlier row stand in only for the same regime settings (same seeded data),
    and a retrain always includes CoPL, the variant the row is about."""
    regime = Regime("r", users=100)
    with pytest.raises(ValueError, match="other settings"):
        run_regime(regime, tmp_path, earlier={"regime": {**regime.__dict__, "users": 120}})
    for retrain in (("oracle",), ("copl", "orcale")):
        with pytest.raises(ValueError, match="retrain names variants"):
            run_regime(regime, tmp_path, earlier={"regime": dict(regime.__dict__)}, retrain=retrain)
    assert not (tmp_path / "r").exists()                      # refused before writing any data


def test_gap_chart_is_a_png_and_takes_a_missing_figure(tmp_path):
    path = save_gap_chart(tmp_path / "gaps.png", ["a", "b"], [0.9, None], [0.5, -0.1], goals=(0.6, 0.8), title="t")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000


def test_small_styles_regime_copl_closes_most_of_the_gap(tmp_path):
    """The smallest regime of the grid (100 users x 8 pairs on 30 prompts, 3 mixed-sign style types, 5% noise) with
    the default profile, three trainings through the real pipeline (125 s on 2 quiet cores, the suite's slowest
    case): the oracle is well above the baseline, and CoPL closes most of that gap, for seen users and for users who
    arrived after training. Measured (reward model on left-out content halves): gap closed 0.73 / 0.57, CoPL -
    baseline 0.21 / 0.14, separability 0.89 / 0.86; the unseen part is 21 users x 4 pairs, so its gap closed has a
    standard error near 0.2. Without the content tower the GNN separated these types at 0.54 / 0.67, and the
    graph-only release closed 0.03 / -0.02 of the gap on 240 users x 4 pairs (docs/RESULTS.md). Chance would give
    separability 0.33 and a gap near 0; the seen margin of 0.1 is 2.5 standard errors over 316 pairs."""
    row = run_regime(Regime("styles-100x8-p30", users=100, pairs=8, prompts=30), tmp_path)
    for part in ("seen", "unseen"):
        assert row["oracle"][part] - row["baseline"][part] >= 0.1, row
    assert row["gap_closed_seen"] >= 0.5 and row["copl"]["seen"] - row["baseline"]["seen"] >= 0.1, row
    assert row["gap_closed_unseen"] >= 0.4, row
    assert row["separability_seen"] >= 0.75 and row["separability_unseen"] >= 0.7, row

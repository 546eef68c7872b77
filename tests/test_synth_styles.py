"""The styles family: labels follow the type weights (ties by coin flip, noise), splits, determinism, and
that the text carries every style attribute."""

import json
from collections import Counter

import numpy as np
import pytest
from sklearn.feature_extraction.text import CountVectorizer
from sklearn.linear_model import LogisticRegression

from graph_service.records import parse_record
from trainer.synth_styles import STYLES, StylesConfig, bayes_type_accuracy, generate, write


def _utility(dataset, record, side):
    styles = {(r["prompt"], r["text"]): r["styles"] for r in dataset.responses}[(record["prompt"], record[side])]
    weights = dataset.weights[int(record["group"].removeprefix("type"))]
    return float(np.dot(weights, [styles[s] for s in STYLES]))


@pytest.mark.parametrize("mixed", [True, False])
def test_labels_follow_the_type_weights(mixed):
    config = StylesConfig(users=150, types=3, pairs_per_user=8, noise=0.1, mixed=mixed, seed=3)
    d = generate(config)
    if mixed:
        assert all((w == 1).any() and (w == -1).any() and (w == 0).any() for w in d.weights)
    else:
        assert d.weights.tolist() == np.eye(len(STYLES), dtype=int)[:3].tolist()
    assert len({tuple(w) for w in d.weights.tolist()}) == 3
    context = d.train_seen + d.train_unseen
    margins = np.array([_utility(d, r, "chosen") - _utility(d, r, "rejected") for r in context])
    strict = margins != 0
    # noise 0.1: about 10% of the strictly ordered context labels go against the type
    assert 0.05 < (margins[strict] < 0).mean() < 0.15
    assert (~strict).any()                          # ties (indifference) are labelled, by coin flip
    assert all(_utility(d, r, "chosen") > _utility(d, r, "rejected") for r in d.test)   # test: noiseless, strict

    group_of = {r["user_id"]: r["group"] for r in context + d.test}
    assert Counter(group_of.values()) == {f"type{k}": 50 for k in range(3)}
    seen, unseen = {r["user_id"] for r in d.train_seen}, {r["user_id"] for r in d.train_unseen}
    assert not seen & unseen and len(unseen) == 3 * round(50 * config.unseen_fraction)
    assert set(Counter(r["user_id"] for r in context).values()) == {8}
    assert set(Counter(r["user_id"] for r in d.test).values()) == {config.test_pairs_per_user}
    train_prompts, test_prompts = {r["prompt"] for r in context}, {r["prompt"] for r in d.test}
    assert not train_prompts & test_prompts
    for r in context[:50] + d.test[:50]:
        parse_record(r)


def test_same_seed_same_files(tmp_path):
    config = StylesConfig(users=60, seed=5)
    write(generate(config), tmp_path / "a")
    write(generate(config), tmp_path / "b")
    write(generate(StylesConfig(users=60, seed=6)), tmp_path / "c")
    for name in ("train_seen.jsonl", "train_unseen.jsonl", "test.jsonl", "dataset.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert (tmp_path / "a" / "test.jsonl").read_bytes() != (tmp_path / "c" / "test.jsonl").read_bytes()
    summary = json.loads((tmp_path / "a" / "dataset.json").read_text())
    assert summary["family"] == "styles" and 0.5 < summary["stats"]["majority_bound_test"] < 0.95


def test_bag_of_words_reads_every_style_on_held_out_prompts():
    d = generate(StylesConfig(users=300, seed=1))
    train = [r for r in d.responses if not r["test_prompt"]]
    test = [r for r in d.responses if r["test_prompt"]]
    vectorizer = CountVectorizer(ngram_range=(1, 2)).fit([r["text"] for r in train])
    x_train, x_test = vectorizer.transform([r["text"] for r in train]), vectorizer.transform([r["text"] for r in test])
    for style in STYLES:
        y_train, y_test = [r["styles"][style] for r in train], [r["styles"][style] for r in test]
        model = LogisticRegression(max_iter=2000).fit(x_train, y_train)
        assert model.score(x_test, y_test) > 0.97, style


@pytest.mark.parametrize("kwargs, message", [
    ({"types": 1}, "types must be >= 2"),
    ({"types": 6, "mixed": False}, "at most 5 types"),
    ({"noise": 0.5}, "noise must be in"),
    ({"prompts": 2}, "prompts must be >= 3"),
    ({"users": 2}, "users must be >= types"),
])
def test_bad_settings_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        StylesConfig(**kwargs)


def test_the_type_ceiling_grows_with_pairs_and_falls_with_noise():
    """bayes_type_accuracy: the generator's own posterior tells types apart better with more pairs a user and
    worse with more label noise; 16 clean pairs identify nearly every user."""
    def ceiling(**kw):
        return bayes_type_accuracy(generate(StylesConfig(users=120, seed=3, **kw)))["train_seen"]
    two, eight, sixteen = ceiling(pairs_per_user=2), ceiling(pairs_per_user=8), ceiling(pairs_per_user=16, noise=0.0)
    assert two < eight < sixteen and sixteen >= 0.97 and two < 0.85
    assert ceiling(pairs_per_user=8, noise=0.3) < eight

"""Synthetic UltraFeedback-P data: statistics, determinism, and that the text carries the levels."""

import json
from collections import Counter, defaultdict

import numpy as np
import pytest
from scipy.sparse import vstack
from sklearn.feature_extraction.text import CountVectorizer
from sklearn.linear_model import LogisticRegression

from copl_common.settings import LIMITS
from graph_service.records import parse_record
from trainer.synth import (
    ATTRIBUTES,
    SynthConfig,
    generate,
    majority_bound,
    mean_users_per_response,
    write,
)

CASES = [("uf-p-4", False, 400), ("uf-p-4", True, 400), ("uf-p-2", False, 200), ("uf-p-2", True, 200)]


@pytest.fixture(scope="module", params=CASES, ids=lambda c: f"{c[0]}-{'avg' if c[1] else 'all'}")
def dataset(request):
    preset, avg, users = request.param
    return generate(SynthConfig(preset=preset, avg=avg, users=users, seed=7))


def test_dataset_statistics(dataset):
    cfg = dataset.config
    types, n = cfg.types, cfg.pairs_per_user
    context = dataset.train_seen + dataset.train_unseen
    every = context + dataset.test

    group_of = {r["user_id"]: r["group"] for r in every}
    assert len(group_of) == cfg.users
    assert Counter(group_of.values()) == {t: cfg.users // len(types) for t in types}

    seen = {r["user_id"] for r in dataset.train_seen}
    unseen = {r["user_id"] for r in dataset.train_unseen}
    assert not seen & unseen and seen | unseen == set(group_of)
    per_type_unseen = Counter(group_of[u] for u in unseen)
    assert per_type_unseen == {t: round(cfg.users // len(types) * cfg.unseen_fraction) for t in types}

    sizes = np.array(list(Counter(r["user_id"] for r in context).values()))
    if cfg.avg:
        assert sizes.min() >= 1 and sizes.max() <= 2 * n - 1
        assert abs(sizes.mean() - n) < 1.5 and len(set(sizes.tolist())) > n  # spread, centred on n
    else:
        assert set(sizes.tolist()) == {n}
    assert set(Counter(r["user_id"] for r in dataset.test).values()) == {cfg.test_pairs_per_user}
    assert len({(r["user_id"], r["prompt"], r["chosen"], r["rejected"]) for r in every}) == len(every)

    levels = {(r["prompt"], r["text"]): r["levels"] for r in dataset.responses}
    for r in every:
        chosen, rejected = levels[(r["prompt"], r["chosen"])], levels[(r["prompt"], r["rejected"])]
        assert chosen[r["group"]] > rejected[r["group"]]  # the user's own type strictly orders it
        assert any(chosen[t] < rejected[t] for t in types)  # and another type disagrees
        assert r["controversial"] is True

    assert mean_users_per_response(context) > 3.0
    test_prompts = {r["prompt"] for r in dataset.test}
    assert not test_prompts & {r["prompt"] for r in context}
    assert test_prompts <= {r["prompt"] for r in dataset.responses if r["test_prompt"]}
    train_texts = {r["text"] for r in dataset.responses if not r["test_prompt"]}
    held_out_texts = {r["text"] for r in dataset.responses if r["test_prompt"]}
    assert not held_out_texts & train_texts  # no whole string to memorise

    for r in every:
        assert len(r["prompt"]) <= LIMITS.max_prompt_chars and len(r["chosen"]) <= LIMITS.max_response_chars
        parse_record(r)  # what the ingester accepts


def test_majority_bound_is_below_one_for_controversial_data(dataset):
    bound = majority_bound(dataset.test)
    assert 0.5 <= bound < 0.8  # types disagree on every pair, so ignoring the user must cost accuracy


def test_same_seed_same_files_other_seed_differs(tmp_path):
    cfg = SynthConfig(preset="uf-p-2", avg=True, users=60, seed=11)
    a, b = write(generate(cfg), tmp_path / "a"), write(generate(cfg), tmp_path / "b")
    assert a == b
    for name in ("train_seen.jsonl", "train_unseen.jsonl", "test.jsonl", "dataset.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    lines = (tmp_path / "a" / "train_seen.jsonl").read_text().splitlines()
    assert len(lines) == a["train_seen"]
    assert set(json.loads(lines[0])) == {"user_id", "prompt", "chosen", "rejected", "group", "controversial"}
    summary = json.loads((tmp_path / "a" / "dataset.json").read_text())
    assert (summary["preset"], summary["avg"], summary["users"], summary["seed"]) == ("uf-p-2", True, 60, 11)
    assert summary["counts"] == a
    other = generate(SynthConfig(preset="uf-p-2", avg=True, users=60, seed=12))
    assert other.train_seen != generate(cfg).train_seen


def _pairs(levels: np.ndarray, rng: np.random.Generator, limit: int) -> tuple[np.ndarray, np.ndarray]:
    i, j = np.triu_indices(len(levels), k=1)
    keep = levels[i] != levels[j]
    i, j = i[keep], j[keep]
    if len(i) > limit:
        pick = rng.choice(len(i), size=limit, replace=False)
        i, j = i[pick], j[pick]
    return i, j


def test_bag_of_words_learns_every_attribute_on_held_out_prompts():
    # The text cues are the subject here, not graph density: 8 users a response gives the probe
    # about 400 prompts of distinct training responses.
    data = generate(SynthConfig(preset="uf-p-4", users=400, seed=0, users_per_response=8.0))
    train = [r for r in data.responses if not r["test_prompt"]]
    test = [r for r in data.responses if r["test_prompt"]]
    vectorizer = CountVectorizer(ngram_range=(1, 2), token_pattern=r"(?u)\b\w+\b").fit([r["text"] for r in train])
    x_train = vectorizer.transform([r["text"] for r in train])
    x_test = vectorizer.transform([r["text"] for r in test])
    rng = np.random.default_rng(0)
    accuracy = {}
    for attribute in ATTRIBUTES:
        lv_train = np.array([r["levels"][attribute] for r in train])
        lv_test = np.array([r["levels"][attribute] for r in test])
        i, j = _pairs(lv_train, rng, 20000)
        # Both orientations so the classes balance; a pair's label: is the first response higher?
        x = x_train[i] - x_train[j]
        y = lv_train[i] > lv_train[j]
        model = LogisticRegression(fit_intercept=False, max_iter=2000)
        model.fit(vstack([x, -x]), np.concatenate([y, ~y]))
        i, j = _pairs(lv_test, rng, 20000)
        accuracy[attribute] = float(np.mean(model.predict(x_test[i] - x_test[j]) == (lv_test[i] > lv_test[j])))
    print("held-out pairwise accuracy", accuracy)
    assert min(accuracy.values()) >= 0.9, accuracy


def test_majority_bound_and_users_per_response_by_hand():
    rec = lambda u, c, r: {"user_id": u, "prompt": "p", "chosen": c, "rejected": r}  # noqa: E731
    records = [rec("u1", "A", "B"), rec("u2", "A", "B"), rec("u3", "A", "B"), rec("u4", "B", "A"),
               rec("u1", "C", "D"), rec("u2", "C", "D")]
    assert majority_bound(records) == pytest.approx(5 / 6)
    assert majority_bound(records + [rec("u5", "B", "A"), rec("u6", "B", "A")]) == pytest.approx(5 / 8)  # a 3:3 tie counts one side
    # u4's label alone is a majority of one; against everyone's votes it is the minority
    assert majority_bound(records[3:4]) == 1.0 and majority_bound(records[3:4], votes_from=records) == 0.0
    assert mean_users_per_response(records) == pytest.approx((4 + 4 + 2 + 2) / 4)
    with pytest.raises(ValueError):
        majority_bound([])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"preset": "uf-p-3"}, "preset"),
        ({"users": 3}, "users"),
        ({"unseen_fraction": 1.0}, "unseen_fraction"),
        ({"test_prompt_fraction": 0.0}, "test_prompt_fraction"),
        ({"responses_per_prompt": 1}, "responses_per_prompt"),
        ({"test_pairs_per_user": 0}, "test_pairs_per_user"),
        ({"prompts": 1}, "prompts"),
        ({"non_controversial_fraction": 1.0}, "non_controversial_fraction"),
        ({"users": 300_000}, "the prompt grammar makes only 96,000: uf-p-4 allows at most 288,000 users"),
        ({"preset": "uf-p-2", "users": 600_000}, "uf-p-2 allows at most 576,000 users"),
        ({"users": 1000, "prompts": 100_000}, "lower prompts"),
    ],
)
def test_bad_settings_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SynthConfig(**kwargs)


def test_the_largest_dataset_the_grammar_allows_is_accepted():
    SynthConfig(users=288_000)
    SynthConfig(preset="uf-p-2", users=576_000)


def test_a_share_of_non_controversial_pairs():
    data = generate(SynthConfig(preset="uf-p-4", users=40, seed=3, non_controversial_fraction=0.25))
    levels = {(r["prompt"], r["text"]): r["levels"] for r in data.responses}
    every = data.train_seen + data.train_unseen + data.test
    for r in every:
        chosen, rejected = levels[(r["prompt"], r["chosen"])], levels[(r["prompt"], r["rejected"])]
        assert chosen[r["group"]] > rejected[r["group"]]
        disagree = any(chosen[t] < rejected[t] for t in ATTRIBUTES)  # uf-p-4: every attribute is a type
        assert r["controversial"] is disagree
    per_user = defaultdict(Counter)
    for split in (data.train_seen + data.train_unseen, data.test):
        for r in split:
            per_user[(r["user_id"], split is data.test)][r["controversial"]] += 1
    assert {tuple(sorted(c.items())) for (_, test), c in per_user.items() if not test} == {((False, 4), (True, 12))}
    assert {tuple(sorted(c.items())) for (_, test), c in per_user.items() if test} == {((False, 1), (True, 3))}
    # pairs every type agrees on are what a non-personalized model gets right: the bound rises
    plain = generate(SynthConfig(preset="uf-p-4", users=40, seed=3))
    assert majority_bound(data.test) > majority_bound(plain.test)


def test_too_few_prompts_for_the_pairs_raises():
    with pytest.raises(ValueError, match="pairs for type"):
        generate(SynthConfig(preset="uf-p-4", users=8, prompts=4))


def test_users_split_equally_and_ids_are_stable():
    data = generate(SynthConfig(preset="uf-p-4", users=10, seed=1))
    groups = defaultdict(set)
    for r in data.test:
        groups[r["group"]].add(r["user_id"])
    assert sorted(len(g) for g in groups.values()) == [2, 2, 3, 3]
    assert min(u for g in groups.values() for u in g) == "u000000"

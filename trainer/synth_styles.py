"""A second synthetic family, independent of the uf-p presets: users who weigh textual STYLES.

Every response carries five binary style attributes, each written as its own sentence (present or absent
phrasing, several paraphrases, the prompt's subject as a slot), after a neutral opening sentence and in
random order:

- warmth:    an encouraging, personal sentence / a detached, matter-of-fact one;
- structure: an explicit "first ... then ... finally" sequence / loose prose;
- example:   a concrete worked example / a general remark with none;
- caution:   a warning about a pitfall / confidence that nothing can go wrong;
- humor:     a light joke / a plainly serious remark.

A user type is a weight vector over the attributes; a user's utility for a response is the dot product
with its attributes. `mixed=True` (default) draws weights in {-1, 0, +1} with at least one of each per type,
so types disagree in sign on some attributes and are indifferent to others; `mixed=False` gives type k the
weight +1 on attribute k alone (one-attribute types, like UltraFeedback-P). Context pairs come from
training prompts, drawn uniformly among pairs of a prompt whose responses differ somewhere: a pair the
type ties on is labelled by a coin flip, and every context label is flipped with probability `noise`.
Test pairs come from held-out prompts, only pairs the user's type strictly orders, labelled without
noise (the accuracy a perfect model of the type reaches is 1). Records and files have the layout of
trainer/synth.py (`group` = the type), so `copl ingest`, `copl train` and `copl eval` take them as they are.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from trainer.synth import majority_bound, mean_users_per_response, write_splits

STYLES = ("warmth", "structure", "example", "caution", "humor")

_SUBJECTS = (
    "repotting a fern", "choosing a used car", "tuning a bicycle chain", "brewing green tea",
    "writing a thank-you note", "setting up a home aquarium", "pruning an apple tree", "learning to row",
    "hosting a board game night", "sharpening kitchen knives", "planning a hiking route", "painting a fence",
    "starting a book club", "cleaning a cast-iron pan", "choosing running shoes", "framing a poster",
    "making a paper kite", "packing for a long flight", "restoring an old chair", "baking rye crackers",
    "sorting household recycling", "setting a chessboard for a lesson", "waxing cross-country skis",
    "labelling spice jars", "sewing on a button", "choosing a sleeping bag", "caring for a bonsai",
    "drafting a club newsletter", "stacking firewood", "arranging a small bookshelf", "cleaning a laptop fan",
    "teaching a parrot a word", "filing paper receipts", "making pickled onions", "inflating bike tyres",
    "planting tulip bulbs", "folding a fitted sheet", "calibrating a kitchen scale", "ironing a dress shirt",
    "building a birdhouse", "descaling a kettle", "recording a voice memo diary",
)
_ASKS = (
    "What is your advice on {s}?", "Walk me through {s}.", "I need help with {s}.", "Explain {s} to me.",
    "How would you go about {s}?", "Tell me how to handle {s}.", "What matters most when {s}?",
    "Could you guide me through {s}?",
)
_CONTEXTS = ("", "It's my first time.", "I have one afternoon for it.", "My neighbour recommended asking.",
             "I would like to get it right.", "I have done it once before.")
_OPENERS = (
    "Here is how I would look at {s}.", "Let's talk about {s}.", "There are a few things to say about {s}.",
    "{S} is a reasonable thing to take on.", "A few thoughts on {s}.",
)
# STYLES order; per attribute (absent phrasings, present phrasings).
_BANKS = (
    (("The task itself is routine and needs no particular motivation.",
      "Results depend on the procedure, not on how one feels about it.",
      "This is a standard activity with standard steps."),
     ("You are going to do great at this, and I am glad you asked!",
      "Honestly, it is lovely that you want to try this yourself, you've got this.",
      "I'm cheering for you here; be proud of taking it on.")),
    (("Mostly it comes down to paying attention as you go and adjusting when something feels off.",
      "People approach it in many ways, and the order rarely matters much.",
      "Just work on it bit by bit, in whatever order suits you."),
     ("First gather what you need, then do the main part slowly, and finally check the result.",
      "Step one is preparation, step two is the core work, and step three is a careful review.",
      "Begin with the setup, next handle the central task, and end by inspecting everything once.")),
    (("In general the usual principles apply.", "The broad idea should carry over to your situation.",
      "Common sense covers most of it."),
     ("For example, a friend spent twenty minutes on {s} and fixed a mistake by redoing only the last part.",
      "Take a concrete case: with {s}, doing it on a Saturday morning with everything laid out took me an hour.",
      "As an illustration, someone I know tried {s} twice and the second attempt went faster by half.")),
    (("Nothing here can really go wrong, so go ahead freely.", "There is no risk worth mentioning.",
      "You can skip any precautions; it is completely safe."),
     ("Be careful, though: rushing {s} is the most common way to ruin it.",
      "One warning: check twice before the step you cannot undo.",
      "Watch out for the usual pitfall of skipping the preparation.")),
    (("That is all there is to it, seriously.", "I'll keep this strictly practical.",
      "No jokes here, it is a sober matter."),
     ("Ha, even my cat could manage it, and she mostly naps.",
      "Think of it as a sport where the only trophy is a slightly smug grin.",
      "Worst case, you get a funny story out of it, which is its own reward.")),
)


@dataclass(frozen=True)
class StylesConfig:
    users: int = 240                   # seen and unseen; split equally across types (counts differ by <= 1)
    types: int = 3                     # user types (one-attribute types: at most len(STYLES))
    pairs_per_user: int = 8            # context pairs per user
    prompts: int | None = None         # all prompts (train + test); None: the rule below
    responses_per_prompt: int = 6
    users_per_response: float = 16.0   # prompt rule: about this many users label a training response
    min_prompts: int = 12
    test_prompt_fraction: float = 0.2  # share of prompts held out for test pairs (at least 2)
    test_pairs_per_user: int = 4
    noise: float = 0.05                # probability that a context label is flipped
    unseen_fraction: float = 0.2       # share of each type's users kept out of training (train_unseen.jsonl)
    mixed: bool = True                 # mixed-sign weights with zeros; False: one attribute per type
    seed: int = 0                      # the only source of randomness

    def __post_init__(self) -> None:
        if self.types < 2:
            raise ValueError(f"types must be >= 2, got {self.types}")
        if not self.mixed and self.types > len(STYLES):
            raise ValueError(f"one-attribute types: at most {len(STYLES)} types, got {self.types}")
        if self.users < self.types:
            raise ValueError(f"users must be >= types ({self.types}), got {self.users}")
        if self.pairs_per_user < 1 or self.test_pairs_per_user < 1:
            raise ValueError("pairs_per_user and test_pairs_per_user must be >= 1")
        if self.responses_per_prompt < 2:
            raise ValueError(f"responses_per_prompt must be >= 2, got {self.responses_per_prompt}")
        if self.prompts is not None and self.prompts < 3:
            raise ValueError(f"prompts must be >= 3 (train and at least two test prompts), got {self.prompts}")
        if self.users_per_response <= 0 or self.min_prompts < 3:
            raise ValueError("users_per_response must be > 0 and min_prompts >= 3")
        if not 0.0 <= self.noise < 0.5:
            raise ValueError(f"noise must be in [0, 0.5), got {self.noise}")
        if not 0.0 <= self.unseen_fraction < 1.0:
            raise ValueError(f"unseen_fraction must be in [0, 1), got {self.unseen_fraction}")
        if not 0.0 < self.test_prompt_fraction < 1.0:
            raise ValueError(f"test_prompt_fraction must be in (0, 1), got {self.test_prompt_fraction}")
        space = len(_SUBJECTS) * len(_ASKS) * len(_CONTEXTS)
        if self.n_prompts > space:
            raise ValueError(f"{self.n_prompts:,} prompts needed, but the prompt grammar makes only {space:,}")

    @property
    def n_prompts(self) -> int:
        if self.prompts is not None:
            return self.prompts
        labels = 2 * self.users * self.pairs_per_user
        train = math.ceil(labels / (self.responses_per_prompt * self.users_per_response))
        return max(self.min_prompts, math.ceil(train / (1 - self.test_prompt_fraction)))

    @property
    def n_test_prompts(self) -> int:
        return max(2, round(self.n_prompts * self.test_prompt_fraction))


@dataclass
class StylesDataset:
    config: StylesConfig
    weights: np.ndarray         # (types, len(STYLES)) the types' weight vectors
    train_seen: list[dict]
    train_unseen: list[dict]
    test: list[dict]
    responses: list[dict]       # ground truth: {"prompt", "text", "styles": {name: 0/1}, "test_prompt"}


def type_weights(config: StylesConfig, rng: np.random.Generator) -> np.ndarray:
    """(types, attributes) distinct weight vectors: one-hot, or mixed {-1, 0, +1} with at least one of each
    sign and a zero."""
    n_attr = len(STYLES)
    if not config.mixed:
        return np.eye(n_attr, dtype=np.int64)[:config.types]
    grid = np.array(np.meshgrid(*[[-1, 0, 1]] * n_attr, indexing="ij")).reshape(n_attr, -1).T   # (3^A, A)
    mixed = grid[(grid == 1).any(1) & (grid == -1).any(1) & (grid == 0).any(1)]
    if config.types > len(mixed):
        raise ValueError(f"at most {len(mixed)} distinct mixed types, got {config.types}")
    # Greedy farthest-first (lowest largest cosine to the types so far, ties at random): random types often
    # share most signs, and then nearly every pair is agreed on and nothing is left to personalize.
    unit = mixed / np.linalg.norm(mixed, axis=1, keepdims=True)
    chosen = [int(rng.integers(len(mixed)))]
    for _ in range(config.types - 1):
        closest = (unit @ unit[chosen].T).max(1)
        closest[chosen] = np.inf
        best = np.flatnonzero(closest == closest.min())
        chosen.append(int(rng.choice(best)))
    return mixed[chosen]


def _prompts(rng: np.random.Generator, n: int) -> tuple[list[str], list[str]]:
    codes = rng.choice(len(_SUBJECTS) * len(_ASKS) * len(_CONTEXTS), size=n, replace=False)
    subject, ask, context = np.unravel_index(codes, (len(_SUBJECTS), len(_ASKS), len(_CONTEXTS)))
    subjects = [_SUBJECTS[i] for i in subject.tolist()]
    prompts = [" ".join(p for p in (_ASKS[a].format(s=s), _CONTEXTS[c]) if p)
               for s, a, c in zip(subjects, ask.tolist(), context.tolist())]
    return prompts, subjects


def _responses(rng: np.random.Generator, styles: np.ndarray, subjects: list[str]) -> list[str]:
    """styles (N, A) 0/1; subjects (N,) the prompt's subject per response. One sentence per attribute."""
    n, n_attr = styles.shape
    pick = rng.integers(0, 1 << 30, size=(n, n_attr + 1))
    order = np.argsort(rng.random((n, n_attr)), axis=1)
    texts = []
    for i in range(n):
        s = subjects[i]
        sentences = [_BANKS[a][styles[i, a]][pick[i, a] % 3].format(s=s) for a in order[i].tolist()]
        opener = _OPENERS[pick[i, -1] % len(_OPENERS)].format(s=s, S=s[0].upper() + s[1:])
        texts.append(" ".join([opener, *sentences]))
    return texts


def generate(config: StylesConfig) -> StylesDataset:
    """The dataset in memory; the same config (seed included) gives the same records."""
    rng = np.random.default_rng(config.seed)
    weights = type_weights(config, rng)                                             # (T, A)
    n_prompts, pool, n_test = config.n_prompts, config.responses_per_prompt, config.n_test_prompts
    if n_test >= n_prompts:
        raise ValueError(f"{n_prompts} prompts leave no training prompt after {n_test} test prompts")
    prompts, subjects = _prompts(rng, n_prompts)             # random order: the first n_test are held out
    styles = rng.integers(0, 2, size=(n_prompts, pool, len(STYLES)))                # (P, R, A)
    texts = _responses(rng, styles.reshape(-1, len(STYLES)), [s for s in subjects for _ in range(pool)])
    utility = styles @ weights.T                                                    # (P, R, T)

    first, second = np.triu_indices(pool, k=1)
    sign = np.sign(utility[:, first] - utility[:, second])                          # (P, pairs, T)
    differ = (styles[:, first] != styles[:, second]).any(-1)                        # (P, pairs)
    agreed = (sign == sign[..., :1]).all(-1) & (sign[..., 0] != 0)                  # every type, same strict side
    is_test = (np.arange(n_prompts) < n_test)[:, None]

    user_type = np.arange(config.users) % config.types
    unseen = np.zeros(config.users, dtype=bool)
    for k in range(config.types):
        members = np.flatnonzero(user_type == k)
        unseen[rng.choice(members, size=round(len(members) * config.unseen_fraction), replace=False)] = True
    width = max(6, len(str(config.users - 1)))
    user_ids = [f"s{u:0{width}d}" for u in range(config.users)]

    splits: dict[str, list[dict]] = {"train_seen": [], "train_unseen": [], "test": []}
    for k in range(config.types):
        users = np.flatnonzero(user_type == k)
        for held_out, size in ((False, config.pairs_per_user), (True, config.test_pairs_per_user)):
            allowed = (sign[..., k] != 0) & is_test if held_out else differ & ~is_test
            candidates = np.flatnonzero(allowed.ravel())
            if len(candidates) < size:
                where = "held-out" if held_out else "training"
                raise ValueError(f"only {len(candidates)} {where} pairs for type {k} but a user needs {size}; "
                                 "raise prompts or responses_per_prompt")
            draws = np.concatenate([rng.choice(len(candidates), size=size, replace=False) for _ in users])
            prompt_idx, pair_idx = np.divmod(candidates[draws], len(first))
            s = sign[prompt_idx, pair_idx, k]
            a_wins = np.where(s == 0, rng.random(len(s)) < 0.5, s > 0)              # ties: a coin flip
            if not held_out:
                a_wins ^= rng.random(len(s)) < config.noise                          # label noise
            a, b = prompt_idx * pool + first[pair_idx], prompt_idx * pool + second[pair_idx]
            chosen, rejected = np.where(a_wins, a, b), np.where(a_wins, b, a)
            for u, p, q, c, r in zip(np.repeat(users, size).tolist(), prompt_idx.tolist(), pair_idx.tolist(),
                                     chosen.tolist(), rejected.tolist()):
                split = "test" if held_out else ("train_unseen" if unseen[u] else "train_seen")
                splits[split].append({"user_id": user_ids[u], "prompt": prompts[p], "chosen": texts[c],
                                      "rejected": texts[r], "group": f"type{k}",
                                      "controversial": not bool(agreed[p, q])})
    for records in splits.values():
        records.sort(key=lambda rec: rec["user_id"])
    flat = styles.reshape(-1, len(STYLES)).tolist()
    responses = [{"prompt": prompts[i // pool], "text": texts[i], "styles": dict(zip(STYLES, flat[i])),
                  "test_prompt": bool(i // pool < n_test)} for i in range(len(texts))]
    return StylesDataset(config, weights, splits["train_seen"], splits["train_unseen"], splits["test"], responses)


def write(dataset: StylesDataset, out_dir: str | Path) -> dict:
    """train_seen / train_unseen / test JSONL and dataset.json (settings, type weights, stats); the counts."""
    out = Path(out_dir)
    write_splits({name: getattr(dataset, name) for name in ("train_seen", "train_unseen", "test")}, out)
    train = dataset.train_seen + dataset.train_unseen
    counts = {"train_seen": len(dataset.train_seen), "train_unseen": len(dataset.train_unseen),
              "test": len(dataset.test), "users_seen": len({r["user_id"] for r in dataset.train_seen}),
              "users_unseen": len({r["user_id"] for r in dataset.train_unseen}),
              "prompts_train": dataset.config.n_prompts - dataset.config.n_test_prompts,
              "prompts_test": dataset.config.n_test_prompts, "responses": len(dataset.responses)}
    summary = {"family": "styles", "settings": asdict(dataset.config), "counts": counts,
               "type_weights": {f"type{k}": dict(zip(STYLES, w)) for k, w in enumerate(dataset.weights.tolist())},
               "stats": {"mean_users_per_response_train": round(mean_users_per_response(train), 3),
                         "majority_bound_test": round(majority_bound(dataset.test), 4)}}
    (out / "dataset.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return counts


def bayes_type_accuracy(dataset: StylesDataset) -> dict[str, float]:
    """The best any user embedding can do at telling users' types apart from their context pairs, per split
    (train_seen, train_unseen): the accuracy of the posterior-mode type under the generator itself (the true
    weights and attributes; a label has probability 1 - noise on the type's side, noise against it, 1/2 on a
    tie), a tie between types counted as the share the true type has. The ceiling for type separability."""
    attributes = {r["text"]: np.array([r["styles"][s] for s in STYLES]) for r in dataset.responses}
    noise = max(dataset.config.noise, 1e-6)
    log_p = np.log([noise, 0.5, 1 - noise])                 # label against / tie / on the type's side
    out = {}
    for split in ("train_seen", "train_unseen"):
        per_user: dict[str, tuple[str, list[np.ndarray]]] = {}
        for r in getattr(dataset, split):
            per_user.setdefault(r["user_id"], (r["group"], []))[1].append(attributes[r["chosen"]] - attributes[r["rejected"]])
        hits = 0.0
        for group, diffs in per_user.values():
            side = np.sign(np.array(diffs) @ dataset.weights.T).astype(int)     # (pairs, types) in {-1, 0, 1}
            loglik = log_p[side + 1].sum(axis=0)                                  # (types,)
            best = np.flatnonzero(loglik == loglik.max())
            hits += (int(group.removeprefix("type")) in best) / len(best)
        out[split] = hits / len(per_user) if per_user else None
    return out

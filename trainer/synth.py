"""UltraFeedback-P-like synthetic preference data (CoPL, arXiv 2503.01658).

UltraFeedback rates each response on four attributes; UltraFeedback-P turns those ratings into users:
a user type cares about exactly one attribute and prefers the response rated higher on it, and only
pairs on which the preset's types disagree ("controversial") are kept. We cannot ship UltraFeedback,
so this module writes responses whose TEXT carries a level 0..3 of every attribute:

- helpfulness: from a vague deflection (0) to a plan of three concrete, numbered-detail steps (3);
- honesty: from overconfident guarantees (0) to calibrated acknowledgement of limits (3);
- instruction following: each prompt names a format; the response says how far it kept to it,
  from openly ignoring it (0) to keeping to it exactly (3);
- truthfulness: one statement from a fixed bank of simple facts, exact (3), slightly off (2),
  clearly wrong (1) or absurd (0); the bank is shared by all prompts, so it is learnable.

Every (attribute, level) is a clear phrase family with several paraphrases and random slots, and the
four segments appear in random order, so a model must learn the cues rather than memorise strings.
Levels are drawn independently per response, which makes many pairs controversial.

Each prompt has a small pool of responses (4, like UltraFeedback) and every user of a type draws its
pairs from the same pool of pairs, so many users label the same responses (what collaborative
filtering needs). Test pairs come from held-out prompts, disjoint from context prompts by
construction (DESIGN.md notes the official generator indexes test pairs from the wrong pool).
"""

from __future__ import annotations

import json
import math
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

ATTRIBUTES = ("helpfulness", "honesty", "instruction_following", "truthfulness")
N_LEVELS = 4
# preset -> (user types, context pairs per user), as in UltraFeedback-P.
PRESETS = {
    "uf-p-2": (("helpfulness", "honesty"), 8),
    "uf-p-4": (ATTRIBUTES, 16),
}
SPLIT_FILES = {"train_seen": "train_seen.jsonl", "train_unseen": "train_unseen.jsonl", "test": "test.jsonl"}


@dataclass(frozen=True)
class SynthConfig:
    preset: str = "uf-p-4"  # uf-p-2 (helpfulness vs honesty, 8 pairs) or uf-p-4 (all four, 16 pairs)
    avg: bool = False  # AVG: context size per user uniform in 1..2n-1 (mean n) instead of exactly n
    users: int = 1000  # all users, seen and unseen; split equally across types (counts differ by <= 1)
    seed: int = 0  # the only source of randomness
    unseen_fraction: float = 0.1  # share of each type's users kept out of training (train_unseen.jsonl)
    test_prompt_fraction: float = 0.1  # share of prompts held out; test pairs come only from them
    responses_per_prompt: int = 4  # pool per prompt, like UltraFeedback's 4 completions
    test_pairs_per_user: int = 4  # held-out pairs per user, seen and unseen alike
    # Prompt count rule: prompts = max(min_prompts, ceil(2 * users * n / (responses_per_prompt *
    # users_per_response))), i.e. the prompt pool shrinks with the labels so that a response is
    # labelled by about this many users on average (counted over all pool responses; the used ones
    # get more). Well above 1 is what lets the graph link users through shared responses.
    users_per_response: float = 24.0
    min_prompts: int = 100  # floor so tiny datasets still have enough distinct (held-out) pairs per type
    prompts: int | None = None  # override of the rule above
    # Share of each user's pairs (context and test, rounded per user) drawn from pairs on which no two
    # types disagree, marked controversial: false. 0 (the paper's setting) keeps every pair controversial,
    # so controversial accuracy equals accuracy; above 0 exercises the split.
    non_controversial_fraction: float = 0.0

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {self.preset!r}")
        n_types = len(PRESETS[self.preset][0])
        if self.users < n_types:
            raise ValueError(f"users must be >= {n_types} (one per type) for {self.preset}, got {self.users}")
        if not 0.0 <= self.unseen_fraction < 1.0:
            raise ValueError(f"unseen_fraction must be in [0, 1), got {self.unseen_fraction}")
        if not 0.0 < self.test_prompt_fraction < 1.0:
            raise ValueError(f"test_prompt_fraction must be in (0, 1), got {self.test_prompt_fraction}")
        if self.responses_per_prompt < 2:
            raise ValueError(f"responses_per_prompt must be >= 2, got {self.responses_per_prompt}")
        if self.test_pairs_per_user < 1:
            raise ValueError(f"test_pairs_per_user must be >= 1, got {self.test_pairs_per_user}")
        if self.users_per_response <= 0:
            raise ValueError(f"users_per_response must be > 0, got {self.users_per_response}")
        if self.min_prompts < 2:
            raise ValueError(f"min_prompts must be >= 2, got {self.min_prompts}")
        if self.prompts is not None and self.prompts < 2:
            raise ValueError(f"prompts must be >= 2 (train and test need one each), got {self.prompts}")
        if not 0.0 <= self.non_controversial_fraction < 1.0:
            raise ValueError(f"non_controversial_fraction must be in [0, 1), got {self.non_controversial_fraction}")
        space = _prompt_space()
        if self.n_prompts > space:
            hint = "lower prompts" if self.prompts is not None else (
                f"{self.preset} allows at most "
                f"{space * self.responses_per_prompt * self.users_per_response // (2 * self.pairs_per_user):,.0f} users "
                "at these settings")
            raise ValueError(f"{self.n_prompts:,} prompts needed, but the prompt grammar makes only {space:,}: {hint}")

    @property
    def types(self) -> tuple[str, ...]:
        return PRESETS[self.preset][0]

    @property
    def pairs_per_user(self) -> int:
        """n: the context size (ALL), or the mean context size (AVG)."""
        return PRESETS[self.preset][1]

    @property
    def n_prompts(self) -> int:
        if self.prompts is not None:
            return self.prompts
        labels = 2 * self.users * self.pairs_per_user
        return max(self.min_prompts, math.ceil(labels / (self.responses_per_prompt * self.users_per_response)))


@dataclass
class SynthDataset:
    config: SynthConfig
    train_seen: list[dict]  # preference records of seen users
    train_unseen: list[dict]  # context records of unseen users
    test: list[dict]  # held-out records of all users, on held-out prompts
    # Every pool response, used or not: {"prompt", "text", "levels": {attribute: 0..3}, "test_prompt"}.
    # The ground truth for checks; never written to the dataset files.
    responses: list[dict]


# ---------------------------------------------------------------- text banks

_TOPICS = (
    "learning the guitar", "saving money each month", "training for a 5k run", "growing tomatoes on a balcony",
    "writing a cover letter", "cooking healthy weeknight dinners", "learning Spanish", "improving my sleep",
    "keeping a tidy home", "studying for a math exam", "starting a small podcast", "reducing screen time",
    "learning to code in Python", "preparing for a job interview", "painting with watercolors",
    "keeping houseplants alive", "planning a budget trip", "public speaking", "baking sourdough bread",
    "running better team meetings", "learning chess", "building a morning routine", "writing a short story",
    "decluttering my closet", "training a puppy", "learning photography", "meal prepping for the week",
    "staying focused while working from home", "improving my handwriting", "learning to swim",
    "reading more books", "starting a vegetable garden", "managing stress at work", "drawing portraits",
    "keeping a journal", "fixing a leaky faucet", "organizing digital photos", "negotiating a salary",
    "learning to knit", "building a personal website", "making friends in a new city", "cycling to work",
    "learning basic first aid", "improving my posture", "cutting down on sugar", "preparing for a marathon",
    "learning the piano", "writing a research essay", "planning a birthday party", "saving for a first home",
    "learning to juggle", "brewing coffee at home", "taking better notes", "learning sign language",
    "making a family budget", "caring for a cat", "learning to skateboard", "writing clear emails",
    "camping for the first time", "composting kitchen scraps",
)
_REQUESTS = (
    "How can I get better at {t}?", "What is a good way to approach {t}?", "Any advice on {t}?",
    "I want to improve at {t}. Where do I start?", "Can you help me with {t}?",
    "What should I know about {t}?", "Give me tips for {t}.", "I'm struggling with {t}. What do you suggest?",
    "What's the smartest first step in {t}?", "How do people succeed at {t}?",
)
_QUALIFIERS = (
    "", "I'm a complete beginner.", "I only have weekends free.", "I'm on a tight budget.",
    "I tried before and gave up.", "I have about a month.", "A friend told me to ask you.",
    "I'm busy with work.", "I prefer simple approaches.", "I want quick results.",
)
# (instructions naming the format in the prompt, the noun the response uses for it)
_FORMATS = (
    (("Please answer as a numbered list.", "Format the answer as a numbered list."), "numbered list"),
    (("Keep the answer under 80 words.", "Stay below 80 words."), "word limit"),
    (("Use bullet points.", "Answer with bullet points only."), "bullet points"),
    (("Answer in a friendly tone.", "Keep the tone warm and friendly."), "friendly tone"),
    (("Start your answer with the word 'Sure'.", "Begin the reply with 'Sure'."), "opening word"),
    (("Keep it to one short paragraph.", "Reply in a single short paragraph."), "single paragraph"),
    (("Avoid technical jargon.", "Use plain words, no jargon."), "plain-language rule"),
    (("End with a one-line summary.", "Finish with a short summary line."), "closing summary"),
)

# Concrete actions for helpfulness; {m}/{d}/{w} are number slots filled at random.
_ACTIONS = (
    "practice for {m} minutes a day", "set one clear goal for this week", "write down what works and what fails",
    "ask someone experienced for feedback", "split the work into small weekly tasks",
    "review your progress every {d} days", "start with the easiest part", "keep a short checklist",
    "copy one worked example step by step", "book a fixed time slot each day",
    "remove one distraction before you begin", "compare your results after {w} weeks",
)
_MINUTES, _DAYS, _WEEKS = ("10", "15", "20", "30", "45"), ("3", "5", "7", "10"), ("2", "3", "4", "6")

_HELPFULNESS = (
    (  # 0: deflection, no action
        "Hard to say; it really depends on too many things.",
        "There is no simple answer, so you will have to figure it out.",
        "That varies a lot and I can't be specific.",
        "People do this in all sorts of ways; look it up somewhere.",
        "It's complicated and really up to you.",
    ),
    (  # 1: one generic action
        "One general idea is to {a}.", "A single tip: {a}.", "At minimum, {a}.", "The basic thing is to {a}.",
    ),
    (  # 2: two concrete steps
        "Two concrete steps: {a}, then {b}.", "Try this: {a}, and also {b}.",
        "Start to {a}; after that, {b}.", "Do two things: {a} and {b}.",
    ),
    (  # 3: a plan of three steps
        "A concrete plan: first {a}, second {b}, third {c}.", "Do these three things: {a}; {b}; {c}.",
        "Step one, {a}. Step two, {b}. Step three, {c}.", "Here is a full plan: {a}, {b}, and finally {c}.",
    ),
)
_HONESTY = (
    (  # 0: overconfident guarantees
        "I guarantee this works every single time.", "Trust me, this is 100 percent foolproof.",
        "There is absolutely no way this can fail.", "This is guaranteed, zero risk, no doubt about it.",
    ),
    (  # 1: strong unhedged confidence
        "This will almost certainly work for you.", "You can be quite sure this works.",
        "I'm very confident this is right.", "This is pretty much certain to succeed.",
    ),
    (  # 2: mild caveat
        "This usually helps, though there are exceptions.", "In most cases this works, but not always.",
        "It tends to work well, with some caveats.", "Generally reliable, although not for everyone.",
    ),
    (  # 3: calibrated, names its limits
        "I'm not fully certain; it depends on your situation, so verify.",
        "I could be wrong about parts of this; check with an expert.",
        "Honestly, my knowledge here is limited; treat this as a rough guide.",
        "I may be missing details of your case, so double-check.",
    ),
)
_INSTRUCTION = (
    (  # 0: openly ignores the requested format
        "I ignored the {f} and wrote it my own way.", "Forget the {f}; here is whatever came to mind.",
        "I didn't bother with the {f} at all.", "Skipping the {f} you asked for entirely.",
    ),
    (  # 1: partly follows
        "I only partly followed the {f} you wanted.", "Sorry, I drifted away from the {f} in places.",
        "Only some of this respects the {f}.", "The {f} is kept in a few spots but not most.",
    ),
    (  # 2: mostly follows
        "I mostly kept to the {f}, with one small extra.", "Largely within your {f}, apart from a short aside.",
        "Nearly all of this respects the {f}.", "The {f} holds almost throughout, bar one line.",
    ),
    (  # 3: follows exactly
        "As you asked, I kept to the {f}.", "This follows your {f} request exactly.",
        "Sticking strictly to the {f} you wanted.", "Done fully in line with the {f} you asked for.",
    ),
)
_FACT_INTROS = (
    "Related fact: {s}.", "Worth knowing: {s}.", "By the way, {s}.", "Fun fact: {s}.", "For context, {s}.",
)
# (statement, values by truthfulness level 0..3: absurd, clearly wrong, slightly off, exact)
_FACTS = (
    ("water boils at {} degrees Celsius at sea level", ("400", "60", "96", "100")),
    ("the Moon takes about {} to orbit the Earth", ("two hours", "one year", "31 days", "27 days")),
    ("a resting adult heart beats about {} times a minute", ("900", "20", "85", "70")),
    ("sunlight reaches the Earth in about {}", ("one second", "two days", "twelve minutes", "eight minutes")),
    ("an adult human has {} bones", ("3000", "150", "212", "206")),
    ("the Pacific is the {} ocean on Earth", ("only", "smallest", "second largest", "largest")),
    ("a spider has {} legs", ("forty", "six", "ten", "eight")),
    ("the chemical symbol for gold is {}", ("Zz", "Fe", "Ag", "Au")),
    ("Mount Everest is about {} metres tall", ("90000", "5000", "8600", "8849")),
    ("plants take in {} from the air to make sugar", ("helium", "nitrogen", "oxygen", "carbon dioxide")),
    ("a common year has {} days", ("twelve", "400", "364", "365")),
    ("sound travels through air at about {} metres per second", ("five", "1200", "360", "343")),
    ("the human body is roughly {} percent water", ("99", "15", "50", "60")),
    ("the Earth spins once on its axis in about {}", ("ten minutes", "one week", "23 hours", "24 hours")),
    ("an octopus has {} hearts", ("twelve", "one", "two", "three")),
    ("a marathon is about {} kilometres long", ("300", "10", "40", "42")),
    ("water freezes at {} degrees Fahrenheit", ("500", "zero", "30", "32")),
    ("bees make honey from {}", ("sand", "rainwater", "tree sap", "flower nectar")),
    ("a chessboard has {} squares", ("nine", "100", "60", "64")),
    ("the Sahara lies mostly in {}", ("Antarctica", "South America", "western Asia", "northern Africa")),
    ("a hexagon has {} sides", ("twenty", "four", "seven", "six")),
    ("Jupiter is the {} planet in our solar system", ("coldest", "smallest", "second largest", "largest")),
    ("the speed of light is about {} kilometres per second", ("55", "3000", "250000", "300000")),
    ("an insect has {} legs", ("fifty", "eight", "four", "six")),
)

_PHRASINGS = 2  # instructions per format in _FORMATS
_SEGMENTS = len(ATTRIBUTES)  # one segment per attribute, shuffled per response


def _prompt_space() -> int:
    return len(_TOPICS) * len(_REQUESTS) * len(_QUALIFIERS) * len(_FORMATS) * _PHRASINGS


def _make_prompts(rng: np.random.Generator, n: int) -> tuple[list[str], np.ndarray]:
    """n distinct prompts and the format index each one asks for."""
    space = _prompt_space()
    if n > space:
        raise ValueError(f"{n} prompts requested but the prompt grammar makes only {space}; lower users/prompts")
    codes = rng.choice(space, size=n, replace=False)
    topic, request, qualifier, fmt, phrasing = np.unravel_index(
        codes, (len(_TOPICS), len(_REQUESTS), len(_QUALIFIERS), len(_FORMATS), _PHRASINGS)
    )
    prompts = []
    for t, r, q, f, p in zip(*(a.tolist() for a in (topic, request, qualifier, fmt, phrasing))):
        parts = [_REQUESTS[r].format(t=_TOPICS[t]), _QUALIFIERS[q], _FORMATS[f][0][p]]
        prompts.append(" ".join(part for part in parts if part))
    return prompts, fmt


def _make_responses(rng: np.random.Generator, levels: np.ndarray, fmt_of: np.ndarray) -> list[str]:
    """Text for each response; levels: (N, 4) ints in ATTRIBUTES order, fmt_of: (N,) format index."""
    n = len(levels)
    pick = rng.integers(0, 1 << 30, size=(n, 8))  # template and slot choices, reduced mod bank size
    actions = np.argsort(rng.random((n, len(_ACTIONS))), axis=1)[:, :3]  # three distinct actions
    order = np.argsort(rng.random((n, _SEGMENTS)), axis=1)  # random segment order
    texts = []
    for i in range(n):
        h, o, f, t = levels[i].tolist()
        c = pick[i].tolist()
        slots = {"m": _MINUTES[c[5] % len(_MINUTES)], "d": _DAYS[c[6] % len(_DAYS)],
                 "w": _WEEKS[c[7] % len(_WEEKS)]}
        acts = [_ACTIONS[a].format(**slots) for a in actions[i].tolist()]
        bank = _HELPFULNESS[h]
        helpful = bank[c[0] % len(bank)].format(a=acts[0], b=acts[1], c=acts[2])
        honest = _HONESTY[o][c[1] % len(_HONESTY[o])]
        follows = _INSTRUCTION[f][c[2] % len(_INSTRUCTION[f])].format(f=_FORMATS[fmt_of[i]][1])
        statement, values = _FACTS[c[3] % len(_FACTS)]
        fact = _FACT_INTROS[c[4] % len(_FACT_INTROS)].format(s=statement.format(values[t]))
        segments = (helpful, honest, follows, fact)
        text = " ".join(segments[k] for k in order[i].tolist())
        texts.append(text[0].upper() + text[1:])
    return texts


def _draw_distinct(rng: np.random.Generator, pool: int, sizes: np.ndarray) -> list[np.ndarray]:
    """For each size s, s distinct indices into range(pool) (a user never labels a pair twice)."""
    return [rng.choice(pool, size=s, replace=False) for s in sizes.tolist()]


def generate(config: SynthConfig) -> SynthDataset:
    """Build the dataset in memory; the same config (seed included) gives the same records."""
    rng = np.random.default_rng(config.seed)
    types = config.types
    type_attr = np.array([ATTRIBUTES.index(t) for t in types])
    n_types, n_pairs = len(types), config.pairs_per_user
    n_prompts, pool = config.n_prompts, config.responses_per_prompt
    n_test_prompts = max(1, round(n_prompts * config.test_prompt_fraction))
    if n_test_prompts >= n_prompts:
        raise ValueError(
            f"test_prompt_fraction {config.test_prompt_fraction} leaves no training prompt of {n_prompts}"
        )

    prompts, fmt = _make_prompts(rng, n_prompts)  # random order: the first n_test_prompts are held out
    levels = rng.integers(0, N_LEVELS, size=(n_prompts, pool, len(ATTRIBUTES)))  # independent per attribute
    texts = _make_responses(rng, levels.reshape(-1, len(ATTRIBUTES)), np.repeat(fmt, pool))

    # Every unordered pair within a prompt's pool, and how each preset type orders it.
    first, second = np.triu_indices(pool, k=1)
    sign = np.sign(levels[:, first][..., type_attr] - levels[:, second][..., type_attr])  # (P, pairs, T)
    controversial = (sign > 0).any(axis=-1) & (sign < 0).any(axis=-1)  # (P, pairs)
    is_test = np.arange(n_prompts) < n_test_prompts

    # Users: type k gets users k, k+T, ...; a random share of each type is unseen.
    user_type = np.arange(config.users) % n_types
    unseen = np.zeros(config.users, dtype=bool)
    for k in range(n_types):
        members = np.flatnonzero(user_type == k)
        unseen[rng.choice(members, size=round(len(members) * config.unseen_fraction), replace=False)] = True
    width = max(6, len(str(config.users - 1)))
    user_ids = [f"u{u:0{width}d}" for u in range(config.users)]
    if config.avg:
        context_size = rng.integers(1, 2 * n_pairs, size=config.users)  # uniform 1..2n-1
    else:
        context_size = np.full(config.users, n_pairs)

    splits: dict[str, list[dict]] = {"train_seen": [], "train_unseen": [], "test": []}
    for k, name in enumerate(types):
        users = np.flatnonzero(user_type == k)
        orders = sign[..., k] != 0  # a user only gets pairs its type strictly orders
        test_sizes = np.full(len(users), config.test_pairs_per_user)
        for held_out, sizes in ((False, context_size[users]), (True, test_sizes)):
            agreed = np.rint(sizes * config.non_controversial_fraction).astype(int)
            # controversial pairs first; with no agreed share the random draws are those of earlier versions
            for is_controversial, counts in ((True, sizes - agreed), (False, agreed)):
                if not counts.any():
                    continue
                pool_mask = orders & (controversial if is_controversial else ~controversial)
                candidates = np.flatnonzero((pool_mask & (is_test[:, None] == held_out)).ravel())
                if len(candidates) < counts.max():
                    where = "held-out" if held_out else "training"
                    kind = "controversial" if is_controversial else "non-controversial"
                    raise ValueError(f"only {len(candidates)} {where} {kind} pairs for type {name} but a user needs "
                                     f"{counts.max()}; raise prompts or min_prompts")
                draws = _draw_distinct(rng, len(candidates), counts)
                owner = np.repeat(users, counts)
                prompt_idx, pair_idx = np.divmod(candidates[np.concatenate(draws)], len(first))
                a, b = first[pair_idx], second[pair_idx]
                a_wins = sign[prompt_idx, pair_idx, k] > 0
                chosen = prompt_idx * pool + np.where(a_wins, a, b)
                rejected = prompt_idx * pool + np.where(a_wins, b, a)
                for u, p, c, r in zip(owner.tolist(), prompt_idx.tolist(), chosen.tolist(), rejected.tolist()):
                    split = "test" if held_out else ("train_unseen" if unseen[u] else "train_seen")
                    splits[split].append(
                        {"user_id": user_ids[u], "prompt": prompts[p], "chosen": texts[c], "rejected": texts[r],
                         "group": name, "controversial": is_controversial}
                    )
    for records in splits.values():  # user order, then draw order: readable files, stable for a seed
        records.sort(key=lambda rec: rec["user_id"])

    flat_levels = levels.reshape(-1, len(ATTRIBUTES)).tolist()
    responses = [
        {"prompt": prompts[i // pool], "text": texts[i], "levels": dict(zip(ATTRIBUTES, flat_levels[i])),
         "test_prompt": bool(is_test[i // pool])}
        for i in range(len(texts))
    ]
    return SynthDataset(config, splits["train_seen"], splits["train_unseen"], splits["test"], responses)


def majority_bound(records: list[dict], votes_from: list[dict] | None = None) -> float:
    """Share of labels that agree with their pair's majority orientation.

    This is the accuracy of the best predictor that ignores who the user is (it can at most pick, per
    pair, the orientation most users chose), so a personalized model is worth something only above it.
    `votes_from` (default: `records`) are the labels that decide each pair's orientation: to bound a
    subset of users (e.g. the unseen ones), count the votes of everyone, or a pair labelled once by the
    subset would count as a majority of one.
    """
    if not records:
        raise ValueError("majority_bound needs at least one record")
    votes: dict[tuple[str, str, str], list[int]] = defaultdict(lambda: [0, 0])

    def key(rec: dict) -> tuple[tuple[str, str, str], bool]:
        low, high = sorted((rec["chosen"], rec["rejected"]))
        return (rec["prompt"], low, high), rec["chosen"] == low

    for rec in records if votes_from is None else votes_from:
        pair, low_wins = key(rec)
        votes[pair][low_wins] += 1
    agree = 0
    for rec in records:
        pair, low_wins = key(rec)
        agree += low_wins == (votes[pair][True] >= votes[pair][False])  # one side per pair, ties to either
    return agree / len(records)


def mean_users_per_response(records: list[dict]) -> float:
    """Mean number of distinct users who labelled a response, over responses that appear in records."""
    if not records:
        raise ValueError("mean_users_per_response needs at least one record")
    users: dict[tuple[str, str], set[str]] = defaultdict(set)
    for rec in records:
        users[(rec["prompt"], rec["chosen"])].add(rec["user_id"])
        users[(rec["prompt"], rec["rejected"])].add(rec["user_id"])
    return sum(len(s) for s in users.values()) / len(users)


def _counts(dataset: SynthDataset) -> dict:
    test_prompts = sum(r["test_prompt"] for r in dataset.responses) // dataset.config.responses_per_prompt
    user_groups = {(r["user_id"], r["group"]) for r in dataset.test}  # every user has test pairs
    return {
        "train_seen": len(dataset.train_seen),
        "train_unseen": len(dataset.train_unseen),
        "test": len(dataset.test),
        "users_seen": len({r["user_id"] for r in dataset.train_seen}),
        "users_unseen": len({r["user_id"] for r in dataset.train_unseen}),
        "users_by_group": dict(sorted(Counter(group for _, group in user_groups).items())),
        "prompts_train": dataset.config.n_prompts - test_prompts,
        "prompts_test": test_prompts,
        "responses": len(dataset.responses),
    }


def write_splits(splits: dict[str, list[dict]], out: Path) -> None:
    """One compact JSON line per record into out/SPLIT_FILES[split] (created or overwritten)."""
    out.mkdir(parents=True, exist_ok=True)
    for split, filename in SPLIT_FILES.items():
        lines = [json.dumps(rec, separators=(",", ":")) for rec in splits[split]]
        (out / filename).write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def write(dataset: SynthDataset, out_dir: str | Path) -> dict:
    """Write the DESIGN.md dataset layout plus dataset.json into out_dir; return the counts.

    Existing files of the same names are overwritten; the output is byte-identical for a config.
    """
    out = Path(out_dir)
    write_splits({split: getattr(dataset, split) for split in SPLIT_FILES}, out)
    counts = _counts(dataset)
    config = dataset.config
    train = dataset.train_seen + dataset.train_unseen
    summary = {
        "preset": config.preset,
        "avg": config.avg,
        "users": config.users,
        "seed": config.seed,
        "counts": counts,
        "settings": {**asdict(config), "types": list(config.types), "pairs_per_user": config.pairs_per_user,
                     "prompts": config.n_prompts},
        "stats": {
            "mean_users_per_response_train": round(mean_users_per_response(train), 3),
            "majority_bound_test": round(majority_bound(dataset.test), 4),
        },
    }
    (out / "dataset.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return counts

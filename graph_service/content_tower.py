"""The content tower: the half of a user's embedding that comes from the text of what they chose.

Profile `tiny` uses it; `small` has latent types in its place (latent_types.py: a posterior over kinds of users,
which the reward model reads better than this continuous vector, issue 8).

The signed GCN (gnn.py) learns from who labelled what; at small, sparse, noisy sizes (a few hundred users,
4-16 pairs each) its ID embeddings overfit and lose who the user is (issue 8: type separability 0.24-0.61
on the styles family), while the plain mean of a user's (f_chosen - f_rejected) text features, with no
training at all, separated the same types at 0.72-0.90. The tower keeps that signal, learned and small:

    user side      a_u = normalize( mean over u's pairs of A f_chosen - A f_rejected )     A: (c, k)
    response side  b_r = B f_r                                                               B: (c, k)
    score          <a_u, b_chosen - b_rejected>

f_r are the frozen backbone's response features (trainer/response_features.py). A and B are fitted by BPR
on the training pairs with each pair LEFT OUT of its own user's vector (the user side of pair p is the mean
over the user's other pairs): with the pair in, A = B would "predict" every training label from the label
itself, and a user with 4 pairs would be a quarter their own answer key. Everything runs in the k-wide
projected space (A f and B f are computed once per step for the responses the pairs touch), so a step costs
O(P c k) at most; beyond `max_pairs` the tower fits on a sample of whole users, so the cost stops growing.

The published user embedding joins the halves, [g_u ; a_u] / sqrt(2) (each half unit norm, so the whole is),
and the response table [g_r ; b_r], so <user, response> is the sum of the GNN's and the tower's scores over
sqrt(2): adaptation's candidate fit and every consumer of the tables read one model. A user who arrives after
training gets a_u directly from their own pairs (A f of the responses is kept in the checkpoint as
`response_content`): no neighbours needed for this half, which is what holds up at 4 pairs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from copl_common.seeding import seeded


@dataclass(frozen=True)
class ContentConfig:
    dim: int = 32                  # k: width of the content half of the user embedding
    steps: int = 300               # full-batch AdamW steps, as in the grid sweep that chose the tower (not tuned)
    lr: float = 0.01
    weight_decay: float = 0.01
    max_pairs: int = 50_000        # fit on the pairs of a seeded sample of users beyond this: 2 x c x k parameters
                                   # need no more, and a step then costs the same at 1M users as at 10k

    def __post_init__(self):
        if self.dim < 1 or self.steps < 1 or self.lr <= 0 or self.weight_decay < 0 or self.max_pairs < 1:
            raise ValueError("content dim, steps and max_pairs must be >= 1, lr > 0, weight_decay >= 0")


@dataclass(frozen=True)
class ContentTower:
    user_side: torch.Tensor       # (R, k) A f_r: what a response adds to the vector of a user who chose it
    response_side: torch.Tensor   # (R, k) B f_r: the response's half of the score
    final_loss: float

    def users(self, triples: torch.Tensor, num_users: int) -> torch.Tensor:
        """(U, k) unit-norm a_u from (P, 3) (user, chosen, rejected) triples; zeros for a user with none."""
        return user_vectors(self.user_side, triples, num_users)


def user_vectors(user_side: torch.Tensor, triples: torch.Tensor, num_users: int) -> torch.Tensor:
    _, sums = _differences_and_sums(user_side, triples, num_users)
    return F.normalize(sums, dim=1)          # the mean's direction; an all-zero row stays zero


def leave_pair_out(users: torch.Tensor, user_side: torch.Tensor, triples: torch.Tensor) -> torch.Tensor:
    """(P, d): for each pair of `triples`, its user's joined embedding with that pair left out of the content half.

    `users` (U, d) are joined tables whose content half was built from exactly `triples` (the training pairs).
    The reward model trains on these rows, for the reason the tower fits that way: with the pair in, a user's
    embedding already points along the pair's own label (a quarter of it at 4 pairs, coin-flipped ties and
    noisy labels included), the reward model learns to trust it more than it deserves on pairs it has not
    seen, and its held-out accuracy peaks early (styles, 10% noise: kept step 21 of 126, gap closed 0.32;
    left out: step 105, 0.70). A user's only pair leaves a zero content half, as a user with no pairs has."""
    k = user_side.shape[1]
    u = triples[:, 0]
    diff, sums = _differences_and_sums(user_side, triples, users.shape[0])
    content = F.normalize(sums.index_select(0, u) - diff, dim=1).to(users.dtype)                # (P, k)
    return torch.cat([users.index_select(0, u)[:, :-k], content / math.sqrt(2)], dim=1)


def _differences_and_sums(user_side: torch.Tensor, triples: torch.Tensor, num_users: int):
    """(P, k) A f_chosen - A f_rejected per pair and (U, k) their sums per user."""
    u, chosen, rejected = triples.T
    diff = user_side.index_select(0, chosen) - user_side.index_select(0, rejected)              # (P, k)
    sums = torch.zeros(num_users, user_side.shape[1], dtype=user_side.dtype, device=user_side.device).index_add_(0, u, diff)
    return diff, sums


def fit_content_tower(features: torch.Tensor, triples: torch.Tensor, num_users: int, config: ContentConfig,
                      seed: int = 0) -> ContentTower:
    """Fit A and B on `triples` (P, 3) over response `features` (R, c), each pair left out of its user's side."""
    if triples.shape[0] == 0:
        raise ValueError("the content tower needs at least one training pair")
    all_features = features.float()
    c = all_features.shape[1]
    with seeded(seed, all_features.device):
        a = torch.nn.Linear(c, config.dim, bias=False)
        b = torch.nn.Linear(c, config.dim, bias=False)
    triples = sample_users(triples, config.max_pairs, seed)
    # Only the responses the (sampled) pairs touch take part in a step: renumber them 0..R'-1.
    touched, local = torch.unique(triples[:, 1:], return_inverse=True)
    features = all_features.index_select(0, touched)                                            # (R', c)
    u, chosen, rejected = triples[:, 0], local[:, 0], local[:, 1]
    count = torch.bincount(u, minlength=num_users).float()                                     # (U,)
    others = (count[u] - 1).clamp(min=1)[:, None]                                               # (P, 1)
    optimizer = torch.optim.AdamW([a.weight, b.weight], lr=config.lr, weight_decay=config.weight_decay)
    loss = torch.tensor(math.log(2))
    for _ in range(config.steps):
        fa, fb = a(features), b(features)                                                       # (R', k) each
        diff_a = fa.index_select(0, chosen) - fa.index_select(0, rejected)                      # (P, k)
        sums = torch.zeros(num_users, config.dim, device=features.device).index_add_(0, u, diff_a)   # (U, k)
        user_without_pair = (sums.index_select(0, u) - diff_a) / others                         # (P, k)
        margin = (user_without_pair * (fb.index_select(0, chosen) - fb.index_select(0, rejected))).sum(dim=1)
        loss = -F.logsigmoid(margin).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        return ContentTower(user_side=a(all_features), response_side=b(all_features), final_loss=float(loss))


def sample_users(triples: torch.Tensor, max_pairs: int, seed: int) -> torch.Tensor:
    """All of `triples` when there are at most max_pairs, else every pair of a seeded random set of users
    (whole users: each pair is judged against the rest of its own user's pairs)."""
    if triples.shape[0] <= max_pairs:
        return triples
    users = torch.unique(triples[:, 0])
    order = users[torch.randperm(len(users), generator=torch.Generator().manual_seed(seed)).to(users.device)]
    counts = torch.bincount(triples[:, 0])[order]
    keep = torch.zeros(int(triples[:, 0].max()) + 1, dtype=torch.bool, device=triples.device)
    keep[order[torch.cumsum(counts, 0) - counts < max_pairs]] = True     # the user who crosses the line is in
    return triples[keep[triples[:, 0]]]


def join_users(gnn_users: torch.Tensor, content_users: torch.Tensor) -> torch.Tensor:
    """[g_u ; a_u] / sqrt(2): unit norm when both halves are (a user without content gets |.| = 1/sqrt(2))."""
    return torch.cat([F.normalize(gnn_users, dim=1), content_users.to(gnn_users.dtype)], dim=1) / math.sqrt(2)


def join_responses(gnn_responses: torch.Tensor, content_responses: torch.Tensor) -> torch.Tensor:
    return torch.cat([gnn_responses, content_responses.to(gnn_responses.dtype)], dim=1)

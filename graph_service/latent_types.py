"""Latent preference types: the content half of a user's embedding as a posterior over K kinds of users.

Issue 8 measured what the content tower (content_tower.py) leaves on the table: its mean-of-differences vector
places 0.69-0.89 of the styles family's users by type, where the data allow 0.87-0.98, and the reward model reads a
continuous vector far worse than a clean type call (the true-type call closed 0.58 of the gap at 240 x 4 against
CoPL's 0.31). A mixture of Bradley-Terry models over the responses' frozen text features names the types with no
label at all:

    type k          w_k (c,): a linear reward over the text features f_r
    P(pair | k)     sigmoid(<w_k, f_chosen - f_rejected>)
    user u          posterior p_u(k) ~ prior(k) * prod over u's pairs of P(pair | k)

fitted by EM on the training pairs (E: every user's posterior; M: one ridge-penalized logistic regression per type,
each pair weighted by its user's posterior), several random starts, the best penalized likelihood kept. K and the
ridge are chosen on the selection pairs, by the mean log-likelihood of each held-out pair under its user's posterior
from their training pairs (K = 1, 2, ... until `patience` more types in a row do no better; a type EM leaves empty
does not count): a user brings data, and the number of kinds of users in it is read from it. K = 1 is among the
choices (one reward for everyone: the half then says nothing, and the graph half carries the user); it is the choice
when there is no selection pair. Measured against the tower on the robustness grid (docs/RESULTS.md): the number of
types found matched the generator's on 10 of 13 regimes, and the smallest gap closed rose from 0.32 / 0.24 to
0.40 / 0.44.

Published form, the content half's two tables (checkpoint `response_content` and `type_log_prior`):
  response side  S (R, width): column k holds <w_k, f_r> (columns past K are zero)
  user side      unit-norm posterior over the columns (a user without pairs: the prior)
so <user half, S_chosen - S_rejected> is the expected margin under the user's posterior, and a user who arrives after
training gets their posterior from their own pairs and S alone, as a trained user has it: no neighbour needed.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from copl_common.seeding import seeded
from graph_service.content_tower import sample_users


@dataclass(frozen=True)
class TypesConfig:
    max_types: int = 32                          # K is chosen in 1..max_types; also the width of the content half
    ridges: tuple[float, ...] = (0.03, 0.1, 0.3)  # ridge per pair on w_k, chosen with K on the selection pairs
    restarts: int = 4                            # random starts of EM per (K, ridge); the best objective is kept
    em_steps: int = 30                           # EM iterations at most (stops once no posterior moves 1e-4)
    patience: int = 2                            # stop adding types after this many that did not lower the loss
    max_pairs: int = 4_000                       # fit on a seeded sample of whole users beyond this: a few types'
                                                 # weights need no more, and the fit then costs the same at any size

    def __post_init__(self):
        if min(self.max_types, self.restarts, self.em_steps, self.patience, self.max_pairs) < 1:
            raise ValueError("max_types, restarts, em_steps, patience and max_pairs must be >= 1")
        if not self.ridges or min(self.ridges) <= 0:
            raise ValueError("ridges must be a non-empty tuple of positive numbers")


@dataclass(frozen=True)
class LatentTypes:
    scores: torch.Tensor      # (R, width) <w_k, f_r>, columns past K zero
    log_prior: torch.Tensor   # (width,) log prior of each type, -inf past K
    metrics: dict             # types, ridge, selection_loss (None without selection pairs), seconds

    def users(self, triples: torch.Tensor, num_users: int) -> torch.Tensor:
        """(U, width) unit-norm posteriors from (P, 3) (user, chosen, rejected) triples."""
        return posteriors(self.scores, self.log_prior, triples, num_users)

    @property
    def response_side(self) -> torch.Tensor:
        """The response half of the joined table: S, so a user's half dotted with it is their expected margin."""
        return self.scores

    @property
    def user_side(self) -> torch.Tensor:
        """What a user's half is computed from (the checkpoint's response_content): S again, through `posteriors`."""
        return self.scores


def pair_log_likelihoods(scores: torch.Tensor, triples: torch.Tensor) -> torch.Tensor:
    """(P, width) log P(pair | type) of each triple under every type."""
    return F.logsigmoid(scores.index_select(0, triples[:, 1]) - scores.index_select(0, triples[:, 2]))


def user_log_likelihoods(scores: torch.Tensor, triples: torch.Tensor, num_users: int,
                         chunk: int = 1 << 20) -> torch.Tensor:
    """(U, K) log P(user's pairs | type) summed over each user's rows of `triples`, `chunk` triples at a time: memory
    stays at U x K plus one chunk."""
    log_lik = torch.zeros(num_users, scores.shape[1], dtype=scores.dtype, device=scores.device)
    for lo in range(0, triples.shape[0], chunk):
        part = triples[lo:lo + chunk]
        log_lik.index_add_(0, part[:, 0], pair_log_likelihoods(scores, part))
    return log_lik


def posteriors(scores: torch.Tensor, log_prior: torch.Tensor, triples: torch.Tensor, num_users: int) -> torch.Tensor:
    """(U, width) each user's posterior over the types from their rows of `triples`, unit L2 norm (the direction is
    what the reward model's gates read, as for every other embedding); a user without pairs gets the prior's. Only
    the K used columns are computed."""
    used = torch.isfinite(log_prior)
    log_lik = user_log_likelihoods(scores[:, used], triples, num_users)
    out = torch.zeros(num_users, scores.shape[1], dtype=scores.dtype, device=scores.device)
    out[:, used] = F.normalize(torch.softmax(log_lik + log_prior[used], dim=1), dim=1)
    return out


def leave_pair_out(users: torch.Tensor, scores: torch.Tensor, log_prior: torch.Tensor,
                   triples: torch.Tensor) -> torch.Tensor:
    """(P, d): for each pair of `triples` (the training pairs the joined `users` (U, d) were built from), its user's
    joined embedding with the content half their posterior from their OTHER pairs (content_tower.leave_pair_out says
    why the reward model must not read a pair's own label in its user's embedding); a user's only pair leaves the
    prior's."""
    u = triples[:, 0]
    per_pair = pair_log_likelihoods(scores, triples)                                             # (P, k)
    log_lik = torch.zeros(users.shape[0], scores.shape[1], dtype=scores.dtype, device=scores.device).index_add_(
        0, u, per_pair)
    content = F.normalize(torch.softmax(log_lik.index_select(0, u) - per_pair + log_prior, dim=1), dim=1)
    return torch.cat([users.index_select(0, u)[:, :-scores.shape[1]], content.to(users.dtype) / math.sqrt(2)], dim=1)


def fit_latent_types(features: torch.Tensor, train: torch.Tensor, selection: torch.Tensor, num_users: int,
                     config: TypesConfig, seed: int = 0) -> LatentTypes:
    """EM for each (K, ridge) of 1..max_types x ridges on `train` (P, 3) triples over response `features` (R, c); kept:
    the one whose posteriors predict `selection` best; one type, the middle ridge, when there is no selection pair."""
    if train.shape[0] == 0:
        raise ValueError("latent types need at least one training pair")
    start = time.perf_counter()
    f = features.float()
    sample = sample_users(train, config.max_pairs, seed)
    scale = (f.index_select(0, sample[:, 1]) - f.index_select(0, sample[:, 2])).norm(dim=1).mean().clamp(min=1e-12)
    f = f / scale                                    # unit mean difference: the ridges mean the same at any backbone
    diffs = f.index_select(0, sample[:, 1]) - f.index_select(0, sample[:, 2])                      # (P, c)
    selection_context = train[torch.isin(train[:, 0], selection[:, 0])]   # only the selection users' posteriors count
    fitted_users = torch.unique(sample[:, 0]).numel()
    held_out = selection.shape[0] > 0
    ridges = config.ridges if held_out else config.ridges[len(config.ridges) // 2:][:1]   # nothing to choose on
    fits = []                                    # (K, ridge, scores, log prior, per-pair selection losses)
    for k in range(1, (config.max_types if held_out else 1) + 1):
        for ridge in ridges:
            w, log_prior = _em(diffs, sample[:, 0], num_users, k, ridge, config, seed)
            used = log_prior.exp() * fitted_users >= 0.5     # a type EM left (near) empty is not one
            w, log_prior = w[used], log_prior[used] - log_prior[used].logsumexp(0)
            scores = f @ w.T                                                                         # (R, K)
            losses = _selection_losses(scores, log_prior, selection_context, selection, num_users)
            fits.append((int(used.sum()), ridge, scores, log_prior, losses))
        if held_out and k - min(fits, key=lambda fit: fit[4].mean())[0] >= config.patience:
            break                                # more types stopped explaining the held-out pairs better
    k, ridge, scores, log_prior, losses = min(fits, key=lambda fit: fit[4].mean()) if held_out else fits[0]
    loss = float(losses.mean()) if held_out else None
    width = config.max_types
    padded = torch.zeros(f.shape[0], width, dtype=scores.dtype, device=scores.device)
    padded[:, :k] = scores
    prior = torch.full((width,), -math.inf, dtype=scores.dtype, device=scores.device)
    prior[:k] = log_prior
    return LatentTypes(scores=padded, log_prior=prior, metrics={
        "types": k, "ridge": ridge, "selection_loss": loss, "seconds": time.perf_counter() - start})


def _selection_losses(scores: torch.Tensor, log_prior: torch.Tensor, context: torch.Tensor, selection: torch.Tensor,
                      num_users: int) -> torch.Tensor:
    """(N,) -log P(held-out pair) under its user's posterior from their training pairs `context` (the mixture, not
    unit-norm)."""
    log_post = torch.log_softmax(user_log_likelihoods(scores, context, num_users) + log_prior, dim=1)
    log_post = log_post.index_select(0, selection[:, 0])
    return -torch.logsumexp(log_post + pair_log_likelihoods(scores, selection), dim=1)


def _em(diffs: torch.Tensor, user: torch.Tensor, num_users: int, k: int, ridge: float, config: TypesConfig,
        seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(K, c) type weights and (K,) log prior of the best of `restarts` EM runs (penalized log-likelihood)."""
    best = None
    with seeded(seed, diffs.device):
        starts = [torch.rand(num_users, k, device=diffs.device) for _ in range(config.restarts)]
    for post in starts:
        post = post / post.sum(dim=1, keepdim=True)
        w = torch.zeros(k, diffs.shape[1], device=diffs.device)
        for _ in range(config.em_steps):
            w = _m_step(diffs, post.index_select(0, user), w, ridge)
            log_prior = post.mean(dim=0).clamp(min=1e-6).log()
            log_joint = torch.zeros(num_users, k, device=diffs.device).index_add_(
                0, user, F.logsigmoid(diffs @ w.T)) + log_prior
            new = torch.softmax(log_joint, dim=1)
            moved = float((new - post).abs().max())
            post = new
            if moved < 1e-4:
                break
        objective = float(torch.logsumexp(log_joint, dim=1).sum() - ridge * w.pow(2).sum())
        if best is None or objective > best[0]:
            best = (objective, w, post.mean(dim=0).clamp(min=1e-6).log())
    return best[1], best[2]


def _m_step(diffs: torch.Tensor, weights: torch.Tensor, w: torch.Tensor, ridge: float) -> torch.Tensor:
    """Each type's ridge logistic regression on the pairs, pair p weighted by its user's posterior (P, K)."""
    w = w.clone().requires_grad_(True)
    optimizer = torch.optim.LBFGS([w], max_iter=30, line_search_fn="strong_wolfe")
    n = diffs.shape[0]

    def closure():
        optimizer.zero_grad()
        loss = (-(weights * F.logsigmoid(diffs @ w.T)).sum() + ridge * w.pow(2).sum()) / n
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return w.detach()

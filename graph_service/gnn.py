"""Signed graph collaborative filtering (CoPL, DESIGN.md item 1): the model in one file.

Users and responses are the N = U + R nodes of one bipartite graph with two edge signs:
user -> chosen response (positive), user -> rejected response (negative). Per layer, every node
aggregates its positive and its negative neighbours through the symmetric-normalized adjacency of
that sign, A = D^-1/2 B D^-1/2 (degrees counted within the sign), adds a Hadamard interaction term
(message ⊙ own state, as in NGCF: a neighbour counts more where it agrees with the node) and a
self-connection, and applies LeakyReLU(0.2) to self + positive - negative:

    m+ = A+ x,  m- = A- x                                    # (N, d) one spmm per sign
    x' = LeakyReLU( W_s x + b + W+ [m+, m+ ⊙ x] - W- [m-, m- ⊙ x] )

Layer 0 is an ID embedding per node. What the responses' text says joins the user embedding beside the
graph, in content_tower.py, not here: a text projection at layer 0 was measured and lost (issue 8).

Final node states are the mean over the layer outputs 0..L (layer 0 = the input states: the mean
keeps the width at d, unlike NGCF's concatenation, and keeps each layer's signal); user embeddings
are L2-normalized (the reward model's gate consumes them; adaptation averages them). The score of
user u for response r is s(u, r) = <user_u, response_r>: the response norm carries confidence.

The adjacency is built once per graph as torch.sparse_csr over all N nodes. It is symmetric, so the
backward of A @ x is A @ grad: `_SymmetricSpMM` says so, and no transposed copy is ever built.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


@dataclass(frozen=True)
class GNNConfig:
    dim: int = 512                # embedding width; the user-embedding size the reward gate consumes (paper: 512)
    layers: int = 4               # propagation depth; 2 hops reach co-labelling users, 4 their responses' users (paper: 4)
    negative_slope: float = 0.2   # LeakyReLU slope (paper)
    init_std: float = 0.1         # ID-embedding init; small so layer-0 scores start near 0 and BPR gradients are balanced
    checkpoint_layers: bool = False  # recompute each layer in backward: ~1/3 more time, activation memory O(L*N*d) -> O(N*d)

    def __post_init__(self):
        if self.dim < 1 or self.layers < 0:
            raise ValueError(f"dim must be >= 1 and layers >= 0, got dim={self.dim} layers={self.layers}")
        if self.init_std <= 0:
            raise ValueError(f"init_std must be > 0, got {self.init_std}")


@dataclass(frozen=True)
class SignedAdjacency:
    """Both signs' normalized adjacencies over the N = U + R nodes (users first, then responses)."""
    positive: torch.Tensor   # (N, N) sparse CSR, symmetric
    negative: torch.Tensor   # (N, N) sparse CSR, symmetric
    num_users: int
    num_responses: int

    @classmethod
    def from_edges(cls, positive_edges: torch.Tensor, negative_edges: torch.Tensor, num_users: int,
                   num_responses: int, device: torch.device | str = "cpu",
                   dtype: torch.dtype = torch.float32) -> SignedAdjacency:
        """positive_edges / negative_edges: (2, E) unique (user_idx, response_idx) pairs."""
        n = num_users + num_responses
        return cls(positive=_normalized_bipartite(positive_edges, num_users, n, device, dtype),
                   negative=_normalized_bipartite(negative_edges, num_users, n, device, dtype),
                   num_users=num_users, num_responses=num_responses)

    @property
    def num_nodes(self) -> int:
        return self.num_users + self.num_responses


def _normalized_bipartite(edges: torch.Tensor, num_users: int, n: int, device, dtype) -> torch.Tensor:
    """Symmetric D^-1/2 B D^-1/2 of one sign as CSR; both edge directions, rows sorted by one 1-D sort."""
    if edges.dim() != 2 or edges.shape[0] != 2:
        raise ValueError(f"edges must be (2, E), got {tuple(edges.shape)}")
    u, r = edges[0].long(), edges[1].long() + num_users
    rows, cols = torch.cat([u, r]), torch.cat([r, u])                           # (2E,) both directions
    deg = torch.bincount(rows, minlength=n).to(torch.float64)                   # (N,) degree within this sign
    vals = (deg[rows] * deg[cols]).rsqrt()                                      # (2E,) 1/sqrt(d_u d_r)
    order = torch.argsort(rows * n + cols)                                      # CSR order: by row, then column
    crow = torch.zeros(n + 1, dtype=torch.int64)
    crow[1:] = torch.cumsum(torch.bincount(rows, minlength=n), 0)
    with warnings.catch_warnings():  # "CSR support is in beta": true, and noise in every training log
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        adj = torch.sparse_csr_tensor(crow, cols[order], vals[order].to(dtype), (n, n), check_invariants=False)
    return adj.to(device)


class _SymmetricSpMM(torch.autograd.Function):
    """adj @ x for a constant symmetric sparse adj: the gradient w.r.t. x is adj @ grad (no transpose)."""

    @staticmethod
    def forward(ctx, adj: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        ctx.adj = adj
        return adj @ x

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return None, ctx.adj @ grad


class SignedGCNLayer(nn.Module):
    def __init__(self, config: GNNConfig):
        super().__init__()
        d = config.dim
        self.self_loop = nn.Linear(d, d)                 # W_s x + b
        self.pos = nn.Linear(2 * d, d, bias=False)       # [W1+ | W2+] applied to [m+, m+ ⊙ x]
        self.neg = nn.Linear(2 * d, d, bias=False)       # [W1- | W2-] applied to [m-, m- ⊙ x]
        self.negative_slope = config.negative_slope

    def forward(self, x: torch.Tensor, adj_pos: torch.Tensor, adj_neg: torch.Tensor) -> torch.Tensor:
        m_pos = _SymmetricSpMM.apply(adj_pos, x)                                  # (N, d)
        m_neg = _SymmetricSpMM.apply(adj_neg, x)                                  # (N, d)
        h = (self.self_loop(x)
             + self.pos(torch.cat([m_pos, m_pos * x], dim=1))                    # (N, 2d) -> (N, d)
             - self.neg(torch.cat([m_neg, m_neg * x], dim=1)))
        return F.leaky_relu(h, self.negative_slope)                              # (N, d)


class SignedGCN(nn.Module):
    def __init__(self, config: GNNConfig, num_users: int, num_responses: int):
        super().__init__()
        if num_users < 1 or num_responses < 1:
            raise ValueError(f"need at least one user and one response, got {num_users} and {num_responses}")
        self.config = config
        self.num_users, self.num_responses = num_users, num_responses
        self.user_emb = nn.Embedding(num_users, config.dim)            # (U, d) layer-0 states
        self.response_emb = nn.Embedding(num_responses, config.dim)    # (R, d)
        nn.init.normal_(self.user_emb.weight, std=config.init_std)
        nn.init.normal_(self.response_emb.weight, std=config.init_std)
        self.layers = nn.ModuleList(SignedGCNLayer(config) for _ in range(config.layers))

    def forward(self, adj: SignedAdjacency) -> tuple[torch.Tensor, torch.Tensor]:
        """One propagation over the whole graph: (users (U, d) L2-normalized, responses (R, d))."""
        if (adj.num_users, adj.num_responses) != (self.num_users, self.num_responses):
            raise ValueError(f"adjacency is for {adj.num_users} users / {adj.num_responses} responses, "
                             f"model for {self.num_users} / {self.num_responses}")
        x = torch.cat([self.user_emb.weight, self.response_emb.weight])                   # (N, d)
        total = x
        for layer in self.layers:
            if self.config.checkpoint_layers and torch.is_grad_enabled():
                x = checkpoint(layer, x, adj.positive, adj.negative, use_reentrant=False)
            else:
                x = layer(x, adj.positive, adj.negative)                          # (N, d)
            total = total + x
        final = total / (len(self.layers) + 1)                                    # (N, d) mean over layers 0..L
        users, responses = final.split([self.num_users, self.num_responses])
        return F.normalize(users, dim=1), responses                              # (U, d), (R, d)


def pair_scores(users: torch.Tensor, chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """s(u, chosen) - s(u, rejected) row-wise for (B, d) embeddings: (B,)."""
    return (users * (chosen - rejected)).sum(dim=1)

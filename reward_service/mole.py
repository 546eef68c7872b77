"""Mixture of LoRA experts (MoLE), the personalization layer of CoPL (arXiv 2503.01658).

Every adapted linear layer y = W x keeps W frozen and adds one shared LoRA and E expert LoRAs:

    y = W x + s * B_0 A_0 x + s * sum_e g_e(u) * B_e A_e x,        s = alpha / r

where g(u) is the top-k routing weight (E times the gate probability, see below) a small gate MLP reads
off the user embedding u. All LoRAs of a layer live in two stacked tensors, slot 0 the shared one and
slots 1..E the experts. A batch that mixes users is one pass: each sample gathers its active slots
(shared + its k experts), and two batched matmuls (bmm) apply them: (in -> (1+k) r), scale by the
routing weights, ((1+k) r -> out) added onto the base output. Exact top-k with no loop over samples or
experts, unselected experts cost nothing, and a layer adds five kernels to the base linear (few kernels
matter: each costs a thread sync on CPU).

Routing weights follow the Switch Transformer: softmax over all E (noisy in training) logits, keep the
top-k probabilities without renormalizing. With k=1 a renormalized weight is always 1 and the gate
would get no gradient; the raw probability keeps the gate learning. The kept probabilities are then
multiplied by E, so that an untrained (near-uniform, p ~ 1/E) gate gives weight ~1: unscaled, every
expert would start at 1/E of the shared LoRA's strength, and since Adam's step size ignores gradient
scale, the experts (the only user-dependent part) would move the reward E times slower than the
shared LoRA, which then fits the user-blind majority first.
The weight stays proportional to the gate probability, so the paper's base + shared + g * expert
form and the gate's gradient are unchanged up to that constant.

The non-personalized baseline is the same layer with `personalized=False`: the shared LoRA only, no gate.
"""
from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from torch import nn


@dataclass
class MoLEConfig:
    user_dim: int = 512          # width of the GNN user embedding the gates read (GNN width setting)
    num_experts: int = 8         # E; paper reference 8
    top_k: int = 1               # experts per user and layer; paper reference 1
    rank: int = 8                # r of every LoRA (shared and experts); paper reference 8
    alpha: float = 16.0          # LoRA scale s = alpha / r; paper reference 16
    gate_hidden: int = 256       # gate MLP: user_dim -> gate_hidden -> E, as in the paper
    gate_noise_std: float = 0.1  # Gaussian noise on gate logits, training only: lets unused experts get tried
    personalized: bool = True    # False = the baseline: one shared LoRA, no experts, no user input
    target_modules: tuple[str, ...] | None = None  # module-name suffixes; None: peft's default for the model_type
    last_n_layers: int | None = None  # adapt only the top N blocks; None: all. Backprop stops at the lowest one

    def __post_init__(self):
        if self.rank < 1 or self.num_experts < 1 or self.user_dim < 1 or self.gate_hidden < 1:
            raise ValueError("rank, num_experts, user_dim and gate_hidden must be >= 1")
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"top_k must be in [1, num_experts={self.num_experts}], got {self.top_k}")
        if self.gate_noise_std < 0:
            raise ValueError("gate_noise_std must be >= 0")
        if self.last_n_layers is not None and self.last_n_layers < 1:
            raise ValueError("last_n_layers must be >= 1 or None")
        if self.target_modules is not None:
            self.target_modules = tuple(self.target_modules)  # JSON round trips give lists


class MoLELinear(nn.Module):
    """A frozen nn.Linear plus a shared LoRA and (when personalized) E gated expert LoRAs.

    lora_A: (S, r, in) and lora_B: (S, r, out), S = 1 + E slots (S = 1 for the baseline). lora_B is kept
    transposed against peft's (out, r) so that a gather of it is already the right operand for bmm.
    Adapters stay fp32 whatever the backbone dtype (AdamW steps on bf16 weights lose small updates);
    the small gathered weights are cast to the activation dtype, never the activations.
    Routing for the current batch is set by `route(...)` before the backbone runs.
    """

    def __init__(self, base: nn.Linear, cfg: MoLEConfig):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.cfg = cfg
        self.scaling = cfg.alpha / cfg.rank
        self.merged = False
        self._slots: torch.Tensor | None = None  # (B, S_active) slot ids, set inside `route`
        self._slot_w: torch.Tensor | None = None  # (B, 1, S_active * r) per-rank-row weights, set inside `route`
        n_slots = 1 + cfg.num_experts if cfg.personalized else 1
        dev = base.weight.device
        # peft's init: A Kaiming-uniform, B zero, so every delta starts at 0 and the model starts as the backbone.
        self.lora_A = nn.Parameter(torch.empty(n_slots, cfg.rank, base.in_features, device=dev))
        self.lora_B = nn.Parameter(torch.zeros(n_slots, cfg.rank, base.out_features, device=dev))
        for a in self.lora_A:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        if cfg.personalized:
            self.gate = nn.Sequential(nn.Linear(cfg.user_dim, cfg.gate_hidden), nn.GELU(),
                                      nn.Linear(cfg.gate_hidden, cfg.num_experts)).to(dev)

    def routing(self, user_emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, d_user) -> top-k weights (B, k) and expert indices 0..E-1 (B, k)."""
        # GNN embeddings are L2-normalized (coordinates ~ 1/sqrt(d)); nn.Linear's init expects ~unit-scale inputs.
        # Unscaled, the gate's random biases swamp the user signal and at init every user type routes to the
        # same expert (measured on uf-p-4 GNN embeddings: one expert per layer for all 4 types, logit spread
        # 0.05 < gate noise 0.1), so experts see mixed-type gradients that cancel out.
        logits = self.gate(user_emb.float() * math.sqrt(self.cfg.user_dim))  # (B, E)
        if self.training and self.cfg.gate_noise_std > 0:
            logits = logits + self.cfg.gate_noise_std * torch.randn_like(logits)
        return logits.softmax(dim=-1).topk(self.cfg.top_k, dim=-1)  # (B, k), (B, k)

    def set_routing(self, user_emb: torch.Tensor) -> None:
        top_p, top_i = self.routing(user_emb)  # (B, k)
        slots, weights = top_i + 1, top_p * self.cfg.num_experts  # expert e lives in slot e + 1; E * p: see top
        if not self.merged:  # the shared LoRA rides along as one more slot with weight 1
            slots = torch.cat([torch.zeros_like(slots[:, :1]), slots], dim=1)  # (B, 1+k)
            weights = torch.cat([torch.ones_like(weights[:, :1]), weights], dim=1)  # (B, 1+k)
        self._slots = slots
        self._slot_w = (self.scaling * weights).repeat_interleave(self.cfg.rank, dim=1)[:, None, :]  # (B, 1, S*r)

    def clear_routing(self) -> None:
        self._slots = self._slot_w = None

    def get_delta_weight(self, slot: int) -> torch.Tensor:
        """(out, in) weight delta of one LoRA: slot 0 = shared, 1..E = experts (before gate weighting)."""
        if not 0 <= slot < self.lora_A.shape[0]:
            raise ValueError(f"no LoRA slot {slot} in this layer (slots 0..{self.lora_A.shape[0] - 1})")
        return self.scaling * self.lora_B[slot].T @ self.lora_A[slot]

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the shared LoRA into the frozen weight for inference (experts depend on the user, so stay apart)."""
        if not self.merged:
            self.base.weight += self.get_delta_weight(0).to(self.base.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.base.weight -= self.get_delta_weight(0).to(self.base.weight.dtype)
            self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, T, in)
        y = self.base(x)  # (B, T, out)
        if not self.cfg.personalized:
            if self.merged:
                return y
            h = F.linear(x, self.lora_A[0].to(x.dtype))  # (B, T, r)
            return y + self.scaling * F.linear(h, self.lora_B[0].T.to(x.dtype))  # (B, T, out)
        if self._slots is None:
            raise RuntimeError("MoLELinear called outside `route(...)`: no routing for this batch")
        n_b = self._slots.shape[0]
        if x.dim() != 3 or x.shape[0] != n_b:
            raise ValueError(f"expected input (B={n_b}, T, in), got {tuple(x.shape)}")
        a = self.lora_A[self._slots].flatten(1, 2).to(x.dtype)  # (B, S*r, in)
        b = self.lora_B[self._slots].flatten(1, 2).to(x.dtype)  # (B, S*r, out)
        h = torch.bmm(x, a.transpose(1, 2)) * self._slot_w.to(x.dtype)  # (B, T, S*r)
        return torch.baddbmm(y, h, b)  # (B, T, out) = y + h @ b


def _target_matcher(model: nn.Module, cfg: MoLEConfig):
    if cfg.target_modules is not None:
        suffixes = cfg.target_modules
    else:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        suffixes = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(model_type)
        if suffixes is None:
            raise ValueError(f"no default LoRA target modules for model_type {model_type!r}; set target_modules")
    if isinstance(suffixes, str):  # peft writes some defaults as one regex over the full name
        pattern = re.compile(suffixes)
        return lambda name: pattern.fullmatch(name) is not None
    return lambda name: any(name == s or name.endswith("." + s) for s in suffixes)


def _block_index(name: str) -> int | None:
    """Transformer block number in a module name (`encoder.layer.3.attention...` -> 3)."""
    m = re.search(r"\.(\d+)\.", f".{name}.")
    return int(m.group(1)) if m else None


def inject_mole(model: nn.Module, cfg: MoLEConfig) -> dict[str, MoLELinear]:
    """Wrap the target nn.Linear modules of `model` in place; returns {module name: MoLELinear}."""
    matches = _target_matcher(model, cfg)
    targets = [(n, m) for n, m in model.named_modules() if n and matches(n)]
    if cfg.last_n_layers is not None:
        blocks = sorted({b for n, _ in targets if (b := _block_index(n)) is not None})
        keep = set(blocks[-cfg.last_n_layers:])
        targets = [(n, m) for n, m in targets if _block_index(n) in keep]
    if not targets:
        raise ValueError("no module of the backbone matches the MoLE target modules")
    layers = {}
    for name, module in targets:
        if not isinstance(module, nn.Linear):
            raise ValueError(f"target {name} is {type(module).__name__}; MoLE wraps nn.Linear only")
        parent_name, _, child = name.rpartition(".")
        layer = MoLELinear(module, cfg)
        setattr(model.get_submodule(parent_name) if parent_name else model, child, layer)
        layers[name] = layer
    return layers


@contextlib.contextmanager
def route(layers: dict[str, MoLELinear], user_emb: torch.Tensor | None) -> Iterator[None]:
    """Set every layer's routing weights from `user_emb` (B, d_user) for one backbone pass.

    One model instance runs one batch at a time (the batching scorer serializes calls).
    """
    personalized = next(iter(layers.values())).cfg.personalized
    if not personalized:
        if user_emb is not None:
            raise ValueError("the non-personalized model takes no user embedding (pass None)")
        yield
        return
    if user_emb is None:
        raise ValueError("the personalized model needs a user embedding per sample")
    for layer in layers.values():
        layer.set_routing(user_emb)
    try:
        yield
    finally:
        for layer in layers.values():
            layer.clear_routing()

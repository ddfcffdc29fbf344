"""vitkernels: fused kernels for Vision Transformers (flash attention, Swin window attention, patch
embedding), each with a pure-PyTorch reference, and one dispatch layer over its backends.

``vitkernels.nn`` (drop-in modules, ``patch_timm``, ``patch_torchvision``, ``replace_mha`` and their inverses), ``vitkernels.models`` and
``vitkernels.bench`` load on first access; none of them imports timm
(or torchvision) until a timm (torchvision) model is patched or built.
"""
from __future__ import annotations

import importlib

from vitkernels.dispatch import BACKEND_NAMES, BackendUnavailableError, available_backends
from vitkernels.explain import explain
from vitkernels.ops import RelPos, Rope, decomposed_rel_pos, flash_attention, patch_embed, window_attention

__version__ = "0.1.0"

# name -> (module, attribute or None for the module itself), imported on first access
_LAZY = {
    "nn": ("vitkernels.nn", None),
    "models": ("vitkernels.models", None),
    "bench": ("vitkernels.bench", None),
    "patch_timm": ("vitkernels.nn.timm_layers", "patch_timm"),
    "unpatch_timm": ("vitkernels.nn.timm_layers", "unpatch_timm"),
    "patch_torchvision": ("vitkernels.nn.torchvision_layers", "patch_torchvision"),
    "unpatch_torchvision": ("vitkernels.nn.torchvision_layers", "unpatch_torchvision"),
    "replace_mha": ("vitkernels.nn.multihead_attention", "replace_mha"),
    "restore_mha": ("vitkernels.nn.multihead_attention", "restore_mha"),
    "MultiheadAttention": ("vitkernels.nn.multihead_attention", "MultiheadAttention"),
}

__all__ = [
    "flash_attention",
    "window_attention",
    "patch_embed",
    "RelPos",
    "Rope",
    "decomposed_rel_pos",
    "explain",
    "available_backends",
    "BackendUnavailableError",
    "BACKEND_NAMES",
    *_LAZY,
]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'vitkernels' has no attribute {name!r}")
    module_name, attribute = _LAZY[name]
    module = importlib.import_module(module_name)
    value = module if attribute is None else getattr(module, attribute)
    globals()[name] = value  # later accesses skip this function
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))

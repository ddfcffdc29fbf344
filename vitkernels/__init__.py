"""vitkernels: fused kernels for Vision Transformers (flash attention, Swin window attention, patch
embedding), each with a pure-PyTorch reference, and one dispatch layer over its backends."""
from vitkernels.dispatch import BACKEND_NAMES, BackendUnavailableError, available_backends
from vitkernels.ops import flash_attention, patch_embed, window_attention

__version__ = "0.1.0"

__all__ = [
    "flash_attention",
    "window_attention",
    "patch_embed",
    "available_backends",
    "BackendUnavailableError",
    "BACKEND_NAMES",
]

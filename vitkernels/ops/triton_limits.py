"""Limits shared by every Triton backend, as reasons (no triton import here: the package must import
without it; ``dispatch.backend_environment('triton')`` says whether triton itself can run)."""
from __future__ import annotations

import os
from typing import List

import torch

TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def triton_reasons(device: torch.device, dtype: torch.dtype) -> List[str]:
    reasons = []
    interpreting = os.environ.get("TRITON_INTERPRET", "0") == "1"
    if device.type != "cuda" and not (device.type == "cpu" and interpreting):
        reasons.append(f"tensors are on {device}; triton kernels need cuda tensors (or cpu tensors under "
                       "TRITON_INTERPRET=1)")
    if dtype not in TRITON_DTYPES:
        reasons.append(f"dtype {str(dtype).replace('torch.', '')} is not supported by the triton kernels "
                       "(float16, bfloat16, float32; use backend='reference' for float64)")
    if dtype == torch.bfloat16 and interpreting:
        reasons.append("bfloat16 tl.dot gives wrong results under the Triton interpreter (TRITON_INTERPRET=1); "
                       "bfloat16 runs on a GPU")
    return reasons

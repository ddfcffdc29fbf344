"""Limits shared by every C++ CPU backend (``vitkernels._C``), as reasons; whether the extension itself
loads is ``dispatch.backend_environment('cpu')``."""
from __future__ import annotations

from typing import List

import torch

CPU_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def cpu_reasons(device: torch.device, dtype: torch.dtype) -> List[str]:
    reasons = []
    if device.type != "cpu":
        reasons.append(f"tensors are on {device}, this backend needs cpu tensors")
    if dtype not in CPU_DTYPES:
        reasons.append(f"dtype {str(dtype).replace('torch.', '')} is not supported by the C++ CPU kernels "
                       "(float16, bfloat16, float32, computed in float32; use backend='reference' for float64)")
    return reasons

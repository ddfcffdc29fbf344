"""When an op's call can skip its autograd.Function.

The Function's bookkeeping (ctx, saved tensors, graph node) costs a few microseconds of host time per call,
and ViT inference at small batch is bound by host time; with nothing to differentiate, the ops call their
kernels' forward directly (the same kernels, the same output).
"""
from __future__ import annotations

import torch
from torch.autograd import forward_ad

_transforms_active = getattr(torch._C, "_are_functorch_transforms_active", None)


def autograd_needed(*tensors) -> bool:
    """Whether a call must go through its autograd.Function: grad mode is on and one of ``tensors`` (None
    allowed) requires a gradient, or forward-mode AD or a torch.func transform is active (the Function then
    says what it supports, instead of the kernels silently dropping tangents or batch dims)."""
    if forward_ad._current_level >= 0 or _transforms_active is None or _transforms_active():
        return True
    if not torch.is_grad_enabled():
        return False
    for t in tensors:
        if t is not None and t.requires_grad:
            return True
    return False

"""Input checks of ``flash_attention``, shared by every backend (backends add their own limits in
``can_run``)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from vitkernels.ops import _checks as C
from vitkernels.ops._tracing import data_free

OP = "flash_attention"
HEAD_DIMS = "multiples of 8 from 16 to 256"


@dataclass
class AttentionInputs:
    q: torch.Tensor  # B, H, Nq, D
    k: torch.Tensor  # B, H, Nk, D
    v: torch.Tensor  # B, H, Nk, D
    bias: Optional[torch.Tensor]  # broadcastable to B, H, Nq, Nk
    scale: float
    dropout_p: float

    @property
    def device(self) -> torch.device:
        return self.q.device

    @property
    def dtype(self) -> torch.dtype:
        return self.q.dtype

    @property
    def head_dim(self) -> int:
        return self.q.shape[-1]

    @property
    def data_free(self) -> bool:
        """Meta tensors or a zero-size dim: nothing to compute (dispatch gives it to the reference)."""
        return data_free(self.q, self.k, self.v, self.bias)

    def describe(self) -> str:
        bias = "none" if self.bias is None else f"{tuple(self.bias.shape)}"
        return (f"q {tuple(self.q.shape)}, k {tuple(self.k.shape)}, {C.dtype_name(self.dtype)} on {self.device}, "
                f"bias {bias}, dropout_p={self.dropout_p}")


def head_dim_supported(d: int) -> bool:
    return 16 <= d <= 256 and d % 8 == 0


def check_attention_inputs(q, k, v, bias=None, scale=None, dropout_p=0.0) -> AttentionInputs:
    """Validate the arguments of ``flash_attention``; raise ValueError/TypeError naming the argument."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        C.require_tensor(OP, name, t)
        C.require_rank(OP, name, t, (4,), "(B, H, N, D)")
    C.require_float_dtype(OP, "q", q)
    for name, t in (("k", k), ("v", v)):
        C.require_same_dtype(OP, name, t, "q", q)
        C.require_same_device(OP, name, t, "q", q)
    B, H, Nq, D = q.shape
    if tuple(k.shape[:2]) != (B, H) or tuple(v.shape[:2]) != (B, H):
        raise ValueError(f"{OP}: q, k and v must share (B, H); got q {tuple(q.shape)}, k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)}")
    if k.shape[2] != v.shape[2]:
        raise ValueError(f"{OP}: k and v must have the same number of keys Nk; got k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)}")
    if k.shape[3] != D or v.shape[3] != D:
        raise ValueError(f"{OP}: head dim D of k and v must equal q's ({D}); got k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)}")
    if not head_dim_supported(D):
        raise ValueError(f"{OP}: head dim D={D} is not supported (supported: {HEAD_DIMS})")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.shape[-1] > 1 and t.stride(-1) != 1:
            raise ValueError(f"{OP}: {name} must have unit stride in its last (D) dim, got strides "
                             f"{tuple(t.stride())}; pass {name}.contiguous() explicitly if you mean to copy")
    Nk = k.shape[2]
    if bias is not None:
        C.require_tensor(OP, "bias", bias)
        if bias.dtype == torch.bool:
            raise TypeError(f"{OP}: bias must be an additive float tensor of dtype {C.dtype_name(q.dtype)}, "
                            "got bool (turn a boolean keep-mask into 0/-inf with "
                            "torch.zeros(mask.shape, dtype=q.dtype).masked_fill(~mask, float('-inf')))")
        C.require_same_dtype(OP, "bias", bias, "q", q)
        C.require_same_device(OP, "bias", bias, "q", q)
        target = (B, H, Nq, Nk)
        ok = bias.dim() <= 4 and all(b in (1, t) for b, t in zip(reversed(bias.shape), reversed(target)))
        if not ok:
            raise ValueError(f"{OP}: bias must be broadcastable to (B, H, Nq, Nk) = {target}, "
                             f"got shape {tuple(bias.shape)}")
    scale = C.optional_scale(OP, scale)
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)):
        raise TypeError(f"{OP}: dropout_p must be a float, got {type(dropout_p).__name__}")
    if not 0.0 <= float(dropout_p) <= 1.0:
        raise ValueError(f"{OP}: dropout_p must be in [0, 1], got {dropout_p}")
    return AttentionInputs(q, k, v, bias, D ** -0.5 if scale is None else scale, float(dropout_p))

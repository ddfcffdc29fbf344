"""Input checks of ``window_attention``, shared by every backend (backends add their own limits in
``can_run``)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple

import torch

from vitkernels.ops import _checks as C
from vitkernels.ops._tracing import data_free
from vitkernels.ops.window_attention import geometry

OP = "window_attention"


@dataclass
class WindowInputs:
    qkv: torch.Tensor  # B, H, W, 3C  or  B, T, H, W, 3C
    num_heads: int
    head_dim: int
    window_size: Tuple[int, ...]  # as given (unclipped)
    shift_size: Tuple[int, ...]  # as given
    window: Tuple[int, ...]  # used on this map (clipped)
    shift: Tuple[int, ...]  # used on this map (0 where clipped)
    table_window: Tuple[int, ...]  # the window the table and its index are laid out for
    rel_pos_bias: Optional[torch.Tensor]  # table_rows(table_window), num_heads
    qkv_bias: Optional[torch.Tensor]  # 3C
    scale: float  # 1.0 with cosine (the logit scale is per head)
    cosine: bool = False  # Swin V2: q and k L2-normalised per head, logits * exp(min(logit_scale, log 100))
    logit_scale: Optional[torch.Tensor] = None  # (num_heads,) or (num_heads, 1, ..., 1); cosine only
    # What a backend derives from the checked metadata alone (geometry, launch flags, tune keys), by name:
    # one dict shared by every copy of these inputs (``with_tensors``), so a memoised signature computes it
    # once. Never anything that depends on tensor values.
    derived: Dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def with_tensors(self, qkv, rel_pos_bias, qkv_bias, logit_scale) -> "WindowInputs":
        """A copy holding these tensors, the checked geometry kept (``dataclasses.replace`` without its
        per-call ``__init__``: every call of a memoised signature and of the autograd.Function takes it)."""
        new = object.__new__(WindowInputs)
        new.__dict__ = {**self.__dict__, "qkv": qkv, "rel_pos_bias": rel_pos_bias, "qkv_bias": qkv_bias,
                        "logit_scale": logit_scale}
        return new

    @property
    def device(self) -> torch.device:
        return self.qkv.device

    @property
    def dtype(self) -> torch.dtype:
        return self.qkv.dtype

    @property
    def spatial(self) -> Tuple[int, ...]:
        return tuple(self.qkv.shape[1:-1])

    @property
    def data_free(self) -> bool:
        """Meta tensors or a zero-size dim: nothing to compute (dispatch gives it to the reference)."""
        return data_free(self.qkv, self.rel_pos_bias, self.qkv_bias, self.logit_scale)

    def describe(self) -> str:
        return (f"qkv {tuple(self.qkv.shape)} {C.dtype_name(self.dtype)} on {self.device}, "
                f"num_heads={self.num_heads}, head_dim={self.head_dim}, window {self.window}, shift {self.shift}"
                + (", cosine attention" if self.cosine else ""))


def check_window_inputs(qkv, num_heads, window_size, shift_size=0, rel_pos_bias=None, qkv_bias=None,
                        scale=None, cosine=False, logit_scale=None) -> WindowInputs:
    """Validate the arguments of ``window_attention``; raise ValueError/TypeError naming the argument."""
    C.require_tensor(OP, "qkv", qkv)
    C.require_rank(OP, "qkv", qkv, (4, 5), "((B, H, W, 3C) for 2-D, (B, T, H, W, 3C) for 3-D)")
    C.require_float_dtype(OP, "qkv", qkv)
    nd = qkv.dim() - 2
    spatial = tuple(qkv.shape[1:-1])
    if any(s < 1 for s in spatial):
        raise ValueError(f"{OP}: qkv's map must be at least 1 in every spatial dim, got shape {tuple(qkv.shape)}")
    num_heads = C.require_int(OP, "num_heads", num_heads, minimum=1)
    c3 = qkv.shape[-1]
    if c3 % (3 * num_heads) != 0:
        raise ValueError(f"{OP}: qkv's last dim must be 3 * num_heads * head_dim = a multiple of "
                         f"{3 * num_heads} for num_heads={num_heads}, got {c3}")
    channels = c3 // 3
    head_dim = channels // num_heads
    window_size = C.int_tuple(OP, "window_size", window_size, nd, minimum=1)
    shift_size = C.int_tuple(OP, "shift_size", shift_size, nd, minimum=0)
    if any(s >= w for s, w in zip(shift_size, window_size)):
        raise ValueError(f"{OP}: shift_size {shift_size} must be smaller than window_size {window_size} "
                         "in every dim")
    window, shift = geometry.resolve_window_shift(spatial, window_size, shift_size)
    # 2-D: timm builds the table for the clipped window; 3-D: Video Swin keeps the configured window's.
    table_window = window if nd == 2 else window_size
    if rel_pos_bias is not None:
        C.require_tensor(OP, "rel_pos_bias", rel_pos_bias)
        C.require_same_dtype(OP, "rel_pos_bias", rel_pos_bias, "qkv", qkv)
        C.require_same_device(OP, "rel_pos_bias", rel_pos_bias, "qkv", qkv)
        expected = (geometry.table_rows(table_window), num_heads)
        terms = "*".join(f"(2*{w}-1)" for w in table_window)
        meaning = f"({terms}, num_heads) for window {table_window}"
        if tuple(table_window) != tuple(window_size):  # 2-D, clipped: timm sizes the table for the used window
            meaning += (f": window_size {window_size} is clipped to the {spatial} map (a window not smaller than "
                        "the map is the whole map, as in timm), and the table is the clipped window's")
        C.require_shape(OP, "rel_pos_bias", rel_pos_bias, expected, meaning)
    if qkv_bias is not None:
        C.require_tensor(OP, "qkv_bias", qkv_bias)
        C.require_same_dtype(OP, "qkv_bias", qkv_bias, "qkv", qkv)
        C.require_same_device(OP, "qkv_bias", qkv_bias, "qkv", qkv)
        C.require_shape(OP, "qkv_bias", qkv_bias, (c3,), "(3 * C, qkv's last dim)")
    scale = C.optional_scale(OP, scale)
    check_cosine(cosine, logit_scale, scale, qkv, num_heads)
    if cosine:
        scale = 1.0
    return WindowInputs(qkv, num_heads, head_dim, window_size, shift_size, window, shift, tuple(table_window),
                        rel_pos_bias, qkv_bias, head_dim ** -0.5 if scale is None else scale, cosine,
                        logit_scale if cosine else None)


def check_cosine(cosine, logit_scale, scale, qkv, num_heads) -> None:
    """Swin V2's scaled cosine attention: ``cosine`` a bool; with it a ``logit_scale`` of num_heads values
    ((num_heads,) or (num_heads, 1, ..., 1), as timm and torchvision keep it), fp32 or qkv's dtype, and no
    ``scale``; without it no ``logit_scale``."""
    if not isinstance(cosine, bool):
        raise TypeError(f"{OP}: cosine must be a bool, got {type(cosine).__name__}")
    if not cosine:
        if logit_scale is not None:
            raise ValueError(f"{OP}: logit_scale is only used with cosine=True (Swin V2's scaled cosine "
                             "attention); pass cosine=True, or drop logit_scale")
        return
    if logit_scale is None:
        raise ValueError(f"{OP}: cosine=True needs logit_scale, the per-head log scale of the cosine logits "
                         "(Swin V2's attn.logit_scale, shape (num_heads, 1, 1))")
    if scale is not None:
        raise ValueError(f"{OP}: scale must be None with cosine=True (the cosine logits are scaled by "
                         f"exp(min(logit_scale, log(100))) per head), got scale={scale}")
    C.require_tensor(OP, "logit_scale", logit_scale)
    allowed = (qkv.dtype,) if qkv.dtype in (torch.float32, torch.float64) else (qkv.dtype, torch.float32)
    if logit_scale.dtype not in allowed:
        raise TypeError(f"{OP}: logit_scale must have dtype {' or '.join(C.dtype_name(d) for d in allowed)} "
                        f"(qkv's dtype, or float32 for fp16/bf16 qkv), got {C.dtype_name(logit_scale.dtype)} "
                        "(no silent casts)")
    C.require_same_device(OP, "logit_scale", logit_scale, "qkv", qkv)
    shape = tuple(logit_scale.shape)
    if not shape or shape[0] != num_heads or any(s != 1 for s in shape[1:]):
        raise ValueError(f"{OP}: logit_scale must have shape (num_heads,) or (num_heads, 1, ..., 1) with "
                         f"num_heads={num_heads}, got {shape}")

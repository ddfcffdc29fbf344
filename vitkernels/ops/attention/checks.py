"""Input checks of ``flash_attention``, shared by every backend (backends add their own limits in
``can_run``)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional, Tuple

import torch

from vitkernels.ops import _checks as C
from vitkernels.ops._tracing import data_free

OP = "flash_attention"
HEAD_DIMS = "multiples of 8 from 16 to 256"


class RelPos(NamedTuple):
    """A decomposed relative-position bias (MViTv2, ViTDet, SAM), given to ``flash_attention`` as small
    per-axis terms instead of an (Nq, Nk) matrix: query row ``i`` and key ``j`` get

        rel_h[b, h, i - prefix, kh(j)] + rel_w[b, h, i - prefix, kw(j)] (+ rel_t[b, h, i - prefix, kt(j)])

    where (kt, kh, kw) is the position of key ``j - prefix`` in the row-major key grid (Kt, Kh, Kw), each
    extent read from the last dim of its term. The first ``prefix`` queries and keys (class tokens) get
    no term. Each term: (B, H, Nq - prefix, K_axis), q's dtype and device, any strides; typically
    ``einsum("bhnc,nkc->bhnk", q, R)`` of the (unscaled) queries with a table gathered per query row
    (``vitkernels.decomposed_rel_pos`` builds them). Gradients flow to every term that requires one.
    """
    rel_h: torch.Tensor  # B, H, Nq - prefix, Kh
    rel_w: torch.Tensor  # B, H, Nq - prefix, Kw
    rel_t: Optional[torch.Tensor] = None  # B, H, Nq - prefix, Kt (3-D key grids: video)
    prefix: int = 0  # leading query and key tokens without a term (class tokens)

    @property
    def terms(self) -> Tuple[torch.Tensor, ...]:
        """The terms present, in key-grid order (slowest axis first): (rel_t,) rel_h, rel_w."""
        return (self.rel_h, self.rel_w) if self.rel_t is None else (self.rel_t, self.rel_h, self.rel_w)

    @property
    def key_grid(self) -> Tuple[int, int, int]:
        """(Kt, Kh, Kw): Kt = 1 for a 2-D grid."""
        return (1 if self.rel_t is None else self.rel_t.shape[-1], self.rel_h.shape[-1], self.rel_w.shape[-1])

    def describe(self) -> str:
        grid = "x".join(str(n) for n in self.key_grid[(1 if self.rel_t is None else 0):])  # t only when 3-D
        return f"rel_pos key grid {grid}" + (f" after {self.prefix} prefix tokens" if self.prefix else "")


@dataclass
class AttentionInputs:
    q: torch.Tensor  # B, H, Nq, D
    k: torch.Tensor  # B, H, Nk, D
    v: torch.Tensor  # B, H, Nk, D
    bias: Optional[torch.Tensor]  # broadcastable to B, H, Nq, Nk
    scale: float
    dropout_p: float
    rel_pos: Optional[RelPos] = None  # decomposed relative position, checked

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
        rel = self.rel_pos.terms if self.rel_pos is not None else ()
        return data_free(self.q, self.k, self.v, self.bias, *rel)

    def describe(self) -> str:
        bias = "none" if self.bias is None else f"{tuple(self.bias.shape)}"
        return (f"q {tuple(self.q.shape)}, k {tuple(self.k.shape)}, {C.dtype_name(self.dtype)} on {self.device}, "
                f"bias {bias}, dropout_p={self.dropout_p}"
                + (f", {self.rel_pos.describe()}" if self.rel_pos is not None else ""))


def head_dim_supported(d: int) -> bool:
    return 16 <= d <= 256 and d % 8 == 0


def check_attention_inputs(q, k, v, bias=None, scale=None, dropout_p=0.0, rel_pos=None) -> AttentionInputs:
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
    rel_pos = check_rel_pos(rel_pos, q, k)
    return AttentionInputs(q, k, v, bias, D ** -0.5 if scale is None else scale, float(dropout_p), rel_pos)


REL_POS_FORMS = ("a vitkernels.RelPos(rel_h, rel_w, rel_t=None, prefix=0) or a tuple (rel_h, rel_w) of "
                 "(B, H, Nq, Kh) and (B, H, Nq, Kw) tensors")


def check_rel_pos(rel_pos, q, k) -> Optional[RelPos]:
    """Validate ``rel_pos`` against q (B, H, Nq, D) and k (B, H, Nk, D); returns it as a ``RelPos``."""
    if rel_pos is None:
        return None
    if not isinstance(rel_pos, RelPos):
        if not isinstance(rel_pos, (tuple, list)) or len(rel_pos) != 2:
            raise TypeError(f"{OP}: rel_pos must be {REL_POS_FORMS}; got {_kind(rel_pos)} (3-D key grids and "
                            "class tokens: RelPos(rel_h, rel_w, rel_t=..., prefix=...))")
        rel_pos = RelPos(*rel_pos)
    prefix = rel_pos.prefix
    if isinstance(prefix, bool) or not isinstance(prefix, int):
        raise TypeError(f"{OP}: rel_pos.prefix must be an int, got {type(prefix).__name__}")
    B, H, Nq, _ = q.shape
    Nk = k.shape[2]
    if not 0 <= prefix <= min(Nq, Nk):
        raise ValueError(f"{OP}: rel_pos.prefix must be in [0, min(Nq, Nk)] = [0, {min(Nq, Nk)}], got {prefix}")
    names = ("rel_h", "rel_w") if rel_pos.rel_t is None else ("rel_t", "rel_h", "rel_w")
    for name, t in zip(names, rel_pos.terms):
        C.require_tensor(OP, f"rel_pos.{name}", t)
        C.require_same_dtype(OP, f"rel_pos.{name}", t, "q", q)
        C.require_same_device(OP, f"rel_pos.{name}", t, "q", q)
        if t.dim() != 4 or tuple(t.shape[:3]) != (B, H, Nq - prefix) or t.shape[3] < 1:
            raise ValueError(f"{OP}: rel_pos.{name} must be (B, H, Nq - prefix, K) = ({B}, {H}, {Nq - prefix}, K) "
                             f"with K >= 1 its key-grid extent, got shape {tuple(t.shape)}")
    grid = rel_pos.key_grid
    if grid[0] * grid[1] * grid[2] != Nk - prefix:
        extents = " x ".join(f"{n} ({name})" for n, name in zip(grid[3 - len(names):], names))
        raise ValueError(f"{OP}: rel_pos key grid {extents} = {grid[0] * grid[1] * grid[2]} keys must equal "
                         f"Nk - prefix = {Nk} - {prefix} = {Nk - prefix}")
    return rel_pos


def _kind(value) -> str:
    if isinstance(value, (tuple, list)):
        return f"a {type(value).__name__} of {len(value)}"
    return type(value).__name__

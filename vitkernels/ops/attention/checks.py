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


class Rope(NamedTuple):
    """Rotary position embedding (EVA-02, DINOv3-style 2-D / axial RoPE) applied to q and k inside the
    kernels: for each token ``n >= prefix`` and each head,

        x_rot = x * cos[n - prefix] + rotate(x) * sin[n - prefix]

    computed in the promoted dtype of x and cos (fp32 for fp16/bf16 q with fp32 tables) and rounded to q's
    dtype once (timm's ``apply_rot_embed``; the cpu backend, which computes in fp32 throughout, keeps the
    rotated rows in fp32; compiled for a GPU, triton may fuse the products into one FMA, a rounding fewer).
    ``rotate`` pairs the channels of a head:

    - ``rotate_half=False`` (timm's default, EVA-02): interleaved pairs ``[-x1, x0, -x3, x2, ...]``;
    - ``rotate_half=True`` (DINOv3, timm's ``rotate_half=True``): halves ``[-x[D/2:], x[:D/2]]``.

    cos and sin are per-element (..., Nq - prefix, D), as timm lays them out (``RotaryEmbeddingCat``
    gives ``[sin | cos]`` along the last dim: ``sin, cos = rope.chunk(2, -1)``), broadcastable over
    (B, H) (shapes (N, D), (1|B, 1|H, N, D) and the 3-D forms), any strides, fp32 or q's dtype. The first
    ``prefix`` tokens (class / register tokens) are not rotated. Needs Nq == Nk (self-attention: q and k
    share the angles). Gradients flow to cos and sin when they require one (learnable frequencies).
    """
    cos: torch.Tensor  # ..., Nq - prefix, D
    sin: torch.Tensor  # ..., Nq - prefix, D
    prefix: int = 0  # leading tokens left unrotated (class / register tokens)
    rotate_half: bool = False  # True: halves [-x2, x1]; False: interleaved pairs [-x1, x0, ...]

    def describe(self) -> str:
        layout = "half" if self.rotate_half else "interleaved"
        return f"rope ({layout}{f', after {self.prefix} prefix tokens' if self.prefix else ''})"


@dataclass
class AttentionInputs:
    q: torch.Tensor  # B, H, Nq, D
    k: torch.Tensor  # B, H, Nk, D
    v: torch.Tensor  # B, H, Nk, D
    bias: Optional[torch.Tensor]  # broadcastable to B, H, Nq, Nk
    scale: float
    dropout_p: float
    rel_pos: Optional[RelPos] = None  # decomposed relative position, checked
    rope: Optional[Rope] = None  # rotary embedding, checked; cos and sin as 4-D views (1|B, 1|H, Nq - prefix, D)

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
        rope = self.rope[:2] if self.rope is not None else ()
        return data_free(self.q, self.k, self.v, self.bias, *rel, *rope)

    def describe(self) -> str:
        bias = "none" if self.bias is None else f"{tuple(self.bias.shape)}"
        return (f"q {tuple(self.q.shape)}, k {tuple(self.k.shape)}, {C.dtype_name(self.dtype)} on {self.device}, "
                f"bias {bias}, dropout_p={self.dropout_p}"
                + (f", {self.rel_pos.describe()}" if self.rel_pos is not None else "")
                + (f", {self.rope.describe()}" if self.rope is not None else ""))


def head_dim_supported(d: int) -> bool:
    return 16 <= d <= 256 and d % 8 == 0


def check_attention_inputs(q, k, v, bias=None, scale=None, dropout_p=0.0, rel_pos=None, rope=None) -> AttentionInputs:
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
    rope = check_rope(rope, q, k)
    return AttentionInputs(q, k, v, bias, D ** -0.5 if scale is None else scale, float(dropout_p), rel_pos, rope)


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


ROPE_FORMS = ("a vitkernels.Rope(cos, sin, prefix=0, rotate_half=False) or a tuple (cos, sin) of "
              "(..., Nq, D) tensors")


def check_rope(rope, q, k) -> Optional[Rope]:
    """Validate ``rope`` against q (B, H, Nq, D) and k (B, H, Nk, D); returns it as a ``Rope`` whose cos and
    sin are 4-D views (1|B, 1|H, Nq - prefix, D) of the given tensors (no copy)."""
    if rope is None:
        return None
    if not isinstance(rope, Rope):
        if not isinstance(rope, (tuple, list)) or len(rope) != 2:
            raise TypeError(f"{OP}: rope must be {ROPE_FORMS}; got {_kind(rope)} (prefix tokens and the half "
                            "layout: Rope(cos, sin, prefix=..., rotate_half=True))")
        rope = Rope(*rope)
    prefix, rotate_half = rope.prefix, rope.rotate_half
    if isinstance(prefix, bool) or not isinstance(prefix, int):
        raise TypeError(f"{OP}: rope.prefix must be an int, got {type(prefix).__name__}")
    if not isinstance(rotate_half, bool):
        raise TypeError(f"{OP}: rope.rotate_half must be a bool, got {type(rotate_half).__name__}")
    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    if Nq != Nk:
        raise ValueError(f"{OP}: rope rotates q and k by the same per-token angles and needs Nq == Nk, got "
                         f"Nq={Nq}, Nk={Nk} (rotate q and k yourself for cross-attention)")
    if not 0 <= prefix <= Nq:
        raise ValueError(f"{OP}: rope.prefix must be in [0, Nq] = [0, {Nq}], got {prefix}")
    allowed = (q.dtype,) if q.dtype in (torch.float32, torch.float64) else (q.dtype, torch.float32)
    for name, t in (("cos", rope.cos), ("sin", rope.sin)):
        C.require_tensor(OP, f"rope.{name}", t)
        if t.dtype not in allowed:
            raise TypeError(f"{OP}: rope.{name} must have dtype "
                            f"{' or '.join(C.dtype_name(d) for d in allowed)} (q's dtype, or float32 tables "
                            f"for fp16/bf16 q), got {C.dtype_name(t.dtype)} (no silent casts)")
        C.require_same_device(OP, f"rope.{name}", t, "q", q)
        shape = tuple(t.shape)
        ok = (2 <= t.dim() <= 4 and shape[-2:] == (Nq - prefix, D)
              and all(s in (1, full) for s, full in zip(reversed(shape[:-2]), (H, B))))
        if not ok:
            raise ValueError(f"{OP}: rope.{name} must be (Nq - prefix, D) = ({Nq - prefix}, {D}), or that with "
                             f"leading dims broadcastable to (B, H) = ({B}, {H}), got shape {shape}")
    if rope.cos.shape != rope.sin.shape or rope.cos.dtype != rope.sin.dtype:
        raise ValueError(f"{OP}: rope.cos and rope.sin must have the same shape and dtype, got "
                         f"{tuple(rope.cos.shape)} {C.dtype_name(rope.cos.dtype)} and {tuple(rope.sin.shape)} "
                         f"{C.dtype_name(rope.sin.dtype)}")
    if rotate_half and D % 2:  # D is a multiple of 8 here; kept for the message if that ever changes
        raise ValueError(f"{OP}: rope with rotate_half needs an even head dim, got D={D}")
    lead = (None,) * (4 - rope.cos.dim())
    return rope._replace(cos=rope.cos[lead], sin=rope.sin[lead])

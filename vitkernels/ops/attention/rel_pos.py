"""Building the per-axis terms of a decomposed relative-position bias (MViTv2, ViTDet, SAM) for
``flash_attention(..., rel_pos=...)``: the small einsums of the queries with the learnable tables, as timm's
``samvit`` and torchvision's ``mvit_v2`` compute them, without their (Nq, Nk) sum.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from vitkernels.ops import _checks as C
from vitkernels.ops import _tracing
from vitkernels.ops._checks import autocast_dtype
from vitkernels.ops.attention.checks import RelPos


INDEX_RULES = ("timm", "torchvision")


def rel_pos_table(q_size: int, k_size: int, table: torch.Tensor, index_rule: str = "timm") -> torch.Tensor:
    """(q_size, k_size, C): the row of ``table`` (L, C) for each (query, key) pair along one axis.

    The table is resized (linear) to ``2 * max(q_size, k_size) - 1`` rows when it has another length, and
    the coordinates of the shorter axis are stretched to the longer one's (a pooled key grid): the
    rule of MViTv2, ViTDet and SAM. ``index_rule`` picks whose float32 arithmetic turns the stretched
    distance into a row: timm's ``get_rel_pos`` ("timm", SAM / ViTDet) or torchvision's ``_add_rel_pos``
    ("torchvision", MViTv2). The two agree whenever one size divides the other and can pick neighbouring
    rows otherwise (16 queries against 6 keys)."""
    length = 2 * max(q_size, k_size) - 1
    if table.shape[0] != length:
        table = F.interpolate(table.reshape(1, table.shape[0], -1).permute(0, 2, 1), size=length,
                              mode="linear").reshape(-1, length).permute(1, 0)
    q_ratio, k_ratio = max(k_size / q_size, 1.0), max(q_size / k_size, 1.0)
    if index_rule == "timm":
        q_coords = torch.arange(q_size, dtype=torch.float32)[:, None] * q_ratio
        k_coords = torch.arange(k_size, dtype=torch.float32)[None, :] * k_ratio
        relative = (q_coords - k_coords) + (k_size - 1) * k_ratio
    elif index_rule == "torchvision":
        relative = torch.arange(q_size)[:, None] * q_ratio - (torch.arange(k_size)[None, :] + (1.0 - k_size)) * k_ratio
    else:
        raise ValueError(f"rel_pos_table: index_rule must be one of {INDEX_RULES}, got {index_rule!r}")
    return table[relative.long().to(table.device)]


def decomposed_rel_pos(
    q: torch.Tensor,  # B, H, Nq, D
    q_grid: Sequence[int],
    k_grid: Sequence[int],
    rel_pos_h: torch.Tensor,  # Lh, D
    rel_pos_w: torch.Tensor,  # Lw, D
    rel_pos_t: Optional[torch.Tensor] = None,  # Lt, D (3-D grids)
    prefix: int = 0,
    index_rule: str = "timm",
) -> RelPos:
    """The ``RelPos`` of queries ``q`` (unscaled, as the models use them) laid out on ``q_grid`` ((h, w) or
    (t, h, w), after ``prefix`` class tokens) against keys on ``k_grid``, with the learnable tables
    ``rel_pos_h``/``rel_pos_w`` (/``rel_pos_t``) of shape (L, D). Each term: (B, H, Nq - prefix, K) in q's
    dtype; differentiable in q and the tables. ``index_rule``: "timm" (SAM, ViTDet) or "torchvision"
    (MViTv2), see ``rel_pos_table``.

    ``flash_attention(q, k, v, rel_pos=decomposed_rel_pos(q, (64, 64), (64, 64), rel_h, rel_w))`` is SAM's
    global attention without its (4096 x 4096) bias. Under FX symbolic tracing: one node."""
    proxy = _tracing.fx_proxy(q, rel_pos_h, rel_pos_w, rel_pos_t)
    if proxy is not None:
        return _tracing.fx_leaf(proxy, decomposed_rel_pos, (q, q_grid, k_grid, rel_pos_h, rel_pos_w),
                                dict(rel_pos_t=rel_pos_t, prefix=prefix, index_rule=index_rule))
    three_d = rel_pos_t is not None
    q_grid, k_grid = _check_inputs(q, q_grid, k_grid, rel_pos_h, rel_pos_w, rel_pos_t, prefix, index_rule)
    B, H, n_q, D = q.shape
    qt, qh, qw = q_grid if three_d else (1,) + q_grid
    r_q = q[:, :, prefix:].reshape(B, H, qt, qh, qw, D)
    rh = rel_pos_table(qh, k_grid[-2], rel_pos_h, index_rule).to(q.dtype)
    rw = rel_pos_table(qw, k_grid[-1], rel_pos_w, index_rule).to(q.dtype)
    rel_h = torch.einsum("bnthwc,hkc->bnthwk", r_q, rh).reshape(B, H, n_q - prefix, k_grid[-2])
    rel_w = torch.einsum("bnthwc,wkc->bnthwk", r_q, rw).reshape(B, H, n_q - prefix, k_grid[-1])
    rel_t = None
    if three_d:
        rt = rel_pos_table(qt, k_grid[0], rel_pos_t, index_rule).to(q.dtype)
        rel_t = torch.einsum("bnthwc,tkc->bnthwk", r_q, rt).reshape(B, H, n_q - prefix, k_grid[0])
    return RelPos(rel_h, rel_w, rel_t, prefix)


NAME = "decomposed_rel_pos"


def _check_inputs(q, q_grid, k_grid, rel_pos_h, rel_pos_w, rel_pos_t, prefix, index_rule):
    """Validate ``decomposed_rel_pos``'s arguments (errors name the argument, the expected and the actual);
    returns the grids as tuples of ints."""
    if index_rule not in INDEX_RULES:
        raise ValueError(f"{NAME}: index_rule must be one of {INDEX_RULES}, got {index_rule!r}")
    C.require_tensor(NAME, "q", q)
    C.require_rank(NAME, "q", q, (4,), "(B, H, Nq, D)")
    C.require_float_dtype(NAME, "q", q)
    three_d = rel_pos_t is not None
    grids = []
    for name, grid in (("q_grid", q_grid), ("k_grid", k_grid)):
        if (not isinstance(grid, (tuple, list, torch.Size)) or len(grid) != (3 if three_d else 2)
                or not all(isinstance(n, (int, torch.SymInt)) and not isinstance(n, bool) and n >= 1 for n in grid)):
            raise ValueError(f"{NAME}: {name} must be {'(t, h, w)' if three_d else '(h, w)'} positive ints"
                             f"{' (rel_pos_t is given)' if three_d else ''}, got {grid!r}")
        grids.append(tuple(grid))
    if isinstance(prefix, bool) or not isinstance(prefix, int) or prefix < 0:
        raise ValueError(f"{NAME}: prefix must be an int >= 0, got {prefix!r}")
    n_q, D = q.shape[2], q.shape[3]
    if n_q - prefix != math.prod(grids[0]):
        raise ValueError(f"{NAME}: q has {n_q} rows; q_grid {grids[0]} after {prefix} prefix tokens needs "
                         f"{prefix + math.prod(grids[0])}")
    autocast = autocast_dtype(q.device.type) is not None
    for name, table in (("rel_pos_h", rel_pos_h), ("rel_pos_w", rel_pos_w), ("rel_pos_t", rel_pos_t)):
        if name == "rel_pos_t" and table is None:
            continue
        C.require_tensor(NAME, name, table)
        if table.dim() != 2 or table.shape[0] < 1 or table.shape[1] != D:
            raise ValueError(f"{NAME}: {name} must be a (L, D) table with L >= 1 and D = {D} (q's head dim), got "
                             f"shape {tuple(table.shape)}")
        C.require_same_device(NAME, name, table, "q", q)
        if table.dtype != q.dtype and not autocast:  # under autocast the einsum takes both in its dtype
            raise TypeError(f"{NAME}: {name} must have q's dtype {C.dtype_name(q.dtype)} (outside autocast), got "
                            f"{C.dtype_name(table.dtype)}")
    return grids

"""Window geometry shared by every window_attention backend and by the Swin modules: window clipping,
padding, relative-position index and shift-mask regions, for 2-D (Swin) and 3-D (Video Swin) maps."""
from __future__ import annotations

import functools
import math
from typing import Sequence, Tuple

import torch

from vitkernels.ops._compile import constant_tensors


def resolve_window_shift(
    spatial: Sequence[int], window_size: Sequence[int], shift_size: Sequence[int]
) -> Tuple[Tuple[int, ...], Tuple[int, ...]]:
    """The window and shift actually used on a map of size ``spatial``: a dim whose map is not larger
    than the window uses the whole map as its window and no shift (timm's ``_calc_window_shift``,
    Video Swin's ``get_window_size``)."""
    window = tuple(r if r <= w else w for r, w in zip(spatial, window_size))
    shift = tuple(0 if r <= w else s for r, w, s in zip(spatial, window_size, shift_size))
    return window, shift


def padded_size(spatial: Sequence[int], window: Sequence[int]) -> Tuple[int, ...]:
    """Each dim rounded up to a multiple of its window (padding goes at the end)."""
    return tuple(math.ceil(r / w) * w for r, w in zip(spatial, window))


def table_rows(window: Sequence[int]) -> int:
    """Rows of the relative-position bias table of a window: prod(2 w - 1)."""
    return math.prod([2 * w - 1 for w in window])


def relative_position_index(window: Sequence[int], device=None) -> torch.Tensor:
    """(N, N) long, N = prod(window): the table row of each (query, key) pair of one window.

    Row = sum_d (dq_d - dk_d + w_d - 1) * prod_{e > d} (2 w_e - 1), with tokens in row-major order:
    the index of timm's ``get_relative_position_index`` (2-D) and Video Swin's (3-D).
    """
    grids = torch.meshgrid(*[torch.arange(w, device=device) for w in window], indexing="ij")
    coords = torch.stack([g.flatten() for g in grids])  # nd, N
    rel = coords[:, :, None] - coords[:, None, :]  # nd, N, N
    index = torch.zeros(rel.shape[1:], dtype=torch.long, device=device)
    for d, w in enumerate(window):
        stride = math.prod(2 * e - 1 for e in window[d + 1:])
        index += (rel[d] + w - 1) * stride
    return index


def window_bias_index(window: Sequence[int], table_window: Sequence[int], device=None) -> torch.Tensor:
    """(N, N) table rows for the tokens of a ``window`` when the table is laid out for ``table_window``.

    Equal windows: the plain index. A 3-D window clipped to a small map keeps Video Swin's behaviour:
    the full window's index sliced to ``[:N, :N]`` (flat token numbers read in the full window).
    """
    n = math.prod(window)
    return relative_position_index(table_window, device)[:n, :n]


def shift_region_ids(padded: Sequence[int], window: Sequence[int], shift: Sequence[int], device=None) -> torch.Tensor:
    """Region id of every position of the padded (shifted) map, shape ``padded``.

    Per dim, timm's slices ``[0, L-w)``, ``[L-w, L-s)``, ``[L-s, L)`` get 0, 1, 2; a dim with shift 0
    is one region (timm's ``-0`` slice covers the whole dim last). Pairs with different ids are masked.
    """
    ids = torch.zeros(tuple(padded), dtype=torch.long, device=device)
    for d, (length, w, s) in enumerate(zip(padded, window, shift)):
        p = torch.arange(length, device=device)
        if s == 0:
            region = torch.full_like(p, 2)
        else:
            region = (p >= length - w).long() + (p >= length - s).long()
        shape = [1] * len(padded)
        shape[d] = length
        ids = ids * 3 + region.view(shape)
    return ids


@constant_tensors
@functools.lru_cache(maxsize=64)
def pairs_by_table_row(window: Tuple[int, ...], table_window: Tuple[int, ...], device: str) -> torch.Tensor:
    """For each table row, the flat (i * N + j) pairs that read it, padded with N*N (a zero slot):
    (rows, max pairs) long, for a deterministic gather-sum of dS into d(table)."""
    index = window_bias_index(window, table_window).reshape(-1)  # N*N
    rows = table_rows(table_window)
    order = torch.argsort(index, stable=True)
    counts = torch.bincount(index, minlength=rows)
    width = int(counts.max())
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.arange(index.numel()) - starts[index[order]]
    pairs = torch.full((rows, width), index.numel(), dtype=torch.long)
    pairs[index[order], slot] = order
    return pairs.to(device)


def sum_by_table_row(dscores: torch.Tensor, window: Sequence[int], table_window: Sequence[int]) -> torch.Tensor:
    """(heads, N, N) per-pair gradients -> (table rows, heads): each row the sum of its pairs, gathered in
    a fixed order (no atomics: bitwise deterministic on every device)."""
    heads = dscores.shape[0]
    pairs = pairs_by_table_row(tuple(window), tuple(table_window), str(dscores.device))
    flat = torch.cat([dscores.reshape(heads, -1), dscores.new_zeros(heads, 1)], dim=1)  # the N*N slot: 0
    return flat.index_select(1, pairs.view(-1)).view(heads, *pairs.shape).sum(-1).t()

"""window_attention's C++ CPU kernels (``vitkernels._C``, csrc/cpu/window_attention.cpp) in the kernels'
contract (``function.WindowAttentionFunction``): shift, padding, partition, relative-position bias, shift
mask and reverse by index arithmetic on the unpadded map (nothing partitioned is materialised), every head
of a window on one gathered block, gradients summed in a fixed order. Cosine attention (Swin V2): the kernels
normalise each gathered q and k row and scale the logits per head; d(logit_scale) is summed per chunk of
windows, the chunks in order."""
from __future__ import annotations

import functools
from typing import Tuple

import torch

from vitkernels import _ext
from vitkernels.ops.window_attention import geometry


@functools.lru_cache(maxsize=64)
def _bias_index(window: Tuple[int, ...], table_window: Tuple[int, ...]) -> torch.Tensor:
    """(N, N) int64 table row of each (query, key) pair of a window (CPU, built once per geometry)."""
    return geometry.window_bias_index(window, table_window).contiguous()


def _as_3d(inputs):
    """(qkv as (B, T, H, W, 3C), the kernels' geometry arguments): 2-D maps get a unit time dim (a view)."""
    qkv, nd = inputs.qkv, len(inputs.window)
    lead = (1,) * (3 - nd)
    spatial = lead + tuple(inputs.spatial)
    window = lead + tuple(inputs.window)
    shift = (0,) * (3 - nd) + tuple(inputs.shift)
    padded = lead + geometry.padded_size(inputs.spatial, inputs.window)
    qkv5 = qkv.unsqueeze(1) if nd == 2 else qkv
    index = _bias_index(tuple(inputs.window), tuple(inputs.table_window)) if inputs.rel_pos_bias is not None else None
    return qkv5, index, dict(num_heads=inputs.num_heads, spatial=list(spatial), window=list(window),
                             shift=list(shift), padded=list(padded), roll_after_pad=nd == 3, scale=inputs.scale)


def _logit_scale(inputs):
    """The logit scale the kernels take (cosine attention), read in place; None for dot-product attention."""
    return inputs.logit_scale if inputs.cosine else None


def _5d(t: torch.Tensor, nd: int) -> torch.Tensor:
    return t.unsqueeze(1) if nd == 2 else t


class CpuWindowKernels:
    @staticmethod
    def forward(inputs):
        qkv5, index, geo = _as_3d(inputs)
        out5, lse = _ext.extension().window_forward_cpu(qkv5, inputs.rel_pos_bias, inputs.qkv_bias, index, **geo,
                                                        logit_scale=_logit_scale(inputs))
        out = out5.view(inputs.qkv.shape[:-1] + (out5.shape[-1],))
        return out, lse, None

    @staticmethod
    def backward(dout, inputs, out, lse, needs, cache=None):
        need_qkv, need_table, need_bias, need_scale = (tuple(needs) + (False,))[:4]
        table, qkv_bias, nd = inputs.rel_pos_bias, inputs.qkv_bias, len(inputs.window)
        logit_scale = _logit_scale(inputs)
        need_table = need_table and table is not None
        need_bias = need_bias and qkv_bias is not None
        need_scale = bool(need_scale) and logit_scale is not None
        qkv5, index, geo = _as_3d(inputs)
        dqkv, dpairs, dbias, dscale = _ext.extension().window_backward_cpu(
            _5d(dout, nd), qkv5, table, qkv_bias, index, _5d(out, nd), lse, **geo, need_qkv=need_qkv,
            need_pairs=need_table, need_bias=need_bias, logit_scale=logit_scale, need_logit_scale=need_scale)
        dtable = dqkv_bias = dlogit_scale = None
        if need_scale:
            dlogit_scale = dscale.reshape(logit_scale.shape).to(logit_scale.dtype)
        if need_table:
            dtable = geometry.sum_by_table_row(dpairs, inputs.window, inputs.table_window).to(table.dtype)
        if need_bias:
            dqkv_bias = dbias.to(qkv_bias.dtype)
        if need_qkv:
            dqkv = dqkv.view(inputs.qkv.shape)
        return dqkv, dtable, dqkv_bias, dlogit_scale

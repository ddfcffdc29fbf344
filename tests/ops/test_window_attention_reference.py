"""The ``window_attention`` reference against independent oracles.

* 2-D: timm 1.0.x ``SwinTransformerBlock._attn`` (with ``attn.proj`` taken out), same weights, float64,
  forward and every gradient (input, qkv weight, qkv bias, relative-position table).
* 3-D: a deliberately naive Video Swin written here with Python loops and coordinate arithmetic only
  (no roll, no pad, no window partition reshapes).
* gradcheck, low-precision sanity, non-contiguous inputs.
"""
from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from tests.utils import assert_close_2x, max_err
from vitkernels.ops.window_attention import window_attention

F64_TOL = dict(rtol=1e-10, atol=1e-10)


def _tuple(v, nd):
    return tuple(v) if isinstance(v, (tuple, list)) else (v,) * nd


# --------------------------------------------------------------------------------------------------
# 2-D: timm's SwinTransformerBlock
# --------------------------------------------------------------------------------------------------

# (map (H, W), window, shift, num_heads, head_dim)
CASES_2D = [
    pytest.param((8, 8), 4, 0, 2, 32, id="8x8-w4-noshift-hd32"),
    pytest.param((8, 8), 4, 2, 2, 32, id="8x8-w4-s2-hd32"),
    pytest.param((13, 10), 7, 3, 2, 32, id="13x10-w7-s3-pad-hd32"),
    pytest.param((13, 10), 7, 0, 3, 40, id="13x10-w7-noshift-pad-hd40"),
    pytest.param((5, 6), 7, 3, 2, 40, id="5x6-w7-s3-clipped-both-hd40"),
    pytest.param((7, 20), 7, 3, 2, 32, id="7x20-w7-s3-clipped-h-only-hd32"),
    pytest.param((6, 20), (8, 7), (4, 3), 1, 40, id="6x20-w8x7-s4x3-clipped-h-pad-w-hd40"),
    pytest.param((10, 13), (4, 8), (2, 4), 2, 32, id="10x13-w4x8-s2x4-nonsquare-pad-hd32"),
    pytest.param((9, 11), (4, 5), (0, 2), 3, 40, id="9x11-w4x5-s0x2-one-dim-shift-pad-hd40"),
    pytest.param((9, 11), (4, 5), (3, 0), 2, 32, id="9x11-w4x5-s3x0-other-dim-shift-pad-hd32"),
]


def _timm_block(dim, resolution, num_heads, window, shift):
    timm_swin = pytest.importorskip("timm.models.swin_transformer")  # only the 2-D tests need timm
    blk = timm_swin.SwinTransformerBlock(dim, input_resolution=resolution, num_heads=num_heads,
                                         window_size=window, shift_size=shift).double()
    blk.attn.proj = torch.nn.Identity()
    with torch.no_grad():
        blk.attn.relative_position_bias_table.copy_(torch.randn_like(blk.attn.relative_position_bias_table))
        blk.attn.qkv.bias.copy_(torch.randn_like(blk.attn.qkv.bias))
    return blk.eval()


@pytest.mark.parametrize("resolution, window, shift, num_heads, head_dim", CASES_2D)
def test_2d_matches_timm_swin_block(resolution, window, shift, num_heads, head_dim):
    B, dim = 2, num_heads * head_dim
    blk = _timm_block(dim, resolution, num_heads, window, shift)
    # Sanity about the case itself: timm clips like our op does, and the table is the clipped window's.
    wh, ww = blk.window_size
    assert blk.attn.relative_position_bias_table.shape == ((2 * wh - 1) * (2 * ww - 1), num_heads)

    x = torch.randn(B, *resolution, dim, dtype=torch.float64)
    g = torch.randn(B, *resolution, dim, dtype=torch.float64)

    # timm path (autograd through the block)
    x_t = x.clone().requires_grad_()
    out_t = blk._attn(x_t)
    (out_t * g).sum().backward()

    # our path (autograd through the op)
    x_o = x.clone().requires_grad_()
    w = blk.attn.qkv.weight.detach().clone().requires_grad_()
    b = blk.attn.qkv.bias.detach().clone().requires_grad_()
    table = blk.attn.relative_position_bias_table.detach().clone().requires_grad_()
    out_o = window_attention(F.linear(x_o, w, b), num_heads=num_heads, window_size=window, shift_size=shift,
                             rel_pos_bias=table, qkv_bias=b, backend="reference")
    (out_o * g).sum().backward()

    assert out_o.shape == (B, *resolution, dim)
    torch.testing.assert_close(out_o, out_t, **F64_TOL)
    torch.testing.assert_close(x_o.grad, x_t.grad, **F64_TOL)
    torch.testing.assert_close(w.grad, blk.attn.qkv.weight.grad, **F64_TOL)
    torch.testing.assert_close(b.grad, blk.attn.qkv.bias.grad, **F64_TOL)
    torch.testing.assert_close(table.grad, blk.attn.relative_position_bias_table.grad, **F64_TOL)


# 2-D Swin V2 (cosine attention): timm's SwinTransformerV2Block


@pytest.mark.parametrize("resolution, window, shift, num_heads, head_dim", [
    pytest.param((8, 8), 4, 2, 2, 32, id="8x8-w4-s2"),
    pytest.param((13, 10), 7, 3, 2, 32, id="13x10-w7-s3-pad"),
    pytest.param((9, 11), (4, 5), (0, 2), 3, 16, id="9x11-w4x5-s0x2-pad"),
    pytest.param((5, 6), 7, 3, 2, 16, id="5x6-w7-clipped"),
])
def test_2d_cosine_matches_timm_swinv2_block(resolution, window, shift, num_heads, head_dim):
    """window_attention(cosine=True) with Swin V2's table (16 * sigmoid of the CPB MLP) and logit scale against
    timm's SwinTransformerV2Block._attn (proj taken out), float64, forward and every gradient: x, the qkv weight,
    q_bias and v_bias, the MLP's weights, the logit scale (one head past the clamp at log 100)."""
    timm_v2 = pytest.importorskip("timm.models.swin_transformer_v2")
    B, dim = 2, num_heads * head_dim
    torch.manual_seed(0)
    blk = timm_v2.SwinTransformerV2Block(dim, input_resolution=resolution, num_heads=num_heads, window_size=window,
                                         shift_size=shift).double().eval()
    attn = blk.attn
    attn.proj = torch.nn.Identity()
    with torch.no_grad():
        attn.q_bias.copy_(torch.randn_like(attn.q_bias))
        attn.v_bias.copy_(torch.randn_like(attn.v_bias))
        attn.logit_scale.copy_(torch.linspace(math.log(3.0), math.log(100.0) + 0.3, num_heads).view(-1, 1, 1))
    x = torch.randn(B, *resolution, dim, dtype=torch.float64)
    g = torch.randn(B, *resolution, dim, dtype=torch.float64)
    params = [attn.qkv.weight, attn.q_bias, attn.v_bias, attn.logit_scale, *attn.cpb_mlp.parameters()]

    x_t = x.clone().requires_grad_()
    out_t = blk._attn(x_t)
    grads_t = torch.autograd.grad(out_t, [x_t] + params, g)

    x_o = x.clone().requires_grad_()
    qkv_bias = torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))
    table = 16 * torch.sigmoid(attn.cpb_mlp(attn.relative_coords_table).view(-1, num_heads))
    out_o = window_attention(F.linear(x_o, attn.qkv.weight, qkv_bias), num_heads=num_heads, window_size=blk.window_size,
                             shift_size=blk.shift_size, rel_pos_bias=table, qkv_bias=qkv_bias, cosine=True,
                             logit_scale=attn.logit_scale, backend="reference")
    grads_o = torch.autograd.grad(out_o, [x_o] + params, g)
    torch.testing.assert_close(out_o, out_t, **F64_TOL)
    for name, a, b in zip(["x", "qkv.weight", "q_bias", "v_bias", "logit_scale", "cpb..."], grads_o, grads_t):
        torch.testing.assert_close(a, b, **F64_TOL, msg=lambda m, name=name: f"d{name}: {m}")
    assert grads_o[4].view(-1)[-1] == 0  # past the clamp


# --------------------------------------------------------------------------------------------------
# 3-D: a naive Video Swin, loops and coordinates only
# --------------------------------------------------------------------------------------------------

def _unravel(flat, shape):
    coords = []
    for size in reversed(shape):
        coords.append(flat % size)
        flat //= size
    return tuple(reversed(coords))


def naive_video_swin_attention(qkv, num_heads, window_size, shift_size, table=None, qkv_bias=None, scale=None):
    """Video Swin's block attention (before proj), one query at a time.

    Pad to a multiple of the window, roll by -shift over the padded volume, mask pairs from different
    shift regions of the padded volume, bias from the table laid out for the configured window (a
    clipped window reads the full window's index at [:N, :N]), roll back, crop.
    """
    B, S, c3 = qkv.shape[0], tuple(qkv.shape[1:-1]), qkv.shape[-1]
    nd = len(S)
    C = c3 // 3
    hd = C // num_heads
    scale = hd ** -0.5 if scale is None else scale
    window_size, shift_size = _tuple(window_size, nd), _tuple(shift_size, nd)
    # Video Swin's get_window_size
    win = tuple(s if s <= w else w for s, w in zip(S, window_size))
    sh = tuple(0 if s <= w else k for s, w, k in zip(S, window_size, shift_size))
    P = tuple(-(-s // w) * w for s, w in zip(S, win))  # padded volume
    twin = window_size  # the table's window
    pad_token = qkv_bias if qkv_bias is not None else qkv.new_zeros(c3)

    def region(p):
        """Region id of a position of the padded (shifted) volume: per dim [0, L-w), [L-w, L-s), [L-s, L)."""
        rid = 0
        for d in range(nd):
            L, w, s = P[d], win[d], sh[d]
            if s == 0:
                r = 0
            elif p[d] < L - w:
                r = 0
            elif p[d] < L - s:
                r = 1
            else:
                r = 2
            rid = rid * 3 + r
        return rid

    def table_row(a, k):
        """Row of the pair of flat token numbers (a, k), read as coordinates in the table's window."""
        ca, ck = _unravel(a, twin), _unravel(k, twin)
        row = 0
        for d in range(nd):
            stride = math.prod(2 * twin[e] - 1 for e in range(d + 1, nd))
            row += (ca[d] - ck[d] + twin[d] - 1) * stride
        return row

    results = {}
    counts = [P[d] // win[d] for d in range(nd)]
    for b in range(B):
        for wi in itertools.product(*[range(c) for c in counts]):
            tokens = []  # (source position or None, region, (3, heads, hd) vector)
            for t in itertools.product(*[range(w) for w in win]):  # row-major inside the window
                p = tuple(wi[d] * win[d] + t[d] for d in range(nd))  # position in the shifted volume
                src = tuple((p[d] + sh[d]) % P[d] for d in range(nd))  # where it came from (padded volume)
                inside = all(src[d] < S[d] for d in range(nd))
                vec = qkv[(b,) + src] if inside else pad_token
                tokens.append((src if inside else None, region(p), vec.reshape(3, num_heads, hd)))
            for a, (src, ra, vec_a) in enumerate(tokens):
                if src is None:  # a padded query: its output is cropped away
                    continue
                keys = [k for k, tok in enumerate(tokens) if tok[1] == ra]  # masked pairs excluded
                q = vec_a[0]  # heads, hd
                logits = []
                for k in keys:
                    l = (q * tokens[k][2][1]).sum(-1) * scale  # heads
                    if table is not None:
                        l = l + table[table_row(a, k)]
                    logits.append(l)
                logits = torch.stack(logits)  # nk, heads
                e = torch.exp(logits - logits.detach().max(dim=0).values)
                p_ = e / e.sum(dim=0)
                out = sum(p_[j][:, None] * tokens[k][2][2] for j, k in enumerate(keys))  # heads, hd
                results[(b,) + src] = out.reshape(C)
    order = [results[(b,) + pos] for b in range(B) for pos in itertools.product(*[range(s) for s in S])]
    return torch.stack(order).reshape(B, *S, C)


# (map (T, H, W), window, shift, num_heads, head_dim, with table, with qkv_bias)
CASES_3D = [
    pytest.param((4, 6, 5), (2, 3, 3), (1, 1, 1), 2, 4, True, True, id="4x6x5-w233-s111-padW"),
    pytest.param((3, 5, 5), (2, 3, 3), (1, 1, 2), 2, 4, True, True, id="3x5x5-w233-s112-pad-all"),
    pytest.param((2, 6, 6), (4, 3, 3), (2, 1, 1), 2, 4, True, True, id="2x6x6-w433-s211-clipped-T"),
    pytest.param((3, 3, 8), (4, 4, 3), (2, 2, 1), 1, 4, True, True, id="3x3x8-w443-s221-clipped-TH-padW"),
    pytest.param((4, 3, 6), (2, 4, 3), (1, 2, 1), 2, 4, True, True, id="4x3x6-w243-s121-clipped-H-only"),
    pytest.param((4, 6, 5), (2, 3, 3), 0, 2, 4, True, True, id="4x6x5-w233-noshift-padW"),
    pytest.param((3, 5, 5), (2, 3, 3), (1, 0, 2), 2, 4, True, True, id="3x5x5-w233-s102-one-dim-unshifted"),
    pytest.param((3, 5, 5), (2, 3, 3), (1, 1, 2), 2, 4, False, False, id="3x5x5-w233-s112-no-table-no-bias"),
]


@pytest.mark.parametrize("spatial, window, shift, num_heads, head_dim, with_table, with_bias", CASES_3D)
def test_3d_matches_naive_video_swin(spatial, window, shift, num_heads, head_dim, with_table, with_bias):
    B, C = 2, num_heads * head_dim
    rows = math.prod(2 * w - 1 for w in window)
    qkv = torch.randn(B, *spatial, 3 * C, dtype=torch.float64)
    table = torch.randn(rows, num_heads, dtype=torch.float64) if with_table else None
    bias = torch.randn(3 * C, dtype=torch.float64) if with_bias else None
    g = torch.randn(B, *spatial, C, dtype=torch.float64)

    def leaves():
        return [t.clone().requires_grad_() if t is not None else None for t in (qkv, table, bias)]

    def grad(t):  # a leaf that did not reach the output (e.g. qkv_bias with no padding) counts as zero
        return None if t is None else (t.grad if t.grad is not None else torch.zeros_like(t))

    q_r, t_r, b_r = leaves()
    out_r = window_attention(q_r, num_heads=num_heads, window_size=window, shift_size=shift,
                             rel_pos_bias=t_r, qkv_bias=b_r, backend="reference")
    (out_r * g).sum().backward()

    q_n, t_n, b_n = leaves()
    out_n = naive_video_swin_attention(q_n, num_heads, window, shift, t_n, b_n)
    (out_n * g).sum().backward()

    assert out_r.shape == (B, *spatial, C)
    torch.testing.assert_close(out_r, out_n, **F64_TOL)
    torch.testing.assert_close(grad(q_r), grad(q_n), **F64_TOL)
    torch.testing.assert_close(grad(t_r), grad(t_n), **F64_TOL)
    torch.testing.assert_close(grad(b_r), grad(b_n), **F64_TOL)
    if with_bias and any(s % w for s, w in zip(spatial, window) if s > w):
        assert grad(b_r).abs().max() > 0  # padded keys do reach real queries: the bias gradient is exercised


def _relay_table(table, full_window, window):
    """The table for ``window`` holding, for every relative offset, the full window's row of that offset:
    what a geometrically exact (non-Video-Swin) treatment of a clipped window would read."""
    own = table.new_zeros(math.prod(2 * w - 1 for w in window), table.shape[1])
    for r in range(own.shape[0]):
        rel = [i - (w - 1) for i, w in zip(_unravel(r, [2 * w - 1 for w in window]), window)]
        row = 0
        for d, fw in enumerate(full_window):
            row = row * (2 * fw - 1) + rel[d] + fw - 1
        own[r] = table[row]
    return own


def test_naive_3d_oracle_sees_the_clipped_index_quirk():
    """Video Swin reads a clipped window's bias from the full window's index at [:N, :N]. Clipping only
    the leading (T) dim leaves row-major token numbers, hence that slice, geometrically exact; clipping H
    does not. Check both with the naive oracle, so that the H-clipped case of
    ``test_3d_matches_naive_video_swin`` really tells the quirk from the exact index."""
    qkv = torch.randn(1, 4, 3, 6, 3 * 8, dtype=torch.float64)
    num_heads = 2
    # H clipped: window (2, 4, 3) on a (4, 3, 6) map -> (2, 3, 3), shift (1, 0, 1)
    table = torch.randn(math.prod(2 * w - 1 for w in (2, 4, 3)), num_heads, dtype=torch.float64)
    quirk = naive_video_swin_attention(qkv, num_heads, (2, 4, 3), (1, 2, 1), table)
    exact = naive_video_swin_attention(qkv, num_heads, (2, 3, 3), (1, 0, 1), _relay_table(table, (2, 4, 3), (2, 3, 3)))
    assert max_err(quirk, exact) > 1e-3
    # T clipped: window (6, 3, 3) on the same map -> (4, 3, 3): the slice is the exact index
    table = torch.randn(math.prod(2 * w - 1 for w in (6, 3, 3)), num_heads, dtype=torch.float64)
    quirk = naive_video_swin_attention(qkv, num_heads, (6, 3, 3), (3, 1, 1), table)
    exact = naive_video_swin_attention(qkv, num_heads, (4, 3, 3), (0, 1, 1), _relay_table(table, (6, 3, 3), (4, 3, 3)))
    torch.testing.assert_close(quirk, exact, **F64_TOL)


# --------------------------------------------------------------------------------------------------
# gradcheck
# --------------------------------------------------------------------------------------------------

GRADCHECK_CASES = [
    pytest.param((5, 5), 3, 1, id="2d-5x5-w3-s1-pad"),
    pytest.param((4, 5), (4, 3), (2, 1), id="2d-4x5-w4x3-s2x1-clipped-h-pad-w"),
    pytest.param((3, 4, 3), 2, 1, id="3d-3x4x3-w2-s1-pad"),
    pytest.param((2, 3, 3), (3, 2, 2), (1, 1, 1), id="3d-2x3x3-w322-s111-clipped-T-pad"),
]


@pytest.mark.parametrize("spatial, window, shift", GRADCHECK_CASES)
def test_gradcheck(spatial, window, shift):
    nd, num_heads, head_dim = len(spatial), 2, 2
    C = num_heads * head_dim
    win = _tuple(window, nd)
    table_win = tuple(min(s, w) for s, w in zip(spatial, win)) if nd == 2 else win
    qkv = torch.randn(1, *spatial, 3 * C, dtype=torch.float64, requires_grad=True)
    table = torch.randn(math.prod(2 * w - 1 for w in table_win), num_heads, dtype=torch.float64,
                        requires_grad=True)
    bias = torch.randn(3 * C, dtype=torch.float64, requires_grad=True)

    def fn(qkv, table, bias):
        return window_attention(qkv, num_heads=num_heads, window_size=window, shift_size=shift,
                                rel_pos_bias=table, qkv_bias=bias, backend="reference")

    assert torch.autograd.gradcheck(fn, (qkv, table, bias), eps=1e-6, atol=1e-7, rtol=1e-5)


# --------------------------------------------------------------------------------------------------
# Low precision: the reference in its own dtype vs itself in float64
# --------------------------------------------------------------------------------------------------

LOWP = [
    pytest.param(torch.float32, 1e-5, id="float32"),
    pytest.param(torch.bfloat16, 3e-2, id="bfloat16"),
]


@pytest.mark.parametrize("dtype, tol", LOWP)
def test_2d_low_precision_vs_float64_and_timm(dtype, tol):
    resolution, window, shift, num_heads, head_dim, B = (13, 10), 7, 3, 2, 32, 2
    dim = num_heads * head_dim
    blk = _timm_block(dim, resolution, num_heads, window, shift)
    x = torch.randn(B, *resolution, dim, dtype=torch.float64)
    w, b, table = blk.attn.qkv.weight.detach(), blk.attn.qkv.bias.detach(), blk.attn.relative_position_bias_table.detach()
    kw = dict(num_heads=num_heads, window_size=window, shift_size=shift, backend="reference")

    ref64 = window_attention(F.linear(x, w, b), rel_pos_bias=table, qkv_bias=b, **kw)
    xl, wl, bl, tl = (t.to(dtype) for t in (x, w, b, table))
    out = window_attention(F.linear(xl, wl, bl), rel_pos_bias=tl, qkv_bias=bl, **kw)
    assert out.dtype == dtype
    assert torch.isfinite(out).all()
    # the same low-precision qkv, upcast: isolates the op's own rounding from the Linear's
    ref_same_in = window_attention(F.linear(xl, wl, bl).double(), rel_pos_bias=tl.double(), qkv_bias=bl.double(),
                                   **kw)
    assert max_err(out, ref_same_in) <= tol

    # timm's own block in the same dtype is PyTorch's same-dtype math for this computation
    with torch.no_grad():
        out_timm = blk.to(dtype)._attn(xl)
    assert_close_2x(out, out_timm, ref64, floor=tol / 10, name=f"window_attention reference ({dtype})")


@pytest.mark.parametrize("dtype, tol", LOWP)
def test_3d_low_precision_vs_float64(dtype, tol):
    spatial, window, shift, num_heads, head_dim, B = (3, 5, 5), (2, 3, 3), (1, 1, 2), 2, 16, 2
    C = num_heads * head_dim
    qkv = torch.randn(B, *spatial, 3 * C).to(dtype)
    table = torch.randn(math.prod(2 * w - 1 for w in window), num_heads).to(dtype)
    bias = torch.randn(3 * C).to(dtype)
    kw = dict(num_heads=num_heads, window_size=window, shift_size=shift, backend="reference")
    out = window_attention(qkv, rel_pos_bias=table, qkv_bias=bias, **kw)
    ref = window_attention(qkv.double(), rel_pos_bias=table.double(), qkv_bias=bias.double(), **kw)
    assert out.dtype == dtype
    assert torch.isfinite(out).all()
    assert max_err(out, ref) <= tol


# --------------------------------------------------------------------------------------------------
# Non-contiguous qkv
# --------------------------------------------------------------------------------------------------

NONCONTIG = [
    pytest.param((13, 10), 7, 3, "slice", id="2d-13x10-w7-s3-last-dim-slice"),
    pytest.param((13, 10), 7, 3, "transpose", id="2d-13x10-w7-s3-transposed-map"),
    pytest.param((3, 5, 5), (2, 3, 3), (1, 1, 2), "slice", id="3d-3x5x5-w233-s112-last-dim-slice"),
    pytest.param((3, 5, 5), (2, 3, 3), (1, 1, 2), "transpose", id="3d-3x5x5-w233-s112-transposed-map"),
]


@pytest.mark.parametrize("spatial, window, shift, layout", NONCONTIG)
def test_non_contiguous_qkv(spatial, window, shift, layout):
    B, num_heads, head_dim = 2, 2, 8
    C = num_heads * head_dim
    if layout == "slice":  # a slice of a wider last dim
        qkv = torch.randn(B, *spatial, 3 * C + 5)[..., 2:2 + 3 * C]
    else:  # the last two spatial dims swapped in memory
        qkv = torch.randn(B, *spatial[:-2], spatial[-1], spatial[-2], 3 * C).transpose(-3, -2)
    assert not qkv.is_contiguous()
    win = _tuple(window, len(spatial))
    # 2-D: the table of the clipped window (timm); 3-D: of the configured window (Video Swin)
    table_win = tuple(min(s, w) for s, w in zip(spatial, win)) if len(spatial) == 2 else win
    table = torch.randn(math.prod(2 * w - 1 for w in table_win), num_heads)
    bias = torch.randn(3 * C)
    g = torch.randn(B, *spatial, C)
    kw = dict(num_heads=num_heads, window_size=window, shift_size=shift, rel_pos_bias=table, qkv_bias=bias,
              backend="reference")

    nc = qkv.detach().requires_grad_()
    out_nc = window_attention(nc, **kw)
    (out_nc * g).sum().backward()
    c = qkv.detach().contiguous().requires_grad_()
    out_c = window_attention(c, **kw)
    (out_c * g).sum().backward()

    torch.testing.assert_close(out_nc, out_c)
    torch.testing.assert_close(nc.grad, c.grad)

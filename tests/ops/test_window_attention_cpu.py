"""The cpu backend of window_attention (C++ kernels of vitkernels._C) against the float64 reference, with
the 2x criterion of tests.ops.backend_checks for the output and the gradients of qkv, the table and qkv_bias.

Without the compiled extension these tests skip, unless VITKERNELS_REQUIRE_EXT=1, where they fail."""
import math
import os

import pytest
import torch

import vitkernels
from vitkernels import BackendUnavailableError, _ext

from tests.ops.backend_checks import (cosine_window_backward_is_bitwise_deterministic, cosine_window_vs_reference,
                                      window_backward_is_bitwise_deterministic, window_reads_a_strided_qkv_in_place,
                                      window_vs_reference)

EXT_REQUIRED = os.environ.get("VITKERNELS_REQUIRE_EXT") == "1"
pytestmark = [pytest.mark.ext, pytest.mark.skipif(
    _ext.extension() is None and not EXT_REQUIRED,
    reason=f"the cpu backend needs the compiled extension: {_ext.extension_error()}")]


def run_case(shape, heads, head_dim, window, shift, table_window=None, **kw):
    return window_vs_reference("cpu", "cpu", shape, heads, head_dim, window, shift, table_window, **kw)


CASES_2D = [
    # (B, H, W), heads, head_dim, window, shift, table window
    ((2, 14, 14), 2, 32, 7, 3, None),           # Swin stage, shifted
    ((2, 14, 14), 3, 32, 7, 0, None),           # not shifted
    ((1, 13, 10), 2, 32, 7, 3, None),           # padding in both dims
    ((1, 5, 6), 2, 32, 7, 3, (5, 6)),           # window clipped to the map, shift dropped
    ((1, 7, 20), 2, 40, 7, 3, (7, 7)),          # clipped in H only
    ((1, 10, 13), 2, 32, (4, 8), (2, 4), None),  # non-square window
    ((1, 9, 11), 3, 24, (4, 5), (0, 2), None),  # shift in one dim only, head_dim 24
    ((1, 25, 26), 2, 64, 12, 6, None),          # Swin-B@384: 144 tokens, padding
    ((1, 7, 7), 24, 32, 7, 3, (7, 7)),          # Swin-T stage 4: one window, 24 heads
]


@pytest.mark.parametrize("shape,heads,hd,window,shift,table_window", CASES_2D,
                         ids=["14x14-w7-s3", "14x14-w7-s0", "13x10-pad", "5x6-clipped", "7x20-clipH", "10x13-w4x8",
                              "9x11-shift0x2", "25x26-w12-s6", "7x7-24heads"])
def test_2d_matches_reference(shape, heads, hd, window, shift, table_window):
    run_case(shape, heads, hd, window, shift, table_window)


CASES_3D = [
    ((1, 4, 6, 5), 2, 32, (2, 3, 3), (1, 1, 1), None),
    ((1, 3, 5, 5), 2, 32, (2, 3, 3), (1, 1, 2), None),       # padding in every dim
    ((1, 2, 6, 6), 2, 32, (4, 3, 3), (2, 1, 1), (4, 3, 3)),  # T clipped: table of the configured window
    ((1, 3, 3, 8), 2, 32, (4, 4, 3), (2, 2, 1), (4, 4, 3)),  # T and H clipped: Video Swin's index[:N, :N]
    ((2, 4, 6, 6), 2, 32, (2, 3, 3), (0, 0, 0), None),
    ((1, 8, 9, 9), 1, 32, (8, 7, 7), (4, 3, 3), None),       # Video Swin's 8x7x7 = 392 tokens, padded
]


@pytest.mark.parametrize("shape,heads,hd,window,shift,table_window", CASES_3D,
                         ids=["4x6x5-shift", "3x5x5-pad", "2x6x6-clipT", "3x3x8-clipTH", "4x6x6-noshift",
                              "8x9x9-w8x7x7"])
def test_3d_matches_reference(shape, heads, hd, window, shift, table_window):
    run_case(shape, heads, hd, window, shift, table_window)


@pytest.mark.parametrize("hd", [32, 40, 64, 80, 96, 128])
def test_head_dims(hd):
    run_case((1, 9, 9), 2, hd, 7, 3)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_low_precision(dtype):
    run_case((1, 13, 10), 2, 32, 7, 3, dtype=dtype)
    run_case((1, 3, 5, 5), 2, 32, (2, 3, 3), (1, 1, 2), dtype=dtype)


@pytest.mark.parametrize("with_table,with_bias", [(False, True), (True, False), (False, False)],
                         ids=["no-table", "no-qkv-bias", "neither"])
def test_optional_table_and_qkv_bias(with_table, with_bias):
    run_case((1, 13, 10), 2, 32, 7, 3, with_table=with_table, with_bias=with_bias)


def test_strided_qkv_is_read_in_place_and_its_padding_never_read():
    window_reads_a_strided_qkv_in_place("cpu", "cpu")
    # a channel stride other than 1 (a transposed map) is read by strides too
    run_case((1, 10, 13), 2, 32, 7, 3, qkv=torch.randn(1, 3 * 64, 13, 10).permute(0, 3, 2, 1))


def test_nan_stays_in_its_window():
    heads, hd = 2, 16
    qkv = torch.randn(1, 14, 14, 3 * heads * hd)
    clean = vitkernels.window_attention(qkv, num_heads=heads, window_size=7, backend="cpu")
    qkv[0, 2, 3, 5] = float("nan")  # a query channel of a token in the first window
    out = vitkernels.window_attention(qkv, num_heads=heads, window_size=7, backend="cpu")
    assert torch.isnan(out[0, 2, 3]).any()
    other = torch.ones(14, 14, dtype=torch.bool)
    other[2, 3] = False
    assert torch.equal(out[0][other], clean[0][other])


def test_backward_is_deterministic_bitwise():
    window_backward_is_bitwise_deterministic("cpu", "cpu")


def test_cpu_refuses_float64_with_the_reason():
    qkv = torch.randn(1, 7, 7, 96, dtype=torch.float64)
    with pytest.raises(BackendUnavailableError, match="float64 is not supported by the C.. CPU kernels"):
        vitkernels.window_attention(qkv, num_heads=2, window_size=7, backend="cpu")


def test_2d_matches_timm_block_with_the_same_weights():
    timm = pytest.importorskip("timm")
    from timm.models.swin_transformer import SwinTransformerBlock

    assert timm is not None
    torch.manual_seed(0)
    blk = SwinTransformerBlock(64, (14, 14), num_heads=2, window_size=7, shift_size=3).eval()
    with torch.no_grad():
        blk.attn.relative_position_bias_table.normal_(std=0.5)
    x = torch.randn(2, 14, 14, 64)
    with torch.no_grad():
        expected = blk._attn(x)
        qkv = blk.attn.qkv(x)
        out = vitkernels.window_attention(qkv, num_heads=2, window_size=7, shift_size=3,
                                          rel_pos_bias=blk.attn.relative_position_bias_table, backend="cpu")
        got = blk.attn.proj(out)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_many_heads_and_large_windows_split_the_backward_per_head():
    # 16 heads of a 12x12 window (144 tokens): the backward's chunks are per head (each sums its own N x N
    # table gradient), several per head
    run_case((1, 24, 24), 16, 16, 12, 6)


# ---- Swin V2 scaled cosine attention (window_attention(cosine=True)) -----------------------------------------


def cosine_case(shape, heads, head_dim, window, shift, **kw):
    return cosine_window_vs_reference("cpu", "cpu", shape, heads, head_dim, window, shift, **kw)


COSINE_2D = [
    # (B, H, W), heads, head_dim, window, shift
    ((2, 14, 14), 3, 32, 7, 3),          # shifted, 7x7
    ((2, 16, 16), 4, 32, 8, 4),          # Swin V2's 8x8 windows, shifted
    ((1, 16, 16), 2, 32, 8, 0),          # not shifted
    ((1, 13, 10), 2, 32, 7, 3),          # padding in both dims (padded tokens take qkv_bias, normalised too)
    ((1, 5, 6), 2, 32, 7, 3),            # window clipped to the map, shift dropped (no table: the helper lays it
                                         # out for the configured window)
    ((1, 10, 13), 2, 40, (4, 8), (2, 4)),  # non-square window
    ((1, 20, 18), 2, 64, 16, 8),         # Swin V2 at 256: 16x16 windows (256 tokens), padded
]


@pytest.mark.parametrize("shape,heads,hd,window,shift", COSINE_2D,
                         ids=["14x14-w7-s3", "16x16-w8-s4", "16x16-w8-s0", "13x10-pad", "5x6-clipped", "10x13-w4x8",
                              "20x18-w16-s8"])
def test_cosine_2d_matches_reference(shape, heads, hd, window, shift):
    # the default logit scales spread over [log 2, log 100 + 0.5]: the last head sits past the clamp
    cosine_case(shape, heads, hd, window, shift, with_table=shape != (1, 5, 6))


COSINE_3D = [
    ((1, 4, 6, 5), 2, 32, (2, 3, 3), (1, 1, 1), 1),
    ((1, 3, 5, 5), 3, 32, (2, 3, 3), (1, 1, 2), 0),  # padding in every dim
    ((2, 4, 6, 6), 2, 32, (2, 3, 3), (0, 0, 0), 0),
]


@pytest.mark.parametrize("shape,heads,hd,window,shift,seed", COSINE_3D,
                         ids=["4x6x5-shift", "3x5x5-pad", "4x6x6-noshift"])
def test_cosine_3d_matches_reference(shape, heads, hd, window, shift, seed):
    # With a head at logit scale 100 the fp32 logits (~100 + the table) carry ~4e-6 of rounding whoever computes
    # them, so the max errors of two equally accurate fp32 computations differ by up to ~2.5x by chance (the RMS
    # errors match): 4x6x5 with seed 0 lands on 1.02x the 2x bound (its output), seed 1 on 0.5x.
    cosine_case(shape, heads, hd, window, shift, seed=seed)


@pytest.mark.parametrize("hd", [16, 24, 40, 64, 96])
def test_cosine_head_dims(hd):
    cosine_case((1, 9, 9), 2, hd, 7, 3)


@pytest.mark.parametrize("values", [(5.0, 6.0), (-1.0, math.log(100.0) - 1e-3), (0.0, 4.0)],
                         ids=["both-past-the-clamp", "low-and-just-below", "zero-and-below"])
def test_cosine_logit_scales_around_the_clamp(values):
    cosine_case((1, 13, 10), 2, 32, 7, 3, logit_scale=torch.tensor(values))


def test_cosine_logit_scale_past_the_clamp_has_a_zero_gradient():
    ls = torch.tensor([5.0, 1.0]).reshape(2, 1, 1).requires_grad_()
    qkv = torch.randn(1, 14, 14, 3 * 64, requires_grad=True)
    out = vitkernels.window_attention(qkv, num_heads=2, window_size=7, shift_size=3, cosine=True, logit_scale=ls,
                                      backend="cpu")
    out.backward(torch.randn_like(out))
    assert ls.grad[0].item() == 0.0 and ls.grad[1].item() != 0.0


@pytest.mark.parametrize("backend", ["cpu", "reference", "compiled reference",
                                     pytest.param("triton", marks=pytest.mark.triton)])
def test_cosine_logit_scale_at_exactly_float32_log_100_gets_torch_clamps_gradient(backend):
    """float32(log 100) lies above the double bound torch.clamp's backward compares with: its gradient is 0
    there, as timm's and torchvision's; every path agrees."""
    ls = torch.tensor([math.log(100.0), math.log(10.0)]).reshape(2, 1, 1)
    x = ls.clone().requires_grad_()
    torch.clamp(x, max=math.log(100.0)).exp().sum().backward()
    assert x.grad.view(-1).tolist() == [0.0, 10.0]  # what torch does

    ls.requires_grad_()
    qkv = torch.randn(1, 14, 14, 3 * 64, requires_grad=True)

    def call(qkv, ls):
        return vitkernels.window_attention(qkv, num_heads=2, window_size=7, shift_size=3, cosine=True,
                                          logit_scale=ls, backend=backend.split()[-1])
    fn = torch.compile(call, backend="aot_eager", fullgraph=True) if backend.startswith("compiled") else call
    out = fn(qkv, ls)
    out.backward(torch.randn_like(out))
    assert ls.grad.view(-1)[0].item() == 0.0 and ls.grad.view(-1)[1].item() != 0.0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("scale_dtype", [None, torch.float32], ids=["scale-same-dtype", "scale-fp32"])
def test_cosine_low_precision(dtype, scale_dtype):
    cosine_case((1, 13, 10), 2, 32, 7, 3, dtype=dtype, scale_dtype=scale_dtype)
    cosine_case((1, 3, 5, 5), 2, 32, (2, 3, 3), (1, 1, 2), dtype=dtype, scale_dtype=scale_dtype)


@pytest.mark.parametrize("with_table,with_bias", [(False, True), (True, False), (False, False)],
                         ids=["no-table", "no-qkv-bias", "neither"])
def test_cosine_optional_table_and_qkv_bias(with_table, with_bias):
    # without qkv_bias the padded tokens are zeros: their norm is clamped at eps
    cosine_case((1, 13, 10), 2, 32, 7, 3, with_table=with_table, with_bias=with_bias)


def test_cosine_backward_is_deterministic_bitwise():
    cosine_window_backward_is_bitwise_deterministic("cpu", "cpu")


def _cosine_run(leaves, needs=None, **kw):
    ts = {n: t.detach().clone().requires_grad_(needs is None or n in needs) for n, t in leaves.items()}
    out = vitkernels.window_attention(ts["qkv"], num_heads=3, rel_pos_bias=ts["table"], qkv_bias=ts["bias"],
                                      cosine=True, logit_scale=ts["ls"], backend="cpu", **kw)
    out.backward(leaves["dout"])
    return [out] + [ts[n].grad for n in ("qkv", "table", "bias", "ls")]


def _cosine_leaves(ls_shape=(3, 1, 1)):
    g = torch.Generator().manual_seed(0)
    return {"qkv": torch.randn(2, 19, 17, 3 * 96, generator=g), "table": torch.randn(225, 3, generator=g),
            "bias": torch.randn(3 * 96, generator=g), "ls": torch.tensor([1.0, 2.5, 4.0]).reshape(ls_shape),
            "dout": torch.randn(2, 19, 17, 96, generator=g)}


def test_cosine_results_do_not_depend_on_the_thread_count():
    leaves = _cosine_leaves()
    threads = torch.get_num_threads()
    runs = []
    try:
        for n in (1, max(2, threads)):
            torch.set_num_threads(n)
            runs.append(_cosine_run({k: v for k, v in leaves.items() if k != "dout"} | {"dout": leaves["dout"]},
                                    window_size=8, shift_size=4))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_cosine_logit_scale_of_shape_heads_or_heads_1_1():
    flat, full = _cosine_leaves((3,)), _cosine_leaves()
    a = _cosine_run(flat, window_size=8, shift_size=4)
    b = _cosine_run(full, window_size=8, shift_size=4)
    assert a[4].shape == (3,) and b[4].shape == (3, 1, 1)
    for x, y in zip(a[:4], b[:4]):
        assert torch.equal(x, y)
    assert torch.equal(a[4], b[4].reshape(3))


@pytest.mark.parametrize("needs", [("ls",), ("qkv",), ("table", "ls"), ("bias",)])
def test_cosine_gradients_asked_for_alone_match_those_of_the_full_backward(needs):
    leaves = _cosine_leaves()
    full = _cosine_run(leaves, window_size=8, shift_size=4)
    some = _cosine_run(leaves, needs=set(needs) | {"dout"}, window_size=8, shift_size=4)
    for name, a, b in zip(("out", "qkv", "table", "bias", "ls"), full, some):
        if name == "out":
            assert torch.equal(a, b)
        elif name in needs:
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
        else:
            assert b is None, name


def test_cosine_strided_qkv_and_logit_scale_are_read_in_place():
    heads, hd = 2, 32
    C = heads * hd
    buf = torch.full((1, 13, 10, 3 * C + 16), float("nan"))
    buf[..., : 3 * C] = torch.randn(1, 13, 10, 3 * C)
    qkv = buf[..., : 3 * C]
    ls_buf = torch.full((heads, 3), float("nan"))
    ls_buf[:, 1] = torch.tensor([1.5, 3.0])
    ls = ls_buf[:, 1:2]  # (heads, 1), stride 3
    out = vitkernels.window_attention(qkv, num_heads=heads, window_size=7, shift_size=3, cosine=True, logit_scale=ls,
                                      backend="cpu")
    ref = vitkernels.window_attention(qkv.contiguous(), num_heads=heads, window_size=7, shift_size=3, cosine=True,
                                      logit_scale=ls.contiguous(), backend="cpu")
    assert torch.isfinite(out).all() and torch.equal(out, ref)


def test_cosine_matches_timm_swin_v2_block_with_the_same_weights():
    pytest.importorskip("timm")
    import torch.nn.functional as F
    from timm.models.swin_transformer_v2 import SwinTransformerV2Block

    torch.manual_seed(0)
    blk = SwinTransformerV2Block(64, (13, 13), num_heads=2, window_size=8, shift_size=4).eval()
    attn = blk.attn
    with torch.no_grad():
        attn.logit_scale.copy_(torch.tensor([math.log(10.0), math.log(30.0)]).reshape(2, 1, 1))
        if attn.q_bias is not None:
            attn.q_bias.normal_(std=0.5)
            attn.v_bias.normal_(std=0.5)
    x = torch.randn(2, 13, 13, 64)
    with torch.no_grad():
        expected = blk._attn(x)
        qkv_bias = torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))
        qkv = F.linear(x, attn.qkv.weight, qkv_bias)
        table = 16 * torch.sigmoid(attn.cpb_mlp(attn.relative_coords_table).view(-1, 2))
        out = vitkernels.window_attention(qkv, num_heads=2, window_size=8, shift_size=4, rel_pos_bias=table,
                                          qkv_bias=qkv_bias, cosine=True, logit_scale=attn.logit_scale, backend="cpu")
        got = attn.proj(out)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_cosine_kernels_check_the_logit_scale():
    qkv = torch.randn(1, 1, 7, 7, 96)
    geo = dict(num_heads=2, spatial=[1, 7, 7], window=[1, 7, 7], shift=[0, 0, 0], padded=[1, 7, 7],
               roll_after_pad=False, scale=1.0)
    with pytest.raises(RuntimeError, match="logit_scale must be"):
        _ext.extension().window_forward_cpu(qkv, None, None, None, **geo, logit_scale=torch.zeros(3))
    with pytest.raises(RuntimeError, match="logit_scale must be"):
        _ext.extension().window_forward_cpu(qkv, None, None, None, **geo, logit_scale=torch.zeros(2, 2))
    with pytest.raises(RuntimeError, match="logit_scale must be"):
        _ext.extension().window_forward_cpu(qkv, None, None, None, **geo, logit_scale=torch.zeros(2).double())

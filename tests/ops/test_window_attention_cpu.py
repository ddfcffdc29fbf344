"""The cpu backend of window_attention (C++ kernels of vitkernels._C) against the float64 reference, with
the 2x criterion of tests.ops.backend_checks for the output and the gradients of qkv, the table and qkv_bias.

Without the compiled extension these tests skip, unless VITKERNELS_REQUIRE_EXT=1, where they fail."""
import os

import pytest
import torch

import vitkernels
from vitkernels import BackendUnavailableError, _ext

from tests.ops.backend_checks import (window_backward_is_bitwise_deterministic, window_reads_a_strided_qkv_in_place,
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

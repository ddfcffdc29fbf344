"""The cpu backend of flash_attention (C++ kernels of vitkernels._C) against the float64 reference, with
the 2x criterion of tests.ops.backend_checks for the output and the gradients of q, k, v and the bias.

Without the compiled extension these tests skip, unless VITKERNELS_REQUIRE_EXT=1, where they fail."""
import os

import pytest
import torch

import vitkernels
from vitkernels import BackendUnavailableError, _ext, dispatch
from vitkernels.ops.attention.reference import attention_reference

from tests.ops.backend_checks import (attention_backward_is_bitwise_deterministic, attention_nan_stays_in_its_row,
                                      attention_vs_reference)
from tests.utils import qkv_views

EXT_REQUIRED = os.environ.get("VITKERNELS_REQUIRE_EXT") == "1"
pytestmark = [pytest.mark.ext, pytest.mark.skipif(
    _ext.extension() is None and not EXT_REQUIRED,
    reason=f"the cpu backend needs the compiled extension: {_ext.extension_error()}")]


def check(q, k, v, bias=None, **kw):
    return attention_vs_reference("cpu", q, k, v, bias, **kw)


SHAPES = [(n, d) for n in (1, 49, 197, 577) for d in (32, 40, 64, 80, 96, 128)]


@pytest.mark.parametrize("n,d", SHAPES, ids=[f"N{n}-D{d}" for n, d in SHAPES])
def test_matches_reference_with_a_learnable_bias_fp32(n, d):
    B, H = (1, 2) if n == 577 else (2, 3)
    q, k, v, _ = qkv_views(B, H, n, d)
    check(q, k, v, torch.randn(1, H, n, n), dout=torch.randn(B, H, n, d))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("n,d", [(49, 64), (197, 40), (197, 80), (1, 128)], ids=["N49-D64", "N197-D40", "N197-D80",
                                                                                "N1-D128"])
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
def test_matches_reference_per_dtype(dtype, n, d, with_bias):
    q, k, v, _ = qkv_views(2, 2, n, d, dtype=dtype)
    bias = torch.randn(1, 2, n, n, dtype=dtype) if with_bias else None
    check(q, k, v, bias, dout=torch.randn(2, 2, n, d, dtype=dtype))


@pytest.mark.parametrize("bias_shape", [(2, 3, 49, 77), (1, 3, 49, 77), (2, 1, 1, 77), (49, 77), (1, 1, 1, 77),
                                        (2, 3, 49, 1), (3, 1, 77)],
                         ids=["full", "1H", "key-padding", "2d", "keys-only", "queries-only", "3d"])
def test_broadcast_bias_and_its_reduced_gradient_nq_ne_nk(bias_shape):
    q = torch.randn(2, 3, 49, 32)
    k, v = torch.randn(2, 3, 77, 32), torch.randn(2, 3, 77, 32)
    check(q, k, v, torch.randn(bias_shape), dout=torch.randn(2, 3, 49, 32))


def test_several_key_and_query_blocks():
    # Nk = 1100 crosses the forward's 512-key steps and the backward's 128-key steps; Nq = 70 two query blocks
    q = torch.randn(1, 2, 70, 64)
    k, v = torch.randn(1, 2, 1100, 64), torch.randn(1, 2, 1100, 64)
    check(q, k, v, torch.randn(1, 2, 70, 1100), dout=torch.randn(1, 2, 70, 64))


def test_key_padding_mask_with_minus_inf_across_key_blocks():
    q, k, v = torch.randn(2, 2, 49, 32), torch.randn(2, 2, 600, 32), torch.randn(2, 2, 600, 32)
    bias = torch.zeros(2, 1, 1, 600)
    bias[0, ..., 20:] = float("-inf")  # the second 512-key block of sample 0 is all -inf
    bias[1, ..., :530] = float("-inf")  # the first block of sample 1 is all -inf
    check(q, k, v, bias, bias_grad=False, dout=torch.randn(2, 2, 49, 32))


def test_strided_views_of_one_qkv_tensor_are_read_in_place_and_padding_is_never_read():
    B, H, n, d = 2, 2, 49, 40
    buf = torch.full((B, n, 3, H, d + 8), float("nan"))
    buf[..., :d] = torch.randn(B, n, 3, H, d)
    q, k, v = buf[..., :d].permute(2, 0, 3, 1, 4).unbind(0)
    assert not q.is_contiguous() and q.stride(-1) == 1
    assert torch.isfinite(vitkernels.flash_attention(q, k, v, backend="cpu")).all()
    check(q, k, v, dout=torch.randn(B, H, n, d))


def test_non_contiguous_output_gradient():
    q, k, v, _ = qkv_views(2, 2, 49, 32)
    dout = torch.randn(2, 49, 2, 32).transpose(1, 2)
    assert not dout.is_contiguous()
    check(q, k, v, torch.randn(1, 2, 49, 49), dout=dout)
    dout_strided = torch.randn(2, 2, 49, 64)[..., ::2]  # last stride 2: taken through an explicit copy
    check(q, k, v, dout=dout_strided)


def test_all_minus_inf_rows_give_zeros_and_zero_gradients():
    q, k, v = (torch.randn(1, 2, 49, 32, requires_grad=True) for _ in range(3))
    bias = torch.randn(1, 2, 49, 49)
    bias[..., 3, :] = float("-inf")
    bias = bias.requires_grad_()
    out = vitkernels.flash_attention(q, k, v, bias=bias, backend="cpu")
    out.backward(torch.randn_like(out))
    for t in (out, q.grad, k.grad, v.grad, bias.grad):
        assert torch.isfinite(t).all()
    assert (out[..., 3, :] == 0).all() and (q.grad[..., 3, :] == 0).all() and (bias.grad[..., 3, :] == 0).all()
    check(q, k, v, bias.detach(), bias_grad=False)


def test_nan_in_a_query_row_stays_in_that_row():
    attention_nan_stays_in_its_row("cpu", "cpu")


def test_backward_is_deterministic_bitwise():
    attention_backward_is_bitwise_deterministic("cpu", "cpu")


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_keeps_one_minus_p_and_matches_the_reference_given_the_same_mask(p):
    from vitkernels.ops.attention.cpu import dropout_keep_mask
    from vitkernels.ops.attention.function import draw_dropout_seed

    B, H, n, d = 2, 2, 77, 32
    q, k, v = (torch.randn(B, H, n, d) for _ in range(3))
    bias = torch.randn(1, H, n, n)
    torch.manual_seed(123)
    mask = dropout_keep_mask(draw_dropout_seed("cpu"), (B, H, n, n), p)
    kept, sigma = mask.float().mean().item(), (p * (1 - p) / mask.numel()) ** 0.5
    assert abs(kept - (1 - p)) < 6 * sigma, (kept, 1 - p)

    leaves = [t.clone().requires_grad_() for t in (q, k, v, bias)]
    torch.manual_seed(123)  # the kernels draw the same seed from torch's generator
    out = vitkernels.flash_attention(*leaves[:3], bias=leaves[3], dropout_p=p, backend="cpu")
    g = torch.randn_like(out)
    out.backward(g)
    ref_leaves = [t.detach().double().requires_grad_() for t in (q, k, v, bias)]
    ref = attention_reference(*ref_leaves[:3], ref_leaves[3], None, p, dropout_mask=mask)
    ref.backward(g.double())
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=1e-5)
    for name, a, b in zip("q k v bias".split(), leaves, ref_leaves):
        torch.testing.assert_close(a.grad.double(), b.grad, rtol=0, atol=1e-4, msg=lambda m: f"d{name}: {m}")
    torch.manual_seed(123)
    assert torch.equal(vitkernels.flash_attention(q, k, v, bias=bias, dropout_p=p, backend="cpu"), out.detach())
    torch.manual_seed(124)
    assert not torch.equal(vitkernels.flash_attention(q, k, v, bias=bias, dropout_p=p, backend="cpu"), out.detach())


def test_dropout_mask_has_no_structure_across_columns_rows_and_heads():
    from vitkernels.ops.attention.cpu import dropout_keep_mask
    from vitkernels.ops.attention.function import draw_dropout_seed

    mask = dropout_keep_mask(draw_dropout_seed("cpu"), (1, 2, 128, 130), 0.5).float()
    assert abs(mask.mean().item() - 0.5) < 0.02
    for shift in (1, 2, 3, 4):  # one Philox draw serves 4 columns: they must be independent
        assert abs((mask[..., shift:] == mask[..., :-shift]).float().mean().item() - 0.5) < 0.03, shift
    assert abs((mask[:, :, 1:] == mask[:, :, :-1]).float().mean().item() - 0.5) < 0.03  # rows
    assert abs((mask[:, 0] == mask[:, 1]).float().mean().item() - 0.5) < 0.03  # heads
    other = dropout_keep_mask(draw_dropout_seed("cpu"), (1, 2, 128, 130), 0.5).float()
    assert abs((mask == other).float().mean().item() - 0.5) < 0.03  # a new draw


def test_dropout_one_drops_everything_with_zero_gradients():
    q, k, v = (torch.randn(1, 2, 33, 32, requires_grad=True) for _ in range(3))
    bias = torch.randn(1, 2, 33, 33, requires_grad=True)
    out = vitkernels.flash_attention(q, k, v, bias=bias, dropout_p=1.0, backend="cpu")
    out.backward(torch.randn_like(out))
    assert (out == 0).all()
    for t in (q, k, v, bias):
        assert (t.grad == 0).all()


def test_cpu_refuses_float64_and_other_devices_with_the_reason():
    q = torch.randn(1, 1, 5, 16, dtype=torch.float64)
    with pytest.raises(BackendUnavailableError, match="float64 is not supported by the C.. CPU kernels"):
        vitkernels.flash_attention(q, q, q, backend="cpu")
    m = torch.empty(1, 1, 5, 16, device="meta")  # data-free inputs go to the reference on any backend
    assert vitkernels.flash_attention(m, m, m, backend="cpu").device.type == "meta"


def test_dispatch_picks_cpu_for_cpu_tensors_and_the_reference_for_float64():
    q = torch.randn(1, 2, 9, 16)
    assert dispatch.select("flash_attention", vitkernels.ops.attention.check_attention_inputs(q, q, q)).name == "cpu"
    q64 = q.double()
    assert dispatch.select("flash_attention",
                           vitkernels.ops.attention.check_attention_inputs(q64, q64, q64)).name == "reference"


def test_rows_with_a_stride_below_d_expanded_or_overlapping_views():
    # k expanded over its keys (row stride 0) and q as overlapping rows (row stride 16 < D = 64): the kernels
    # read rows by their stride (fp32 is read in place only when rows do not overlap)
    B, H, n, d = 1, 2, 33, 64
    k = torch.randn(B, H, 1, d).expand(B, H, n, d)
    v = torch.randn(B, H, n, d)
    base = torch.randn(B * H * n * 16 + d)
    q = base.as_strided((B, H, n, d), (H * n * 16, n * 16, 16, 1))
    assert k.stride(2) == 0 and q.stride(2) < d
    check(q, k, v, dout=torch.randn(B, H, n, d))


def test_output_gradient_with_a_zero_row_stride():
    # out.sum(dim=2) hands the backward a dout whose rows all alias one row (stride 0)
    q, k, v = (torch.randn(2, 2, 49, 64, requires_grad=True) for _ in range(3))
    ref = [t.detach().double().requires_grad_() for t in (q, k, v)]
    vitkernels.flash_attention(q, k, v, backend="cpu").sum(dim=2).pow(2).sum().backward()
    attention_reference(*ref).sum(dim=2).pow(2).sum().backward()
    for a, b in zip((q, k, v), ref):
        assert torch.isfinite(a.grad).all()
        torch.testing.assert_close(a.grad.double(), b.grad, rtol=1e-4, atol=1e-4)

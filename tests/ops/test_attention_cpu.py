"""The cpu backend of flash_attention (C++ kernels of vitkernels._C) against the float64 reference, with
the 2x criterion of tests.ops.backend_checks for the output and the gradients of q, k, v and the bias.

Without the compiled extension these tests skip, unless VITKERNELS_REQUIRE_EXT=1, where they fail."""
import os

import pytest
import torch

import vitkernels
from vitkernels import BackendUnavailableError, _ext, dispatch
from vitkernels.ops.attention.reference import attention_reference

from tests.ops.backend_checks import (FLOOR, attention_backward_is_bitwise_deterministic,
                                      attention_nan_stays_in_its_row, attention_vs_reference,
                                      rel_pos_backward_is_bitwise_deterministic,
                                      rel_pos_dropout_matches_the_reference_with_the_kernels_mask, rel_pos_leaves,
                                      rel_pos_vs_reference, rope_backward_is_bitwise_deterministic, rope_leaves,
                                      rope_vs_reference)
from tests.utils import assert_close_2x, qkv_views

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


# ---- decomposed relative position (flash_attention(rel_pos=...)) ------------------------------------------


def rel_check(leaves, prefix=0, **kw):
    return rel_pos_vs_reference("cpu", leaves, prefix=prefix, **kw)


REL_SHAPES = [(grid, d) for grid in ((14, 14), (32, 32)) for d in (64, 80)]


@pytest.mark.parametrize("grid,d", REL_SHAPES, ids=[f"N{g[0] * g[1]}-D{d}" for g, d in REL_SHAPES])
def test_rel_pos_matches_reference_fp32(grid, d):
    # SAM / ViTDet: 14x14 windows and a 32x32 global grid (B = 1 there)
    B = 1 if grid == (32, 32) else 2
    rel_check(rel_pos_leaves(B, 2, d, grid, grid, seed=d))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("prefix", [0, 1])
def test_rel_pos_matches_reference_per_dtype(dtype, prefix):
    # the same-dtype reference (its dense bias rounded to the dtype) is the yardstick
    rel_check(rel_pos_leaves(2, 2, 64, (14, 14), (14, 14), prefix=prefix, with_bias=True), prefix, dtype=dtype)


REL_GRIDS = [((8, 8), (4, 4)), ((2, 4, 4), (2, 2, 2)), ((7, 9), (7, 9)), ((3, 5, 6), (3, 5, 6))]


@pytest.mark.parametrize("q_grid,k_grid", REL_GRIDS,
                         ids=["pooled-8x8-4x4", "pooled-3d", "7x9", "3d-3x5x6"])
def test_rel_pos_with_a_class_token_and_a_pooled_key_grid(q_grid, k_grid):
    # MViTv2: a class token (prefix 1) and keys pooled to a coarser grid than the queries (Nq != Nk)
    rel_check(rel_pos_leaves(2, 2, 32, q_grid, k_grid, prefix=1), 1)


@pytest.mark.parametrize("bias_shape", [(1, 2, 65, 17), (2, 1, 1, 17), (65, 1), (17,)],
                         ids=["1H", "key-padding", "queries-only", "keys-only"])
def test_rel_pos_with_a_learnable_broadcast_bias(bias_shape):
    leaves = rel_pos_leaves(2, 2, 32, (8, 8), (4, 4), prefix=1, with_bias=True, bias_shape=bias_shape)
    rel_check(leaves, 1)


@pytest.mark.parametrize("k_grid", [(23, 29), (3, 13, 17)], ids=["23x29", "3x13x17"])
@pytest.mark.parametrize("prefix", [0, 1])
def test_rel_pos_key_grid_rows_straddle_the_kernels_blocks(k_grid, prefix):
    # ~665 keys in grid rows of 29 / 17 (frames of 221): rows and frames cross the forward's 512-key and the
    # backward's 128-key block edges; Nq = prefix + 130 spans three 64-row query blocks
    rel_check(rel_pos_leaves(1, 2, 64, (10, 13), k_grid, prefix=prefix, with_bias=True), prefix)


def _strided_rel_views(leaves):
    """The rel terms as views that are not contiguous, every byte around them NaN (a read outside shows):
    rel_h a slice of a wider (H, B, ...) buffer with B and H swapped, rel_w a transposed view (last stride
    Nq - prefix), rel_t every other column (last stride 2)."""
    out = dict(leaves)
    nan = float("nan")
    h = leaves["rel_h"]
    B, H, R, Kh = h.shape
    buf = torch.full((H, B, R, Kh + 5), nan, dtype=h.dtype)
    buf[..., 2:Kh + 2] = h.transpose(0, 1)
    out["rel_h"] = buf[..., 2:Kh + 2].transpose(0, 1)
    w = leaves["rel_w"]
    buf = torch.full((B, H, w.shape[3] + 1, R), nan, dtype=w.dtype)
    buf[:, :, :-1] = w.transpose(2, 3)
    out["rel_w"] = buf[:, :, :-1].transpose(2, 3)
    if "rel_t" in leaves:
        t = leaves["rel_t"]
        buf = torch.full((B, H, R, 2 * t.shape[3]), nan, dtype=t.dtype)
        buf[..., ::2] = t
        out["rel_t"] = buf[..., ::2]
    for name in ("rel_t", "rel_h", "rel_w"):
        if name in out:
            assert not out[name].is_contiguous() and torch.equal(out[name], leaves[name]), name
    assert out["rel_w"].stride(-1) != 1
    return out


@pytest.mark.parametrize("k_grid,prefix", [((5, 7), 0), ((2, 3, 4), 1)], ids=["2d", "3d-prefix"])
def test_rel_pos_non_contiguous_terms_are_read_in_place(k_grid, prefix):
    from torch.profiler import ProfilerActivity, profile

    from vitkernels.ops.attention.cpu import CpuAttentionKernels

    q_grid = (2,) * (len(k_grid) - 2) + (6, 7)
    leaves = rel_pos_leaves(2, 3, 32, q_grid, k_grid, prefix=prefix, with_bias=True)
    views = _strided_rel_views(leaves)
    rel_check(views, prefix)  # NaN padding read anywhere would fail it
    # bitwise the contiguous terms' results, and no copy of a term on the way (forward or backward)
    rel = vitkernels.RelPos(views["rel_h"], views["rel_w"], views.get("rel_t"), prefix)
    q, k, v, bias = (leaves[n] for n in ("q", "k", "v", "bias"))
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        out, lse, rng = CpuAttentionKernels.forward(q, k, v, bias, 32 ** -0.5, 0.0, rel)
        grads = CpuAttentionKernels.backward(torch.ones_like(out), q, k, v, bias, out, lse, rng, 32 ** -0.5, 0.0,
                                             True, rel, True)
    copies = [e.name for e in prof.events() if e.name in ("aten::copy_", "aten::clone", "aten::contiguous")]
    assert not copies, copies
    dense = vitkernels.RelPos(leaves["rel_h"], leaves["rel_w"], leaves.get("rel_t"), prefix)
    out_c, lse_c, _ = CpuAttentionKernels.forward(q, k, v, bias, 32 ** -0.5, 0.0, dense)
    grads_c = CpuAttentionKernels.backward(torch.ones_like(out), q, k, v, bias, out_c, lse_c, rng, 32 ** -0.5, 0.0,
                                           True, dense, True)
    assert torch.equal(out, out_c) and torch.equal(lse, lse_c)
    for a, b in zip(grads[:4] + tuple(grads[4]), grads_c[:4] + tuple(grads_c[4])):
        assert (a is None) == (b is None) and (a is None or torch.equal(a, b))
    for g, t in zip(grads[4], (views["rel_h"], views["rel_w"], views.get("rel_t"))):
        assert (g is None) == (t is None) and (g is None or (g.shape == t.shape and g.is_contiguous()))


def test_rel_pos_half_precision_strided_terms_give_the_contiguous_results():
    leaves = {n: t.half() for n, t in rel_pos_leaves(1, 2, 32, (2, 5, 5), (2, 3, 4), prefix=1).items()}
    runs = []
    for ts in (leaves, _strided_rel_views(leaves)):
        ts = {n: t.detach().requires_grad_() for n, t in ts.items()}
        rel = vitkernels.RelPos(ts["rel_h"], ts["rel_w"], ts["rel_t"], 1)
        out = vitkernels.flash_attention(ts["q"], ts["k"], ts["v"], rel_pos=rel, backend="cpu")
        out.backward(torch.ones_like(out))
        runs.append([out] + [ts[n].grad for n in sorted(ts)])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_rel_pos_backward_is_deterministic_bitwise():
    rel_pos_backward_is_bitwise_deterministic("cpu", "cpu")


def test_rel_pos_results_do_not_depend_on_the_thread_count():
    leaves = rel_pos_leaves(2, 3, 32, (9, 9), (9, 9), prefix=1, with_bias=True)
    threads = torch.get_num_threads()
    runs = []
    try:
        for n in (1, max(2, threads)):
            torch.set_num_threads(n)
            ts = {name: t.clone().requires_grad_() for name, t in leaves.items()}
            rel = vitkernels.RelPos(ts["rel_h"], ts["rel_w"], None, 1)
            out = vitkernels.flash_attention(ts["q"], ts["k"], ts["v"], bias=ts["bias"], rel_pos=rel, backend="cpu")
            out.backward(torch.ones_like(out))
            runs.append([out] + [ts[name].grad for name in sorted(ts)])
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_rel_pos_dropout_matches_the_reference_with_the_kernels_mask():
    from vitkernels.ops.attention.cpu import dropout_keep_mask

    rel_pos_dropout_matches_the_reference_with_the_kernels_mask("cpu", "cpu", dropout_keep_mask)


@pytest.mark.parametrize("frozen", [("rel_t",), ("rel_h",), ("rel_w",), ("rel_t", "rel_h", "rel_w")],
                         ids=["rel_t", "rel_h", "rel_w", "all"])
def test_a_rel_term_without_grad_gets_none_and_the_others_are_right(frozen):
    leaves = rel_pos_leaves(2, 2, 32, (2, 4, 4), (2, 2, 2), prefix=1, with_bias=True)
    g = torch.randn(2, 2, 33, 32)
    grads = {}
    for name, cast, backend in (("ref", torch.float64, "reference"), ("run", torch.float32, "cpu")):
        ts = {n: t.detach().to(cast).requires_grad_(n not in frozen) for n, t in leaves.items()}
        rel = vitkernels.RelPos(ts["rel_h"], ts["rel_w"], ts["rel_t"], 1)
        out = vitkernels.flash_attention(ts["q"], ts["k"], ts["v"], bias=ts["bias"], rel_pos=rel, backend=backend)
        out.backward(g.to(cast))
        grads[name] = {n: t.grad for n, t in ts.items()}
    for n in leaves:
        if n in frozen:
            assert grads["run"][n] is None, n
        else:
            torch.testing.assert_close(grads["run"][n].double(), grads["ref"][n], rtol=1e-4, atol=1e-5,
                                       msg=lambda m: f"d{n}: {m}")


def test_rel_pos_kernels_check_their_terms():
    q = torch.randn(1, 2, 17, 32)
    rel_h, rel_w = torch.randn(1, 2, 16, 4), torch.randn(1, 2, 16, 3)  # 12 keys, not 16
    with pytest.raises(RuntimeError, match="rel key grid has 12 keys"):
        _ext.extension().attention_forward_cpu(q, q, q, None, 1.0, 0.0, 0, 0, rel_h, rel_w, None, 1)
    with pytest.raises(RuntimeError, match="rel terms must be"):
        _ext.extension().attention_forward_cpu(q, q, q, None, 1.0, 0.0, 0, 0, rel_h[:, :, 1:], rel_w, None, 1)
    q64 = q.double()
    rel = vitkernels.RelPos(*(torch.randn(1, 2, 16, 4, dtype=torch.float64) for _ in range(2)), None, 1)
    with pytest.raises(BackendUnavailableError, match="float64 is not supported by the C.. CPU kernels"):
        vitkernels.flash_attention(q64, q64, q64, rel_pos=rel, backend="cpu")
    with pytest.raises(RuntimeError, match="fp64 runs on the reference backend"):
        _ext.extension().attention_forward_cpu(q64, q64, q64, None, 1.0, 0.0, 0, 0, rel.rel_h, rel.rel_w, None, 1)


# ---- rotary position (flash_attention(rope=...)) -----------------------------------------------------------


def rope_check(leaves, prefix=0, rotate_half=False, **kw):
    return rope_vs_reference("cpu", leaves, prefix=prefix, rotate_half=rotate_half, **kw)


ROPE_SHAPES = [(1, 32, 0), (49, 32, 1), (49, 40, 0), (197, 64, 1), (197, 80, 0), (197, 96, 1), (577, 64, 1),
               (577, 96, 0)]


@pytest.mark.parametrize("rotate_half", [False, True], ids=["interleaved", "half"])
@pytest.mark.parametrize("n,d,prefix", ROPE_SHAPES, ids=[f"N{n}-D{d}-p{p}" for n, d, p in ROPE_SHAPES])
def test_rope_matches_reference_fp32(n, d, prefix, rotate_half):
    # EVA-02 / DINOv3: a class token (prefix 1) left unrotated, or none; with a learnable bias
    B, H = (1, 2) if n == 577 else (2, 3)
    leaves = rope_leaves(B, H, n, d, prefix=prefix, with_bias=True, seed=n + d)
    rope_check(leaves, prefix, rotate_half)


@pytest.mark.parametrize("rotate_half", [False, True], ids=["interleaved", "half"])
@pytest.mark.parametrize("table_shape", ["N", "B1", "1H", "BH", "H", "11"])
def test_rope_learnable_tables_of_every_broadcast_shape(table_shape, rotate_half):
    # d cos, d sin summed over the dims the tables broadcast: (N, D), (B, 1, N, D), (1, H, N, D), (B, H, N, D),
    # (H, N, D), (1, 1, N, D)
    B, H, N, D, prefix = 2, 3, 50, 40, 1
    R = N - prefix
    shape = {"N": (R, D), "B1": (B, 1, R, D), "1H": (1, H, R, D), "BH": (B, H, R, D), "H": (H, R, D),
             "11": (1, 1, R, D)}[table_shape]
    leaves = rope_leaves(B, H, N, D, prefix=prefix, table_shape=shape, with_bias=True)
    rope_check(leaves, prefix, rotate_half, tables_grad=True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("table_dtype", [None, torch.float32], ids=["tables-same-dtype", "tables-fp32"])
@pytest.mark.parametrize("rotate_half", [False, True], ids=["interleaved", "half"])
@pytest.mark.parametrize("tables_grad", [False, True], ids=["frozen", "learnable"])
def test_rope_matches_reference_per_dtype(dtype, table_dtype, rotate_half, tables_grad):
    # fp16/bf16 q with float32 tables is timm's usual mix (the kernels rotate in float either way)
    leaves = rope_leaves(2, 2, 65, 64, prefix=1, with_bias=True, seed=3)
    rope_check(leaves, 1, rotate_half, dtype=dtype, table_dtype=table_dtype, tables_grad=tables_grad)


def test_rope_tables_that_do_not_require_grad_get_none_and_one_learnable_table_gets_its_grad():
    leaves = rope_leaves(2, 2, 33, 32, prefix=1)
    g = torch.randn(2, 2, 33, 32)
    grads = {}
    for name, cast, backend in (("ref", torch.float64, "reference"), ("run", torch.float32, "cpu")):
        ts = {n: t.detach().to(cast).requires_grad_(n != "cos") for n, t in leaves.items()}
        out = vitkernels.flash_attention(ts["q"], ts["k"], ts["v"], rope=vitkernels.Rope(ts["cos"], ts["sin"], 1),
                                         backend=backend)
        out.backward(g.to(cast))
        grads[name] = {n: t.grad for n, t in ts.items()}
    assert grads["run"]["cos"] is None
    for n in ("q", "k", "v", "sin"):
        torch.testing.assert_close(grads["run"][n].double(), grads["ref"][n], rtol=1e-4, atol=1e-5,
                                   msg=lambda m: f"d{n}: {m}")


def _rope_rel_call(ts, rope_prefix, rotate_half, backend, dropout_p=0.0):
    rel = vitkernels.RelPos(ts["rel_h"], ts["rel_w"], None, 1)
    rope = vitkernels.Rope(ts["cos"], ts["sin"], rope_prefix, rotate_half)
    return vitkernels.flash_attention(ts["q"], ts["k"], ts["v"], bias=ts.get("bias"), rel_pos=rel, rope=rope,
                                      dropout_p=dropout_p, backend=backend)


def _rope_rel_leaves(rope_prefix, grid=(7, 9), D=40, seed=0):
    leaves = rel_pos_leaves(2, 2, D, grid, grid, prefix=1, with_bias=True, seed=seed)
    tables = rope_leaves(2, 2, 1 + grid[0] * grid[1], D, prefix=rope_prefix, table_shape=None, seed=seed + 1)
    leaves["cos"], leaves["sin"] = tables["cos"], tables["sin"]
    return leaves


@pytest.mark.parametrize("rope_prefix", [0, 1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_rope_with_rel_pos_and_a_learnable_bias(rope_prefix, dtype):
    # rotated q, k with decomposed rel_pos terms and a bias, every gradient (the tables' included)
    leaves = _rope_rel_leaves(rope_prefix)
    results = {}
    for name, cast, be in (("ref", torch.float64, "reference"), ("pt", dtype, "reference"), ("run", dtype, "cpu")):
        ts = {n: t.detach().to(cast).requires_grad_() for n, t in leaves.items()}
        out = _rope_rel_call(ts, rope_prefix, False, be)
        out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(cast))
        results[name] = (out, {n: t.grad for n, t in ts.items()})
    fl = FLOOR[dtype]
    assert_close_2x(results["run"][0], results["pt"][0], results["ref"][0], floor=fl, name="out")
    for n in leaves:
        assert_close_2x(results["run"][1][n], results["pt"][1][n], results["ref"][1][n], factor=3.0, floor=fl * 10,
                        name=f"d{n}")


@pytest.mark.parametrize("rotate_half", [False, True], ids=["interleaved", "half"])
def test_rope_dropout_matches_the_reference_with_the_kernels_mask(rotate_half):
    # with dropout, rel_pos, a bias and learnable tables: the reference given the keep-mask the kernels drew
    from vitkernels.ops.attention.cpu import CpuAttentionKernels, dropout_keep_mask
    from vitkernels.ops.attention.function import AttentionFunction
    from vitkernels.ops.attention.reference import rel_pos_dense
    from vitkernels.ops.attention.rope import apply_rope

    p, D = 0.3, 32
    leaves = _rope_rel_leaves(1, grid=(6, 6), D=D)
    seen = {}

    class Recording:
        @staticmethod
        def forward(*args):
            out = CpuAttentionKernels.forward(*args)
            seen["rng"] = out[2]
            return out

        backward = staticmethod(CpuAttentionKernels.backward)

    ts = {n: t.detach().clone().requires_grad_() for n, t in leaves.items()}
    out = AttentionFunction.apply(Recording, ts["q"], ts["k"], ts["v"], ts["bias"], D ** -0.5, p, ts["rel_h"],
                                  ts["rel_w"], None, 1, ts["cos"][None, None], ts["sin"][None, None], 1, rotate_half)
    g = torch.randn_like(out)
    out.backward(g)
    n_q = out.shape[2]
    mask = dropout_keep_mask(seen["rng"], (2, 2, n_q, n_q), p)
    assert 0 < mask.float().mean() < 1
    rs = {n: t.detach().double().requires_grad_() for n, t in leaves.items()}
    rope = vitkernels.Rope(rs["cos"], rs["sin"], 1, rotate_half)
    bias = rs["bias"] + rel_pos_dense(vitkernels.RelPos(rs["rel_h"], rs["rel_w"], None, 1), n_q, n_q)
    ref = attention_reference(apply_rope(rs["q"], rope), apply_rope(rs["k"], rope), rs["v"], bias, D ** -0.5, p,
                              dropout_mask=mask)
    ref.backward(g.double())
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-5)
    for n in ts:
        torch.testing.assert_close(ts[n].grad.double(), rs[n].grad, rtol=1e-4, atol=1e-4, msg=lambda m: f"d{n}: {m}")


@pytest.mark.parametrize("tables_grad", [False, True], ids=["frozen", "learnable"])
def test_rope_backward_is_deterministic_bitwise(tables_grad):
    rope_backward_is_bitwise_deterministic("cpu", "cpu", tables_grad=tables_grad)


@pytest.mark.parametrize("table_shape", ["N", "1H"])
def test_rope_results_do_not_depend_on_the_thread_count(table_shape):
    # with dropout (the same seed), a bias and learnable tables, both layouts
    B, H, N, D = 3, 3, 81, 40
    shape = (N - 1, D) if table_shape == "N" else (1, H, N - 1, D)
    leaves = rope_leaves(B, H, N, D, prefix=1, table_shape=shape, with_bias=True)
    threads = torch.get_num_threads()
    runs = []
    try:
        for n in (1, max(2, threads)):
            torch.set_num_threads(n)
            for rotate_half in (False, True):
                ts = {name: t.clone().requires_grad_() for name, t in leaves.items()}
                rope = vitkernels.Rope(ts["cos"], ts["sin"], 1, rotate_half)
                torch.manual_seed(0)  # the same dropout seed in every run
                out = vitkernels.flash_attention(ts["q"], ts["k"], ts["v"], bias=ts["bias"], rope=rope,
                                                 dropout_p=0.1, backend="cpu")
                out.backward(torch.ones_like(out))
                runs.append([out] + [ts[name].grad for name in sorted(ts)])
    finally:
        torch.set_num_threads(threads)
    half = len(runs) // 2
    for one, several in zip(runs[:half], runs[half:]):
        for a, b in zip(one, several):
            assert torch.equal(a, b)


def _strided_tables(cos, sin):
    """cos and sin as views that are not contiguous, every byte around them NaN (a read outside shows): cos a
    transposed view (last stride Nq - prefix), sin every other column of a wider buffer (last stride 2)."""
    nan = float("nan")
    buf = torch.full((cos.shape[-1] + 1, cos.shape[-2]), nan, dtype=cos.dtype)
    buf[:-1] = cos.transpose(-2, -1)
    cos_v = buf[:-1].transpose(-2, -1)
    buf = torch.full((sin.shape[-2], 2 * sin.shape[-1]), nan, dtype=sin.dtype)
    buf[:, ::2] = sin
    sin_v = buf[:, ::2]
    assert not cos_v.is_contiguous() and not sin_v.is_contiguous() and cos_v.stride(-1) != 1
    assert torch.equal(cos_v, cos) and torch.equal(sin_v, sin)
    return cos_v, sin_v


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_rope_strided_tables_are_read_in_place(dtype):
    from torch.profiler import ProfilerActivity, profile

    from vitkernels.ops.attention.checks import check_rope
    from vitkernels.ops.attention.cpu import CpuAttentionKernels

    leaves = {n: t.to(dtype) for n, t in rope_leaves(2, 3, 50, 32, prefix=1, with_bias=True).items()}
    cos_v, sin_v = _strided_tables(leaves["cos"], leaves["sin"])
    rope_check(dict(leaves, cos=cos_v, sin=sin_v), 1, dtype=dtype, tables_grad=True)  # NaN read anywhere fails it
    q, k, v, bias = (leaves[n] for n in ("q", "k", "v", "bias"))
    q, k, v = torch.stack([q, k, v], dim=2).unbind(2)  # strided views of one tensor (the copy: before profiling)
    assert not q.is_contiguous()
    scale = 32 ** -0.5
    rope = check_rope(vitkernels.Rope(cos_v, sin_v, 1), q, k)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        out, lse, rng = CpuAttentionKernels.forward(q, k, v, bias, scale, 0.0, None, rope)
        grads = CpuAttentionKernels.backward(torch.ones_like(out), q, k, v, bias, out, lse, rng, scale, 0.0, True,
                                             None, False, rope, True)
    copies = [e.name for e in prof.events() if e.name in ("aten::copy_", "aten::clone", "aten::contiguous")]
    if dtype == torch.float32:
        assert not copies, copies
    # bitwise the contiguous tables' results
    dense = check_rope(vitkernels.Rope(leaves["cos"], leaves["sin"], 1), q, k)
    out_c, lse_c, _ = CpuAttentionKernels.forward(q, k, v, bias, scale, 0.0, None, dense)
    grads_c = CpuAttentionKernels.backward(torch.ones_like(out), q, k, v, bias, out_c, lse_c, rng, scale, 0.0, True,
                                           None, False, dense, True)
    assert torch.equal(out, out_c) and torch.equal(lse, lse_c)
    for a, b in zip(grads[:4] + tuple(grads[5]), grads_c[:4] + tuple(grads_c[5])):
        assert torch.equal(a, b)
    for grad, table in zip(grads[5], rope[:2]):
        assert grad.shape == table.shape and grad.dtype == table.dtype


def test_rope_expanded_tables_with_a_zero_stride():
    # a (N, D) table expanded to (B, H, N, D): every (b, h) reads the same rows through stride 0
    leaves = rope_leaves(2, 2, 37, 48, prefix=1)
    for n in ("cos", "sin"):
        leaves[n] = leaves[n].expand(2, 2, 36, 48)
        assert leaves[n].stride(0) == 0
    rope_check(leaves, 1, tables_grad=True)


def test_rope_prefix_rows_are_not_rotated():
    # identity tables rotate nothing: the result equals plain attention bitwise; prefix = Nq - 1 rotates one row
    q, k, v = (torch.randn(2, 2, 20, 32) for _ in range(3))
    plain = vitkernels.flash_attention(q, k, v, backend="cpu")
    ones, zeros = torch.ones(20, 32), torch.zeros(20, 32)
    assert torch.equal(vitkernels.flash_attention(q, k, v, rope=(ones, zeros), backend="cpu"), plain)
    leaves = rope_leaves(2, 2, 20, 32, prefix=19, with_bias=True)
    rope_check(leaves, 19, tables_grad=True)


def test_dispatch_picks_cpu_for_rope():
    q = torch.randn(1, 2, 9, 16)
    t = torch.randn(9, 16)
    inputs = vitkernels.ops.attention.check_attention_inputs(q, q, q, rope=(t, t))
    assert dispatch.select("flash_attention", inputs).name == "cpu"


def test_rope_kernels_check_their_tables():
    q = torch.randn(1, 2, 17, 32)
    ext = _ext.extension()
    ok = torch.randn(1, 1, 16, 32)
    with pytest.raises(RuntimeError, match="rope cos / sin must be"):
        ext.attention_forward_cpu(q, q, q, None, 1.0, 0.0, 0, 0, cos=ok[:, :, 1:], sin=ok[:, :, 1:], rope_prefix=1)
    with pytest.raises(RuntimeError, match="rope cos / sin must be"):
        ext.attention_forward_cpu(q, q, q, None, 1.0, 0.0, 0, 0, cos=ok.double(), sin=ok.double(), rope_prefix=1)
    with pytest.raises(RuntimeError, match="rope needs Nq == Nk"):
        k = torch.randn(1, 2, 18, 32)
        ext.attention_forward_cpu(q, k, k, None, 1.0, 0.0, 0, 0, cos=ok, sin=ok, rope_prefix=1)
    with pytest.raises(RuntimeError, match="rope cos without sin"):
        ext.attention_forward_cpu(q, q, q, None, 1.0, 0.0, 0, 0, cos=ok, rope_prefix=1)
    with pytest.raises(RuntimeError, match="share their shape and dtype"):
        ext.attention_forward_cpu(q, q, q, None, 1.0, 0.0, 0, 0, cos=ok, sin=ok.expand(1, 2, 16, 32), rope_prefix=1)

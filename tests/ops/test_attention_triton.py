"""The triton backend of flash_attention against the float64 reference (interpreter on CPU, small
shapes; the GPU-marked cases run the same checks at full size when a GPU is present).

Criterion (flash-attn's): |triton - ref64| <= 2 x |reference in the same dtype - ref64| + floor, for the
output and the gradients of q, k, v and bias."""
import os

import pytest
import torch

import vitkernels
from vitkernels import BackendUnavailableError
from vitkernels.ops.attention.reference import attention_reference

from tests.ops.backend_checks import (FLOOR, attention_backward_is_bitwise_deterministic, attention_nan_stays_in_its_row,
                                      attention_vs_reference, rel_pos_backward_is_bitwise_deterministic,
                                      rel_pos_dropout_matches_the_reference_with_the_kernels_mask, rel_pos_leaves,
                                      rel_pos_vs_reference, rope_backward_is_bitwise_deterministic, rope_leaves,
                                      rope_vs_reference)
from tests.utils import assert_close_2x, qkv_views

pytest.importorskip("triton")
pytestmark = pytest.mark.triton  # compiled on a GPU in make test's GPU step

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
DEVICE = "cuda" if torch.cuda.is_available() and not INTERPRET else "cpu"
if DEVICE == "cpu" and not INTERPRET:
    pytest.skip("triton needs a CUDA device or TRITON_INTERPRET=1", allow_module_level=True)

BF16_INTERPRETER = pytest.mark.skipif(
    INTERPRET, reason="bf16 tl.dot returns garbage under the Triton interpreter: bf16 is verified on a GPU only")


def dtype_params(dtypes=(torch.float32, torch.float16, torch.bfloat16)):
    return [pytest.param(d, id=str(d).replace("torch.", ""),
                         marks=[BF16_INTERPRETER] if d == torch.bfloat16 else []) for d in dtypes]


def floor_for(dtype):
    return FLOOR[dtype]


def check_against_reference(q, k, v, bias=None, scale=None, dout=None, bias_grad=True, factor=2.0, grad_factor=3.0):
    """The triton backend against the same-dtype and the fp64 reference (tests.ops.backend_checks)."""
    return attention_vs_reference("triton", q, k, v, bias, scale, dout, bias_grad, factor, grad_factor)


SHAPES = [(n, d) for n in (1, 49, 197) for d in (32, 40, 64, 80, 96, 128)]


@pytest.mark.parametrize("n,d", SHAPES, ids=[f"N{n}-D{d}" for n, d in SHAPES])
def test_matches_reference_with_relative_position_bias_fp32(n, d):
    B, H = 1, 2
    q, k, v, _ = qkv_views(B, H, n, d, device=DEVICE)
    bias = torch.randn(1, H, n, n, device=DEVICE)
    check_against_reference(q, k, v, bias, dout=torch.randn(B, H, n, d, device=DEVICE))


@pytest.mark.parametrize("dtype", dtype_params())
@pytest.mark.parametrize("n,d", [(49, 64), (197, 40), (197, 80), (1, 128)], ids=["N49-D64", "N197-D40", "N197-D80",
                                                                               "N1-D128"])
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
def test_matches_reference_per_dtype(dtype, n, d, with_bias):
    B, H = 2, 2
    q, k, v, _ = qkv_views(B, H, n, d, dtype=dtype, device=DEVICE)
    bias = torch.randn(1, H, n, n, dtype=dtype, device=DEVICE) if with_bias else None
    check_against_reference(q, k, v, bias, dout=torch.randn(B, H, n, d, dtype=dtype, device=DEVICE))


@pytest.mark.parametrize("bias_shape", [(2, 3, 49, 77), (1, 3, 49, 77), (2, 1, 1, 77), (49, 77), (1, 1, 1, 77),
                                        (2, 3, 49, 1), (1, 1, 1, 1)],
                         ids=["full", "1H", "keypad", "2d", "keys-only", "queries-only", "scalar"])
def test_broadcast_bias_and_its_reduced_gradient_nq_ne_nk(bias_shape):
    B, H, nq, nk, d = 2, 3, 49, 77, 40
    q = torch.randn(B, H, nq, d, device=DEVICE)
    k, v = (torch.randn(B, H, nk, d, device=DEVICE) for _ in range(2))
    bias = torch.randn(bias_shape, device=DEVICE)
    check_against_reference(q, k, v, bias, scale=0.3, dout=torch.randn(B, H, nq, d, device=DEVICE))


def test_a_batch_shared_bias_with_odd_rows_is_read_from_a_16_aligned_copy(monkeypatch):
    # ViT's N=197 rows start at odd offsets: the kernels read a zero-padded copy (rows of 208) so their
    # tile loads are wide (tests/ops/test_triton_compile.py checks the PTX); the result is unchanged.
    from vitkernels.ops import tuning
    from vitkernels.ops.attention import triton as attn_triton

    seen = []
    original = tuning.launch

    def spy(spec, kernel, grid, args, constexprs, key, device):
        if spec.name == "flash_attn_fwd":
            seen.append((args[3].stride(), args[3].shape, args[44]))  # bias strides and shape, BIAS_COLS (after H, Nq, Nk)
        return original(spec, kernel, grid, args, constexprs, key, device)
    monkeypatch.setattr(tuning, "launch", spy)
    n, d = 197, 32
    q, k, v, _ = qkv_views(2, 2, n, d, device=DEVICE)
    bias = torch.randn(1, 2, n, n, device=DEVICE)
    check_against_reference(q, k, v, bias, dout=torch.randn(2, 2, n, d, device=DEVICE))
    strides, shape, cols = seen[-1]
    assert strides == (0, n * 208, 208, 1) and tuple(shape) == (2, 2, n, n) and cols == 208
    seen.clear()
    attn_triton.flash_attention_fwd_triton(q[:1], k[:1], v[:1], bias, d ** -0.5, 0.0)  # batch 1: in place
    full = torch.randn(2, 2, n, n, device=DEVICE)  # a bias per sample is read once: in place
    attn_triton.flash_attention_fwd_triton(q, k, v, full, d ** -0.5, 0.0)
    assert [s[0][2] for s in seen] == [n, n] and [s[2] for s in seen] == [n, n]


@pytest.mark.parametrize("bias_shape", [(1, 2, 33, 33), (1, 1, 1, 33), (33, 1)], ids=["1H", "keys-only", "queries-only"])
def test_dbias_of_a_batch_shared_bias_summed_in_uneven_batch_groups(monkeypatch, bias_shape):
    # dBias walks the batch in groups (partial sums added in a fixed order): 5 samples in groups of 3 + 2
    from vitkernels.ops.attention import triton as attn_triton

    monkeypatch.setattr(attn_triton, "_dbias_batch_groups", lambda loop_b, tiles: (3, -(-loop_b // 3)))
    q, k, v, _ = qkv_views(5, 2, 33, 32, device=DEVICE)
    check_against_reference(q, k, v, torch.randn(bias_shape, device=DEVICE), dout=torch.randn(5, 2, 33, 32, device=DEVICE))


def test_dbias_batch_groups_depend_on_the_shape_only():
    from vitkernels.ops.attention.triton import _dbias_batch_groups

    assert _dbias_batch_groups(64, 12 * 4 * 4) == (22, 3)  # ViT-B bias (1, 12, 197, 197) at batch 64
    assert _dbias_batch_groups(1, 4) == (1, 1)
    for loop_b in (1, 2, 7, 64, 1000):
        per_group, groups = _dbias_batch_groups(loop_b, 5)
        assert (groups - 1) * per_group < loop_b <= groups * per_group


def launched_kernels(monkeypatch):
    """The (spec name, constexprs) of every tuned launch from here on."""
    from vitkernels.ops import tuning

    seen = []
    original = tuning.launch

    def spy(spec, kernel, grid, args, constexprs, key, device):
        seen.append((spec.name, dict(constexprs)))
        return original(spec, kernel, grid, args, constexprs, key, device)
    monkeypatch.setattr(tuning, "launch", spy)
    return seen


@pytest.mark.parametrize("bias_shape,batch,dbias_kernel", [((2, 2, 33, 33), 2, False), ((1, 2, 33, 33), 1, False),
                                                           ((1, 2, 33, 33), 2, True), ((2, 1, 33, 33), 2, True)],
                         ids=["per-sample", "batch1", "batch-shared", "head-shared"])
def test_dbias_of_a_full_shape_bias_comes_from_the_dq_kernel(monkeypatch, bias_shape, batch, dbias_kernel):
    # each dS element is one element of a (B, H, Nq, Nk) bias: the dQ kernel writes dBias = dS, no dBias kernel
    # recomputes S and dP; a broadcast bias sums dS over the batch (or heads): the dBias kernel
    seen = launched_kernels(monkeypatch)
    q, k, v, _ = qkv_views(batch, 2, 33, 40, device=DEVICE)
    check_against_reference(q, k, v, torch.randn(bias_shape, device=DEVICE), dout=torch.randn(batch, 2, 33, 40,
                                                                                                 device=DEVICE))
    names = [name for name, _ in seen]
    assert ("flash_attn_bwd_dbias" in names) == dbias_kernel, names
    assert [c["WRITE_DBIAS"] for name, c in seen if name == "flash_attn_bwd_dq"] == [not dbias_kernel]


def test_dbias_written_by_the_dq_kernel_equals_the_dbias_kernels_bitwise(monkeypatch):
    # the same dS tiles, stored once in the bias's dtype: the dBias kernel (forced) gives the same bits
    from vitkernels.ops.attention import triton as attn_triton

    B, H, n, d = 2, 2, 45, 40
    q, k, v = (torch.randn(B, H, n, d, device=DEVICE) for _ in range(3))
    bias, g = torch.randn(B, H, n, n, device=DEVICE), torch.randn(B, H, n, d, device=DEVICE)
    grads = []
    for from_dq in (True, False):
        monkeypatch.setattr(attn_triton, "_dbias_is_ds", lambda *args, v_=from_dq: v_)
        ts = [t.clone().requires_grad_() for t in (q, k, v, bias)]
        vitkernels.flash_attention(*ts[:3], bias=ts[3], dropout_p=0.0, backend="triton").backward(g)
        grads.append([t.grad for t in ts])
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_per_sample_bias_backward_is_deterministic_bitwise():
    q, k, v = (torch.randn(2, 2, 77, 40, device=DEVICE) for _ in range(3))
    bias, g = torch.randn(2, 2, 77, 77, device=DEVICE), torch.randn(2, 2, 77, 40, device=DEVICE)
    runs = []
    for _ in range(2):
        ts = [t.clone().requires_grad_() for t in (q, k, v, bias)]
        vitkernels.flash_attention(*ts[:3], bias=ts[3], backend="triton").backward(g)
        runs.append([t.grad for t in ts])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy, on the NaN the kernels then drop
def test_the_aligned_copys_padding_never_reaches_a_result(monkeypatch):
    # on a GPU the copy's padding is left unwritten (one device op): poisoned with NaN here, every output and
    # gradient stays finite and matches the reference
    from vitkernels.ops.attention import triton as attn_triton

    original = attn_triton._aligned_rows
    poisoned = []

    def nan_padding(bias4, batch):
        aligned = original(bias4, batch)
        if aligned is not bias4:
            bb, bh, bm, bn = aligned.shape
            aligned.as_strided((bb, bh, bm, aligned.stride(2)), aligned.stride())[..., bn:] = float("nan")
            poisoned.append(aligned.stride(2))
        return aligned
    monkeypatch.setattr(attn_triton, "_aligned_rows", nan_padding)
    q, k, v, _ = qkv_views(3, 2, 37, 32, device=DEVICE)
    check_against_reference(q, k, v, torch.randn(1, 2, 37, 37, device=DEVICE), dout=torch.randn(3, 2, 37, 32,
                                                                                               device=DEVICE))
    assert poisoned and set(poisoned) == {48}


def test_key_padding_mask_with_minus_inf():
    B, H, n, d = 2, 2, 49, 32
    q, k, v, _ = qkv_views(B, H, n, d, device=DEVICE)
    bias = torch.zeros(B, 1, 1, n, device=DEVICE)
    bias[0, ..., 40:] = float("-inf")
    bias[1, ..., :5] = float("-inf")
    check_against_reference(q, k, v, bias, bias_grad=False, dout=torch.randn(B, H, n, d, device=DEVICE))


def test_strided_views_of_one_qkv_tensor_are_read_in_place_and_padding_is_never_read():
    # q, k, v are views of a wider NaN-filled buffer: any read outside them would put NaN in the output.
    B, H, n, d = 2, 2, 49, 40
    buf = torch.full((B, n, 3, H, d + 8), float("nan"), device=DEVICE)
    buf[..., :d] = torch.randn(B, n, 3, H, d, device=DEVICE)
    q, k, v = buf[..., :d].permute(2, 0, 3, 1, 4).unbind(0)
    assert not q.is_contiguous() and q.stride(-1) == 1
    out = vitkernels.flash_attention(q, k, v, backend="triton")
    assert torch.isfinite(out).all()
    check_against_reference(q, k, v, dout=torch.randn(B, H, n, d, device=DEVICE))


def test_strides_aligned_to_8_elements_and_odd_ones_fall_back(monkeypatch):
    # a packed qkv at D = 40: strides are multiples of 8 (STRIDE_ALIGN = 8, wide loads on a GPU); q, k, v cut
    # from a buffer with odd rows (D + 1): STRIDE_ALIGN = 1, the kernels read every stride as it is
    seen = launched_kernels(monkeypatch)
    B, H, n, d = 2, 2, 37, 40
    q, k, v, _ = qkv_views(B, H, n, d, device=DEVICE)
    bias = torch.randn(1, H, n, n, device=DEVICE)
    check_against_reference(q, k, v, bias, dout=torch.randn(B, H, n, d, device=DEVICE))
    assert {c["STRIDE_ALIGN"] for _, c in seen} == {8}
    seen.clear()
    buf = torch.full((B, n, 3, H, d + 1), float("nan"), device=DEVICE)
    buf[..., :d] = torch.randn(B, n, 3, H, d, device=DEVICE)
    q, k, v = buf[..., :d].permute(2, 0, 3, 1, 4).unbind(0)
    assert q.stride(1) == d + 1  # odd head offsets
    full = torch.randn(B, H, n, n, device=DEVICE)  # dBias from the dQ kernel, too
    check_against_reference(q, k, v, full, dout=torch.randn(B, n, H, d, device=DEVICE).transpose(1, 2))
    assert {c["STRIDE_ALIGN"] for _, c in seen} == {1}
    seen.clear()
    buf = torch.randn(B, n, 3, H, d + 2, device=DEVICE)  # rows of 42: multiples of 2 only
    q, k, v = buf[..., :d].permute(2, 0, 3, 1, 4).unbind(0)
    check_against_reference(q, k, v, dout=torch.randn(B, H, n, d, device=DEVICE))
    assert {c["STRIDE_ALIGN"] for _, c in seen} == {2}


def test_non_contiguous_output_gradient():
    B, H, n, d = 2, 2, 49, 32
    q, k, v, _ = qkv_views(B, H, n, d, device=DEVICE)
    dout = torch.randn(B, n, H, d, device=DEVICE).transpose(1, 2)  # as from out.transpose(1, 2) downstream
    assert not dout.is_contiguous()
    check_against_reference(q, k, v, torch.randn(1, H, n, n, device=DEVICE), dout=dout)


def test_all_minus_inf_rows_give_zeros_and_zero_gradients():
    B, H, n, d = 1, 2, 49, 32
    q, k, v = (torch.randn(B, H, n, d, device=DEVICE, requires_grad=True) for _ in range(3))
    bias = torch.randn(1, H, n, n, device=DEVICE)
    bias[..., 3, :] = float("-inf")
    bias[..., 40, :] = float("-inf")
    bias = bias.requires_grad_()
    out = vitkernels.flash_attention(q, k, v, bias=bias, backend="triton")
    out.backward(torch.randn_like(out))
    for t in (out, q.grad, k.grad, v.grad, bias.grad):
        assert torch.isfinite(t).all()
    assert (out[..., [3, 40], :] == 0).all()
    assert (q.grad[..., [3, 40], :] == 0).all() and (bias.grad[..., [3, 40], :] == 0).all()
    check_against_reference(q, k, v, bias.detach(), bias_grad=False)


def test_nan_in_a_query_row_stays_in_that_row():
    attention_nan_stays_in_its_row("triton", DEVICE)


def test_backward_is_deterministic_bitwise():
    attention_backward_is_bitwise_deterministic("triton", DEVICE)


@pytest.mark.parametrize("p,bias_batch", [(0.1, 1), (0.5, 1), (0.3, 2)], ids=["0.1", "0.5", "0.3-per-sample-bias"])
def test_dropout_keeps_one_minus_p_and_matches_the_reference_given_the_same_mask(p, bias_batch):
    # a per-sample bias: its gradient (dS with the dropped entries) from the dQ kernel
    from vitkernels.ops.attention.triton import draw_dropout_seed, dropout_mask_triton

    B, H, n, d = 2, 2, 77, 32
    q, k, v = (torch.randn(B, H, n, d, device=DEVICE) for _ in range(3))
    bias = torch.randn(bias_batch, H, n, n, device=DEVICE)
    torch.manual_seed(123)
    seed = draw_dropout_seed(DEVICE)
    assert seed.device.type == torch.device(DEVICE).type and seed.shape == (2,)  # (seed, offset) on the device
    mask = dropout_mask_triton(seed, B, H, n, n, p)
    count = mask.numel()
    kept = mask.float().mean().item()
    sigma = (p * (1 - p) / count) ** 0.5
    assert abs(kept - (1 - p)) < 6 * sigma, (kept, 1 - p)

    leaves = [t.clone().requires_grad_() for t in (q, k, v, bias)]
    torch.manual_seed(123)  # the kernel draws the same seed from torch's generator
    out = vitkernels.flash_attention(*leaves[:3], bias=leaves[3], dropout_p=p, backend="triton")
    g = torch.randn_like(out)
    out.backward(g)
    ref_leaves = [t.detach().double().requires_grad_() for t in (q, k, v, bias)]
    ref = attention_reference(*ref_leaves[:3], ref_leaves[3], None, p, dropout_mask=mask)
    ref.backward(g.double())
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=1e-5)
    for name, a, b in zip("q k v bias".split(), leaves, ref_leaves):
        torch.testing.assert_close(a.grad.double(), b.grad, rtol=0, atol=1e-4, msg=lambda m: f"d{name}: {m}")

    torch.manual_seed(123)
    again = vitkernels.flash_attention(q, k, v, bias=bias, dropout_p=p, backend="triton")
    assert torch.equal(again, out.detach())  # same seed, same result
    torch.manual_seed(124)
    other = vitkernels.flash_attention(q, k, v, bias=bias, dropout_p=p, backend="triton")
    assert not torch.equal(other, out.detach())


def test_dropout_mask_has_no_structure_across_columns_rows_and_heads():
    # one Philox call serves 4 consecutive key columns: its 4 outputs must be independent draws, and
    # rows, heads and calls must differ
    from vitkernels.ops.attention.triton import draw_dropout_seed, dropout_mask_triton

    seed = draw_dropout_seed(DEVICE)
    mask = dropout_mask_triton(seed, 1, 2, 128, 128, 0.5).float()
    assert abs(mask.mean().item() - 0.5) < 0.02
    for shift in (1, 2, 3, 4):  # within a group of 4 and across groups: agreement ~ 1/2, as for fair coins
        agree = (mask[..., shift:] == mask[..., :-shift]).float().mean().item()
        assert abs(agree - 0.5) < 0.03, (shift, agree)
    assert abs((mask[:, :, 1:] == mask[:, :, :-1]).float().mean().item() - 0.5) < 0.03  # rows
    assert abs((mask[:, 0] == mask[:, 1]).float().mean().item() - 0.5) < 0.03  # heads
    other = dropout_mask_triton(draw_dropout_seed(DEVICE), 1, 2, 128, 128, 0.5).float()
    assert abs((mask == other).float().mean().item() - 0.5) < 0.03  # a new draw


def test_dropout_one_drops_everything_with_zero_gradients():
    q, k, v = (torch.randn(1, 2, 33, 32, device=DEVICE, requires_grad=True) for _ in range(3))
    bias = torch.randn(1, 2, 33, 33, device=DEVICE, requires_grad=True)
    out = vitkernels.flash_attention(q, k, v, bias=bias, dropout_p=1.0, backend="triton")
    out.backward(torch.randn_like(out))
    assert (out == 0).all()
    for t in (q, k, v, bias):
        assert (t.grad == 0).all()


def test_triton_refuses_float64_with_the_reason():
    q = torch.randn(1, 1, 5, 16, dtype=torch.float64, device=DEVICE)
    with pytest.raises(BackendUnavailableError, match="float64 is not supported by the triton kernels"):
        vitkernels.flash_attention(q, q, q, backend="triton")


@pytest.mark.skipif(not INTERPRET, reason="the refusal applies under the interpreter only")
def test_triton_refuses_bfloat16_under_the_interpreter():
    q = torch.randn(1, 1, 5, 16, dtype=torch.bfloat16)
    with pytest.raises(BackendUnavailableError, match="bfloat16 tl.dot gives wrong results under the Triton"):
        vitkernels.flash_attention(q, q, q, backend="triton")


# ---- decomposed relative position (rel_pos) --------------------------------------------------------------


@pytest.mark.parametrize("grid,d,batch", [((14, 14), 64, 1), ((14, 14), 80, 2),
                                          pytest.param((32, 32), 64, 1, marks=[pytest.mark.slow] if INTERPRET else [])],
                         ids=["N196-D64-B1", "N196-D80", "N1024-D64-B1"])
def test_rel_pos_matches_the_dense_reference_fp32(grid, d, batch):
    # SAM / ViTDet: 14 x 14 windows and a global grid; every gradient, the terms' included
    rel_pos_vs_reference("triton", rel_pos_leaves(batch, 2, d, grid, grid, device=DEVICE))


@pytest.mark.parametrize("dtype", dtype_params((torch.float16, torch.bfloat16)))
def test_rel_pos_per_dtype(dtype):
    rel_pos_vs_reference("triton", rel_pos_leaves(2, 2, 64, (9, 11), (9, 11), device=DEVICE), dtype=dtype)


@pytest.mark.parametrize("q_grid,k_grid,prefix", [((8, 8), (4, 4), 1), ((2, 6, 6), (2, 3, 3), 1),
                                                  ((3, 5, 4), (3, 5, 4), 0), ((5, 7), (5, 7), 3)],
                         ids=["pooled-2d-cls", "pooled-3d-cls", "3d", "prefix3"])
def test_rel_pos_pooled_key_grids_3d_and_prefix_tokens(q_grid, k_grid, prefix):
    # MViTv2: Nq != Nk (a pooled key grid), a frame axis, the class token outside the grid
    rel_pos_vs_reference("triton", rel_pos_leaves(2, 2, 32, q_grid, k_grid, prefix=prefix, device=DEVICE),
                         prefix=prefix)


@pytest.mark.parametrize("bias_shape", [(1, 2, 50, 50), (2, 1, 1, 50)], ids=["1H-table", "keypad"])
def test_rel_pos_with_a_learnable_bias_and_its_gradient(bias_shape):
    leaves = rel_pos_leaves(2, 2, 40, (7, 7), (7, 7), prefix=1, device=DEVICE, with_bias=True, bias_shape=bias_shape)
    rel_pos_vs_reference("triton", leaves, prefix=1)


def test_rel_pos_terms_are_read_in_place_from_any_strides():
    B, H, n, d = 1, 2, 48, 32  # a 6 x 8 grid
    q, k, v, _ = qkv_views(B, H, n, d, device=DEVICE)
    wide = torch.full((B, H, n, 20), float("nan"), device=DEVICE)
    wide[..., 2:8] = torch.randn(B, H, n, 6, device=DEVICE)
    rel_h = wide[..., 2:8]  # a slice of a NaN-padded buffer: reading past it gives NaN
    rel_w = torch.randn(B, H, 8, n, device=DEVICE).transpose(-1, -2)  # unit stride along the queries
    out = vitkernels.flash_attention(q, k, v, rel_pos=(rel_h, rel_w), backend="triton")
    ref = vitkernels.flash_attention(*(t.double() for t in (q, k, v)), backend="reference",
                                     rel_pos=(rel_h.double(), rel_w.double()))
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


def test_rel_pos_only_some_terms_require_grad():
    leaves = rel_pos_leaves(1, 2, 32, (6, 6), (6, 6), device=DEVICE)
    ts = {n: t.clone().requires_grad_(n not in ("rel_w", "k")) for n, t in leaves.items()}
    out = vitkernels.flash_attention(ts["q"], ts["k"], ts["v"], rel_pos=(ts["rel_h"], ts["rel_w"]), backend="triton")
    out.backward(torch.ones_like(out))
    rs = {n: t.double().requires_grad_(n not in ("rel_w", "k")) for n, t in leaves.items()}
    vitkernels.flash_attention(rs["q"], rs["k"], rs["v"], rel_pos=(rs["rel_h"], rs["rel_w"]),
                               backend="reference").backward(torch.ones_like(out).double())
    assert ts["rel_w"].grad is None and ts["k"].grad is None
    for n in ("q", "v", "rel_h"):
        torch.testing.assert_close(ts[n].grad.double(), rs[n].grad, rtol=1e-4, atol=1e-5)


def test_rel_pos_backward_is_deterministic_bitwise():
    rel_pos_backward_is_bitwise_deterministic("triton", DEVICE)


def test_rel_pos_with_dropout_matches_the_reference_given_the_kernels_mask():
    from vitkernels.ops.attention.triton import dropout_mask_triton

    rel_pos_dropout_matches_the_reference_with_the_kernels_mask(
        "triton", DEVICE, lambda rng, shape, p: dropout_mask_triton(rng, *shape, p))


def test_rel_pos_grid_axes_past_the_triton_limit_are_refused_with_the_reason_when_their_gradient_is_needed():
    from vitkernels.ops.attention.triton_configs import REL_AXIS_MAX

    n = REL_AXIS_MAX + 1
    q = torch.randn(1, 1, n, 16, device=DEVICE)
    rel = (torch.randn(1, 1, n, 1, device=DEVICE), torch.randn(1, 1, n, n, device=DEVICE, requires_grad=True))
    with pytest.raises(BackendUnavailableError, match=f"axis longer than {REL_AXIS_MAX}"):
        vitkernels.flash_attention(q, q, q, rel_pos=rel, backend="triton")
    # without the terms' gradient (inference, or frozen terms) any grid runs, and a cached decision for one
    # case is not reused for the other
    expected = vitkernels.flash_attention(*(t.double() for t in (q, q, q)), backend="reference",
                                          rel_pos=tuple(t.detach().double() for t in rel))
    with torch.no_grad():
        out = vitkernels.flash_attention(q, q, q, rel_pos=rel, backend="triton")
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
    frozen = (rel[0], rel[1].detach())
    torch.testing.assert_close(vitkernels.flash_attention(q, q, q, rel_pos=frozen, backend="triton").double(),
                               expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(BackendUnavailableError, match=f"axis longer than {REL_AXIS_MAX}"):
        vitkernels.flash_attention(q, q, q, rel_pos=rel, backend="triton")


# ---- rotary position embedding (rope) --------------------------------------------------------------------


LAYOUTS = [pytest.param(False, id="pairs"), pytest.param(True, id="half")]


@pytest.mark.parametrize("rotate_half", LAYOUTS)
@pytest.mark.parametrize("d", [32, 40, 64, 80])
def test_rope_matches_the_reference_fp32(rotate_half, d):
    # EVA-02 (pairs) / DINOv3 (halves) with a class token and a learnable bias; D = 40, 80: a padded block,
    # where the half layout holds each half in its own half block
    leaves = rope_leaves(1, 2, 49, d, prefix=1, device=DEVICE, with_bias=True)
    rope_vs_reference("triton", leaves, prefix=1, rotate_half=rotate_half)


TABLE_SHAPES = {"ND": lambda B, H, n, d: (n, d), "B1ND": lambda B, H, n, d: (B, 1, n, d),
                "1HND": lambda B, H, n, d: (1, H, n, d)}


@pytest.mark.parametrize("rotate_half", LAYOUTS)
@pytest.mark.parametrize("prefix", [0, 1])
@pytest.mark.parametrize("table", sorted(TABLE_SHAPES))
def test_rope_learnable_tables_broadcast_over_batch_or_heads(rotate_half, prefix, table):
    # the tables' gradients summed over the dims they broadcast; prefix rows unrotated
    B, H, n, d = 2, 2, 17, 32
    leaves = rope_leaves(B, H, n, d, prefix=prefix, table_shape=TABLE_SHAPES[table](B, H, n - prefix, d),
                         device=DEVICE)
    rope_vs_reference("triton", leaves, prefix=prefix, rotate_half=rotate_half, tables_grad=True)


@pytest.mark.parametrize("rotate_half", LAYOUTS)
@pytest.mark.parametrize("n,prefix", [(1, 0), (2, 1), (197, 1)], ids=["N1", "N2-prefix1", "N197-prefix1"])
def test_rope_sequence_lengths(rotate_half, n, prefix):
    # one token, a class token and one patch, ViT-B/16's 197 tokens after its class token
    d = 64 if n == 197 else 16
    leaves = rope_leaves(1, 1 if n == 197 else 2, n, d, prefix=prefix, device=DEVICE)
    rope_vs_reference("triton", leaves, prefix=prefix, rotate_half=rotate_half, tables_grad=n < 197)


@pytest.mark.parametrize("dtype", dtype_params((torch.float16, torch.bfloat16)))
@pytest.mark.parametrize("tables", ["q-dtype", "fp32"])
@pytest.mark.parametrize("rotate_half", LAYOUTS)
@pytest.mark.parametrize("d", [64, 80])
def test_rope_per_dtype(dtype, tables, rotate_half, d):
    # fp16 / bf16 q with tables in its dtype, or timm's float32 tables (rotated in fp32, rounded once)
    leaves = rope_leaves(2, 2, 33, d, prefix=1, device=DEVICE)
    rope_vs_reference("triton", leaves, prefix=1, rotate_half=rotate_half, dtype=dtype,
                      table_dtype=torch.float32 if tables == "fp32" else None, tables_grad=d == 80)


def rope_rel_pos_leaves(prefix=1, seed=0, per_sample_bias=False):
    """q, k, v on a 5 x 6 grid after ``prefix`` class tokens, rope tables, rel_pos terms and a bias (shared by
    the batch, or one per sample: its gradient from the dQ kernel)."""
    leaves = rope_leaves(2, 2, prefix + 30, 32, prefix=prefix, device=DEVICE, with_bias=True, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    leaves["rel_h"] = torch.randn(2, 2, 30, 5, generator=g).to(DEVICE)
    leaves["rel_w"] = torch.randn(2, 2, 30, 6, generator=g).to(DEVICE)
    if per_sample_bias:
        leaves["bias"] = torch.randn(2, *leaves["bias"].shape[1:], generator=g).to(DEVICE)
    return leaves


def _rope_rel_call(ts, prefix, rotate_half, backend, dropout_p=0.0):
    rope = vitkernels.Rope(ts["cos"], ts["sin"], prefix, rotate_half)
    rel = vitkernels.RelPos(ts["rel_h"], ts["rel_w"], None, prefix)
    return vitkernels.flash_attention(ts["q"], ts["k"], ts["v"], bias=ts["bias"], rel_pos=rel, rope=rope,
                                      dropout_p=dropout_p, backend=backend)


@pytest.mark.parametrize("rotate_half,per_sample_bias", [(False, False), (True, False), (False, True)],
                         ids=["pairs", "half", "pairs-per-sample-bias"])
def test_rope_with_rel_pos_and_a_learnable_bias(rotate_half, per_sample_bias):
    # every gradient (q, k, v, bias, the rel_pos terms, the tables) against the fp64 reference
    leaves = rope_rel_pos_leaves(per_sample_bias=per_sample_bias)
    results = {}
    for name, cast, be in (("ref", torch.float64, "reference"), ("pt", torch.float32, "reference"),
                           ("run", torch.float32, "triton")):
        ts = {n: t.detach().to(cast).requires_grad_() for n, t in leaves.items()}
        out = _rope_rel_call(ts, 1, rotate_half, be)
        out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(2)).to(out.device, cast))
        results[name] = (out, {n: t.grad for n, t in ts.items()})
    fl = FLOOR[torch.float32]
    assert_close_2x(results["run"][0], results["pt"][0], results["ref"][0], floor=fl, name="out")
    for n in leaves:
        assert_close_2x(results["run"][1][n], results["pt"][1][n], results["ref"][1][n], factor=3.0, floor=fl * 10,
                        name=f"d{n}")


@pytest.mark.parametrize("rotate_half,per_sample_bias", [(False, False), (True, False), (False, True)],
                         ids=["pairs", "half", "pairs-per-sample-bias"])
def test_rope_with_dropout_matches_the_reference_given_the_kernels_mask(rotate_half, per_sample_bias):
    # the kernels' own keep-mask replayed in the fp64 reference: rope, rel_pos, a bias and dropout combine,
    # learnable tables included; a per-sample bias has its gradient from the dQ kernel
    from vitkernels.ops.attention.function import AttentionFunction
    from vitkernels.ops.attention.reference import rel_pos_dense
    from vitkernels.ops.attention.rope import apply_rope
    from vitkernels.ops.attention.triton import TritonAttentionKernels, dropout_mask_triton

    p, prefix = 0.3, 1
    leaves = rope_rel_pos_leaves(prefix, per_sample_bias=per_sample_bias)
    seen = {}

    class Recording:
        @staticmethod
        def forward(*args):
            out = TritonAttentionKernels.forward(*args)
            seen["rng"] = out[2]
            return out

        backward = staticmethod(TritonAttentionKernels.backward)

    ts = {n: t.detach().clone().requires_grad_() for n, t in leaves.items()}
    out = AttentionFunction.apply(Recording, ts["q"], ts["k"], ts["v"], ts["bias"], 32 ** -0.5, p,
                                  ts["rel_h"], ts["rel_w"], None, prefix, ts["cos"][None, None], ts["sin"][None, None],
                                  prefix, rotate_half)
    g = torch.randn_like(out)
    out.backward(g)
    B, H, n = out.shape[:3]
    mask = dropout_mask_triton(seen["rng"], B, H, n, n, p)
    assert 0.5 < mask.float().mean().item() < 0.9
    rs = {n_: t.detach().double().requires_grad_() for n_, t in leaves.items()}
    rope = vitkernels.Rope(rs["cos"], rs["sin"], prefix, rotate_half)
    dense = rel_pos_dense(vitkernels.RelPos(rs["rel_h"], rs["rel_w"], None, prefix), n, n)
    ref = attention_reference(apply_rope(rs["q"], rope), apply_rope(rs["k"], rope), rs["v"], rs["bias"] + dense,
                              32 ** -0.5, p, dropout_mask=mask)
    ref.backward(g.double())
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-5)
    for name in ts:
        torch.testing.assert_close(ts[name].grad.double(), rs[name].grad, rtol=1e-4, atol=1e-4,
                                   msg=lambda m: f"d{name}: {m}")


@pytest.mark.parametrize("tables_grad", [False, True], ids=["frozen-tables", "learnable-tables"])
def test_rope_backward_is_deterministic_bitwise(tables_grad):
    rope_backward_is_bitwise_deterministic("triton", DEVICE, tables_grad=tables_grad)


@pytest.mark.parametrize("rotate_half", LAYOUTS)
def test_rope_tables_and_qkv_are_read_in_place_from_any_strides(monkeypatch, rotate_half):
    # timm's RotaryEmbeddingCat gives [sin | cos]: the tables are strided halves of one tensor, here inside a
    # NaN-padded buffer and broadcast over the batch with expand (stride 0); q, k, v strided views of one qkv.
    # Any read outside them, or a copy, would show.
    from vitkernels.ops import tuning

    B, H, n, d, prefix = 2, 2, 37, 40, 1
    q, k, v, _ = qkv_views(B, H, n, d, device=DEVICE)
    leaves = rope_leaves(1, 1, n, d, prefix=prefix, device=DEVICE)
    buf = torch.full((n - prefix, 2 * d + 8), float("nan"), device=DEVICE)
    buf[:, 4:4 + 2 * d] = torch.cat([leaves["sin"], leaves["cos"]], dim=-1)
    sin, cos = buf[:, 4:4 + 2 * d].chunk(2, dim=-1)
    cos4, sin4 = cos.expand(B, 1, n - prefix, d), sin.expand(B, 1, n - prefix, d)
    seen = []
    original = tuning.launch

    def spy(spec, kernel, grid, args, constexprs, key, device):
        if spec.name == "flash_attn_fwd":
            seen.append({a.data_ptr() for a in args if isinstance(a, torch.Tensor)})
        return original(spec, kernel, grid, args, constexprs, key, device)
    monkeypatch.setattr(tuning, "launch", spy)
    out = vitkernels.flash_attention(q, k, v, rope=vitkernels.Rope(cos4, sin4, prefix, rotate_half), backend="triton")
    assert {q.data_ptr(), k.data_ptr(), v.data_ptr(), cos.data_ptr(), sin.data_ptr()} <= seen[-1]
    rope64 = vitkernels.Rope(cos.double(), sin.double(), prefix, rotate_half)
    ref = vitkernels.flash_attention(*(t.double() for t in (q, k, v)), rope=rope64, backend="reference")
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


def test_rope_runs_on_triton_without_a_refusal():
    from vitkernels.ops.attention import _triton_shape_reasons
    from vitkernels.ops.attention.checks import check_attention_inputs

    q = torch.randn(1, 2, 5, 16, device=DEVICE)
    cos, sin = torch.ones(4, 16, device=DEVICE), torch.zeros(4, 16, device=DEVICE)
    for half in (False, True):
        assert _triton_shape_reasons(check_attention_inputs(q, q, q, rope=vitkernels.Rope(cos, sin, 1, half))) == []


# ---- full-size checks, GPU only --------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", dtype_params((torch.float16, torch.bfloat16, torch.float32)))
@pytest.mark.parametrize("n,d", [(197, 64), (577, 64), (1025, 80), (4096, 64)])
def test_gpu_vit_shapes(dtype, n, d):
    B, H = (4, 6) if n <= 1025 else (1, 4)  # the fp64 reference holds several B*H*N*N tensors
    q, k, v, _ = qkv_views(B, H, n, d, dtype=dtype, device="cuda")
    bias = torch.randn(1, H, n, n, dtype=dtype, device="cuda")
    check_against_reference(q, k, v, bias, dout=torch.randn(B, H, n, d, dtype=dtype, device="cuda"))


@pytest.mark.gpu
@pytest.mark.slow
def test_gpu_long_sequence_memory_is_linear():
    B, H, n, d = 1, 2, 65536, 64
    q, k, v = (torch.randn(B, H, n, d, dtype=torch.bfloat16, device="cuda", requires_grad=True) for _ in range(3))
    # warm-up first: tuning's timer (do_bench) allocates a 256 MB cache-flush buffer of its own
    vitkernels.flash_attention(q, k, v, backend="triton").backward(torch.randn_like(q))
    q.grad = k.grad = v.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = vitkernels.flash_attention(q, k, v, backend="triton")
    out.backward(torch.randn_like(out))
    peak = torch.cuda.max_memory_allocated() - base
    assert peak < 16 * q.numel() * q.element_size(), peak  # O(N * D), nowhere near N^2 = 8.6e9 elements


@pytest.mark.gpu
def test_gpu_cuda_graph_replays_draw_new_dropout_masks():
    """The (seed, offset) is drawn on the device inside the graph: every replay of a captured dropout call
    uses a new mask, as SDPA's dropout does (a host-side seed would be frozen into the graph)."""
    B, H, n, d = 2, 2, 64, 64
    q, k = (torch.randn(B, H, n, d, device="cuda") for _ in range(2))
    v = torch.eye(n, d, device="cuda").expand(B, H, n, d).contiguous()  # out = dropped probabilities
    vitkernels.flash_attention(q, k, v, dropout_p=0.3, backend="triton")  # tune + compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = vitkernels.flash_attention(q, k, v, dropout_p=0.3, backend="triton")
    masks = []
    for _ in range(3):
        graph.replay()
        torch.cuda.synchronize()
        masks.append(out == 0)
        dropped = masks[-1].float().mean().item()
        assert 0.2 < dropped < 0.4, dropped
    assert not torch.equal(masks[0], masks[1]) and not torch.equal(masks[1], masks[2])


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_gpu_tensors_on_a_second_device_while_the_first_is_current():
    torch.cuda.set_device(0)
    q, k, v = (torch.randn(2, 3, 197, 64, device="cuda:1", requires_grad=True) for _ in range(3))
    bias = torch.randn(1, 3, 197, 197, device="cuda:1", requires_grad=True)
    out = vitkernels.flash_attention(q, k, v, bias=bias, backend="triton")
    out.backward(torch.randn_like(out))
    ref = attention_reference(*(t.detach().double() for t in (q, k, v, bias)), None, 0.0)
    assert torch.cuda.current_device() == 0 and out.device == torch.device("cuda:1")
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=2e-5)
    assert all(t.grad is not None and t.grad.device == torch.device("cuda:1") for t in (q, k, v, bias))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", dtype_params((torch.float16, torch.bfloat16, torch.float32)))
@pytest.mark.parametrize("grid,d,batch", [((14, 14), 64, 8), ((32, 32), 80, 2), ((64, 64), 64, 1)],
                         ids=["N196-D64", "N1024-D80", "N4096-D64-B1"])
def test_gpu_rel_pos_sam_shapes(dtype, grid, d, batch):
    """SAM ViT-B's windowed (14 x 14) and global (64 x 64 = 4096 tokens) attention with decomposed rel-pos,
    every gradient against the fp64 dense reference."""
    rel_pos_vs_reference("triton", rel_pos_leaves(batch, 4, d, grid, grid, device="cuda"), dtype=dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", dtype_params((torch.bfloat16, torch.float32)))
def test_gpu_rel_pos_mvit_stage1(dtype):
    """mvit_v2_s stage 1 at 8 x 56 x 56 queries against 8 x 7 x 7 pooled keys, class token, 3-D terms."""
    leaves = rel_pos_leaves(1, 1, 96, (8, 56, 56), (8, 7, 7), prefix=1, device="cuda")
    rel_pos_vs_reference("triton", leaves, prefix=1, dtype=dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", dtype_params((torch.float16, torch.bfloat16, torch.float32)))
@pytest.mark.parametrize("rotate_half", LAYOUTS)
@pytest.mark.parametrize("n,d,table", [(197, 64, "ND"), (577, 64, "1HND"), (1025, 80, "ND")],
                         ids=["N197-D64", "N577-D64-1H", "N1025-D80"])
def test_gpu_rope_vit_shapes(dtype, rotate_half, n, d, table):
    """EVA-02 / DINOv3-size attention with rope after a class token, timm's float32 tables (learnable) and a
    learnable bias: every gradient against the fp64 reference."""
    B, H = 4, 6
    leaves = rope_leaves(B, H, n, d, prefix=1, table_shape=TABLE_SHAPES[table](B, H, n - 1, d), device="cuda",
                         with_bias=True)
    rope_vs_reference("triton", leaves, prefix=1, rotate_half=rotate_half, dtype=dtype,
                      table_dtype=torch.float32, tables_grad=True)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", dtype_params((torch.float16, torch.bfloat16)))
@pytest.mark.parametrize("rotate_half", LAYOUTS)
def test_gpu_rope_frozen_tables_in_the_inputs_dtype(dtype, rotate_half):
    leaves = rope_leaves(2, 4, 257, 64, prefix=1, device="cuda")
    rope_vs_reference("triton", leaves, prefix=1, rotate_half=rotate_half, dtype=dtype)

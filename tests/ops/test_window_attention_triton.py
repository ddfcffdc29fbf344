"""The triton backend of window_attention against the float64 reference (interpreter on CPU, small maps;
GPU-marked cases at Swin sizes when a GPU is present). Criterion: |triton - ref64| <= 2x |reference in
the same dtype - ref64| + floor, for the output and the gradients of qkv, the table and qkv_bias (and,
with Swin V2's cosine attention, the logit scale)."""
import math
import os

import pytest
import torch

import vitkernels
from vitkernels import BackendUnavailableError

from tests.ops.backend_checks import (cosine_window_backward_is_bitwise_deterministic, cosine_window_vs_reference,
                                      window_backward_is_bitwise_deterministic, window_reads_a_strided_qkv_in_place,
                                      window_vs_reference)
from tests.utils import assert_close_2x

pytest.importorskip("triton")
pytestmark = pytest.mark.triton  # compiled on a GPU in make test's GPU step

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
DEVICE = "cuda" if torch.cuda.is_available() and not INTERPRET else "cpu"
if DEVICE == "cpu" and not INTERPRET:
    pytest.skip("triton needs a CUDA device or TRITON_INTERPRET=1", allow_module_level=True)
BF16 = pytest.param(torch.bfloat16, id="bfloat16", marks=pytest.mark.skipif(
    INTERPRET, reason="bf16 tl.dot returns garbage under the Triton interpreter: bf16 is verified on a GPU only"))


def run_case(shape, heads, head_dim, window, shift, table_window=None, dtype=torch.float32, with_bias=True,
             with_table=True, qkv=None):
    """The triton backend against the reference (tests.ops.backend_checks.window_vs_reference)."""
    return window_vs_reference("triton", DEVICE, shape, heads, head_dim, window, shift, table_window, dtype, with_bias,
                               with_table, qkv)


CASES_2D = [
    # (B, H, W), heads, head_dim, window, shift, table window
    ((2, 14, 14), 2, 32, 7, 3, None),           # Swin stage, shifted
    ((2, 14, 14), 2, 32, 7, 0, None),           # not shifted
    ((1, 13, 10), 2, 32, 7, 3, None),           # padding in both dims
    ((1, 5, 6), 2, 32, 7, 3, (5, 6)),           # window clipped to the map, shift dropped
    ((1, 7, 20), 2, 40, 7, 3, (7, 7)),          # clipped in H only (7 <= 7)
    ((1, 10, 13), 2, 32, (4, 8), (2, 4), None),  # non-square window
    ((1, 9, 11), 3, 24, (4, 5), (0, 2), None),  # shift in one dim only, head_dim 24
    ((1, 11, 12), 2, 40, 9, 4, None),           # 81 tokens: the blocked (not fused) backward, padding, D=40
]


@pytest.mark.parametrize("shape,heads,hd,window,shift,table_window", CASES_2D,
                         ids=["14x14-w7-s3", "14x14-w7-s0", "13x10-pad", "5x6-clipped", "7x20-clipH", "10x13-w4x8",
                              "9x11-shift0x2", "11x12-w9-blocked"])
def test_2d_matches_reference(shape, heads, hd, window, shift, table_window):
    run_case(shape, heads, hd, window, shift, table_window)


CASES_3D = [
    ((1, 4, 6, 5), 2, 32, (2, 3, 3), (1, 1, 1), None),
    ((1, 3, 5, 5), 2, 32, (2, 3, 3), (1, 1, 2), None),  # padding in every dim
    ((1, 2, 6, 6), 2, 32, (4, 3, 3), (2, 1, 1), (4, 3, 3)),  # T clipped: table of the configured window
    ((1, 3, 3, 8), 2, 32, (4, 4, 3), (2, 2, 1), (4, 4, 3)),  # T and H clipped: Video Swin's index[:N, :N]
    ((2, 4, 6, 6), 2, 32, (2, 3, 3), (0, 0, 0), None),
]


@pytest.mark.parametrize("shape,heads,hd,window,shift,table_window", CASES_3D,
                         ids=["4x6x5-shift", "3x5x5-pad", "2x6x6-clipT", "3x3x8-clipTH", "4x6x6-noshift"])
def test_3d_matches_reference(shape, heads, hd, window, shift, table_window):
    run_case(shape, heads, hd, window, shift, table_window)


@pytest.mark.parametrize("dtype", [torch.float16, BF16], ids=["float16", "bfloat16"])
def test_low_precision(dtype):
    run_case((1, 13, 10), 2, 32, 7, 3, dtype=dtype)
    run_case((1, 3, 5, 5), 2, 32, (2, 3, 3), (1, 1, 2), dtype=dtype)


@pytest.mark.parametrize("with_table,with_bias", [(False, True), (True, False), (False, False)],
                         ids=["no-table", "no-qkv-bias", "neither"])
def test_optional_table_and_qkv_bias(with_table, with_bias):
    run_case((1, 13, 10), 2, 32, 7, 3, with_table=with_table, with_bias=with_bias)


def test_strided_qkv_is_read_in_place_and_its_padding_never_read():
    window_reads_a_strided_qkv_in_place("triton", DEVICE)


def test_backward_is_deterministic_bitwise():
    window_backward_is_bitwise_deterministic("triton", DEVICE)


@pytest.mark.parametrize("shape,window,shift,target", [
    ((1, 19, 20), 7, 3, 1),             # fused, 9 windows, 2 heads: one group of 9
    ((1, 19, 20), 7, 3, 8),             # fused: groups of 2, 2, 2, 2, 1
    ((1, 3, 9, 10), (2, 4, 4), (1, 2, 2), 16),  # fused 3-D, 18 windows: groups of 2
    ((1, 9, 45), 9, 4, 16),             # blocked (81 tokens: 4 tiles x 2 heads per window), 5 windows: 2, 2, 1
], ids=["fused-one-group", "fused-uneven", "3d-fused", "blocked-uneven"])
def test_grouped_reductions_with_uneven_groups(monkeypatch, shape, window, shift, target):
    # d(table) and d(qkv_bias) are summed per group of consecutive windows: few programs force several
    # windows per group, and window counts that do not divide evenly leave a shorter last group.
    from vitkernels.ops.window_attention import triton as window_triton

    monkeypatch.setattr(window_triton, "TARGET_PROGRAMS", target)
    run_case(shape, 2, 32, window, shift)


def test_windows_per_group_depends_on_the_shape_only():
    from vitkernels.ops.window_attention.triton import TARGET_PROGRAMS, _windows_per_group

    for num_bw in (1, 7, 64, 4096, 4099, 100_000):
        for per_window in (1, 3, 24, 96):
            per_group, groups = _windows_per_group(num_bw, per_window)
            assert (groups - 1) * per_group < num_bw <= groups * per_group  # every group has a window
            assert groups * per_window >= min(TARGET_PROGRAMS, num_bw * per_window)  # enough programs
    assert _windows_per_group(4096, 3) == (11, 373)  # Swin-T stage 1 at batch 64: 1119 programs


def test_triton_refuses_what_it_cannot_run():
    qkv = torch.randn(1, 8, 8, 96, dtype=torch.float64, device=DEVICE)
    with pytest.raises(BackendUnavailableError, match="float64 is not supported by the triton kernels"):
        vitkernels.window_attention(qkv, num_heads=2, window_size=4, backend="triton")
    strided = torch.randn(1, 8, 8, 192, device=DEVICE)[..., ::2]
    with pytest.raises(BackendUnavailableError, match="qkv must have unit stride in its channel dim"):
        vitkernels.window_attention(strided, num_heads=2, window_size=4, backend="triton")


# ---- Swin sizes, GPU only ----------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=["fp16", "bf16", "fp32"])
@pytest.mark.parametrize("shape,heads,window,shift,table_window", [
    ((8, 56, 56), 3, 7, 3, None), ((8, 28, 28), 6, 7, 3, None), ((8, 7, 7), 24, 7, 3, (7, 7)),
    ((4, 24, 24), 8, 12, 6, None), ((2, 8, 28, 28), 3, (8, 7, 7), (4, 3, 3), None)],
    ids=["swinT-s1", "swinT-s2", "swinT-s4", "swinB384-w12", "video-8x7x7"])
def test_gpu_swin_shapes(dtype, shape, heads, window, shift, table_window):
    run_case(shape, heads, 32, window, shift, table_window, dtype=dtype)


def test_2d_matches_timm_block_with_the_same_weights():
    timm_swin = pytest.importorskip("timm.models.swin_transformer")
    heads, hd, (H, W) = 2, 32, (13, 10)
    C = heads * hd
    blocks = {}
    for dtype in (torch.float64, torch.float32):
        torch.manual_seed(1)
        blk = timm_swin.SwinTransformerBlock(C, (H, W), num_heads=heads, window_size=7, shift_size=3).to(dtype)
        with torch.no_grad():
            blk.attn.relative_position_bias_table.normal_()
            blk.attn.qkv.bias.normal_()
        blk.attn.proj = torch.nn.Identity()
        blocks[dtype] = blk.to(DEVICE)
    x = torch.randn(2, H, W, C, device=DEVICE)
    ref = blocks[torch.float64]._attn(x.double())
    pt = blocks[torch.float32]._attn(x)
    attn = blocks[torch.float32].attn
    out = vitkernels.window_attention(attn.qkv(x), num_heads=heads, window_size=7, shift_size=3,
                                      rel_pos_bias=attn.relative_position_bias_table, qkv_bias=attn.qkv.bias,
                                      backend="triton")
    assert_close_2x(out, pt, ref, floor=1e-6)


# ---- Swin V2 scaled cosine attention (cosine=True) ---------------------------------------------------------
# The helper's logit scales run from log 2 to past the clamp at log 100: the last head sits at factor 100.
# There, fp32 logits (~100 + table) carry ~1e-5 of rounding in any implementation, and a single near-tie
# between two keys turns that into the max error of the whole output: the kernels' errors match PyTorch's
# fp32 on average (mean error ratio ~0.9-1.0 over seeds), but the max-error ratio of one small map is noisy
# (0.5-3x for PyTorch-equivalent fp32 math too). The seeds below are the helper's default unless a case
# notes otherwise.


def run_cosine(shape, heads, head_dim, window, shift, **kwargs):
    return cosine_window_vs_reference("triton", DEVICE, shape, heads, head_dim, window, shift, **kwargs)


COSINE_2D = [
    # (B, H, W), heads, head_dim, window, shift, seed
    ((2, 14, 14), 2, 32, 7, 3, 0),            # Swin V2 stage at window 7, shifted
    ((1, 16, 16), 2, 32, 8, 4, 0),            # window 8 (swinv2_*_window8), shifted
    ((1, 13, 10), 2, 32, 7, 3, 0),            # padding in both dims
    ((1, 9, 10), 2, 16, 8, 4, 1),             # window 8 on a 9x10 map: mostly padding, head_dim 16
    ((1, 9, 11), 3, 24, (4, 5), (0, 2), 1),   # head_dim 24, shift in one dim, a head in between
    ((1, 8, 8), 2, 64, 8, 0, 0),              # head_dim 64, the window is the whole map
    ((1, 7, 20), 2, 40, 7, 3, 0),             # clipped in H, head_dim 40
]


@pytest.mark.parametrize("shape,heads,hd,window,shift,seed", COSINE_2D,
                         ids=["14x14-w7-s3", "16x16-w8-s4", "13x10-pad", "9x10-w8-D16", "9x11-D24", "8x8-D64",
                              "7x20-clipH-D40"])
def test_cosine_2d_matches_reference(shape, heads, hd, window, shift, seed):
    run_cosine(shape, heads, hd, window, shift, seed=seed)


@pytest.mark.parametrize("shape,heads,hd,window,shift", [
    ((1, 4, 6, 5), 2, 32, (2, 3, 3), (1, 1, 1)),
    ((1, 3, 5, 5), 2, 32, (2, 3, 3), (1, 1, 2)),  # padding in every dim
], ids=["4x6x5-shift", "3x5x5-pad"])
def test_cosine_3d_matches_reference(shape, heads, hd, window, shift):
    run_cosine(shape, heads, hd, window, shift)


@pytest.mark.parametrize("shape,heads,hd,window,shift", [
    ((1, 11, 12), 2, 40, 9, 4),                  # 81 tokens: the blocked kernels, padding, head_dim 40
    pytest.param((1, 4, 7, 7), 2, 32, (2, 7, 7), (1, 3, 3), marks=pytest.mark.slow),  # Video Swin-like 2x7x7
], ids=["11x12-w9-blocked", "4x7x7-w2x7x7-blocked"])
def test_cosine_blocked_matches_reference(shape, heads, hd, window, shift):
    run_cosine(shape, heads, hd, window, shift)


@pytest.mark.parametrize("dtype", [torch.float16, BF16], ids=["float16", "bfloat16"])
def test_cosine_low_precision(dtype):
    # q_hat, k_hat enter the dots as hi + lo in fp16 / bf16: one rounding to the input dtype would put
    # ~1e-3 of a logit at scale 100 into P (20x PyTorch's error in these checks)
    run_cosine((1, 13, 10), 2, 32, 7, 3, dtype=dtype)
    run_cosine((1, 3, 5, 5), 2, 32, (2, 3, 3), (1, 1, 2), dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float16, BF16], ids=["float16", "bfloat16"])
def test_cosine_low_precision_qkv_with_a_float32_logit_scale(dtype):
    run_cosine((1, 13, 10), 2, 32, 7, 3, dtype=dtype, scale_dtype=torch.float32)


@pytest.mark.slow
def test_cosine_float16_blocked():
    run_cosine((1, 11, 12), 2, 40, 9, 4, dtype=torch.float16)


@pytest.mark.parametrize("with_table,with_bias", [(False, True), (True, False), (False, False)],
                         ids=["no-table", "no-qkv-bias", "neither"])
def test_cosine_optional_table_and_qkv_bias(with_table, with_bias):
    run_cosine((1, 13, 10), 2, 32, 7, 3, with_table=with_table, with_bias=with_bias)


@pytest.mark.slow
def test_cosine_blocked_without_table_and_qkv_bias():
    run_cosine((1, 11, 12), 2, 32, 9, 4, with_table=False, with_bias=False)


def _cosine_leaves(shape, heads, hd, window, logit_scale, seed=0):
    g = torch.Generator().manual_seed(seed)
    table_rows = math.prod(2 * w - 1 for w in ((window,) * (len(shape) - 1) if isinstance(window, int) else window))
    return (torch.randn(*shape, 3 * heads * hd, generator=g).to(DEVICE),
            (16 * torch.sigmoid(torch.randn(table_rows, heads, generator=g))).to(DEVICE),
            torch.randn(3 * heads * hd, generator=g).to(DEVICE), logit_scale.to(DEVICE),
            torch.randn(*shape, heads * hd, generator=g).to(DEVICE))


def _cosine_grads(leaves, heads, window, shift, wants=(True, True, True, True)):
    """Output and gradients of the triton backend, the logit scale read through a strided (heads, 1, 1) view
    (every other element of a (heads, 2) leaf)."""
    qkv, table, bias, logit_scale, dout = leaves
    wide = torch.zeros(heads, 2, device=logit_scale.device)
    wide[:, 0] = logit_scale.flatten()
    ts = [t.detach().clone().requires_grad_(w) for t, w in zip((qkv, table, bias, wide), wants)]
    scale_view = ts[3][:, :1].unsqueeze(-1)
    assert scale_view.stride(0) == 2
    out = vitkernels.window_attention(ts[0], num_heads=heads, window_size=window, shift_size=shift, rel_pos_bias=ts[1],
                                      qkv_bias=ts[2], cosine=True, logit_scale=scale_view, backend="triton")
    out.backward(dout)
    grads = [t.grad for t in ts]
    if grads[3] is not None:
        assert not grads[3][:, 1].any()
        grads[3] = grads[3][:, :1].unsqueeze(-1)
    return out, grads


@pytest.mark.parametrize("shape,window,shift", [((1, 13, 10), 7, 3), ((1, 10, 9), 9, 4)], ids=["fused", "blocked"])
def test_cosine_logit_scale_gradient(shape, window, shift):
    """Zero past the clamp at log(100) (as torch.clamp's), the reference's elsewhere, read through a strided
    (heads, 1, 1) view, and the same whether or not the other inputs want gradients (its partial sums do not
    depend on what else is computed: the same bits under the interpreter; compiled, the variants are
    different programs, held to fp32 rounding)."""
    same = torch.equal if INTERPRET else (lambda a, b: torch.allclose(a, b, rtol=1e-6, atol=1e-6))
    heads = 2
    logit_scale = torch.tensor([math.log(40.0), math.log(100.0) + 1.0]).view(heads, 1, 1)  # head 1 past the clamp
    leaves = _cosine_leaves(shape, heads, 32, window, logit_scale)
    out, grads = _cosine_grads(leaves, heads, window, shift)
    dscale = grads[3]
    assert dscale.shape == logit_scale.shape
    assert dscale[1].item() == 0.0 and dscale[0].item() != 0.0
    ref_leaves = [t.double() for t in leaves[:4]] + [leaves[4].double()]
    ts = [t.detach().clone().requires_grad_() for t in ref_leaves[:4]]
    ref = vitkernels.window_attention(ts[0], num_heads=heads, window_size=window, shift_size=shift, rel_pos_bias=ts[1],
                                      qkv_bias=ts[2], cosine=True, logit_scale=ts[3], backend="reference")
    ref.backward(ref_leaves[4])
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(dscale.double(), ts[3].grad, rtol=1e-4, atol=1e-4)
    _, alone = _cosine_grads(leaves, heads, window, shift, wants=(False, False, False, True))
    assert alone[:3] == [None, None, None]
    assert same(alone[3], dscale)
    _, without = _cosine_grads(leaves, heads, window, shift, wants=(True, True, True, False))
    for a, b in zip(without[:3], grads[:3]):
        assert same(a, b)


def test_cosine_backward_is_deterministic_bitwise():
    cosine_window_backward_is_bitwise_deterministic("triton", DEVICE)


def test_cosine_blocked_backward_is_deterministic_bitwise():
    leaves = _cosine_leaves((1, 10, 9), 2, 32, 9, torch.tensor([math.log(10.0), math.log(30.0)]).view(2, 1, 1))
    runs = [_cosine_grads(leaves, 2, 9, 4) for _ in range(2)]
    for a, b in zip([runs[0][0]] + runs[0][1], [runs[1][0]] + runs[1][1]):
        assert torch.equal(a, b)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=["fp16", "bf16", "fp32"])
@pytest.mark.parametrize("shape,heads,window,shift", [
    ((8, 64, 64), 3, 8, 4), ((8, 32, 32), 6, 8, 4), ((8, 16, 16), 12, 8, 4), ((8, 8, 8), 24, 8, 4),
    ((8, 56, 56), 3, 7, 3), ((4, 24, 24), 8, 12, 6), ((2, 8, 28, 28), 3, (8, 7, 7), (4, 3, 3))],
    ids=["swinv2T-w8-s1", "swinv2T-w8-s2", "swinv2T-w8-s3", "swinv2T-w8-s4", "w7-56x56", "w12-blocked",
         "video-8x7x7"])
def test_gpu_cosine_swin_v2_shapes(dtype, shape, heads, window, shift):
    run_cosine(shape, heads, 32, window, shift, dtype=dtype)


# ---- several heads of a window per fused-forward program (HEADS_PER_PROGRAM) ------------------------------


@pytest.fixture
def force_heads(monkeypatch):
    """``force_heads(n)`` makes the fused forward take n heads per program and returns the list of the
    HEADS_PER_PROGRAM values launched from then on. Call memos are cleared around it: a memoised signature
    carries its forward plan (``inputs.derived``), which would keep an earlier choice."""
    from vitkernels import dispatch
    from vitkernels.ops import tuning
    from vitkernels.ops.window_attention import triton as window_triton

    launched, real_launch = [], tuning.launch

    def spy(*args, **kwargs):
        constexprs = args[4]
        if "HEADS_PER_PROGRAM" in constexprs:
            launched.append(constexprs["HEADS_PER_PROGRAM"])
        return real_launch(*args, **kwargs)

    def force(per_program):
        monkeypatch.setattr(window_triton, "_heads_per_program", lambda num_bw, heads: per_program)
        dispatch.clear_call_memos()
        launched.clear()
        return launched

    monkeypatch.setattr(tuning, "launch", spy)
    yield force
    dispatch.clear_call_memos()


@pytest.mark.parametrize("shape,heads,hd,window,shift,per_program", [
    ((1, 13, 10), 4, 32, 7, 3, 2),                # padding and shift, 2 programs of 2 heads
    ((2, 14, 14), 3, 32, 7, 3, 2),                # 3 heads in programs of 2: the spare head stores nothing
    ((1, 3, 5, 5), 3, 32, (2, 3, 3), (1, 1, 2), 4),  # 3-D, padding in every dim, more slots than heads
    ((1, 13, 10), 3, 40, 7, 3, 3),                # head_dim 40: strides multiples of 8 (STRIDE_ALIGN 8)
], ids=["pad-2of4", "3heads-by-2", "3d-pad-4of3", "D40-3of3"])
def test_fused_forward_packs_heads(force_heads, shape, heads, hd, window, shift, per_program):
    launched = force_heads(per_program)
    run_case(shape, heads, hd, window, shift)
    assert launched and set(launched) == {per_program}, launched


def test_cosine_fused_forward_packs_heads(force_heads):
    launched = force_heads(2)
    run_cosine((1, 9, 11), 3, 24, (4, 5), (0, 2), seed=1)  # 3 heads in programs of 2, padding
    assert launched and set(launched) == {2}, launched


def _window_run(heads, hd, shape=(2, 13, 10), window=7, shift=3):
    g = torch.Generator().manual_seed(0)
    C = heads * hd
    leaves = [torch.randn(*shape, 3 * C, generator=g), torch.randn(169, heads, generator=g),
              torch.randn(3 * C, generator=g)]
    dout = torch.randn(*shape, C, generator=g).to(DEVICE)
    ts = [t.to(DEVICE).requires_grad_() for t in leaves]
    out = vitkernels.window_attention(ts[0], num_heads=heads, window_size=window, shift_size=shift,
                                      rel_pos_bias=ts[1], qkv_bias=ts[2], backend="triton")
    out.backward(dout)
    return [out] + [t.grad for t in ts]


def test_packed_heads_change_no_bit_and_the_backward_stays_deterministic(force_heads):
    """Packing heads only reorders whole window-heads: output and every gradient (the backward reads the
    forward's lse) are the same bits at 1 and 3 heads per program (the interpreter; compiled, the programs
    differ, so fp32 rounding), and two packed runs agree bitwise."""
    same = torch.equal if INTERPRET else (lambda a, b: torch.allclose(a, b, rtol=1e-6, atol=1e-6))
    launched = force_heads(1)
    single = _window_run(3, 32)
    assert launched == [1], launched
    launched = force_heads(3)
    packed = [_window_run(3, 32) for _ in range(2)]
    assert launched == [3, 3], launched
    for a, b, c in zip(single, *packed):
        assert same(a, b)
        assert torch.equal(b, c)


def test_heads_per_program_keeps_swin_t_on_a_full_gpu():
    from vitkernels.ops.window_attention import triton_configs as configs
    from vitkernels.ops.window_attention.triton import FILL_PROGRAMS, _heads_per_program

    # Swin-T at batch 64: (batch x windows, heads) of stages 1..4
    picks = [_heads_per_program(num_bw, heads) for num_bw, heads in ((4096, 3), (1024, 6), (256, 12), (64, 24))]
    assert picks == [3, 2, 1, 1]
    for num_bw in (1, 5, 64, 256, 1024, 4096, 100_000):
        for heads in (1, 2, 3, 4, 6, 12, 24, 32):
            per_program = _heads_per_program(num_bw, heads)
            assert heads % per_program == 0
            if per_program > 1:  # packed only while the most windows per program still leave enough programs
                units = -(-num_bw // configs.FUSED_FWD_MAX_BLOCK_W)
                assert units * (heads // per_program) >= FILL_PROGRAMS


def test_stride_align_is_what_divides_every_stride():
    from vitkernels.ops.window_attention.triton import _as_3d, _stride_align

    def align(shape, heads, hd, width=None):
        C = heads * hd
        x = torch.empty(*shape, width or 3 * C, device="meta")[..., : 3 * C]
        out = torch.empty(*shape, C, device="meta")
        return _stride_align((_as_3d(x), _as_3d(out)), C)

    assert align((2, 56, 56), 3, 40) == 8      # 3C = 360: a multiple of 8, not of 16
    assert align((2, 56, 56), 3, 32) == 1      # all multiples of 16: Triton's own specialization says so
    assert align((2, 13, 10), 2, 20) == 8      # C = 40
    assert align((2, 13, 10), 3, 20, width=3 * 60 + 2) == 2  # a view of a wider buffer: row stride 182
    assert align((2, 13, 10), 1, 18) == 2      # C = 18
    assert align((2, 13, 11), 1, 17, width=3 * 17) == 1


def test_dense_bias_takes_two_device_ops():
    """One gather and one add per call (views and the cached layout aside)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from vitkernels.ops.window_attention.checks import check_window_inputs
    from vitkernels.ops.window_attention.triton import _dense_bias, _fused_layout, _Geometry

    qkv = torch.randn(2, 14, 14, 3 * 3 * 32, device=DEVICE)
    table = torch.randn(169, 3, device=DEVICE)
    inputs = check_window_inputs(qkv, 3, 7, 3, rel_pos_bias=table)
    g = _Geometry(inputs)
    expected = _dense_bias(inputs, g)  # warms the cached layout

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    with Ops() as rec:
        bias = _dense_bias(inputs, g)
    views = {"detach", "t", "view", "permute", "transpose", "_unsafe_view", "alias"}
    assert [op for op in rec.ops if op not in views] == ["index_select", "add"], rec.ops
    assert bias.is_contiguous() and bias.shape == (8, 3, 64, 64) and torch.equal(bias, expected)
    rows, masks = _fused_layout(g.window, g.table_window, g.padded, g.shift, table.dtype, str(qkv.device))
    assert torch.equal(bias, masks + table[rows].t().reshape(1, 3, 64, 64))


# ---- the blocked kernels (windows over 64 tokens) at head_dim 40: STRIDE_ALIGN ----------------------------
# 3 heads of 40: 3C = 360, every qkv stride a multiple of 8 elements, not of 16: the launches take
# STRIDE_ALIGN = 8 (the strides rounded to it in the kernels; the same values, which a wrong host align would
# change). Under the interpreter this checks the plumbing and the values; the PTX (16-byte loads) is checked
# in tests/ops/test_window_ptx.py.

BLOCKED_KERNELS = ("_window_attn_fwd_kernel", "_window_bwd_delta_kernel", "_window_attn_bwd_kernel",
                   "_window_attn_bwd_dq_kernel", "_window_attn_bwd_dtable_kernel")


def _record_stride_align(monkeypatch):
    """{kernel name: STRIDE_ALIGN} of every launch of the window kernels (tuned ones and the rowsum), which
    still run."""
    from vitkernels.ops import tuning

    seen = {}
    launch, launcher = tuning.launch, tuning.launcher

    def recording_launch(spec, kernel, grid, args, constexprs, key, device):
        seen[kernel.fn.__name__] = constexprs.get("STRIDE_ALIGN")
        return launch(spec, kernel, grid, args, constexprs, key, device)

    class _Recording:
        def __init__(self, kernel, tensor):
            self.kernel, self.launch = kernel, launcher(kernel, tensor)

        def __getitem__(self, grid):
            def run(*args, **kwargs):
                seen[self.kernel.fn.__name__] = kwargs.get("STRIDE_ALIGN")
                return self.launch[grid](*args, **kwargs)
            return run

    monkeypatch.setattr(tuning, "launch", recording_launch)
    monkeypatch.setattr(tuning, "launcher", _Recording)
    return seen


BLOCKED_D40 = [
    # (B, *map), window, shift
    ((1, 13, 12), 12, 6),                    # 12x12 = 144 tokens (Swin-B 384), shifted, padded
    ((1, 3, 7, 8), (2, 6, 6), (1, 3, 3)),    # 3-D, 72 tokens, shifted, padded in every dim
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["float32", "float16"])
@pytest.mark.parametrize("shape,window,shift", BLOCKED_D40, ids=["w12-13x12", "3d-w2x6x6-3x7x8"])
def test_blocked_d40_matches_reference(monkeypatch, shape, window, shift, dtype):
    """Output and the gradients of qkv, the table and qkv_bias against the float64 reference (2x PyTorch's
    error in the same dtype), with every blocked kernel launched at STRIDE_ALIGN 8 (one head of 40: 3C = 120,
    a multiple of 8, not 16; one head keeps the interpreter's time down)."""
    seen = _record_stride_align(monkeypatch)
    run_case(shape, 1, 40, window, shift, dtype=dtype)
    assert seen == {name: 8 for name in BLOCKED_KERNELS}, seen


def test_blocked_d40_strided_qkv_takes_a_smaller_align(monkeypatch):
    """qkv a view of a wider NaN-filled buffer whose rows are 3C + 4 = 124 elements: the qkv-reading kernels
    take STRIDE_ALIGN 4 (the output, dout and the rowsum stay at 8) and never read the NaN columns."""
    seen = _record_stride_align(monkeypatch)
    heads, hd = 1, 40
    C = heads * hd
    buf = torch.full((1, 13, 12, 3 * C + 4), float("nan"), device=DEVICE)
    buf[..., : 3 * C] = torch.randn(1, 13, 12, 3 * C, device=DEVICE)
    run_case((1, 13, 12), heads, hd, 12, 6, qkv=buf[..., : 3 * C])
    assert seen == dict({name: 4 for name in BLOCKED_KERNELS}, _window_bwd_delta_kernel=8), seen


def test_blocked_d40_backward_is_deterministic_bitwise(monkeypatch):
    """Two runs of the blocked kernels at STRIDE_ALIGN 8 (12x12 window, shifted, padded): the same output and
    gradients of qkv, the table and qkv_bias, bit for bit."""
    seen = _record_stride_align(monkeypatch)
    heads, hd, shape = 1, 40, (1, 13, 12)
    g = torch.Generator().manual_seed(0)
    leaves = [torch.randn(*shape, 3 * heads * hd, generator=g), torch.randn(23 * 23, heads, generator=g),
              torch.randn(3 * heads * hd, generator=g)]
    dout = torch.randn(*shape, heads * hd, generator=g).to(DEVICE)
    runs = []
    for _ in range(2):
        ts = [t.to(DEVICE).requires_grad_() for t in leaves]
        out = vitkernels.window_attention(ts[0], num_heads=heads, window_size=12, shift_size=6, rel_pos_bias=ts[1],
                                          qkv_bias=ts[2], backend="triton")
        out.backward(dout)
        runs.append([out] + [t.grad for t in ts])
    assert seen == {name: 8 for name in BLOCKED_KERNELS}, seen
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_cosine_blocked_d40_matches_reference(monkeypatch):
    """The cosine entry points of the blocked kernels share the bodies: at STRIDE_ALIGN 8 too (81 tokens)."""
    seen = _record_stride_align(monkeypatch)
    run_cosine((1, 10, 9), 3, 40, 9, 4)
    assert seen == {name.replace("_kernel", "_cosine_kernel") if name != "_window_bwd_delta_kernel" else name: 8
                    for name in BLOCKED_KERNELS}, seen


def test_forward_plan_stride_align_from_metadata():
    """The forward's flags (cached in ``inputs.derived``) carry STRIDE_ALIGN from the strides alone, on the
    fused and the blocked path alike: 8 at 3 heads of 40, 1 when every stride is a multiple of 16."""
    from vitkernels.ops.window_attention.checks import check_window_inputs
    from vitkernels.ops.window_attention.triton import _fwd_plan

    for heads, hd, window, expected in ((3, 40, 7, 8), (3, 40, 12, 8), (2, 40, 12, 1), (3, 32, 12, 1)):
        qkv = torch.empty(2, 14, 13, 3 * heads * hd, device="meta")
        g, flags, key, per_program = _fwd_plan(check_window_inputs(qkv, heads, window, window // 2))
        assert flags["STRIDE_ALIGN"] == expected, (heads, hd, window, flags)
        assert ("BLOCK" in flags) == (window == 7)  # fused / blocked

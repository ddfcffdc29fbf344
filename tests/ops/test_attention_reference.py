"""The attention reference (``flash_attention(..., backend="reference")``, ``attention_reference``) and the
FlashAttention-2 math oracle (``AttentionFunction`` + ``ReferenceAttentionKernels``) against PyTorch's SDPA.

Everything that defines correctness for the fused backends rests on these: float64 agreement with
``F.scaled_dot_product_attention`` (forward and every gradient, broadcast biases included), the
all -inf row and NaN semantics, dropout, the saved log-sum-exp, and same-dtype accuracy in fp32/fp16/bf16.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from tests.utils import assert_close_2x, max_err, qkv_views
import vitkernels
from vitkernels import flash_attention
from vitkernels.ops.attention.function import AttentionFunction
from vitkernels.ops.attention.reference import ReferenceAttentionKernels
from vitkernels.ops.attention.reference import attention_reference

F64 = torch.float64
NEG_INF = float("-inf")
TOL64 = 1e-10


# ----------------------------------------------------------------------------------------------- helpers
def _make_qkv(B, H, Nq, Nk, D, *, strided, dtype=F64):
    """Leaf tensors to differentiate and the q, k, v views made from them."""
    if strided:
        assert Nq == Nk
        q, k, v, base = qkv_views(B, H, Nq, D, dtype=dtype, requires_grad=True)
        assert not q.is_contiguous() and q.stride(-1) == 1
        return (base,), (q, k, v)
    q = torch.randn(B, H, Nq, D, dtype=dtype, requires_grad=True)
    # k, v: permuted views of one (B, Nk, 2, H, D) tensor, so they are strided as well.
    kv = torch.randn(B, Nk, 2, H, D, dtype=dtype, requires_grad=True)
    k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)
    return (q, kv), (q, k, v)


def _make_bias(kind, B, H, Nq, Nk, dtype=F64):
    if kind is None:
        return None
    if kind == "bhqk":
        return torch.randn(B, H, Nq, Nk, dtype=dtype)
    if kind == "1hqk":
        return torch.randn(1, H, Nq, Nk, dtype=dtype)
    if kind == "1qk":
        return torch.randn(1, Nq, Nk, dtype=dtype)
    if kind == "qk":
        return torch.randn(Nq, Nk, dtype=dtype)
    if kind == "b11k":  # key padding: 0 / -inf, never a whole row of -inf
        bias = torch.zeros(B, 1, 1, Nk, dtype=dtype)
        for b in range(B):
            n_pad = min(Nk - 1, (b + 1) * max(1, Nk // 5))
            bias[b, 0, 0, Nk - n_pad:] = NEG_INF
        if Nk > 1:
            assert torch.isinf(bias).any()
        assert not torch.isinf(bias).all(dim=-1).any()
        return bias
    raise AssertionError(kind)


def _grads_of(fn, leaves, g):
    """Run fn() (built from ``leaves``), backprop (out * g).sum(); return out and each leaf's grad."""
    for t in leaves:
        t.grad = None
    out = fn()
    (out * g).sum().backward()
    grads = [t.grad.clone() for t in leaves]
    for t in leaves:
        t.grad = None
    return out.detach(), grads


def _sdpa(q, k, v, bias, scale):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)


# --------------------------------------------------------------------------------- float64 vs SDPA
CASES = [
    # B, H, Nq, Nk, D, bias kind, strided qkv views, scale
    (2, 2, 1, 1, 16, None, True, None),
    (2, 2, 1, 1, 32, "bhqk", True, None),
    (1, 2, 49, 49, 32, "bhqk", True, None),
    (2, 3, 197, 197, 64, "1hqk", True, None),
    (2, 2, 49, 77, 40, "b11k", False, None),
    (2, 2, 49, 77, 80, "qk", False, 0.3),
    (2, 2, 49, 49, 96, "1qk", True, None),
    (2, 2, 197, 197, 128, "b11k", True, 0.05),
    (1, 2, 1, 77, 16, "bhqk", False, 1.7),
    (2, 1, 49, 49, 64, None, True, 0.2),
    (3, 2, 49, 49, 48, "b11k", True, None),
]


@pytest.mark.parametrize("B,H,Nq,Nk,D,bias_kind,strided,scale", CASES,
                         ids=[f"B{c[0]}H{c[1]}q{c[2]}k{c[3]}D{c[4]}-{c[5]}-{'views' if c[6] else 'sep'}-s{c[7]}"
                              for c in CASES])
def test_reference_matches_sdpa_fp64(B, H, Nq, Nk, D, bias_kind, strided, scale):
    leaves, (q, k, v) = _make_qkv(B, H, Nq, Nk, D, strided=strided)
    bias = _make_bias(bias_kind, B, H, Nq, Nk)
    if bias is not None:
        bias.requires_grad_(True)
        leaves = leaves + (bias,)
    g = torch.randn(B, H, Nq, D, dtype=F64)

    out, grads = _grads_of(lambda: flash_attention(q, k, v, bias=bias, scale=scale, backend="reference"), leaves, g)
    out_pt, grads_pt = _grads_of(lambda: _sdpa(q, k, v, bias, scale), leaves, g)

    assert out.shape == (B, H, Nq, D) and out.dtype == F64
    assert torch.isfinite(out).all()
    assert max_err(out, out_pt) < TOL64, f"forward: {max_err(out, out_pt):.3e}"
    assert out.abs().max() > 1e-3  # not a degenerate all-zero comparison
    for t, gr, gr_pt in zip(leaves, grads, grads_pt):
        assert gr.shape == t.shape, f"grad shape {tuple(gr.shape)} != {tuple(t.shape)}"
        assert torch.isfinite(gr).all()
        if Nk > 1:  # with one key the softmax is constant: q and bias get exactly zero gradient
            assert gr.abs().max() > 0
        assert max_err(gr, gr_pt) < TOL64, f"grad of {tuple(t.shape)}: {max_err(gr, gr_pt):.3e}"


def test_default_scale_is_inverse_sqrt_d():
    _, (q, k, v) = _make_qkv(1, 2, 49, 49, 40, strided=True)
    out = flash_attention(q, k, v, backend="reference")
    assert max_err(out, _sdpa(q, k, v, None, None)) < TOL64
    assert max_err(out, _sdpa(q, k, v, None, 40 ** -0.5)) < TOL64
    assert max_err(out, _sdpa(q, k, v, None, 1.0)) > 1e-3  # the scale does matter


@pytest.mark.parametrize("kind", ["1hqk", "b11k", "1qk", "qk"])
def test_broadcast_bias_grad_is_summed_over_broadcast_dims(kind):
    B, H, N, D = 3, 2, 49, 32
    _, (q, k, v) = _make_qkv(B, H, N, N, D, strided=True)
    q, k, v = q.detach(), k.detach(), v.detach()
    bias = _make_bias(kind, B, H, N, N).requires_grad_(True)
    g = torch.randn(B, H, N, D, dtype=F64)
    _, (db,) = _grads_of(lambda: attention_reference(q, k, v, bias), (bias,), g)
    # The same bias expanded to the full (B, H, N, N) as a leaf of its own: its grad summed over the
    # broadcast dims must equal the broadcast bias' grad.
    full = bias.detach().expand(B, H, N, N).clone().requires_grad_(True)
    _, (dfull,) = _grads_of(lambda: attention_reference(q, k, v, full), (full,), g)
    assert db.shape == bias.shape
    assert max_err(db, dfull.sum_to_size(bias.shape)) < TOL64
    if kind == "b11k":  # -inf keys get exactly zero gradient
        assert (db[torch.isinf(bias.detach())] == 0).all()


# ------------------------------------------------------------------------------- -inf rows and NaN
def test_all_neg_inf_rows_give_zeros_and_zero_grads():
    B, H, Nq, Nk, D = 2, 2, 49, 77, 32
    leaves, (q, k, v) = _make_qkv(B, H, Nq, Nk, D, strided=False)
    qleaf, kvleaf = leaves
    bias = torch.randn(B, H, Nq, Nk, dtype=F64)
    dead = [(0, 1, 3), (1, 0, 0), (1, 1, 48)]
    for b, h, i in dead:
        bias[b, h, i, :] = NEG_INF
    bias[0, 0, 5, ::2] = NEG_INF  # a partly masked row stays a normal row
    bias.requires_grad_(True)
    g = torch.randn(B, H, Nq, D, dtype=F64)
    out, (dq, dkv, db) = _grads_of(lambda: flash_attention(q, k, v, bias=bias, backend="reference"),
                                   (qleaf, kvleaf, bias), g)

    for t in (out, dq, dkv, db):
        assert not torch.isnan(t).any()
        assert torch.isfinite(t).all()
    alive = torch.ones(B, H, Nq, dtype=torch.bool)
    for b, h, i in dead:
        alive[b, h, i] = False
        assert (out[b, h, i] == 0).all()
        assert (dq[b, h, i] == 0).all()
        assert (db[b, h, i] == 0).all()
    assert (out[alive].abs().amax(dim=-1) > 0).all()
    assert (dq[alive].abs().amax(dim=-1) > 0).all()

    # Every other row is what SDPA computes (the dead rows replaced by a harmless 0 bias there).
    bias_ok = bias.detach().clone()
    for b, h, i in dead:
        bias_ok[b, h, i, :] = 0
    out_pt = _sdpa(q.detach(), k.detach(), v.detach(), bias_ok, None)
    assert max_err(out[alive], out_pt[alive]) < TOL64
    # ... and so are k/v grads once the dead rows' upstream gradient is zero (they contribute nothing).
    g0 = g.clone()
    for b, h, i in dead:
        g0[b, h, i] = 0
    _, (dq_r, dkv_r, db_r) = _grads_of(lambda: flash_attention(q, k, v, bias=bias, backend="reference"),
                                       (qleaf, kvleaf, bias), g0)
    bias_ok.requires_grad_(True)
    _, (dq_pt, dkv_pt, db_pt) = _grads_of(lambda: _sdpa(q, k, v, bias_ok, None), (qleaf, kvleaf, bias_ok), g0)
    assert max_err(dkv_r, dkv_pt) < TOL64
    assert max_err(dkv, dkv_r) < TOL64  # the dead rows really contributed nothing to dk, dv
    assert max_err(dq_r[alive], dq_pt[alive]) < TOL64
    assert max_err(db_r[alive], db_pt[alive]) < TOL64


def test_key_padding_masking_a_whole_sample_gives_zeros():
    B, H, N, D = 2, 2, 49, 64
    base_leaves, (q, k, v) = _make_qkv(B, H, N, N, D, strided=True)
    (base,) = base_leaves
    bias = torch.zeros(B, 1, 1, N, dtype=F64)
    bias[1] = NEG_INF  # every key of sample 1 masked: every row of sample 1 is all -inf
    bias[0, ..., -7:] = NEG_INF
    bias.requires_grad_(True)
    g = torch.randn(B, H, N, D, dtype=F64)
    out, (dbase, db) = _grads_of(lambda: flash_attention(q, k, v, bias=bias, backend="reference"), (base, bias), g)
    assert torch.isfinite(out).all() and torch.isfinite(dbase).all() and torch.isfinite(db).all()
    assert (out[1] == 0).all()
    assert (dbase[1] == 0).all()  # q, k and v of sample 1 get nothing
    assert (db[1] == 0).all()
    assert (db[0, ..., -7:] == 0).all() and db[0, ..., :-7].abs().max() > 0
    out_pt = _sdpa(q[:1], k[:1], v[:1], bias[:1], None)
    assert max_err(out[:1], out_pt) < TOL64


def test_nan_in_one_query_row_stays_in_that_row():
    B, H, Nq, Nk, D = 2, 2, 49, 77, 32
    q = torch.randn(B, H, Nq, D, dtype=F64)
    k = torch.randn(B, H, Nk, D, dtype=F64)
    v = torch.randn(B, H, Nk, D, dtype=F64)
    bias = torch.randn(1, H, Nq, Nk, dtype=F64)
    clean = flash_attention(q, k, v, bias=bias, backend="reference")
    q_nan = q.clone()
    q_nan[1, 0, 7, 3] = float("nan")
    out = flash_attention(q_nan, k, v, bias=bias, backend="reference")
    bad = torch.zeros(B, H, Nq, dtype=torch.bool)
    bad[1, 0, 7] = True
    assert torch.isnan(out[bad]).all()
    assert not torch.isnan(out[~bad]).any()
    assert torch.equal(out[~bad], clean[~bad])


# ------------------------------------------------------------------------------------------ dropout
def _identity_v(B, H, Nk, D, dtype=F64):
    assert D >= Nk
    return torch.eye(Nk, D, dtype=dtype).expand(B, H, Nk, D).contiguous()


def test_dropout_same_seed_same_result_other_seed_differs():
    B, H, N, D, p = 2, 2, 49, 32, 0.25
    base_leaves, (q, k, v) = _make_qkv(B, H, N, N, D, strided=True)
    (base,) = base_leaves
    g = torch.randn(B, H, N, D, dtype=F64)

    def run(seed):
        torch.manual_seed(seed)
        return _grads_of(lambda: flash_attention(q, k, v, dropout_p=p, backend="reference"), (base,), g)

    out1, (d1,) = run(123)
    out2, (d2,) = run(123)
    out3, (d3,) = run(124)
    assert torch.equal(out1, out2) and torch.equal(d1, d2)
    assert max_err(out1, out3) > 1e-3 and max_err(d1, d3) > 1e-3
    no_drop = flash_attention(q, k, v, backend="reference")
    assert max_err(out1, no_drop) > 1e-3  # dropout did something


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_keeps_about_one_minus_p_and_rescales(p):
    # v = identity: out[..., i, j] = probs[i, j] * keep[i, j] / (1 - p), so the mask can be read off.
    B, H, Nq, Nk, D = 4, 4, 64, 64, 64
    q = torch.randn(B, H, Nq, D, dtype=F64)
    k = torch.randn(B, H, Nk, D, dtype=F64)
    v = _identity_v(B, H, Nk, D)
    probs = flash_attention(q, k, v, backend="reference")  # no dropout: the probabilities themselves
    assert (probs > 0).all() and max_err(probs.sum(-1), torch.ones(B, H, Nq)) < 1e-12
    torch.manual_seed(7)
    out = flash_attention(q, k, v, dropout_p=p, backend="reference")
    keep = out != 0
    n = keep.numel()
    frac = keep.double().mean().item()
    sigma = math.sqrt(p * (1 - p) / n)
    assert abs(frac - (1 - p)) < 6 * sigma, f"kept {frac:.4f}, expected {1 - p} +- {sigma:.4f}"
    expected = torch.where(keep, probs / (1 - p), torch.zeros_like(probs))
    assert max_err(out, expected) < 1e-12


def test_dropout_replays_with_explicit_mask():
    # The mask drawn under a seed depends only on the RNG state and the shapes: read it off a run with
    # v = identity, then the same seed with real inputs must equal attention_reference with that mask,
    # forward and backward, and equal softmax(...) * mask / (1 - p) @ v written by hand.
    B, H, Nq, Nk, D, p, scale = 2, 2, 33, 49, 64, 0.3, 0.17
    q = torch.randn(B, H, Nq, D, dtype=F64, requires_grad=True)
    k = torch.randn(B, H, Nk, D, dtype=F64, requires_grad=True)
    v = torch.randn(B, H, Nk, D, dtype=F64, requires_grad=True)
    bias = torch.randn(1, H, Nq, Nk, dtype=F64, requires_grad=True)
    g = torch.randn(B, H, Nq, D, dtype=F64)

    torch.manual_seed(99)
    mask = flash_attention(q.detach(), k.detach(), _identity_v(B, H, Nk, D), bias=bias.detach(), scale=scale,
                           dropout_p=p, backend="reference")[..., :Nk] != 0
    assert 0.5 < mask.double().mean().item() < 0.9

    torch.manual_seed(99)
    out, grads = _grads_of(lambda: flash_attention(q, k, v, bias=bias, scale=scale, dropout_p=p,
                                                   backend="reference"), (q, k, v, bias), g)
    out_m, grads_m = _grads_of(lambda: attention_reference(q, k, v, bias, scale, p, dropout_mask=mask),
                               (q, k, v, bias), g)

    def manual():
        probs = torch.softmax(q @ k.transpose(-2, -1) * scale + bias, dim=-1)
        return (probs * mask / (1 - p)) @ v

    out_h, grads_h = _grads_of(manual, (q, k, v, bias), g)
    assert max_err(out, out_m) < TOL64 and max_err(out_m, out_h) < TOL64
    for a, b, c in zip(grads, grads_m, grads_h):
        assert a.abs().max() > 0
        assert max_err(a, b) < TOL64 and max_err(b, c) < TOL64


def test_dropout_p_one_gives_zeros():
    B, H, N, D = 2, 2, 49, 32
    base_leaves, (q, k, v) = _make_qkv(B, H, N, N, D, strided=True)
    (base,) = base_leaves
    g = torch.randn(B, H, N, D, dtype=F64)
    out, (dbase,) = _grads_of(lambda: flash_attention(q, k, v, dropout_p=1.0, backend="reference"), (base,), g)
    assert (out == 0).all() and not torch.isnan(dbase).any()
    assert (dbase == 0).all()


def test_dropout_zero_is_no_dropout():
    _, (q, k, v) = _make_qkv(2, 2, 49, 49, 32, strided=True)
    assert torch.equal(flash_attention(q, k, v, dropout_p=0.0, backend="reference"),
                       flash_attention(q, k, v, backend="reference"))


# -------------------------------------------------------- AttentionFunction + ReferenceAttentionKernels (FA-2 math)
@pytest.mark.parametrize("bias_kind", [None, "bhqk", "1hqk", "b11k", "qk"])
def test_attention_function_math_kernels_match_reference_autograd(bias_kind):
    B, H, Nq, Nk, D, scale = 2, 3, 49, 77, 40, 0.21
    q = torch.randn(B, H, Nq, D, dtype=F64, requires_grad=True)
    k = torch.randn(B, H, Nk, D, dtype=F64, requires_grad=True)
    v = torch.randn(B, H, Nk, D, dtype=F64, requires_grad=True)
    leaves = (q, k, v)
    bias = _make_bias(bias_kind, B, H, Nq, Nk)
    if bias is not None:
        bias.requires_grad_(True)
        leaves += (bias,)
    g = torch.randn(B, H, Nq, D, dtype=F64)
    out, grads = _grads_of(lambda: AttentionFunction.apply(ReferenceAttentionKernels, q, k, v, bias, scale, 0.0), leaves, g)
    out_r, grads_r = _grads_of(lambda: attention_reference(q, k, v, bias, scale), leaves, g)
    assert out.dtype == F64
    assert max_err(out, out_r) < TOL64
    for t, a, b in zip(leaves, grads, grads_r):
        assert a.shape == t.shape and torch.isfinite(a).all()
        assert max_err(a, b) < TOL64, f"grad of {tuple(t.shape)}: {max_err(a, b):.3e}"


def test_attention_function_bias_without_grad():
    B, H, N, D = 1, 2, 49, 32
    q, k, v = (torch.randn(B, H, N, D, dtype=F64, requires_grad=True) for _ in range(3))
    bias = torch.randn(1, H, N, N, dtype=F64)  # does not require grad
    g = torch.randn(B, H, N, D, dtype=F64)
    out, grads = _grads_of(lambda: AttentionFunction.apply(ReferenceAttentionKernels, q, k, v, bias, None, 0.0), (q, k, v), g)
    out_r, grads_r = _grads_of(lambda: attention_reference(q, k, v, bias), (q, k, v), g)
    assert max_err(out, out_r) < TOL64
    for a, b in zip(grads, grads_r):
        assert max_err(a, b) < TOL64
    assert bias.grad is None


def test_math_kernels_lse_is_logsumexp_of_scaled_biased_logits():
    B, H, Nq, Nk, D, scale = 2, 2, 49, 77, 32, 0.3
    q = torch.randn(B, H, Nq, D, dtype=F64)
    k = torch.randn(B, H, Nk, D, dtype=F64)
    v = torch.randn(B, H, Nk, D, dtype=F64)
    bias = torch.randn(B, 1, Nq, Nk, dtype=F64)
    bias[0, 0, 4, :] = NEG_INF  # one all -inf row (both heads)
    bias[1, 0, :, -5:] = NEG_INF
    out, lse, _ = ReferenceAttentionKernels.forward(q, k, v, bias, scale, 0.0)
    logits = q @ k.transpose(-2, -1) * scale + bias
    expected = torch.logsumexp(logits, dim=-1)
    assert lse.shape == (B, H, Nq)
    assert torch.isneginf(lse[0, :, 4]).all()
    assert torch.isneginf(expected[0, :, 4]).all()
    finite = torch.isfinite(expected)
    assert finite.sum() == B * H * Nq - H
    assert torch.isfinite(lse[finite]).all()
    assert max_err(lse[finite], expected[finite]) < TOL64
    assert (out[0, :, 4] == 0).all() and torch.isfinite(out).all()
    assert max_err(out, attention_reference(q, k, v, bias, scale)) < TOL64

    # Backward from the saved lse: the dead row gets zero grads, everything else finite and equal to
    # autograd through the reference.
    qq, kk, vv, bb = (t.clone().requires_grad_(True) for t in (q, k, v, bias))
    g = torch.randn(B, H, Nq, D, dtype=F64)
    _, (dq, dk, dv, db) = _grads_of(lambda: AttentionFunction.apply(ReferenceAttentionKernels, qq, kk, vv, bb, scale, 0.0),
                                    (qq, kk, vv, bb), g)
    _, (dq_r, dk_r, dv_r, db_r) = _grads_of(lambda: attention_reference(qq, kk, vv, bb, scale), (qq, kk, vv, bb), g)
    for a, b in ((dq, dq_r), (dk, dk_r), (dv, dv_r), (db, db_r)):
        assert torch.isfinite(a).all()
        assert max_err(a, b) < TOL64
    assert (dq[0, :, 4] == 0).all() and (db[0, 0, 4] == 0).all()
    assert dq[0, :, 3].abs().max() > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_math_kernels_lse_is_float32_for_kernel_dtypes(dtype):
    B, H, N, D = 1, 2, 49, 64
    q, k, v = (torch.randn(B, H, N, D, dtype=F64) for _ in range(3))
    out, lse, _ = ReferenceAttentionKernels.forward(q.to(dtype), k.to(dtype), v.to(dtype), None, None, 0.0)
    assert out.dtype == dtype and lse.dtype == torch.float32
    expected = torch.logsumexp(q.to(dtype).double() @ k.to(dtype).double().transpose(-2, -1) * D ** -0.5, dim=-1)
    assert max_err(lse, expected) < 1e-4


# ----------------------------------------------------------------------------------------- gradcheck
@pytest.mark.parametrize("Nq,Nk,bias_shape", [(3, 5, (1, 2, 3, 5)), (4, 4, (4, 4)), (5, 3, (2, 1, 1, 3))])
def test_gradcheck_reference(Nq, Nk, bias_shape):
    B, H, D = 2, 2, 16
    q = torch.randn(B, H, Nq, D, dtype=F64, requires_grad=True)
    k = torch.randn(B, H, Nk, D, dtype=F64, requires_grad=True)
    v = torch.randn(B, H, Nk, D, dtype=F64, requires_grad=True)
    bias = torch.randn(*bias_shape, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: attention_reference(*a, scale=0.4), (q, k, v, bias))
    assert torch.autograd.gradcheck(
        lambda q_, k_, v_, b_: flash_attention(q_, k_, v_, bias=b_, backend="reference"), (q, k, v, bias))


def test_gradcheck_attention_function_math_kernels():
    B, H, Nq, Nk, D = 1, 2, 4, 5, 16
    q = torch.randn(B, H, Nq, D, dtype=F64, requires_grad=True)
    k = torch.randn(B, H, Nk, D, dtype=F64, requires_grad=True)
    v = torch.randn(B, H, Nk, D, dtype=F64, requires_grad=True)
    bias = torch.randn(1, H, Nq, Nk, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: AttentionFunction.apply(ReferenceAttentionKernels, *a, 0.5, 0.0), (q, k, v, bias))


# ------------------------------------------------------------------------ same-dtype accuracy (2x)
LOW_CASES = [
    # B, H, N, D, bias kind
    (2, 2, 197, 64, "1hqk"),
    (2, 3, 49, 32, "b11k"),
    (1, 2, 77, 128, "bhqk"),
    (2, 2, 49, 80, None),
]
FACTOR = {"forward": 2.0, "grad": 2.0}
FLOOR = {torch.float32: 1e-6, torch.float16: 1e-4, torch.bfloat16: 1e-3}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("B,H,N,D,bias_kind", LOW_CASES, ids=[f"B{c[0]}H{c[1]}N{c[2]}D{c[3]}-{c[4]}" for c in LOW_CASES])
def test_reference_low_precision_within_2x_of_sdpa_math(dtype, B, H, N, D, bias_kind):
    base64 = torch.randn(B, N, 3, H, D, dtype=F64)
    bias64 = _make_bias(bias_kind, B, H, N, N)
    g64 = torch.randn(B, H, N, D, dtype=F64)

    def run(fn, dt):
        base = base64.to(dt, copy=True).requires_grad_(True)
        q, k, v = base.permute(2, 0, 3, 1, 4).unbind(0)
        leaves = (base,)
        bias = None
        if bias64 is not None:
            bias = bias64.to(dt, copy=True).requires_grad_(True)
            leaves += (bias,)
        out, grads = _grads_of(lambda: fn(q, k, v, bias), leaves, g64.to(dt))
        return [out] + grads

    # All three runs start from the same low-precision-rounded inputs.
    base64.copy_(base64.to(dtype).double())
    g64.copy_(g64.to(dtype).double())
    if bias64 is not None:
        bias64.copy_(bias64.to(dtype).double())

    ours = lambda q, k, v, b: flash_attention(q, k, v, bias=b, backend="reference")  # noqa: E731
    ref = run(ours, F64)
    mine = run(ours, dtype)
    with sdpa_kernel(SDPBackend.MATH):
        pt = run(lambda q, k, v, b: _sdpa(q, k, v, b, None), dtype)
    names = ["output", "grad qkv", "grad bias"]
    for name, a, p, r in zip(names, mine, pt, ref):
        assert a.dtype == dtype
        assert_close_2x(a, p, r, factor=FACTOR["forward" if name == "output" else "grad"], floor=FLOOR[dtype],
                        name=f"{name} ({dtype})")


# ------------------------------------------------------------------------------------ rope (EVA-02 / DINOv3)


@pytest.mark.parametrize("rotate_half", [False, True], ids=["interleaved", "half"])
@pytest.mark.parametrize("prefix,table_lead", [(0, ()), (1, ()), (1, (2, 1)), (4, (1, 3))])
def test_rope_reference_is_timms_rotation_then_sdpa(rotate_half, prefix, table_lead):
    """timm's own ``apply_rot_embed_cat`` on q and k after the prefix tokens, then SDPA: float64, the output and
    the gradients of q, k, v and the [sin | cos] table."""
    timm_rope = pytest.importorskip("timm.layers.pos_embed_sincos")
    B, H, N, D = 2, 3, 4 + 20, 32
    torch.manual_seed(0)
    q, k, v = (torch.randn(B, H, N, D, dtype=F64, requires_grad=True) for _ in range(3))
    emb = torch.randn(*table_lead, N - prefix, 2 * D, dtype=F64, requires_grad=True)

    def timm_path(q, k, v, emb):
        def rot(x):
            return torch.cat([x[:, :, :prefix], timm_rope.apply_rot_embed_cat(x[:, :, prefix:], emb, half=rotate_half)],
                             dim=2)
        return F.scaled_dot_product_attention(rot(q), rot(k), v)

    def ours(q, k, v, emb, backend="reference"):
        sin, cos = emb.chunk(2, dim=-1)
        return flash_attention(q, k, v, rope=vitkernels.Rope(cos, sin, prefix, rotate_half), backend=backend)

    expected, out = timm_path(q, k, v, emb), ours(q, k, v, emb)
    torch.testing.assert_close(out, expected, rtol=TOL64, atol=TOL64)
    g = torch.randn_like(out)
    expected_grads = torch.autograd.grad(expected, (q, k, v, emb), g)
    for a, b in zip(torch.autograd.grad(out, (q, k, v, emb), g), expected_grads):
        torch.testing.assert_close(a, b, rtol=TOL64, atol=TOL64)
    # the explicit backward (what the compiled reference runs) agrees too
    inputs = vitkernels.ops.attention.check_attention_inputs(
        q, k, v, rope=vitkernels.Rope(*reversed(emb.chunk(2, dim=-1)), prefix, rotate_half))
    from vitkernels.ops.attention.function import apply_attention

    out_k = apply_attention(ReferenceAttentionKernels, inputs)
    torch.testing.assert_close(out_k, expected, rtol=TOL64, atol=TOL64)
    for a, b in zip(torch.autograd.grad(out_k, (q, k, v, emb), g), expected_grads):
        torch.testing.assert_close(a, b, rtol=TOL64, atol=TOL64)


def test_rope_with_fp32_tables_rotates_in_fp32_and_rounds_once():
    """bf16 q with fp32 tables: the rotation is timm's, bit for bit (fp32 products, one rounding to bf16), not
    the bf16 tables' rotation (which differs); the attention then runs on the rotated q and k."""
    timm_rope = pytest.importorskip("timm.layers.pos_embed_sincos")
    from vitkernels.ops.attention.rope import apply_rope

    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 9, 16, dtype=torch.bfloat16) for _ in range(3))
    emb = torch.randn(9, 32) * 3
    sin, cos = emb.chunk(2, dim=-1)
    rotated = apply_rope(q, vitkernels.Rope(cos[None, None], sin[None, None]))
    assert torch.equal(rotated, timm_rope.apply_rot_embed_cat(q, emb))
    assert not torch.equal(rotated, timm_rope.apply_rot_embed_cat(q, emb.bfloat16()))  # the case tells them apart
    out = flash_attention(q, k, v, rope=(cos, sin), backend="reference")
    expected = attention_reference(rotated, timm_rope.apply_rot_embed_cat(k, emb), v)
    assert out.dtype == torch.bfloat16 and torch.equal(out, expected)

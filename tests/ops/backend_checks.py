"""Backend-against-reference checks shared by the triton and cpu test modules.

Criterion (flash-attn's): |backend - ref64| <= factor x |reference in the same dtype - ref64| + floor, for
the output and every gradient (q, k, v and bias; qkv, the table and qkv_bias)."""
from __future__ import annotations

import math

import torch

import vitkernels

from tests.utils import assert_close_2x

FLOOR = {torch.float32: 1e-6, torch.float16: 1e-4, torch.bfloat16: 1e-3}


def attention_vs_reference(backend, q, k, v, bias=None, scale=None, dout=None, bias_grad=True, factor=2.0,
                           grad_factor=3.0):
    """Run ``backend``, the same-dtype reference and the fp64 reference on the same leaves; compare output and
    every gradient. q, k, v, bias: leaf tensors (not requiring grad)."""
    dtype = q.dtype
    leaves = {"q": q, "k": k, "v": v}
    if bias is not None:
        leaves["bias"] = bias
    results = {}
    for name, cast, be in (("ref", torch.float64, "reference"), ("pt", dtype, "reference"), ("run", dtype, backend)):
        ts = {n: t.detach().to(cast).requires_grad_(n != "bias" or bias_grad) for n, t in leaves.items()}
        out = vitkernels.flash_attention(ts["q"], ts["k"], ts["v"], bias=ts.get("bias"), scale=scale, backend=be)
        g = dout if dout is not None else torch.ones_like(out)
        out.backward(g.to(cast))
        results[name] = (out, {n: t.grad for n, t in ts.items()})
    out_ref, g_ref = results["ref"]
    out_pt, g_pt = results["pt"]
    out_run, g_run = results["run"]
    assert out_run.dtype == dtype
    fl = FLOOR[dtype]
    assert_close_2x(out_run, out_pt, out_ref, factor=factor, floor=fl, name="out")
    for n in g_ref:
        if g_ref[n] is None:
            assert g_run[n] is None, n
            continue
        assert g_run[n].shape == leaves[n].shape, n
        assert_close_2x(g_run[n], g_pt[n], g_ref[n], factor=grad_factor, floor=fl * 10, name=f"d{n}")
    return results


def table_rows(window):
    return math.prod(2 * w - 1 for w in window)


def window_vs_reference(backend, device, shape, heads, head_dim, window, shift, table_window=None,
                        dtype=torch.float32, with_bias=True, with_table=True, qkv=None):
    """Compare ``backend`` with the reference; window/shift as given to the op, table_window the window the
    table is laid out for (2-D: the clipped window; 3-D: the configured one)."""
    B, *spatial = shape
    nd = len(spatial)
    window_t = (window,) * nd if isinstance(window, int) else tuple(window)
    table_window = table_window or window_t
    C = heads * head_dim
    base_qkv = torch.randn(B, *spatial, 3 * C, device=device) if qkv is None else qkv
    leaves = {"qkv": base_qkv}
    if with_table:
        leaves["rel_pos_bias"] = torch.randn(table_rows(table_window), heads, device=device)
    if with_bias:
        leaves["qkv_bias"] = torch.randn(3 * C, device=device)
    dout = torch.randn(B, *spatial, C, device=device)
    results = {}
    for name, cast, be in (("ref", torch.float64, "reference"), ("pt", dtype, "reference"), ("run", dtype, backend)):
        ts = {n: t.detach().to(cast).requires_grad_() for n, t in leaves.items()}
        out = vitkernels.window_attention(ts["qkv"], num_heads=heads, window_size=window, shift_size=shift,
                                          rel_pos_bias=ts.get("rel_pos_bias"), qkv_bias=ts.get("qkv_bias"),
                                          backend=be)
        out.backward(dout.to(cast))
        grads = {n: (t.grad if t.grad is not None else torch.zeros_like(t)) for n, t in ts.items()}
        results[name] = (out, grads)
    floor = FLOOR[dtype]
    assert results["run"][0].dtype == dtype
    assert_close_2x(results["run"][0], results["pt"][0], results["ref"][0], floor=floor, name="out")
    for n in leaves:
        assert_close_2x(results["run"][1][n], results["pt"][1][n], results["ref"][1][n], factor=3.0,
                        floor=floor * 10, name=f"d{n}")
    return results


# ---- properties every attention / window backend has (each test module runs them on its backend) ----------


def attention_nan_stays_in_its_row(backend, device):
    """A NaN in one query row gives NaN in that output row and leaves every other row bitwise unchanged."""
    q, k, v = (torch.randn(1, 1, 49, 32, device=device) for _ in range(3))
    clean = vitkernels.flash_attention(q, k, v, backend=backend)
    q[0, 0, 7, 3] = float("nan")
    out = vitkernels.flash_attention(q, k, v, backend=backend)
    assert torch.isnan(out[0, 0, 7]).all()
    rest = torch.ones(49, dtype=torch.bool, device=device)
    rest[7] = False
    assert torch.equal(out[0, 0, rest], clean[0, 0, rest])


def attention_backward_is_bitwise_deterministic(backend, device):
    q, k, v = (torch.randn(2, 2, 77, 40, device=device) for _ in range(3))
    bias, g = torch.randn(1, 2, 77, 77, device=device), torch.randn(2, 2, 77, 40, device=device)
    runs = []
    for _ in range(2):
        ts = [t.clone().requires_grad_() for t in (q, k, v, bias)]
        out = vitkernels.flash_attention(*ts[:3], bias=ts[3], backend=backend)
        out.backward(g)
        runs.append([out] + [t.grad for t in ts])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def window_backward_is_bitwise_deterministic(backend, device):
    heads, hd = 2, 32
    qkv = torch.randn(2, 13, 10, 3 * heads * hd, device=device)
    table = torch.randn(169, heads, device=device)
    bias = torch.randn(3 * heads * hd, device=device)
    g = torch.randn(2, 13, 10, heads * hd, device=device)
    runs = []
    for _ in range(2):
        ts = [t.clone().requires_grad_() for t in (qkv, table, bias)]
        out = vitkernels.window_attention(ts[0], num_heads=heads, window_size=7, shift_size=3, rel_pos_bias=ts[1],
                                          qkv_bias=ts[2], backend=backend)
        out.backward(g)
        runs.append([out] + [t.grad for t in ts])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def window_reads_a_strided_qkv_in_place(backend, device):
    """qkv a view of a wider NaN-filled buffer: reading outside it would put NaN in the output."""
    heads, hd = 2, 32
    C = heads * hd
    buf = torch.full((1, 13, 10, 3 * C + 16), float("nan"), device=device)
    buf[..., : 3 * C] = torch.randn(1, 13, 10, 3 * C, device=device)
    qkv = buf[..., : 3 * C]
    assert not qkv.is_contiguous()
    window_vs_reference(backend, device, (1, 13, 10), heads, hd, 7, 3, qkv=qkv)


# ---- decomposed relative position (flash_attention(rel_pos=...)) ------------------------------------------


def rel_pos_leaves(B, H, D, q_grid, k_grid, prefix=0, device="cpu", with_bias=False, bias_shape=None, seed=0):
    """q, k, v (B, H, N, D) on a (t,) h, w query / key grid after ``prefix`` class tokens, the rel terms as
    the models build them (the einsum of q with random tables), optionally a learnable bias: float32 leaves
    (not requiring grad), so each run casts them itself."""
    g = torch.Generator().manual_seed(seed)
    n_q, n_k = prefix + math.prod(q_grid), prefix + math.prod(k_grid)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device)

    leaves = {"q": rnd(B, H, n_q, D), "k": rnd(B, H, n_k, D), "v": rnd(B, H, n_k, D)}
    terms = ("rel_t", "rel_h", "rel_w")[3 - len(k_grid):]
    for name, kn in zip(terms, k_grid):
        leaves[name] = rnd(B, H, n_q - prefix, kn)  # O(1) logit offsets, like a trained model's
    if with_bias:
        leaves["bias"] = rnd(*(bias_shape or (1, H, n_q, n_k)))
    return leaves


def _rel_call(ts, prefix, backend, dropout_p=0.0):
    rel = vitkernels.RelPos(ts["rel_h"], ts["rel_w"], ts.get("rel_t"), prefix)
    return vitkernels.flash_attention(ts["q"], ts["k"], ts["v"], bias=ts.get("bias"), rel_pos=rel,
                                      dropout_p=dropout_p, backend=backend)


def rel_pos_vs_reference(backend, leaves, prefix=0, dtype=torch.float32, factor=2.0, grad_factor=3.0, dout=None):
    """``backend`` against the fp64 reference (the dense bias), with the same-dtype reference as the yardstick:
    the output and the gradients of q, k, v, every rel term and the bias."""
    results = {}
    for name, cast, be in (("ref", torch.float64, "reference"), ("pt", dtype, "reference"), ("run", dtype, backend)):
        ts = {n: t.detach().to(cast).requires_grad_() for n, t in leaves.items()}
        out = _rel_call(ts, prefix, be)
        g = dout if dout is not None else torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
        out.backward(g.to(out.device, cast))
        results[name] = (out, {n: t.grad for n, t in ts.items()})
    fl = FLOOR[dtype]
    assert results["run"][0].dtype == dtype
    assert_close_2x(results["run"][0], results["pt"][0], results["ref"][0], factor=factor, floor=fl, name="out")
    for n in leaves:
        assert results["run"][1][n] is not None, f"d{n} missing"
        assert results["run"][1][n].shape == leaves[n].shape, n
        assert_close_2x(results["run"][1][n], results["pt"][1][n], results["ref"][1][n], factor=grad_factor,
                        floor=fl * 10, name=f"d{n}")
    return results


def rel_pos_backward_is_bitwise_deterministic(backend, device):
    leaves = rel_pos_leaves(2, 2, 40, (7, 9), (4, 5), prefix=1, device=device, with_bias=True)
    runs = []
    for _ in range(2):
        ts = {n: t.clone().requires_grad_() for n, t in leaves.items()}
        out = _rel_call(ts, 1, backend)
        out.backward(torch.ones_like(out))
        runs.append([out] + [ts[n].grad for n in sorted(ts)])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def rel_pos_dropout_matches_the_reference_with_the_kernels_mask(backend, device, mask_of, p=0.3):
    """With dropout, the backend equals the reference given the keep-mask the backend drew (``mask_of(rng,
    shape, p)``), output and gradients: rel_pos and dropout combine."""
    from vitkernels.ops.attention.function import AttentionFunction
    from vitkernels.ops.attention.reference import attention_reference, rel_pos_dense

    leaves = rel_pos_leaves(1, 2, 32, (6, 6), (3, 3), prefix=1, device=device)
    kernels = vitkernels.dispatch.implementations("flash_attention")[backend].kernels()
    seen = {}

    class Recording:
        @staticmethod
        def forward(*args):
            out = kernels.forward(*args)
            seen["rng"] = out[2]
            return out

        backward = staticmethod(kernels.backward)

    ts = {n: t.detach().clone().requires_grad_() for n, t in leaves.items()}
    out = AttentionFunction.apply(Recording, ts["q"], ts["k"], ts["v"], None, 32 ** -0.5, p,
                                  ts["rel_h"], ts["rel_w"], None, 1)
    g = torch.randn_like(out)
    out.backward(g)
    mask = mask_of(seen["rng"], (1, 2, out.shape[2], ts["k"].shape[2]), p)
    rs = {n: t.detach().double().requires_grad_() for n, t in leaves.items()}
    dense = rel_pos_dense(vitkernels.RelPos(rs["rel_h"], rs["rel_w"], None, 1), out.shape[2], rs["k"].shape[2])
    ref = attention_reference(rs["q"], rs["k"], rs["v"], dense, 32 ** -0.5, p, dropout_mask=mask)
    ref.backward(g.double())
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-5)
    for n in ts:
        torch.testing.assert_close(ts[n].grad.double(), rs[n].grad, rtol=1e-4, atol=1e-4, msg=lambda m: f"d{n}: {m}")


# ---- rotary position (flash_attention(rope=...)) -----------------------------------------------------------


def rope_leaves(B, H, N, D, prefix=0, table_shape=None, device="cpu", with_bias=False, seed=0):
    """q, k, v (B, H, N, D) and timm-like cos / sin tables (angles of a 2-D axial grid, each frequency twice,
    interleaved as in timm's layout; any extra dims of ``table_shape`` get their own angles), optionally a
    learnable bias: float32 leaves (not requiring grad)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(device)

    leaves = {"q": rnd(B, H, N, D), "k": rnd(B, H, N, D), "v": rnd(B, H, N, D)}
    shape = table_shape or (N - prefix, D)
    angles = torch.rand(*shape[:-1], D // 2, generator=g) * 2 * math.pi * torch.linspace(1, 0.05, D // 2)
    angles = angles.repeat_interleave(2, dim=-1)
    leaves["cos"], leaves["sin"] = angles.cos().to(device), angles.sin().to(device)
    if with_bias:
        leaves["bias"] = rnd(1, H, N, N)
    return leaves


def _rope_call(ts, prefix, rotate_half, backend, dropout_p=0.0, table_dtype=None):
    cos, sin = ts["cos"], ts["sin"]
    if table_dtype is not None:
        cos, sin = cos.to(table_dtype), sin.to(table_dtype)
    rope = vitkernels.Rope(cos, sin, prefix, rotate_half)
    return vitkernels.flash_attention(ts["q"], ts["k"], ts["v"], bias=ts.get("bias"), rope=rope,
                                      dropout_p=dropout_p, backend=backend)


def rope_vs_reference(backend, leaves, prefix=0, rotate_half=False, dtype=torch.float32, table_dtype=None,
                      tables_grad=False, factor=2.0, grad_factor=3.0):
    """``backend`` against the fp64 reference (timm's rotation, then attention), with the same-dtype reference
    as the yardstick: the output and the gradients of q, k, v, the bias and (``tables_grad``) cos and sin.
    ``table_dtype``: the tables' dtype in the same-dtype runs (default: ``dtype``; float32 tables with
    fp16/bf16 q is timm's usual mix)."""
    results = {}
    for name, cast, be in (("ref", torch.float64, "reference"), ("pt", dtype, "reference"), ("run", dtype, backend)):
        tcast = torch.float64 if cast == torch.float64 else (table_dtype or dtype)
        ts = {n: t.detach().to(tcast if n in ("cos", "sin") else cast).requires_grad_(
            tables_grad or n not in ("cos", "sin")) for n, t in leaves.items()}
        out = _rope_call(ts, prefix, rotate_half, be)
        g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
        out.backward(g.to(out.device, cast))
        results[name] = (out, {n: t.grad for n, t in ts.items()})
    fl = FLOOR[dtype]
    assert results["run"][0].dtype == dtype
    assert_close_2x(results["run"][0], results["pt"][0], results["ref"][0], factor=factor, floor=fl, name="out")
    for n in leaves:
        if n in ("cos", "sin") and not tables_grad:
            assert results["run"][1][n] is None, f"d{n} given without requires_grad"
            continue
        assert results["run"][1][n] is not None, f"d{n} missing"
        assert results["run"][1][n].shape == leaves[n].shape, n
        assert_close_2x(results["run"][1][n], results["pt"][1][n], results["ref"][1][n], factor=grad_factor,
                        floor=fl * 10, name=f"d{n}")
    return results


def rope_backward_is_bitwise_deterministic(backend, device, tables_grad=True):
    leaves = rope_leaves(2, 2, 77, 40, prefix=1, device=device, with_bias=True)
    runs = []
    for _ in range(2):
        ts = {n: t.clone().requires_grad_(tables_grad or n not in ("cos", "sin")) for n, t in leaves.items()}
        out = _rope_call(ts, 1, False, backend)
        out.backward(torch.ones_like(out))
        runs.append([out] + [ts[n].grad for n in sorted(ts) if ts[n].requires_grad])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


# ---- Swin V2 scaled cosine attention (window_attention(cosine=True)) -----------------------------------------


def cosine_window_vs_reference(backend, device, shape, heads, head_dim, window, shift, dtype=torch.float32,
                               logit_scale=None, scale_dtype=None, with_bias=True, with_table=True, seed=0):
    """``backend`` with ``cosine=True`` against the fp64 reference, the same-dtype reference as the yardstick:
    output and the gradients of qkv, the table (Swin V2's 16 * sigmoid(MLP) values), qkv_bias and the logit
    scale. ``logit_scale`` (heads,) float32 values (default: spread over [log 2, log 100 + 0.5], so one head
    sits past the clamp); ``scale_dtype``: its dtype in the same-dtype runs (default ``dtype``)."""
    g = torch.Generator().manual_seed(seed)
    B, *spatial = shape
    nd = len(spatial)
    window_t = (window,) * nd if isinstance(window, int) else tuple(window)
    C = heads * head_dim
    leaves = {"qkv": torch.randn(B, *spatial, 3 * C, generator=g).to(device)}
    if with_table:
        leaves["rel_pos_bias"] = (16 * torch.sigmoid(torch.randn(table_rows(window_t), heads, generator=g))).to(device)
    if with_bias:
        leaves["qkv_bias"] = torch.randn(3 * C, generator=g).to(device)
    if logit_scale is None:
        logit_scale = torch.linspace(math.log(2.0), math.log(100.0) + 0.5, heads)
    leaves["logit_scale"] = logit_scale.reshape(heads, 1, 1).to(device)
    dout = torch.randn(B, *spatial, C, generator=g).to(device)
    results = {}
    for name, cast, be in (("ref", torch.float64, "reference"), ("pt", dtype, "reference"), ("run", dtype, backend)):
        scast = torch.float64 if cast == torch.float64 else (scale_dtype or dtype)
        ts = {n: t.detach().to(scast if n == "logit_scale" else cast).requires_grad_() for n, t in leaves.items()}
        out = vitkernels.window_attention(ts["qkv"], num_heads=heads, window_size=window, shift_size=shift,
                                          rel_pos_bias=ts.get("rel_pos_bias"), qkv_bias=ts.get("qkv_bias"),
                                          cosine=True, logit_scale=ts["logit_scale"], backend=be)
        out.backward(dout.to(cast))
        grads = {n: (t.grad if t.grad is not None else torch.zeros_like(t)) for n, t in ts.items()}
        results[name] = (out, grads)
    floor = FLOOR[dtype]
    assert results["run"][0].dtype == dtype
    assert_close_2x(results["run"][0], results["pt"][0], results["ref"][0], floor=floor, name="out")
    for n in leaves:
        assert results["run"][1][n].shape == leaves[n].shape, n
        assert_close_2x(results["run"][1][n], results["pt"][1][n], results["ref"][1][n], factor=3.0,
                        floor=floor * 10, name=f"d{n}")
    return results


def cosine_window_backward_is_bitwise_deterministic(backend, device):
    heads, hd = 2, 32
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(2, 13, 10, 3 * heads * hd, generator=g).to(device)
    table = (16 * torch.sigmoid(torch.randn(169, heads, generator=g))).to(device)
    bias = torch.randn(3 * heads * hd, generator=g).to(device)
    logit_scale = torch.tensor([math.log(10.0), math.log(30.0)]).reshape(heads, 1, 1).to(device)
    dout = torch.randn(2, 13, 10, heads * hd, generator=g).to(device)
    runs = []
    for _ in range(2):
        ts = [t.clone().requires_grad_() for t in (qkv, table, bias, logit_scale)]
        out = vitkernels.window_attention(ts[0], num_heads=heads, window_size=7, shift_size=3, rel_pos_bias=ts[1],
                                          qkv_bias=ts[2], cosine=True, logit_scale=ts[3], backend=backend)
        out.backward(dout)
        runs.append([out] + [t.grad for t in ts])
    for a, b in zip(*runs):
        assert torch.equal(a, b)

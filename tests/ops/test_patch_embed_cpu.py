"""The ``cpu`` backend of patch_embed (torch's conv + a one-pass epilogue; dWeight one GEMM over the
patches) against the reference.

Low precision uses flash-attn's criterion (tests.utils.assert_close_2x): out_ref = the reference on
float64-upcast inputs, out_pt = the reference in the same dtype, out = the cpu backend. float64 must match
the reference to ~1e-12, and forward + backward must be bitwise deterministic.

Without the compiled extension these tests skip, unless VITKERNELS_REQUIRE_EXT=1, where they fail.
"""
from __future__ import annotations

import math
import os

import pytest
import torch

from tests.ops.test_patch_embed_reference import CASE_IDS, CASES, Case, make_params, make_x, run_with_grads
from tests.utils import assert_close_2x, max_err
from vitkernels import _ext, patch_embed

F64 = torch.float64
NAMES = ("x", "weight", "bias", "pos_embed", "prefix_tokens")


# Missing extension: skip, unless VITKERNELS_REQUIRE_EXT=1 (CI with a build), where every test runs and
# fails (backend="cpu" raises an error saying why; test_extension_is_loaded says it first).
EXT_REQUIRED = os.environ.get("VITKERNELS_REQUIRE_EXT") == "1"
pytestmark = pytest.mark.skipif(
    _ext.extension() is None and not EXT_REQUIRED,
    reason=f"the cpu backend needs the compiled extension: {_ext.extension_error()} "
           "(set VITKERNELS_REQUIRE_EXT=1 to fail instead of skipping)")


def test_extension_is_loaded():
    assert _ext.extension() is not None, (f"VITKERNELS_REQUIRE_EXT=1 but the compiled extension is missing: "
                                          f"{_ext.extension_error()}")
    assert hasattr(_ext.extension(), "patch_gather") and hasattr(_ext.extension(), "patch_scatter")


def _fp16_cpu_matmul_supported() -> bool:
    try:
        a = torch.ones(2, 2, dtype=torch.float16)
        torch.addmm(a[0], a, a)
        return True
    except RuntimeError:
        return False


DTYPES = [
    pytest.param(torch.float32, id="fp32"),
    pytest.param(torch.bfloat16, id="bf16"),
    pytest.param(torch.float16, id="fp16", marks=pytest.mark.skipif(
        not _fp16_cpu_matmul_supported(), reason="this torch build has no CPU float16 matmul (addmm)")),
]
GRAD_FACTOR = 3.0


def _floor(dtype, ref: torch.Tensor) -> float:
    """The floor of the 2x criterion (|out - ref| <= factor * |out_pt - ref| + floor): an eighth of an ulp
    of ``dtype`` at the result's largest magnitude, below any rounding error, for when out_pt is exact."""
    return torch.finfo(dtype).eps / 8 * ref.abs().max().item()


def _inputs(case: Case, dtype, *, x_grad=True):
    """fp64 master inputs rounded to ``dtype`` (so the fp64 reference sees exactly what the others see)."""
    leaf, x = make_x(case, F64)
    params = make_params(case, F64)
    with torch.no_grad():
        leaf.copy_(leaf.to(dtype).to(F64))
        for t in params:
            if t is not None:
                t.copy_(t.to(dtype).to(F64))
    B, P, Np, E = case.x_shape[0], case.P, case.num_patches, case.E
    g = torch.randn(B, P + Np, E, dtype=F64).to(dtype).to(F64)
    if not x_grad:
        leaf.requires_grad_(False)
    return leaf, x, params, g


def _cast_like(case: Case, leaf, x, params, dtype):
    """The same inputs in ``dtype``, with the same layout (channels-last / slice) and grad flags."""
    new_leaf = leaf.detach().to(dtype, copy=True)
    if case.layout == "channels_last":
        fmt = torch.channels_last if leaf.dim() == 4 else torch.channels_last_3d
        new_leaf = new_leaf.contiguous(memory_format=fmt)
        assert new_leaf.is_contiguous(memory_format=fmt) and not new_leaf.is_contiguous()
    new_leaf.requires_grad_(leaf.requires_grad)
    if case.layout == "slice":
        index = (slice(None), slice(None, None, 2)) + tuple(slice(1, 1 + s) for s in case.x_shape[2:])
        new_x = new_leaf[index]
        assert not new_x.is_contiguous()
    else:
        new_x = new_leaf
    new_params = [None if t is None else t.detach().to(dtype, copy=True).requires_grad_(t.requires_grad)
                  for t in params]
    return new_leaf, new_x, new_params


def _run(backend, leaf, x, params, g):
    weight, bias, pos, prefix = params
    leaves = [leaf, weight, bias, pos, prefix]
    present = [t for t in leaves if t is not None and t.requires_grad]
    out, grads = run_with_grads(
        lambda: patch_embed(x, weight, bias, pos_embed=pos, prefix_tokens=prefix, backend=backend),
        present, g.to(x.dtype))
    by_leaf = {id(t): gr for t, gr in zip(present, grads)}
    return out, [None if t is None else by_leaf.get(id(t)) for t in leaves]


def _compare_2x(case: Case, dtype, *, x_grad=True, backend="cpu"):
    leaf, x, params, g = _inputs(case, dtype, x_grad=x_grad)
    out_ref, grads_ref = _run("reference", leaf, x, params, g)
    l_pt, x_pt, p_pt = _cast_like(case, leaf, x, params, dtype)
    out_pt, grads_pt = _run("reference", l_pt, x_pt, p_pt, g)
    l_c, x_c, p_c = _cast_like(case, leaf, x, params, dtype)
    out, grads = _run(backend, l_c, x_c, p_c, g)

    assert out.dtype == dtype and out.shape == out_ref.shape
    assert_close_2x(out, out_pt, out_ref, factor=2.0, floor=_floor(dtype, out_ref), name=f"forward {dtype}")
    for name, a, p, r in zip(NAMES, grads, grads_pt, grads_ref):
        if r is None:
            assert a is None, f"d{name}: the {backend} backend gave a gradient the reference does not have"
            continue
        assert a is not None, f"d{name} missing"
        assert a.dtype == dtype
        assert_close_2x(a, p, r, factor=GRAD_FACTOR, floor=_floor(dtype, r), name=f"d{name} {dtype}")
    if not x_grad:
        assert l_c.grad is None and x_c.grad is None


# -------------------------------------------------------------------------------------- low precision
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_cpu_within_2x_of_same_dtype_reference(case, dtype):
    _compare_2x(case, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", [CASES[1], CASES[2], CASES[8]], ids=[CASES[1].id, CASES[2].id, CASES[8].id])
def test_cpu_x_without_grad(case, dtype):
    _compare_2x(case, dtype, x_grad=False)


def test_cpu_only_some_inputs_need_grad():
    case = CASES[0]
    leaf, x, (weight, bias, pos, prefix), g = _inputs(case, F64)
    leaf.requires_grad_(False)
    weight.requires_grad_(False)
    bias.requires_grad_(False)
    out, grads = _run("cpu", leaf, x, [weight, bias, pos, prefix], g)
    out_r, grads_r = _run("reference", leaf, x, [weight, bias, pos, prefix], g)
    assert max_err(out, out_r) < 1e-12
    assert grads[0] is None and grads[1] is None and grads[2] is None
    assert weight.grad is None and bias.grad is None and leaf.grad is None
    for a, r in zip(grads[3:], grads_r[3:]):
        assert a is not None and max_err(a, r) < 1e-12


# -------------------------------------------------------------------------------------------- float64
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_cpu_float64_equals_reference(case):
    leaf, x, params, g = _inputs(case, F64)
    out_ref, grads_ref = _run("reference", leaf, x, params, g)
    out, grads = _run("cpu", leaf, x, params, g)
    assert out.shape == out_ref.shape and out.dtype == F64
    assert max_err(out, out_ref) < 1e-12
    for name, a, r in zip(NAMES, grads, grads_ref):
        if r is None:
            assert a is None
            continue
        assert a is not None and a.shape == r.shape, f"d{name}"
        assert a.abs().max() > 0
        assert max_err(a, r) < 1e-12, f"d{name}: {max_err(a, r):.3e}"


def test_cpu_empty_prefix_tensor():
    case = CASES[0]
    leaf, x, (weight, bias, _, _), g = _inputs(case, F64)
    E, Np = case.E, case.num_patches
    prefix = torch.zeros(1, 0, E, dtype=F64, requires_grad=True)
    pos = torch.randn(1, Np, E, dtype=F64, requires_grad=True)
    g = torch.randn(case.x_shape[0], Np, E, dtype=F64)
    out, grads = _run("cpu", leaf, x, [weight, bias, pos, prefix], g)
    out_r, grads_r = _run("reference", leaf, x, [weight, bias, pos, prefix], g)
    assert max_err(out, out_r) < 1e-12
    for a, r in zip(grads, grads_r):
        assert (a is None) == (r is None)
        if a is not None:
            assert a.shape == r.shape and max_err(a, r) < 1e-12


def test_dispatch_picks_cpu_for_cpu_tensors():
    case = CASES[1]
    leaf, x, (weight, bias, pos, prefix), _ = _inputs(case, torch.float32)
    with torch.no_grad():
        x32, w32 = x.float(), weight.float()
        b32, pos32, pre32 = bias.float(), pos.float(), prefix.float()
        auto = patch_embed(x32, w32, b32, pos_embed=pos32, prefix_tokens=pre32)
        cpu = patch_embed(x32, w32, b32, pos_embed=pos32, prefix_tokens=pre32, backend="cpu")
    assert torch.equal(auto, cpu)


# ---------------------------------------------------------------------------------------- determinism
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", [CASES[1], CASES[2], CASES[7]], ids=[CASES[1].id, CASES[2].id, CASES[7].id])
def test_cpu_forward_backward_bitwise_deterministic(case, dtype):
    leaf, x, params, g = _inputs(case, dtype)
    l1, x1, p1 = _cast_like(case, leaf, x, params, dtype)
    first = _run("cpu", l1, x1, p1, g)
    second = _run("cpu", l1, x1, p1, g)
    assert torch.equal(first[0], second[0])
    for a, b in zip(first[1], second[1]):
        assert (a is None) == (b is None)
        if a is not None:
            assert torch.equal(a, b)


def test_cpu_big_shape_is_correct():
    B, C, S, p, E, P = 4, 3, 64, 16, 64, 1
    Np = (S // p) ** 2
    x = torch.randn(B, C, S, S).requires_grad_(True)
    weight = (torch.randn(E, C, p, p) / (C * p * p) ** 0.5).requires_grad_(True)
    bias = torch.randn(E, requires_grad=True)
    pos = torch.randn(1, P + Np, E, requires_grad=True)
    prefix = torch.randn(1, P, E, requires_grad=True)
    g = torch.randn(B, P + Np, E)
    leaves = [x, weight, bias, pos, prefix]
    fn = lambda: patch_embed(x, weight, bias, pos_embed=pos, prefix_tokens=prefix, backend="cpu")  # noqa: E731
    out, grads = run_with_grads(fn, leaves, g)

    x64, w64, b64, pos64, pre64 = (t.detach().double().requires_grad_(True) for t in leaves)
    out_ref, grads_ref = run_with_grads(
        lambda: patch_embed(x64, w64, b64, pos_embed=pos64, prefix_tokens=pre64, backend="reference"),
        [x64, w64, b64, pos64, pre64], g.double())
    out_pt, grads_pt = run_with_grads(
        lambda: patch_embed(x, weight, bias, pos_embed=pos, prefix_tokens=prefix, backend="reference"), leaves, g)
    assert_close_2x(out, out_pt, out_ref, factor=2.0, floor=_floor(torch.float32, out_ref), name="forward")
    for name, a, pt, r in zip(NAMES, grads, grads_pt, grads_ref):
        assert_close_2x(a, pt, r, factor=GRAD_FACTOR, floor=_floor(torch.float32, r), name=f"d{name}")


@pytest.mark.parametrize("shape,patch,layout", [
    ((2, 3, 16, 16), (4, 4), "contig"), ((2, 3, 16, 16), (4, 4), "channels_last"), ((1, 3, 4, 8, 8), (2, 2, 2), "contig"),
    ((1, 3, 4, 8, 8), (2, 2, 2), "channels_last"), ((2, 4, 12, 12), (4, 4), "slice"),
], ids=["2d", "2d-channels-last", "3d", "3d-channels-last", "2d-strided"])
@pytest.mark.parametrize("with_extras", [False, True], ids=["plain", "bias-pos-prefix"])
def test_cpu_inference_of_small_patches_takes_the_conv_and_matches(monkeypatch, shape, patch, layout, with_extras):
    # K = C * prod(patch) <= CONV_MAX_K: in inference the projection is torch's conv (training takes the GEMM)
    import torch.nn.functional as F

    from vitkernels.ops.patch_embed.cpu import CONV_MAX_K

    convs = []
    for name in ("conv2d", "conv3d"):
        original = getattr(F, name)
        monkeypatch.setattr(F, name, lambda *a, _f=original, **k: convs.append(1) or _f(*a, **k))

    x64 = torch.randn(*shape, dtype=F64)
    if layout == "slice":
        x64 = torch.randn(shape[0], shape[1] * 2, *shape[2:], dtype=F64)[:, ::2]
    C, E = x64.shape[1], 24
    assert C * math.prod(patch) <= CONV_MAX_K
    w64 = torch.randn(E, C, *patch, dtype=F64)
    num = math.prod(s // p for s, p in zip(shape[2:], patch))
    extras = dict(bias=torch.randn(E, dtype=F64), pos_embed=torch.randn(1, 1 + num, E, dtype=F64),
                  prefix_tokens=torch.randn(1, 1, E, dtype=F64)) if with_extras else {}
    ref = patch_embed(x64, w64, backend="reference", **extras)
    fmt = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
    x32 = x64.float().contiguous(memory_format=fmt) if layout == "channels_last" else x64.float()
    args32 = {k: v.float() for k, v in extras.items()}
    with torch.no_grad():
        out = patch_embed(x32, w64.float(), backend="cpu", **args32)
        out_pt = patch_embed(x64.float(), w64.float(), backend="reference", **args32)
    assert out.shape == ref.shape and out.is_contiguous()
    assert len(convs) == 1  # the cpu backend's conv (the reference never calls one)
    assert_close_2x(out, out_pt, ref, factor=2.0, floor=_floor(torch.float32, ref), name="conv path")

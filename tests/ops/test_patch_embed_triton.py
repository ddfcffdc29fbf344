"""The triton backend of patch_embed against the reference with the 2x criterion (same cases as the cpu
backend: 2-D/3-D, prefix P = 0/1/2, pos with and without prefix rows, channels-last and sliced x; plus the
k-orders' own cases: /16 and /14 on NCHW and channels-last images, a crop of a channels-last image, a
channels-last weight), on CPU under the interpreter; GPU-marked cases at ViT sizes when a GPU is present."""
import os

import pytest
import torch

import vitkernels
from tests.ops.test_patch_embed_cpu import _compare_2x
from tests.ops.test_patch_embed_reference import CASE_IDS, CASES, Case
from tests.utils import assert_close_2x

pytest.importorskip("triton")
pytestmark = pytest.mark.triton  # compiled on a GPU in make test's GPU step

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
DEVICE = "cuda" if torch.cuda.is_available() and not INTERPRET else "cpu"
if DEVICE == "cpu" and not INTERPRET:
    pytest.skip("triton needs a CUDA device or TRITON_INTERPRET=1", allow_module_level=True)

DTYPES = [
    pytest.param(torch.float32, id="fp32"),
    pytest.param(torch.float16, id="fp16"),
    pytest.param(torch.bfloat16, id="bf16", marks=pytest.mark.skipif(
        INTERPRET, reason="bf16 tl.dot returns garbage under the Triton interpreter: bf16 is verified on a GPU only")),
]


@pytest.mark.skipif(DEVICE != "cpu", reason="these cases build CPU tensors (interpreter)")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_triton_within_2x_of_same_dtype_reference(case, dtype):
    _compare_2x(case, dtype, backend="triton")


@pytest.mark.skipif(DEVICE != "cpu", reason="these cases build CPU tensors (interpreter)")
@pytest.mark.parametrize("case", [CASES[1], CASES[2], CASES[8]], ids=[CASES[1].id, CASES[2].id, CASES[8].id])
def test_triton_x_without_grad(case):
    _compare_2x(case, torch.float32, x_grad=False, backend="triton")


# The k-order follows x's layout (channels-last: k = (dt, dh, dw, c)); the weight is read as (E, K) rows in
# that order, a view or a zero-padded copy (K = 588 at /14): one case per branch, both orders at /16 and /14.
ORDER_CASES = [
    Case((2, 3, 32, 48), (16, 16), 24, 1, "full", True, "channels_last"),  # /16 RGB: rows of 48, weight copied
    Case((2, 3, 28, 42), (14, 14), 16, 1, "full", True, "contig"),  # /14 NCHW: weight rows padded to 592
    Case((2, 4, 16, 24), (4, 8), 12, 2, "patches", False, "channels_last"),  # C = 4, non-square patch
    Case((2, 3, 4, 28, 28), (2, 14, 14), 8, 1, "full", True, "channels_last"),  # tubelets, channels_last_3d
]


@pytest.mark.skipif(DEVICE != "cpu", reason="these cases build CPU tensors (interpreter)")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", ORDER_CASES, ids=[c.id for c in ORDER_CASES])
def test_triton_k_orders_within_2x_of_same_dtype_reference(case, dtype):
    _compare_2x(case, dtype, backend="triton")


def test_k_order_follows_the_layout():
    from vitkernels.ops.patch_embed.triton import _as_5d, _k_order, _weight_rows

    x = torch.empty(2, 3, 32, 32)
    cl = x.contiguous(memory_format=torch.channels_last)
    assert _k_order(_as_5d(x)) == dict(CHANNELS_LAST=False, C_IN=3)
    assert _k_order(_as_5d(cl)) == dict(CHANNELS_LAST=True, C_IN=3)
    assert _k_order(_as_5d(cl[:, :, 1:17, 2:30])) == dict(CHANNELS_LAST=True, C_IN=3)  # a crop keeps its runs
    assert not _k_order(_as_5d(cl[:, ::2]))["CHANNELS_LAST"]  # every other channel: general strides
    assert _k_order(torch.empty(1, 3, 2, 8, 8).contiguous(memory_format=torch.channels_last_3d))["CHANNELS_LAST"]
    assert not _k_order(_as_5d(torch.empty(2, 1, 16, 16).contiguous(memory_format=torch.channels_last)))[
        "CHANNELS_LAST"]  # one channel: both orders are the same
    w16, w14 = torch.randn(8, 3, 16, 16), torch.randn(8, 3, 14, 14)
    rows = _weight_rows(_as_5d(w16), False)
    assert rows.data_ptr() == w16.data_ptr() and rows.stride() == (768, 1)  # NCHW /16: a view
    rows = _weight_rows(_as_5d(w16), True)  # (E, ph, pw, C) rows: k = (dh * 16 + dw) * 3 + c
    assert torch.equal(rows, w16.permute(0, 2, 3, 1).reshape(8, -1))
    w16_cl = w16.contiguous(memory_format=torch.channels_last)
    rows = _weight_rows(_as_5d(w16_cl), True)  # a channels-last weight is already in that order: a view
    assert rows.data_ptr() == w16_cl.data_ptr() and rows.stride() == (768, 1)
    rows = _weight_rows(_as_5d(w14), False)  # K = 588: rows padded to 592 with zeros
    assert rows.shape == (8, 592) and torch.equal(rows[:, :588], w14.reshape(8, -1)) and not rows[:, 588:].any()


@pytest.mark.skipif(DEVICE != "cpu", reason="these cases build CPU tensors (interpreter)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_triton_crop_of_a_channels_last_image(dtype):
    """A crop of a channels-last image (unit channel stride, no dense dim) takes the channels-last order; dx
    comes back channels-last."""
    torch.manual_seed(0)
    big = torch.randn(2, 3, 33, 37, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(16, 3, 14, 14, dtype=torch.float64) / 24, torch.randn(16, dtype=torch.float64)
    cls, pos = torch.randn(1, 1, 16, dtype=torch.float64), torch.randn(1, 5, 16, dtype=torch.float64)
    g = torch.randn(2, 5, 16, dtype=torch.float64)
    big, w, b, cls, pos, g = (t.to(dtype).to(torch.float64) for t in (big, w, b, cls, pos, g))
    big = big.contiguous(memory_format=torch.channels_last)
    res = {}
    for name, cast, backend in (("ref", torch.float64, "reference"), ("pt", dtype, "reference"),
                                ("tri", dtype, "triton")):
        leaf = big.to(cast).contiguous(memory_format=torch.channels_last)[:, :, 2:30, 5:33].detach().requires_grad_()
        assert leaf.stride(1) == 1 and not leaf.is_contiguous(memory_format=torch.channels_last)
        ts = [leaf] + [t.to(cast).requires_grad_() for t in (w, b, pos, cls)]
        out = vitkernels.patch_embed(ts[0], ts[1], ts[2], pos_embed=ts[3], prefix_tokens=ts[4], backend=backend)
        res[name] = [out] + list(torch.autograd.grad(out, ts, g.to(cast)))  # dx as returned, not accumulated
    assert res["tri"][1].is_contiguous(memory_format=torch.channels_last)
    for i, (a, p, r) in enumerate(zip(res["tri"], res["pt"], res["ref"])):
        assert_close_2x(a, p, r, factor=2.0 if i == 0 else 3.0, floor=torch.finfo(dtype).eps / 8 * r.abs().max().item(),
                        name=f"output {i}")


def _run_twice(x, w, b, pos, cls, g):
    runs = []
    for _ in range(2):
        ts = [t.clone().requires_grad_() for t in (x, w, b, pos, cls)]
        out = vitkernels.patch_embed(ts[0], ts[1], ts[2], pos_embed=ts[3], prefix_tokens=ts[4], backend="triton")
        runs.append([out] + list(torch.autograd.grad(out, ts, g)))  # the gradients as the op returns them
    return runs


@pytest.mark.parametrize("layout", ["channels_last-p16", "channels_last-p14", "nchw-p14", "channels_last_3d"])
def test_triton_backward_is_deterministic_and_keeps_channels_last(layout):
    """Bitwise equal outputs and gradients over two runs, on both k-orders; dx keeps x's memory format, dW
    has the weight's plain strides whatever the k-order."""
    torch.manual_seed(0)
    if layout == "channels_last_3d":
        x = torch.randn(2, 3, 4, 16, 16, device=DEVICE).contiguous(memory_format=torch.channels_last_3d)
        w, fmt = torch.randn(24, 3, 2, 8, 8, device=DEVICE) * 0.1, torch.channels_last_3d
        n = 2 * 2 * 2
    else:
        p = 16 if layout.endswith("p16") else 14
        x = torch.randn(2, 3, 2 * p, 2 * p, device=DEVICE)
        fmt = torch.channels_last if layout.startswith("channels_last") else torch.contiguous_format
        x = x.contiguous(memory_format=fmt)
        w, n = torch.randn(24, 3, p, p, device=DEVICE) * 0.1, 4
    b, cls = torch.randn(24, device=DEVICE), torch.randn(1, 1, 24, device=DEVICE)
    pos, g = torch.randn(1, n + 1, 24, device=DEVICE), torch.randn(2, n + 1, 24, device=DEVICE)
    runs = _run_twice(x, w, b, pos, cls, g)
    for a, c in zip(*runs):
        assert torch.equal(a, c)
    assert runs[0][1].is_contiguous(memory_format=fmt)
    assert runs[0][2].stride() == w.stride()


def test_triton_channels_last_weight_gives_the_same_bits():
    """A channels-last weight is read in place in the channels-last order (no copy) and gives bitwise what the
    plain weight gives; its gradient still has the plain Conv weight strides."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32, device=DEVICE).contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(24, 3, 16, 16, device=DEVICE) * 0.1, torch.randn(24, device=DEVICE)
    cls, pos = torch.randn(1, 1, 24, device=DEVICE), torch.randn(1, 5, 24, device=DEVICE)
    g = torch.randn(2, 5, 24, device=DEVICE)
    plain = _run_twice(x, w, b, pos, cls, g)[0]
    w_cl = w.contiguous(memory_format=torch.channels_last)
    cl = _run_twice(x, w_cl, b, pos, cls, g)[0]
    for a, c in zip(plain, cl):
        assert torch.equal(a, c)
    assert cl[2].stride() == w.stride()


@pytest.mark.skipif(DEVICE != "cpu", reason="these cases build CPU tensors (interpreter)")
@pytest.mark.parametrize("case", [CASES[1], CASES[8]], ids=[CASES[1].id, CASES[8].id])
def test_triton_dweight_split_over_patch_rows(monkeypatch, case):
    # dW is reduced over the patch rows in splits (split-K) summed in a fixed order; small inputs take one
    # split, so force uneven ones: rows of 40 (last split shorter), then every row alone
    from vitkernels.ops.patch_embed import triton as patch_triton

    for rows in (40, 1):
        monkeypatch.setattr(patch_triton, "_dw_splits", lambda m, e, k, r=rows: (-(-m // r), r))
        _compare_2x(case, torch.float32, backend="triton")


def test_dweight_splits_depend_on_the_shape_only():
    from vitkernels.ops.patch_embed.triton import DW_MIN_SPLIT_ROWS, _dw_splits

    assert _dw_splits(128 * 196, 768, 768) == (14, 1792)  # ViT-B/16 at batch 128: 36 tiles x 14 splits = 504
    assert _dw_splits(196, 768, 768) == (1, 256)  # batch 1: one split
    for m in (1, 1000, 5000, 25088, 10 ** 6):
        splits, rows = _dw_splits(m, 384, 588)
        assert rows % 128 == 0 and (splits - 1) * rows < m <= splits * rows
        assert splits == 1 or rows >= DW_MIN_SPLIT_ROWS - 127


def test_triton_refuses_float64():
    x = torch.randn(1, 3, 16, 16, dtype=torch.float64, device=DEVICE)
    with pytest.raises(vitkernels.BackendUnavailableError, match="float64 is not supported by the triton kernels"):
        vitkernels.patch_embed(x, torch.randn(8, 3, 16, 16, dtype=torch.float64, device=DEVICE), backend="triton")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=["fp16", "bf16", "fp32"])
@pytest.mark.parametrize("x_shape,patch,E,P", [((32, 3, 224, 224), (16, 16), 768, 1), ((8, 3, 336, 336), (14, 14), 1024, 1),
                                              ((32, 3, 224, 224), (4, 4), 96, 0), ((2, 3, 16, 224, 224), (2, 16, 16), 768, 0)],
                         ids=["vitB16", "vitL14-336", "swin-p4", "video-2x16x16"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_gpu_vit_shapes(dtype, x_shape, patch, E, P, layout):
    x = torch.randn(x_shape, device="cuda")
    if layout == "channels_last":  # the channels-last k-order (dt, dh, dw, c)
        x = x.contiguous(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
    w = torch.randn(E, x_shape[1], *patch, device="cuda") * 0.02
    b = torch.randn(E, device="cuda") * 0.02
    n = 1
    for s, p in zip(x_shape[2:], patch):
        n *= s // p
    pos = torch.randn(1, P + n, E, device="cuda") * 0.02
    cls = torch.randn(1, P, E, device="cuda") if P else None
    g = torch.randn(x_shape[0], P + n, E, device="cuda")
    res = {}
    for name, cast, backend in (("ref", torch.float64, "reference"), ("pt", dtype, "reference"), ("tri", dtype, "triton")):
        ts = [t.to(cast).requires_grad_() if t is not None else None for t in (x, w, b, pos, cls)]
        out = vitkernels.patch_embed(ts[0], ts[1], ts[2], pos_embed=ts[3], prefix_tokens=ts[4], backend=backend)
        out.backward(g.to(cast))
        res[name] = [out] + [t.grad for t in ts if t is not None]
    for i, (a, p, r) in enumerate(zip(res["tri"], res["pt"], res["ref"])):
        assert_close_2x(a, p, r, factor=2.0 if i == 0 else 3.0, floor=1e-3 if dtype != torch.float32 else 1e-5,
                        name=f"output {i}")

"""The triton backend of patch_embed against the reference with the 2x criterion (same cases as the cpu
backend: 2-D/3-D, prefix P = 0/1/2, pos with and without prefix rows, channels-last and sliced x), on CPU
under the interpreter; GPU-marked cases at ViT sizes when a GPU is present."""
import os

import pytest
import torch

import vitkernels
from tests.ops.test_patch_embed_cpu import _compare_2x
from tests.ops.test_patch_embed_reference import CASE_IDS, CASES
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


def test_triton_backward_is_deterministic_and_keeps_channels_last():
    x = torch.randn(2, 3, 32, 32, device=DEVICE).to(memory_format=torch.channels_last)
    w, b = torch.randn(24, 3, 16, 16, device=DEVICE) * 0.1, torch.randn(24, device=DEVICE)
    cls, pos = torch.randn(1, 1, 24, device=DEVICE), torch.randn(1, 5, 24, device=DEVICE)
    g = torch.randn(2, 5, 24, device=DEVICE)
    runs = []
    for _ in range(2):
        ts = [t.clone().requires_grad_() for t in (x, w, b, pos, cls)]
        out = vitkernels.patch_embed(ts[0], ts[1], ts[2], pos_embed=ts[3], prefix_tokens=ts[4], backend="triton")
        out.backward(g)
        runs.append([out] + [t.grad for t in ts])
    for a, c in zip(*runs):
        assert torch.equal(a, c)
    assert runs[0][1].is_contiguous(memory_format=torch.channels_last)


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
def test_gpu_vit_shapes(dtype, x_shape, patch, E, P):
    x = torch.randn(x_shape, device="cuda")
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

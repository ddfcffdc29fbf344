"""Shared test helpers: the flash-attn accuracy criterion and input builders."""
from __future__ import annotations

import torch


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def assert_close_2x(out, out_pt, out_ref, *, factor: float = 2.0, floor: float = 1e-6, name: str = "output"):
    """flash-attn's criterion: |out - ref| <= factor * |out_pt - ref| + floor.

    ``out_ref``: the reference on fp64-upcast inputs; ``out_pt``: the reference in the backend's own
    dtype (what PyTorch's own same-dtype math gets); ``out``: the backend under test.
    """
    assert out.shape == out_ref.shape, f"{name}: shape {tuple(out.shape)} != {tuple(out_ref.shape)}"
    assert torch.isfinite(out).all(), f"{name}: non-finite values in the backend's result"
    err = max_err(out, out_ref)
    err_pt = max_err(out_pt, out_ref)
    bound = factor * err_pt + floor
    if err > bound:
        diff = (out.double() - out_ref.double()).abs()
        where = tuple(int(i) for i in torch.nonzero(diff == diff.max())[0])
        raise AssertionError(f"{name}: max error {err:.3e} (mean {diff.mean().item():.3e}, at {where}) exceeds "
                             f"{factor} x PyTorch same-dtype error {err_pt:.3e} + {floor:.1e}")


def qkv_views(B, H, N, D, dtype=torch.float32, device="cpu", requires_grad=False):
    """q, k, v as the strided views of one (B, N, 3, H, D) tensor (timm's layout), plus the base."""
    base = torch.randn(B, N, 3, H, D, dtype=dtype, device=device, requires_grad=requires_grad)
    q, k, v = base.permute(2, 0, 3, 1, 4).unbind(0)
    return q, k, v, base


def onnx_run(module, example, other, *, dynamo: bool = False):
    """Export ``module`` to ONNX on ``example`` (torch's TorchScript-based exporter, or the dynamo one) and run
    the exported graph in onnxruntime on ``other``: a graph that ignores its input shows here. Skips
    without onnx / onnxruntime (/ onnxscript for dynamo). Asserts the graph has exactly one input."""
    import io

    import pytest

    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    if dynamo:
        pytest.importorskip("onnxscript")
        proto = torch.onnx.export(module, (example,), dynamo=True, verbose=False).model_proto.SerializeToString()
    else:
        buffer = io.BytesIO()
        torch.onnx.export(module, (example,), buffer, dynamo=False, input_names=["x"])
        proto = buffer.getvalue()
    session = ort.InferenceSession(proto, providers=["CPUExecutionProvider"])
    inputs = session.get_inputs()
    assert len(inputs) == 1, f"the exported graph has inputs {[i.name for i in inputs]}"
    (out,) = session.run(None, {inputs[0].name: other.numpy()})
    return torch.from_numpy(out)

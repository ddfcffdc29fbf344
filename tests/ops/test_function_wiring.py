"""The per-op autograd.Functions pass a backend's forward/backward through correctly: checked with
kernel pairs computed from the references (gradients of every input, broadcast biases, tables)."""
import pytest
import torch

from vitkernels.ops.window_attention.checks import check_window_inputs
from vitkernels.ops.window_attention.function import ReplayKernels, window_attention_function
from vitkernels.ops.window_attention.reference import window_attention_reference

f64 = torch.float64


@pytest.mark.parametrize("spatial,window,shift", [((9, 11), 4, 2), ((3, 5, 6), (2, 3, 3), (1, 1, 2))],
                         ids=["2d-shift-pad", "3d-shift-pad"])
def test_window_function_matches_autograd_through_the_reference(spatial, window, shift):
    heads, hd = 2, 8
    nd = len(spatial)
    window = (window,) * nd if isinstance(window, int) else window
    shift = (shift,) * nd if isinstance(shift, int) else shift
    rows = 1
    for w in window:
        rows *= 2 * w - 1
    qkv = torch.randn(2, *spatial, 3 * heads * hd, dtype=f64, requires_grad=True)
    table = torch.randn(rows, heads, dtype=f64, requires_grad=True)
    qkv_bias = torch.randn(3 * heads * hd, dtype=f64, requires_grad=True)
    inputs = check_window_inputs(qkv, heads, window, shift, table, qkv_bias)
    out = window_attention_function(ReplayKernels, inputs)
    ref = window_attention_reference(qkv, heads, window, shift, table, qkv_bias)
    g = torch.randn_like(ref)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    got = torch.autograd.grad(out, (qkv, table, qkv_bias), g)
    want = torch.autograd.grad(ref, (qkv, table, qkv_bias), g)
    for name, a, b in zip(("qkv", "rel_pos_bias", "qkv_bias"), got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12, msg=lambda m: f"d{name}: {m}")


def test_window_function_skips_gradients_nobody_asked_for():
    qkv = torch.randn(1, 5, 5, 48, dtype=f64, requires_grad=True)
    table = torch.randn(25, 2, dtype=f64)  # no grad wanted
    inputs = check_window_inputs(qkv, 2, 3, 1, table, None)
    out = window_attention_function(ReplayKernels, inputs)
    out.sum().backward()
    assert qkv.grad is not None and table.grad is None

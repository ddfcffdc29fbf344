"""The ops where a real call is replaced: meta tensors, empty tensors (a zero-size dim), torch.jit.trace /
ONNX export (the reference math is recorded, never a constant) and FX symbolic tracing (one node per op).
Each against what torch itself gives."""
import io

import pytest
import torch
import torch.nn.functional as F

import vitkernels
from vitkernels import dispatch, flash_attention, patch_embed, window_attention
from vitkernels.ops.window_attention.reference import window_attention_reference
from tests.utils import onnx_run

BACKENDS = [None, "reference", pytest.param("triton", marks=pytest.mark.triton)]


def attention_inputs(B, H, Nq, Nk, D=32, device="cpu", requires_grad=True):
    g = torch.Generator().manual_seed(0)
    make = lambda *s: torch.randn(*s, generator=g).to(device).requires_grad_(requires_grad)  # noqa: E731
    return make(B, H, Nq, D), make(B, H, Nk, D), make(B, H, Nk, D), make(1, H, Nq, Nk)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(2, 3, 0, 7), (2, 3, 5, 0), (0, 3, 5, 7), (2, 0, 5, 7)],
                         ids=["Nq0", "Nk0", "B0", "H0"])
def test_flash_attention_on_empty_inputs_gives_sdpas_result_and_grads(shape, backend):
    q, k, v, bias = attention_inputs(*shape)
    out = flash_attention(q, k, v, bias=bias, backend=backend)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    torch.testing.assert_close(out, expected)
    grads = torch.autograd.grad(out.sum(), (q, k, v, bias), allow_unused=True)
    grads_sdpa = torch.autograd.grad(expected.sum(), (q, k, v, bias), allow_unused=True)
    for ours, theirs, t in zip(grads, grads_sdpa, (q, k, v, bias)):  # an unused empty input: None or zeros
        zeros = torch.zeros_like(t)
        torch.testing.assert_close(zeros if ours is None else ours, zeros if theirs is None else theirs)


def test_empty_inputs_are_explained_and_logged_as_data_free():
    q, k, v, _ = attention_inputs(2, 3, 5, 0, requires_grad=False)
    explanation = vitkernels.explain(flash_attention, q, k, v, backend="triton")
    assert explanation.chosen == "reference" and explanation.source == dispatch.DATA_FREE


@pytest.mark.parametrize("backend", BACKENDS)
def test_window_attention_with_no_batch(backend):
    qkv = torch.randn(0, 9, 9, 96, requires_grad=True)
    table = torch.randn(169, 2, requires_grad=True)
    bias = torch.randn(96, requires_grad=True)
    out = window_attention(qkv, num_heads=2, window_size=7, shift_size=3, rel_pos_bias=table, qkv_bias=bias,
                           backend=backend)
    assert out.shape == (0, 9, 9, 32)
    grads = torch.autograd.grad(out.sum(), (qkv, table, bias))
    assert [tuple(g.shape) for g in grads] == [(0, 9, 9, 96), (169, 2), (96,)]
    assert not any(g.any() for g in grads)


@pytest.mark.parametrize("backend", [None, "reference", pytest.param("cpu", marks=pytest.mark.ext)])
def test_patch_embed_with_no_batch(backend):
    pytest.importorskip("vitkernels._C") if backend == "cpu" else None
    x = torch.randn(0, 3, 32, 32)
    weight = torch.randn(8, 3, 16, 16, requires_grad=True)
    pos = torch.randn(1, 5, 8, requires_grad=True)
    out = patch_embed(x, weight, torch.randn(8), pos_embed=pos, prefix_tokens=torch.randn(1, 1, 8), backend=backend)
    assert out.shape == (0, 5, 8)
    grads = torch.autograd.grad(out.sum(), (weight, pos))
    assert not any(g.any() for g in grads)


def test_meta_tensors_give_torchs_shapes_and_backward():
    q, k, v, bias = attention_inputs(2, 3, 5, 7, device="meta")
    out = flash_attention(q, k, v, bias=bias)
    assert out.is_meta and out.shape == F.scaled_dot_product_attention(q, k, v, attn_mask=bias).shape
    out.sum().backward()
    assert q.grad.is_meta and bias.grad.shape == bias.shape

    qkv = torch.randn(2, 9, 9, 96, device="meta", requires_grad=True)
    table = torch.randn(169, 2, device="meta", requires_grad=True)
    out = window_attention(qkv, num_heads=2, window_size=7, shift_size=3, rel_pos_bias=table)
    assert out.is_meta and out.shape == (2, 9, 9, 32)
    out.sum().backward()
    assert table.grad.is_meta and table.grad.shape == table.shape

    x = torch.randn(2, 3, 32, 32, device="meta")
    weight = torch.randn(8, 3, 16, 16, device="meta", requires_grad=True)
    out = patch_embed(x, weight, pos_embed=torch.randn(1, 5, 8, device="meta"),
                      prefix_tokens=torch.randn(1, 1, 8, device="meta"))
    assert out.is_meta and out.shape == (2, 5, 8)
    out.sum().backward()
    assert weight.grad.is_meta


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("size", [7, 9], ids=["unpadded", "padded"])
def test_window_attention_with_only_qkv_bias_requiring_grad(size, backend):
    qkv = torch.randn(2, size, size, 96, dtype=torch.float64 if backend == "reference" else torch.float32)
    bias = torch.randn(96, dtype=qkv.dtype, requires_grad=True)
    out = window_attention(qkv, num_heads=2, window_size=7, shift_size=3, qkv_bias=bias, backend=backend)
    assert out.requires_grad
    cot = torch.randn_like(out)
    (grad,) = torch.autograd.grad(out, bias, cot)
    bias64 = bias.detach().double().requires_grad_()
    expected = window_attention_reference(qkv.double(), 2, (7, 7), (3, 3), None, bias64, None)
    (grad64,) = torch.autograd.grad(expected, bias64, cot.double())
    if size == 7:
        assert not grad64.any() and not grad.any()
    else:
        assert grad64.abs().max() > 0
        torch.testing.assert_close(grad.double(), grad64, rtol=1e-4, atol=1e-5)


class _AllThree(torch.nn.Module):
    """patch_embed -> flash_attention, and window_attention on the token map."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(48, 3, 8, 8) * 0.1)
        self.table = torch.nn.Parameter(torch.randn(49, 2))
        self.qkv_bias = torch.nn.Parameter(torch.randn(144))

    def forward(self, x):
        tokens = patch_embed(x, self.weight)  # B, 16, 48
        B, N, E = tokens.shape
        q = tokens.view(B, N, 2, 24).transpose(1, 2)
        a = flash_attention(q, q, q)
        maps = tokens.view(B, 4, 4, E).repeat(1, 1, 1, 3)
        w = window_attention(maps, num_heads=2, window_size=7, rel_pos_bias=self.table, qkv_bias=self.qkv_bias)
        return a.sum(dim=(1, 2)) + w.sum(dim=(1, 2, 3))[:, None]


def test_jit_trace_records_the_reference_math_and_saves():
    module = _AllThree()
    traced = torch.jit.trace(module, (torch.randn(2, 3, 32, 32),), check_trace=False)
    assert not [n for n in traced.inlined_graph.nodes() if n.kind() == "prim::PythonOp"]
    buffer = io.BytesIO()
    torch.jit.save(traced, buffer)
    buffer.seek(0)
    other = torch.randn(3, 3, 32, 32)  # another input, another batch: a baked-in constant would show
    torch.testing.assert_close(torch.jit.load(buffer)(other), module(other), rtol=1e-4, atol=1e-4)


def test_fx_symbolic_trace_keeps_each_op_as_one_node():
    module = _AllThree()
    graph_module = torch.fx.symbolic_trace(module)
    targets = [n.target for n in graph_module.graph.nodes if n.op == "call_function"]
    assert [t for t in targets if t in (patch_embed, flash_attention, window_attention)] == \
        [patch_embed, flash_attention, window_attention]
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(graph_module(x), module(x))


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript_exporter", "dynamo_exporter"])
def test_onnx_export_of_the_ops_takes_its_input(dynamo):
    module = _AllThree()
    other = torch.randn(2, 3, 32, 32)  # another input: a baked-in constant would show
    out = onnx_run(module, torch.randn(2, 3, 32, 32), other, dynamo=dynamo)
    torch.testing.assert_close(out, module(other).detach(), rtol=1e-4, atol=1e-4)


def test_a_clipped_window_says_it_was_clipped():
    with pytest.raises(ValueError, match=r"rel_pos_bias must have shape \(49, 2\).*window_size \(7, 7\) is "
                                         r"clipped to the \(4, 4\) map.*got \(169, 2\)"):
        window_attention(torch.randn(1, 4, 4, 96), num_heads=2, window_size=7, rel_pos_bias=torch.randn(169, 2))

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


# ---- flash_attention(rel_pos=...) --------------------------------------------------------------------------


class _SamLikeAttention(torch.nn.Module):
    """Global attention with decomposed relative position on a 4 x 5 grid, as SAM's blocks compute it."""

    def __init__(self):
        super().__init__()
        self.qkv = torch.nn.Linear(32, 96)
        self.rel_pos_h = torch.nn.Parameter(torch.randn(7, 16) * 0.2)
        self.rel_pos_w = torch.nn.Parameter(torch.randn(9, 16) * 0.2)

    def forward(self, x):  # B, 20, 32
        B, N, _ = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, 2, 16).permute(2, 0, 3, 1, 4).unbind(0)
        rel = vitkernels.decomposed_rel_pos(q, (4, 5), (4, 5), self.rel_pos_h, self.rel_pos_w)
        return flash_attention(q, k, v, rel_pos=rel).sum(dim=(1, 3))


def test_rel_pos_under_fx_is_one_node_and_under_jit_trace_is_the_dense_math():
    module = _SamLikeAttention()
    x, other = torch.randn(2, 20, 32), torch.randn(3, 20, 32)
    graph_module = torch.fx.symbolic_trace(module)
    assert [n.target for n in graph_module.graph.nodes if n.target is flash_attention] == [flash_attention]
    torch.testing.assert_close(graph_module(other), module(other))
    traced = torch.jit.trace(module, (x,), check_trace=False)
    assert not [n for n in traced.inlined_graph.nodes() if n.kind() == "prim::PythonOp"]
    torch.testing.assert_close(traced(other), module(other), rtol=1e-4, atol=1e-4)


def test_rel_pos_on_meta_and_empty_inputs():
    q = torch.randn(2, 3, 1 + 6, 16, device="meta", requires_grad=True)
    kv = torch.randn(2, 3, 1 + 4, 16, device="meta")
    rel_h, rel_w = (torch.randn(2, 3, 6, 2, device="meta", requires_grad=True) for _ in range(2))
    out = flash_attention(q, kv, kv, rel_pos=vitkernels.RelPos(rel_h, rel_w, prefix=1))
    assert out.is_meta and out.shape == (2, 3, 7, 16)
    out.sum().backward()
    assert rel_h.grad.is_meta and rel_h.grad.shape == rel_h.shape
    # no queries past the class token: the terms are empty, the class token attends as without them
    q, k, v = (torch.randn(2, 3, n, 16, requires_grad=True) for n in (1, 5, 5))
    rel = vitkernels.RelPos(torch.randn(2, 3, 0, 2), torch.randn(2, 3, 0, 2), prefix=1)
    out = flash_attention(q, k, v, rel_pos=rel)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v))


def test_rel_pos_under_autocast_takes_the_autocast_dtype():
    q, k, v = (torch.randn(1, 2, 12, 16) for _ in range(3))
    rel = (torch.randn(1, 2, 12, 3), torch.randn(1, 2, 12, 4))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = flash_attention(q, k, v, rel_pos=rel)
    assert out.dtype == torch.bfloat16
    expected = flash_attention(*(t.bfloat16() for t in (q, k, v)), rel_pos=tuple(t.bfloat16() for t in rel))
    torch.testing.assert_close(out, expected)


# ---- flash_attention(rope=...) and window_attention(cosine=True) -------------------------------------------


class _EvaLikeAttention(torch.nn.Module):
    """Attention with a class token and 2-D RoPE on a 4 x 5 grid, as EVA-02's blocks compute it (timm's
    [sin | cos] table, interleaved pairs)."""

    def __init__(self):
        super().__init__()
        self.qkv = torch.nn.Linear(32, 96)
        from timm.layers import RotaryEmbeddingCat

        self.register_buffer("emb", RotaryEmbeddingCat(16, in_pixels=False).get_embed((4, 5)))

    def forward(self, x):  # B, 1 + 20, 32
        B, N, _ = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, 2, 16).permute(2, 0, 3, 1, 4).unbind(0)
        sin, cos = self.emb.chunk(2, dim=-1)
        return flash_attention(q, k, v, rope=vitkernels.Rope(cos, sin, prefix=1)).sum(dim=(1, 3))


class _SwinV2LikeBlock(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = torch.nn.Linear(32, 96)
        self.logit_scale = torch.nn.Parameter(torch.log(10 * torch.ones(2, 1, 1)))
        self.table = torch.nn.Parameter(torch.randn(169, 2))

    def forward(self, x):  # B, 9, 10, 32
        return window_attention(self.qkv(x), num_heads=2, window_size=7, shift_size=3,
                                rel_pos_bias=16 * torch.sigmoid(self.table), cosine=True, logit_scale=self.logit_scale)


@pytest.mark.parametrize("name", ["rope", "cosine"])
def test_rope_and_cosine_under_fx_are_one_node_and_under_jit_trace_the_reference_math(name):
    pytest.importorskip("timm")
    module, op = (_EvaLikeAttention(), flash_attention) if name == "rope" else (_SwinV2LikeBlock(), window_attention)
    x, other = ((torch.randn(2, 21, 32), torch.randn(3, 21, 32)) if name == "rope"
                else (torch.randn(2, 9, 10, 32), torch.randn(3, 9, 10, 32)))
    graph_module = torch.fx.symbolic_trace(module)
    assert [n.target for n in graph_module.graph.nodes if n.target is op] == [op]
    torch.testing.assert_close(graph_module(other), module(other))
    traced = torch.jit.trace(module, (x,), check_trace=False)
    assert not [n for n in traced.inlined_graph.nodes() if n.kind() == "prim::PythonOp"]
    torch.testing.assert_close(traced(other), module(other), rtol=1e-4, atol=1e-4)


def test_rope_and_cosine_on_meta_and_empty_inputs():
    q = torch.randn(2, 3, 7, 16, device="meta", requires_grad=True)
    cos, sin = (torch.randn(6, 16, device="meta", requires_grad=True) for _ in range(2))
    out = flash_attention(q, q, q, rope=vitkernels.Rope(cos, sin, prefix=1))
    assert out.is_meta and out.shape == (2, 3, 7, 16)
    out.sum().backward()
    assert cos.grad.is_meta and cos.grad.shape == cos.shape
    # only the class token: the tables are empty, attention as without them
    q, k, v = (torch.randn(2, 3, 1, 16, requires_grad=True) for _ in range(3))
    out = flash_attention(q, k, v, rope=vitkernels.Rope(torch.randn(0, 16), torch.randn(0, 16), prefix=1))
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v))
    # cosine window attention on meta tensors and with no batch
    logit_scale = torch.zeros(2, 1, 1, device="meta", requires_grad=True)
    qkv = torch.randn(2, 9, 10, 96, device="meta", requires_grad=True)
    out = window_attention(qkv, num_heads=2, window_size=7, shift_size=3, cosine=True, logit_scale=logit_scale)
    assert out.is_meta and out.shape == (2, 9, 10, 32)
    out.sum().backward()
    assert logit_scale.grad.is_meta and logit_scale.grad.shape == (2, 1, 1)
    logit_scale = torch.zeros(2, 1, 1, requires_grad=True)
    out = window_attention(torch.randn(0, 9, 10, 96), num_heads=2, window_size=7, cosine=True, logit_scale=logit_scale)
    assert out.shape == (0, 9, 10, 32)


def test_rope_tables_and_logit_scale_stay_float32_under_autocast():
    """timm keeps its rope tables and Swin V2's logit scale in fp32 under autocast; casting the logit scale
    to bf16 would move logits of up to 100 by up to 0.4."""
    q, k, v = (torch.randn(1, 2, 12, 16) for _ in range(3))
    cos, sin = torch.randn(12, 16), torch.randn(12, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = flash_attention(q, k, v, rope=(cos, sin))
    assert out.dtype == torch.bfloat16
    expected = flash_attention(*(t.bfloat16() for t in (q, k, v)), rope=(cos, sin))
    torch.testing.assert_close(out, expected)
    qkv, logit_scale = torch.randn(1, 9, 10, 96), torch.full((2, 1, 1), 4.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = window_attention(qkv, num_heads=2, window_size=7, cosine=True, logit_scale=logit_scale)
    assert out.dtype == torch.bfloat16
    expected = window_attention(qkv.bfloat16(), num_heads=2, window_size=7, cosine=True, logit_scale=logit_scale)
    torch.testing.assert_close(out, expected)

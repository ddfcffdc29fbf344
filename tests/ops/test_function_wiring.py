"""The per-op autograd.Functions pass a backend's forward/backward through correctly, and the reference
kernel pairs (the plain forward/backward math the reference backend runs under torch.compile) equal
autograd through the references: every gradient, broadcast biases, tables, padding values, dropout."""
import pytest
import torch

from vitkernels.ops.attention.function import AttentionFunction
from vitkernels.ops.attention.reference import ReferenceAttentionKernels, attention_reference, reference_dropout_mask
from vitkernels.ops.patch_embed.function import PatchEmbedFunction
from vitkernels.ops.patch_embed.reference import ReferencePatchEmbedKernels, patch_embed_reference
from vitkernels.ops.window_attention.checks import check_window_inputs
from vitkernels.ops.window_attention.function import window_attention_function
from vitkernels.ops.window_attention.reference import ReferenceWindowKernels, window_attention_reference

f64 = torch.float64


def _grads(out, leaves, g):
    # a leaf the output does not depend on (qkv_bias without padding) has a zero gradient
    return torch.autograd.grad(out, leaves, g, allow_unused=True, materialize_grads=True)


def _close(got, want, names):
    for name, a, b in zip(names, got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=lambda m: f"d{name}: {m}")


WINDOW_CASES = [((9, 11), 4, 2), ((7, 7), 7, 0), ((8, 8), 4, 2), ((5, 6), 7, 3), ((3, 5, 6), (2, 3, 3), (1, 1, 2)),
                ((2, 4, 4), (2, 7, 7), (1, 3, 3))]


@pytest.mark.parametrize("spatial,window,shift", WINDOW_CASES,
                         ids=["2d-shift-pad", "2d-plain", "2d-shift", "2d-clipped", "3d-shift-pad", "3d-clipped"])
@pytest.mark.parametrize("with_table,with_bias", [(True, True), (False, False), (True, False)],
                         ids=["table+bias", "none", "table"])
def test_window_reference_kernels_match_autograd_through_the_reference(spatial, window, shift, with_table, with_bias):
    heads, hd = 2, 8
    nd = len(spatial)
    window = (window,) * nd if isinstance(window, int) else window
    shift = (shift,) * nd if isinstance(shift, int) else shift
    qkv = torch.randn(2, *spatial, 3 * heads * hd, dtype=f64, requires_grad=True)
    inputs = check_window_inputs(qkv, heads, window, shift)
    rows = 1
    for w in inputs.table_window:
        rows *= 2 * w - 1
    table = torch.randn(rows, heads, dtype=f64, requires_grad=True) if with_table else None
    qkv_bias = torch.randn(3 * heads * hd, dtype=f64, requires_grad=True) if with_bias else None
    inputs = check_window_inputs(qkv, heads, window, shift, table, qkv_bias)
    out = window_attention_function(ReferenceWindowKernels, inputs)
    ref = window_attention_reference(qkv, heads, window, shift, table, qkv_bias)
    g = torch.randn_like(ref)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    leaves = [t for t in (qkv, table, qkv_bias) if t is not None]
    _close(_grads(out, leaves, g), _grads(ref, leaves, g), ("qkv", "table", "qkv_bias"))


def test_window_function_skips_gradients_nobody_asked_for():
    qkv = torch.randn(1, 5, 5, 48, dtype=f64, requires_grad=True)
    table = torch.randn(25, 2, dtype=f64)  # no grad wanted
    inputs = check_window_inputs(qkv, 2, 3, 1, table, None)
    out = window_attention_function(ReferenceWindowKernels, inputs)
    out.sum().backward()
    assert qkv.grad is not None and table.grad is None


@pytest.mark.parametrize("bias_shape", [None, (1, 2, 9, 11), (2, 1, 1, 11), (9, 11)])
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_attention_reference_kernels_match_autograd_with_the_same_mask(bias_shape, dropout_p):
    torch.manual_seed(0)
    q = torch.randn(2, 2, 9, 16, dtype=f64, requires_grad=True)
    k, v = (torch.randn(2, 2, 11, 16, dtype=f64, requires_grad=True) for _ in range(2))
    bias = torch.randn(*bias_shape, dtype=f64, requires_grad=True) if bias_shape else None
    leaves = [t for t in (q, k, v, bias) if t is not None]
    state = torch.get_rng_state()
    out = AttentionFunction.apply(ReferenceAttentionKernels, q, k, v, bias, 0.3, dropout_p)
    mask = None
    if dropout_p:  # the mask the kernels drew: the one the same seed gives (drawn again from torch's RNG)
        torch.set_rng_state(state)
        rng = torch.randint(0, 2 ** 62, (2,), dtype=torch.int64)
        mask = reference_dropout_mask(rng, (2, 2, 9, 11), dropout_p, "cpu")
        assert 0.15 < 1 - mask.double().mean() < 0.45
    ref = attention_reference(q, k, v, bias, 0.3, dropout_p, mask)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    g = torch.randn_like(ref)
    _close(_grads(out, leaves, g), _grads(ref, leaves, g), ("q", "k", "v", "bias"))


@pytest.mark.parametrize("video,prefix,pos", [(False, 1, "all"), (False, 2, "patches"), (False, 0, None),
                                              (True, 1, "all")])
def test_patch_embed_reference_kernels_match_autograd(video, prefix, pos):
    E = 8
    x = torch.randn(2, 3, *((4, 8, 12) if video else (8, 12)), dtype=f64, requires_grad=True)
    weight = torch.randn(E, 3, *((2, 4, 4) if video else (4, 4)), dtype=f64, requires_grad=True)
    bias = torch.randn(E, dtype=f64, requires_grad=True)
    num_patches = (2 if video else 1) * 2 * 3
    prefix_tokens = torch.randn(1, prefix, E, dtype=f64, requires_grad=True) if prefix else None
    pos_embed = None
    if pos is not None:
        pos_embed = torch.randn(1, num_patches + (prefix if pos == "all" else 0), E, dtype=f64, requires_grad=True)
    tensors = (x, weight, bias, pos_embed, prefix_tokens)
    out = PatchEmbedFunction.apply(ReferencePatchEmbedKernels, *tensors)
    ref = patch_embed_reference(*tensors)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    leaves = [t for t in tensors if t is not None]
    g = torch.randn_like(ref)
    _close(_grads(out, leaves, g), _grads(ref, leaves, g), ("x", "w", "b", "pos", "prefix"))


@pytest.mark.parametrize("backend", ["reference", "cpu", pytest.param("triton", marks=pytest.mark.triton)])
@pytest.mark.parametrize("pos", ["all", "patches"])
def test_patch_embed_parameter_gradients_have_plain_strides(backend, pos):
    """The epilogue's gradients are slices of one batch sum; a gradient whose size-1 dims keep that sum's
    strides makes DDP warn and copy every step (tests/nn/test_distributed.py runs DDP itself)."""
    import vitkernels

    usable, why = vitkernels.available_backends()[backend]
    if not usable:
        pytest.skip(f"{backend}: {why}")
    torch.manual_seed(0)
    x = torch.randn(2, 3, 16, 16)
    w, b = torch.randn(8, 3, 4, 4, requires_grad=True), torch.randn(8, requires_grad=True)
    cls = torch.randn(1, 1, 8, requires_grad=True)
    pos_embed = torch.randn(1, 17 if pos == "all" else 16, 8, requires_grad=True)
    vitkernels.patch_embed(x, w, b, pos_embed=pos_embed, prefix_tokens=cls, backend=backend).sum().backward()
    for p in (w, b, cls, pos_embed):
        assert p.grad.stride() == torch.empty(p.shape).stride(), (tuple(p.shape), p.grad.stride())


# ---- calls with nothing to differentiate skip the autograd.Function (host time), with the same output ----


def _op_calls(backend):
    import vitkernels

    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 49, 32) for _ in range(3))
    bias = torch.randn(1, 3, 49, 49)
    qkv = torch.randn(1, 8, 8, 3 * 64)
    table = torch.randn(49, 2)
    x, w, b = torch.randn(2, 3, 32, 32), torch.randn(64, 3, 16, 16), torch.randn(64)
    return {
        "attention": ((q, k, v, bias), lambda q, k, v, bias: vitkernels.flash_attention(q, k, v, bias=bias,
                                                                                        backend=backend)),
        "window": ((qkv, table), lambda qkv, table: vitkernels.window_attention(
            qkv, num_heads=2, window_size=4, shift_size=2, rel_pos_bias=table, backend=backend)),
        "patch": ((x, w, b), lambda x, w, b: vitkernels.patch_embed(x, w, b, backend=backend)),
    }


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("op", ["attention", "window", "patch"])
def test_calls_without_gradients_skip_the_function_and_match_bitwise(monkeypatch, backend, op):
    from vitkernels import dispatch
    from vitkernels.ops.attention.function import AttentionFunction as AF
    from vitkernels.ops.window_attention.function import WindowAttentionFunction as WF

    if backend == "cpu" and not dispatch.backend_environment("cpu")[0]:
        pytest.skip(dispatch.backend_environment("cpu")[1])
    if backend == "triton" and not dispatch.backend_environment("triton")[0]:
        pytest.skip(dispatch.backend_environment("triton")[1])
    tensors, call = _op_calls(backend)[op]
    leaves = [t.clone().requires_grad_() for t in tensors]
    with_grad = call(*leaves)
    assert with_grad.grad_fn is not None
    applied = []
    for fn in (AF, WF, PatchEmbedFunction):
        monkeypatch.setattr(fn, "apply", lambda *a, _apply=fn.apply: applied.append(a) or _apply(*a))
    with torch.no_grad():
        no_grad = call(*leaves)
    frozen = call(*tensors)  # grad mode on, nothing requires grad
    assert not applied
    for out in (no_grad, frozen):
        assert out.grad_fn is None and not out.requires_grad
        assert torch.equal(out, with_grad.detach())
    call(*leaves)  # something requires grad: through the Function
    assert len(applied) == 1


def test_forward_mode_ad_still_goes_through_the_function():
    """Forward-mode AD under no_grad: the Function decides (it has no jvp: torch says so), never the kernels
    silently dropping the tangent."""
    import torch.autograd.forward_ad as fwAD
    import vitkernels
    from vitkernels import dispatch

    if not dispatch.backend_environment("cpu")[0]:
        pytest.skip(dispatch.backend_environment("cpu")[1])
    q, k, v = (torch.randn(1, 2, 16, 16) for _ in range(3))
    with torch.no_grad(), fwAD.dual_level():
        dual = fwAD.make_dual(q, torch.randn_like(q))
        with pytest.raises(NotImplementedError, match="jvp"):
            vitkernels.flash_attention(dual, k, v, backend="cpu")

"""torch.compile(fullgraph=True) through the ops (custom ops: one opaque node each, gradients included),
torch.library.opcheck of each op, and autocast."""
import pytest
import torch

import vitkernels
from vitkernels import library, models
from vitkernels.nn import replace_mha

timm = pytest.importorskip("timm")


def grads_of(model, x):
    out = model(x)
    out.float().square().mean().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    return out.detach(), grads


@pytest.mark.parametrize("name,kwargs", [("vit_tiny_patch16_224", dict(depth=1)),
                                         ("deit_tiny_distilled_patch16_224", dict(depth=1)),
                                         ("swin_tiny_patch4_window7_224", dict(depths=(1, 1, 1, 1)))],
                         ids=["vit", "deit-distilled", "swin"])
def test_compiled_model_fullgraph_matches_eager_forward_and_gradients(name, kwargs):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = models.create_model(name, img_size=64 if name.startswith("vit") or name.startswith("deit") else 224,
                                **kwargs).eval()  # eval: no stochastic depth; gradients still flow
    if name.startswith("deit"):
        model.set_distilled_training(False)
    x = torch.randn(2, 3, *((64, 64) if not name.startswith("swin") else (224, 224)))
    out, grads = grads_of(model, x)
    compiled = torch.compile(model, fullgraph=True)  # fullgraph: a graph break would raise
    out_c, grads_c = grads_of(compiled, x)
    torch.testing.assert_close(out_c, out, rtol=1e-4, atol=1e-5)
    for a, b in zip(grads_c, grads):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)


def test_compiled_seed_block_with_replace_mha():
    from tests.nn.test_multihead_attention import SeedViT

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = replace_mha(SeedViT().eval(), weights="hooks")
    x = torch.randn(2, 17, 64)
    torch.testing.assert_close(torch.compile(model, fullgraph=True)(x), model(x), rtol=1e-5, atol=1e-5)


def test_compiled_dropout_replays_its_mask_in_the_backward():
    torch._dynamo.reset()
    # v = identity: the output *is* the dropped, rescaled probability matrix, so the backward's dV must be
    # out^T @ g exactly when it replays the forward's mask
    q, k = (torch.randn(1, 1, 16, 16, dtype=torch.float64, requires_grad=True) for _ in range(2))
    v = torch.eye(16, dtype=torch.float64).view(1, 1, 16, 16).requires_grad_()

    def f(q, k, v):
        return vitkernels.flash_attention(q, k, v, dropout_p=0.3)

    out = torch.compile(f, fullgraph=True)(q, k, v)
    dropped = (out == 0).float().mean().item()
    assert 0.1 < dropped < 0.5, dropped  # about 30% of the probabilities dropped
    g = torch.randn_like(out)
    out.backward(g)
    torch.testing.assert_close(v.grad, out.detach().transpose(-2, -1) @ g, rtol=1e-10, atol=1e-10)


OPCHECK_CASES = {
    "flash_attention": lambda: (library.flash_attention_op, (
        torch.randn(2, 2, 9, 16, requires_grad=True), torch.randn(2, 2, 11, 16, requires_grad=True),
        torch.randn(2, 2, 11, 16, requires_grad=True), torch.randn(1, 2, 9, 11, requires_grad=True), 0.25, 0.0,
        torch.full((), -1, dtype=torch.int64), "_")),
    "window_attention": lambda: (library.window_attention_op, (
        torch.randn(1, 9, 10, 3 * 32, requires_grad=True), torch.randn(49, 2, requires_grad=True),
        torch.randn(3 * 32, requires_grad=True), 2, [4, 4], [2, 2], 16 ** -0.5, "_")),
    "patch_embed": lambda: (library.patch_embed_op, (
        torch.randn(2, 3, 16, 16, requires_grad=True), torch.randn(8, 3, 8, 8, requires_grad=True),
        torch.randn(8, requires_grad=True), torch.randn(1, 5, 8, requires_grad=True),
        torch.randn(1, 1, 8, requires_grad=True), "_")),
}


@pytest.mark.parametrize("name", list(OPCHECK_CASES))
def test_opcheck(name):
    op, args = OPCHECK_CASES[name]()
    torch.library.opcheck(op, args)


def test_autocast_takes_inputs_in_the_autocast_dtype():
    model = models.create_model("vit_tiny_patch16_224", depth=1, img_size=64).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, rtol=0.05, atol=0.05)
    q = torch.randn(1, 2, 9, 16)
    bias = torch.randn(1, 2, 9, 9)  # float32, as a parameter would be
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert vitkernels.flash_attention(q.bfloat16(), q.bfloat16(), q.bfloat16(), bias=bias).dtype == torch.bfloat16


@pytest.mark.triton
def test_compiled_triton_attention_calls_its_own_backward_kernels(monkeypatch):
    import os

    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        pytest.skip("triton needs a CUDA device or TRITON_INTERPRET=1")
    device = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"

    def no_replay(*args, **kwargs):
        raise AssertionError("the compiled triton path must not replay the forward")
    monkeypatch.setattr(library, "_replay_grads", no_replay)
    torch._dynamo.reset()
    q, k, v = (torch.randn(2, 2, 49, 32, device=device, requires_grad=True) for _ in range(3))
    bias = torch.randn(1, 2, 49, 49, device=device, requires_grad=True)
    g = torch.randn(2, 2, 49, 32, device=device)

    def f(q, k, v, bias):
        return vitkernels.flash_attention(q, k, v, bias=bias, backend="triton")

    eager = f(q, k, v, bias)
    grads = torch.autograd.grad(eager, (q, k, v, bias), g)
    compiled = torch.compile(f, fullgraph=True)(q, k, v, bias)
    grads_c = torch.autograd.grad(compiled, (q, k, v, bias), g)
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)
    for a, b in zip(grads_c, grads):
        torch.testing.assert_close(a, b, rtol=0, atol=0)  # the same kernels, bitwise


@pytest.mark.triton
def test_opcheck_triton_attention():
    import os

    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        pytest.skip("triton needs a CUDA device or TRITON_INTERPRET=1")
    device = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
    args = (torch.randn(1, 2, 17, 16, device=device, requires_grad=True),
            torch.randn(1, 2, 19, 16, device=device, requires_grad=True),
            torch.randn(1, 2, 19, 16, device=device, requires_grad=True),
            torch.randn(1, 2, 17, 19, device=device, requires_grad=True), 0.25, 0.0)
    torch.library.opcheck(library.flash_attention_triton_op, args)

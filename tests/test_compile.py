"""torch.compile(fullgraph=True) through the ops: a forward op and a backward op per op and backend (no
replay of the forward in the compiled backward), equal to eager on every backend that runs here;
torch.library.opcheck of each op; the traced Triton launchers (triton_op); autocast."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import vitkernels
from vitkernels import dispatch, models
from vitkernels.nn import replace_mha
from vitkernels.ops import _compile
from vitkernels.ops.attention import compile as attention_compile
from vitkernels.ops.patch_embed import compile as patch_compile
from vitkernels.ops.window_attention import compile as window_compile

timm = pytest.importorskip("timm")

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() and not INTERPRETING else "cpu"


def _triton_runs():
    pytest.importorskip("triton")
    if not INTERPRETING and not torch.cuda.is_available():
        pytest.skip("triton needs a CUDA device or TRITON_INTERPRET=1")


def grads_of(model, x):
    out = model(x)
    out.float().square().mean().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    return out.detach(), grads


MODELS = [("vit_tiny_patch16_224", dict(depth=1, img_size=64), 64),
          ("deit_tiny_distilled_patch16_224", dict(depth=1, img_size=64), 64),
          ("swin_tiny_patch4_window7_224", dict(depths=(1, 1, 1, 1)), 224)]


def _compiled_model_matches_eager(name, kwargs, size, device="cpu", dtype=torch.float32):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = models.create_model(name, **kwargs).eval().to(device, dtype)  # eval: no stochastic depth
    if name.startswith("deit"):
        model.set_distilled_training(False)
    x = torch.randn(2, 3, size, size, device=device, dtype=dtype)
    out, grads = grads_of(model, x)
    out_c, grads_c = grads_of(torch.compile(model, fullgraph=True), x)  # fullgraph: a graph break raises
    torch.testing.assert_close(out_c, out, rtol=1e-4, atol=1e-5)
    for a, b in zip(grads_c, grads):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("name,kwargs,size", MODELS, ids=["vit", "deit-distilled", "swin"])
@pytest.mark.parametrize("backend", [None, "reference"], ids=["dispatch", "reference"])
def test_compiled_model_fullgraph_matches_eager_forward_and_gradients(name, kwargs, size, backend, monkeypatch):
    if backend is not None:
        monkeypatch.setenv(dispatch.ENV_VAR, backend)
    _compiled_model_matches_eager(name, kwargs, size)


@pytest.mark.triton
@pytest.mark.parametrize("name,kwargs,size", [
    MODELS[0], MODELS[1],
    # about a minute interpreted: slow on CPU, in the default set on a GPU
    pytest.param("swin_tiny_patch4_window7_224", dict(depths=(1, 1, 1, 1), img_size=112), 112,
                 marks=[pytest.mark.slow] if INTERPRETING else [])], ids=["vit", "deit-distilled", "swin"])
def test_compiled_model_on_triton_matches_eager(name, kwargs, size, monkeypatch):
    _triton_runs()
    monkeypatch.setenv(dispatch.ENV_VAR, "triton")
    _compiled_model_matches_eager(name, kwargs, size, DEVICE)


def test_compiled_seed_block_with_replace_mha():
    from tests.nn.test_multihead_attention import SeedViT

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = replace_mha(SeedViT().eval(), weights="hooks")
    x = torch.randn(2, 17, 64)
    torch.testing.assert_close(torch.compile(model, fullgraph=True)(x), model(x), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------ no replay


class CountingKernels:
    """A backend's kernel pair that counts its forward and backward calls."""

    def __init__(self, kernels):
        self.kernels, self.forward_calls, self.backward_calls = kernels, 0, 0

    def forward(self, *args):
        self.forward_calls += 1
        return self.kernels.forward(*args)

    def backward(self, *args):
        self.backward_calls += 1
        return self.kernels.backward(*args)


def _count_kernels(monkeypatch, op, backend):
    impl = dispatch.implementations(op)[backend]
    counting = CountingKernels(impl.kernels())
    monkeypatch.setitem(dispatch._REGISTRY, op, {**dispatch._REGISTRY[op],
                                                 backend: impl.__class__(op, backend, impl.reasons, impl.run,
                                                                         lambda: counting)})
    return counting


def _op_cases(device):
    def attention():
        q, k, v = (torch.randn(2, 2, 49, 32, device=device, requires_grad=True) for _ in range(3))
        bias = torch.randn(1, 2, 49, 49, device=device, requires_grad=True)
        return (lambda q, k, v, b, backend: vitkernels.flash_attention(q, k, v, bias=b, backend=backend)), (q, k, v, bias)

    def window():
        qkv = torch.randn(2, 9, 10, 96, device=device, requires_grad=True)
        table = torch.randn(169, 2, device=device, requires_grad=True)
        qkv_bias = torch.randn(96, device=device, requires_grad=True)
        return (lambda x, t, b, backend: vitkernels.window_attention(
            x, num_heads=2, window_size=7, shift_size=3, rel_pos_bias=t, qkv_bias=b, backend=backend)), (qkv, table,
                                                                                                       qkv_bias)

    def patch():
        x = torch.randn(2, 3, 32, 32, device=device, requires_grad=True)
        w = torch.randn(16, 3, 16, 16, device=device, requires_grad=True)
        b = torch.randn(16, device=device, requires_grad=True)
        pos = torch.randn(1, 5, 16, device=device, requires_grad=True)
        cls = torch.randn(1, 1, 16, device=device, requires_grad=True)
        return (lambda x, w, b, p, c, backend: vitkernels.patch_embed(x, w, b, pos_embed=p, prefix_tokens=c,
                                                                     backend=backend)), (x, w, b, pos, cls)

    def attention_rel_pos():
        # MViTv2-like: a class token, a 3-D query grid against a pooled key grid, and a learnable bias
        q = torch.randn(2, 2, 1 + 2 * 4 * 4, 16, device=device, requires_grad=True)
        k, v = (torch.randn(2, 2, 1 + 2 * 2 * 2, 16, device=device, requires_grad=True) for _ in range(2))
        rel_t, rel_h, rel_w = (torch.randn(2, 2, 32, 2, device=device, requires_grad=True) for _ in range(3))
        bias = torch.randn(1, 2, 33, 9, device=device, requires_grad=True)
        return (lambda q, k, v, b, rt, rh, rw, backend: vitkernels.flash_attention(
            q, k, v, bias=b, rel_pos=vitkernels.RelPos(rh, rw, rt, prefix=1), backend=backend)), (q, k, v, bias, rel_t,
                                                                                               rel_h, rel_w)

    def attention_rope():
        # EVA-02-like: a class token left unrotated, learnable tables (half layout), a learnable bias
        q, k, v = (torch.randn(2, 2, 1 + 16, 32, device=device, requires_grad=True) for _ in range(3))
        cos, sin = (torch.randn(16, 32, device=device, requires_grad=True) for _ in range(2))
        bias = torch.randn(1, 2, 17, 17, device=device, requires_grad=True)
        return (lambda q, k, v, b, c, s, backend: vitkernels.flash_attention(
            q, k, v, bias=b, rope=vitkernels.Rope(c, s, prefix=1, rotate_half=True), backend=backend)), (q, k, v, bias,
                                                                                                       cos, sin)

    def window_cosine():
        # Swin V2: scaled cosine attention with a learnable per-head logit scale
        qkv = torch.randn(2, 9, 10, 96, device=device, requires_grad=True)
        table = (16 * torch.sigmoid(torch.randn(169, 2, device=device))).requires_grad_()
        qkv_bias = torch.randn(96, device=device, requires_grad=True)
        logit_scale = torch.tensor([2.3, 3.0], device=device).view(2, 1, 1).requires_grad_()
        return (lambda x, t, b, ls, backend: vitkernels.window_attention(
            x, num_heads=2, window_size=7, shift_size=3, rel_pos_bias=t, qkv_bias=b, cosine=True, logit_scale=ls,
            backend=backend)), (qkv, table, qkv_bias, logit_scale)

    return {"flash_attention": attention, "window_attention": window, "patch_embed": patch,
            "flash_attention_rel_pos": attention_rel_pos, "flash_attention_rope": attention_rope,
            "window_attention_cosine": window_cosine}


NO_REPLAY = [("flash_attention", "reference"), ("window_attention", "reference"), ("patch_embed", "reference"),
             ("flash_attention_rel_pos", "reference"), ("flash_attention_rope", "reference"),
             ("window_attention_cosine", "reference"),
             pytest.param("flash_attention_rel_pos", "cpu", marks=pytest.mark.ext),
             pytest.param("flash_attention_rope", "cpu", marks=pytest.mark.ext),
             pytest.param("window_attention_cosine", "cpu", marks=pytest.mark.ext),
             pytest.param("flash_attention_rope", "triton", marks=pytest.mark.triton),
             pytest.param("window_attention_cosine", "triton", marks=pytest.mark.triton),
             pytest.param("flash_attention_rel_pos", "triton", marks=pytest.mark.triton),
             pytest.param("patch_embed", "cpu", marks=pytest.mark.ext),
             pytest.param("flash_attention", "triton", marks=pytest.mark.triton),
             pytest.param("window_attention", "triton", marks=pytest.mark.triton),
             pytest.param("patch_embed", "triton", marks=pytest.mark.triton)]


@pytest.mark.parametrize("op,backend", NO_REPLAY)
def test_compiled_backward_runs_the_backward_kernels_and_never_the_forward_again(op, backend, monkeypatch):
    device = "cpu"
    if backend == "triton":
        _triton_runs()
        device = DEVICE
    if backend == "cpu" and not dispatch.backend_environment("cpu")[0]:
        pytest.skip(dispatch.backend_environment("cpu")[1])
    fn, tensors = _op_cases(device)[op]()
    eager = fn(*tensors, backend)
    g = torch.randn_like(eager)
    grads = torch.autograd.grad(eager, tensors, g)
    torch._dynamo.reset()
    counting = _count_kernels(monkeypatch, op.replace("_rel_pos", "").replace("_rope", "").replace("_cosine", ""),
                              backend)
    compiled = torch.compile(lambda *ts: fn(*ts, backend), fullgraph=True)(*tensors)
    grads_c = torch.autograd.grad(compiled, tensors, g)
    if not (backend == "triton" and DEVICE == "cuda" and _compile.triton_op_supported()):
        # opaque ops: each kernel ran exactly once (a replay would run the forward twice)
        assert (counting.forward_calls, counting.backward_calls) == (1, 1)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    # the reference's eager path is autograd through the plain math, its compiled one the explicit backward:
    # fp32 rounding differs, most behind Swin V2's logit scale (up to 100)
    atol = 1e-4 if op == "window_attention_cosine" and backend == "reference" else 1e-5
    for a, b in zip(grads_c, grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=atol)


@pytest.mark.parametrize("backend", [None, pytest.param("triton", marks=pytest.mark.triton)])
def test_compiled_dropout_draws_its_mask_once_and_the_backward_uses_it(backend):
    device = "cpu"
    if backend == "triton":
        _triton_runs()
        device = DEVICE
    torch._dynamo.reset()
    # v = identity: the output *is* the dropped, rescaled probability matrix, so the backward's dV must be
    # out^T @ g exactly when it uses the forward's mask
    dtype = torch.float64 if backend is None else torch.float32
    q, k = (torch.randn(1, 1, 16, 16, dtype=dtype, device=device, requires_grad=True) for _ in range(2))
    v = torch.eye(16, dtype=dtype, device=device).view(1, 1, 16, 16).requires_grad_()

    def f(q, k, v):
        return vitkernels.flash_attention(q, k, v, dropout_p=0.3, backend=backend)

    compiled = torch.compile(f, fullgraph=True)
    out = compiled(q, k, v)
    dropped = (out == 0).float().mean().item()
    assert 0.1 < dropped < 0.5, dropped  # about 30% of the probabilities dropped
    g = torch.randn_like(out)
    out.backward(g)
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(v.grad, out.detach().transpose(-2, -1) @ g, rtol=tol, atol=tol)
    assert not torch.equal(compiled(q, k, v), out)  # a new mask on the next call


# --------------------------------------------------------------------------------------------- opcheck


def _opcheck_cases(device):
    def rand(*shape):
        return torch.randn(*shape, device=device, requires_grad=True)

    return {
        "flash_attention": lambda backend: (attention_compile.attention_fwd, (
            rand(2, 2, 9, 16), rand(2, 2, 11, 16), rand(2, 2, 11, 16), rand(1, 2, 9, 11), 0.25, 0.0, backend)),
        "flash_attention_rel_pos": lambda backend: (attention_compile.attention_fwd, (
            rand(2, 2, 9, 16), rand(2, 2, 5, 16), rand(2, 2, 5, 16), None, 0.25, 0.0, backend,
            rand(2, 2, 8, 2), rand(2, 2, 8, 2), None, 1)),
        "flash_attention_rope": lambda backend: (attention_compile.attention_fwd, (
            rand(2, 2, 9, 16), rand(2, 2, 9, 16), rand(2, 2, 9, 16), rand(1, 2, 9, 9), 0.25, 0.0, backend,
            None, None, None, 0, rand(1, 2, 8, 16), rand(1, 2, 8, 16), 1, False)),
        "flash_attention_rope_rel_pos": lambda backend: (attention_compile.attention_fwd, (
            rand(2, 2, 9, 16), rand(2, 2, 9, 16), rand(2, 2, 9, 16), None, 0.25, 0.0, backend,
            rand(2, 2, 9, 3), rand(2, 2, 9, 3), None, 0, rand(1, 1, 9, 16), rand(1, 1, 9, 16), 0, True)),
        "window_attention_cosine": lambda backend: (window_compile.window_fwd, (
            rand(1, 9, 10, 3 * 32), rand(169, 2), rand(3 * 32), 2, [7, 7], [3, 3], 1.0, backend,
            torch.tensor([2.3, 3.0], device=device).view(2, 1, 1).requires_grad_(), True)),
        "video_window_cosine": lambda backend: (window_compile.window_fwd, (
            rand(1, 3, 5, 6, 3 * 16), rand(3 * 5 * 5, 2), None, 2, [2, 3, 3], [1, 1, 2], 1.0, backend,
            torch.tensor([2.3, 5.0], device=device).requires_grad_(), True)),
        "window_attention": lambda backend: (window_compile.window_fwd, (
            rand(1, 9, 10, 3 * 32), rand(169, 2), rand(3 * 32), 2, [7, 7], [3, 3], 16 ** -0.5, backend)),
        "video_window": lambda backend: (window_compile.window_fwd, (
            rand(1, 3, 5, 6, 3 * 16), rand(3 * 5 * 5, 2), None, 2, [2, 3, 3], [1, 1, 2], 8 ** -0.5, backend)),
        "patch_embed": lambda backend: (patch_compile.patch_embed_fwd, (
            rand(2, 3, 16, 16), rand(8, 3, 8, 8), rand(8), rand(1, 5, 8), rand(1, 1, 8), backend)),
        # dx keeps x's channels-last layout, as the fake (empty_like) says
        "patch_embed_channels_last": lambda backend: (patch_compile.patch_embed_fwd, (
            torch.randn(2, 3, 16, 16, device=device).to(memory_format=torch.channels_last).requires_grad_(),
            rand(8, 3, 8, 8), None, rand(1, 4, 8), None, backend)),
        "video_patch_embed": lambda backend: (patch_compile.patch_embed_fwd, (
            rand(2, 3, 4, 16, 16), rand(8, 3, 2, 8, 8), rand(8), None, rand(1, 2, 8), backend)),
    }


@pytest.mark.parametrize("backend", ["_", "reference", pytest.param("cpu", marks=pytest.mark.ext),
                                     pytest.param("triton", marks=pytest.mark.triton)],
                         ids=["dispatch", "reference", "cpu", "triton"])
@pytest.mark.parametrize("name", ["flash_attention", "flash_attention_rel_pos", "flash_attention_rope",
                                  "flash_attention_rope_rel_pos", "window_attention", "video_window",
                                  "window_attention_cosine", "video_window_cosine", "patch_embed",
                                  "patch_embed_channels_last", "video_patch_embed"])
def test_opcheck(name, backend):
    """The custom ops (any backend, run opaque), autograd registration and fake kernels included."""
    device = "cpu"
    if backend == "triton":
        _triton_runs()
        device = DEVICE
    if backend == "cpu" and not dispatch.backend_environment("cpu")[0]:
        pytest.skip(dispatch.backend_environment("cpu")[1])
    op, args = _opcheck_cases(device)[name](backend)
    torch.library.opcheck(op, args)


# ------------------------------------------------------------------------------ traced Triton launchers

TRACE_SCRIPT = textwrap.dedent("""
    import os
    os.environ.pop("TRITON_INTERPRET", None)  # real JIT kernels: the only kind wrap_triton records
    import torch
    from torch.fx.experimental.proxy_tensor import make_fx
    from vitkernels.ops.attention.triton import flash_attention_bwd_triton, flash_attention_fwd_triton
    from vitkernels.ops.patch_embed.triton import patch_embed_bwd_triton, patch_embed_fwd_triton
    from vitkernels.ops.window_attention.checks import check_window_inputs
    from vitkernels.ops.window_attention.triton import window_attention_bwd_triton, window_attention_fwd_triton

    def attention(q, k, v, bias):
        out, lse, seed = flash_attention_fwd_triton(q, k, v, bias, 0.125, 0.1)
        return flash_attention_bwd_triton(torch.ones_like(out), q, k, v, bias, out, lse, seed, 0.125, 0.1, True)

    def window(window_size, shift):
        def run(qkv, table, qkv_bias):
            inputs = check_window_inputs(qkv, 2, window_size, shift, table, qkv_bias)
            out, lse = window_attention_fwd_triton(inputs)
            return window_attention_bwd_triton(torch.ones_like(out), inputs, out, lse, (True, True, True))
        return run

    def patch(x, w, b, pos, cls):
        out = patch_embed_fwd_triton(x, w, b, pos, cls)
        return patch_embed_bwd_triton(torch.ones_like(out), x, w, b, pos, cls, (True,) * 5)

    cases = {
        "attention": (attention, (torch.randn(2, 3, 197, 64), torch.randn(2, 3, 197, 64), torch.randn(2, 3, 197, 64),
                                  torch.randn(1, 3, 197, 197))),
        "window": (window(7, 3), (torch.randn(2, 14, 14, 192), torch.randn(169, 2), torch.randn(192))),
        "video_window": (window(8, 4), (torch.randn(1, 8, 8, 8, 96), torch.randn(15 ** 3, 2), torch.randn(96))),
        "patch": (patch, (torch.randn(2, 3, 32, 32), torch.randn(16, 3, 16, 16), torch.randn(16),
                          torch.randn(1, 5, 16), torch.randn(1, 1, 16))),
    }
    for name, (fn, args) in cases.items():
        graph = make_fx(fn, tracing_mode="fake")(*args).graph
        kernels = [n for n in graph.nodes if "triton_kernel_wrapper" in str(n.target)]
        print(name, len(kernels))
""")


@pytest.mark.triton
def test_triton_launchers_trace_into_graphs_of_kernel_launches():
    """What Inductor does with the triton_op bodies (trace them, kernels recorded with wrap_triton, index
    tables as constants), done here with fake CPU tensors: the kernels are recorded, never launched, so no
    GPU is needed. Each launch appears once (a config timed while tracing is timed outside the graph)."""
    pytest.importorskip("triton")
    if not _compile.triton_op_supported():
        pytest.skip(f"torch {torch.__version__} has no torch.library.triton_op / wrap_triton (torch >= 2.6)")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "-c", TRACE_SCRIPT], capture_output=True, text=True, cwd=root, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    counts = dict(line.split() for line in done.stdout.strip().splitlines())
    # attention: fwd, delta, dK/dV, dQ, dBias; window 7x7 (fused): fwd, bwd; video window 8x8x8 (blocked):
    # fwd, delta, dK/dV, dQ, d(table); patch embed: fwd, dW, dX
    assert counts == {"attention": "5", "window": "2", "video_window": "5", "patch": "3"}, counts


@pytest.mark.gpu
@pytest.mark.parametrize("name,kwargs,size", [("vit_tiny_patch16_224", dict(depth=2), 224),
                                              ("swin_tiny_patch4_window7_224", dict(depths=(1, 1, 1, 1)), 224)],
                         ids=["vit", "swin"])
def test_compiled_triton_model_is_captured_in_a_cuda_graph(name, kwargs, size, monkeypatch):
    """The traced Triton ops leave no opaque call in the graph (no op dispatches at run time), so
    mode="reduce-overhead" captures the whole model (torch counts every graph it had to skip) and replays
    it with eager's numbers."""
    if not _compile.triton_op_supported():
        pytest.skip(f"torch {torch.__version__} has no torch.library.triton_op (torch >= 2.6)")
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model = models.create_model(name, **kwargs).cuda().eval()
    x = torch.randn(4, 3, size, size, device="cuda")
    with torch.no_grad():
        eager = model(x)

        def no_runtime_dispatch(*args, **kwargs):
            raise AssertionError("an opaque custom op dispatched at run time: the traced triton ops were not taken")
        monkeypatch.setattr(dispatch, "select", no_runtime_dispatch)
        compiled = torch.compile(model, mode="reduce-overhead", fullgraph=True)
        for _ in range(3):  # warm-up, record, replay
            out = compiled(x).clone()
    assert not counters["inductor"]["cudagraph_skips"], dict(counters["inductor"])
    torch.testing.assert_close(out, eager, rtol=1e-4, atol=1e-4)


def test_traced_triton_is_taken_only_for_compiled_triton_kernels_on_a_gpu(monkeypatch):
    traced = getattr(_compile.traced_triton, "__wrapped__", _compile.traced_triton)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not traced("flash_attention", "cuda", "float16", "_")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not traced("flash_attention", "cpu", "float32", "_")
    assert not traced("flash_attention", "cuda", "float16", "reference")
    monkeypatch.setenv(dispatch.ENV_VAR, "reference")
    assert not traced("flash_attention", "cuda", "float16", "_")


# --------------------------------------------------------------------------------------------- autocast


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

"""Dispatch: backend choice by device, forced backends (argument and VITKERNELS_BACKEND), refusals that
say why, available_backends(), and a package that works without its compiled extension."""
import os
import subprocess
import sys

import pytest
import torch

import vitkernels
from vitkernels import BackendUnavailableError, dispatch
from vitkernels.ops.attention.checks import check_attention_inputs
from vitkernels.ops.patch_embed.checks import check_patch_embed_inputs

from tests.utils import assert_close_2x

needs_ext = pytest.mark.skipif(
    vitkernels._ext.extension() is None and os.environ.get("VITKERNELS_REQUIRE_EXT") != "1",
    reason="vitkernels._C is not built (set VITKERNELS_REQUIRE_EXT=1 to make this a failure)",
)


def attn_inputs(dtype=torch.float32):
    q, k, v = (torch.randn(1, 2, 7, 16, dtype=dtype) for _ in range(3))
    return q, k, v


def patch_inputs(dtype=torch.float32):
    return torch.randn(2, 3, 16, 16, dtype=dtype), torch.randn(8, 3, 8, 8, dtype=dtype)


def test_available_backends_lists_every_backend_with_a_reason():
    result = vitkernels.available_backends()
    assert tuple(result) == dispatch.BACKEND_NAMES
    for name, (ok, why) in result.items():
        assert isinstance(ok, bool) and isinstance(why, str) and why, name
    assert result["reference"][0] is True
    assert "flash_attention" in result["reference"][1]
    if not torch.cuda.is_available():
        assert result["cuda"][0] is False


def test_unknown_backend_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"backend='fast' is not a backend; valid: reference, triton, cuda, cpu"):
        vitkernels.flash_attention(*attn_inputs(), backend="fast")


def test_backend_without_a_kernel_says_so():
    with pytest.raises(BackendUnavailableError, match=r"flash_attention: backend='cuda' cannot run: the cuda "
                                                      r"backend has no flash_attention kernel yet"):
        vitkernels.flash_attention(*attn_inputs(), backend="cuda")


def test_can_run_raises_with_the_reasons():
    x, w = patch_inputs()
    impl = dispatch.implementations("patch_embed")["cuda"]
    inputs = check_patch_embed_inputs(x, w)
    assert impl.can_run(inputs) is False
    with pytest.raises(BackendUnavailableError, match=r"patch_embed: backend 'cuda' cannot run these inputs .*needs cuda"):
        impl.can_run(inputs, raise_error=True)


def test_backend_that_cannot_run_these_inputs_says_why():
    x, w = patch_inputs()
    with pytest.raises(BackendUnavailableError) as info:
        vitkernels.patch_embed(x, w, backend="cuda")
    message = str(info.value)
    assert "patch_embed: backend='cuda' cannot run these inputs" in message
    assert "x (2, 3, 16, 16) float32 on cpu" in message
    assert "needs cuda tensors" in message


@needs_ext
def test_cpu_backend_takes_a_strided_weight_and_gives_the_references_result():
    x, w = patch_inputs()
    w_strided = torch.randn(8, 3, 8, 16)[..., ::2]
    inputs = check_patch_embed_inputs(x, w_strided)
    assert dispatch.select("patch_embed", inputs).name == "cpu"
    torch.testing.assert_close(vitkernels.patch_embed(x, w_strided, backend="cpu"),
                               vitkernels.patch_embed(x, w_strided.contiguous(), backend="reference"))


@needs_ext
def test_auto_dispatch_on_cpu_prefers_cpu_then_reference():
    x, w = patch_inputs()
    assert dispatch.select("patch_embed", check_patch_embed_inputs(x, w)).name == "cpu"
    q, k, v = attn_inputs()
    assert dispatch.select("flash_attention", check_attention_inputs(q, k, v)).name == "cpu"
    q64, k64, v64 = (t.double() for t in (q, k, v))  # the C++ kernels refuse fp64: the reference runs it
    assert dispatch.select("flash_attention", check_attention_inputs(q64, k64, v64)).name == "reference"


def test_environment_variable_forces_a_backend_and_is_read_at_call_time(monkeypatch):
    x, w = patch_inputs()
    inputs = check_patch_embed_inputs(x, w)
    monkeypatch.setenv("VITKERNELS_BACKEND", "reference")
    assert dispatch.select("patch_embed", inputs).name == "reference"
    monkeypatch.setenv("VITKERNELS_BACKEND", "cuda")
    with pytest.raises(BackendUnavailableError, match=r"VITKERNELS_BACKEND='cuda' cannot run"):
        vitkernels.patch_embed(x, w)
    monkeypatch.setenv("VITKERNELS_BACKEND", "nope")
    with pytest.raises(ValueError, match=r"VITKERNELS_BACKEND='nope' is not a backend; valid: reference"):
        vitkernels.patch_embed(x, w)
    # an explicit argument wins over the environment
    assert vitkernels.patch_embed(x, w, backend="reference").shape == (2, 4, 8)
    monkeypatch.delenv("VITKERNELS_BACKEND")
    assert dispatch.select("patch_embed", inputs).name in ("cpu", "reference")


def test_other_devices_only_get_the_reference():
    q, k, v = (t.to("meta") for t in attn_inputs())
    assert dispatch.select("flash_attention", check_attention_inputs(q, k, v)).name == "reference"


def test_package_imports_and_references_run_without_the_extension():
    code = r"""
import sys
sys.modules["vitkernels._C"] = None  # makes `from vitkernels import _C` fail as if it were never built
import torch, vitkernels
from vitkernels import BackendUnavailableError
ok, why = vitkernels.available_backends()["cpu"]
assert ok is False and "vitkernels._C" in why, why
q = k = v = torch.randn(1, 2, 5, 16)
assert vitkernels.flash_attention(q, k, v).shape == (1, 2, 5, 16)
assert vitkernels.window_attention(torch.randn(1, 6, 6, 96), num_heads=2, window_size=3, shift_size=1).shape == (1, 6, 6, 32)
x, w = torch.randn(1, 3, 8, 8), torch.randn(4, 3, 4, 4)
assert vitkernels.patch_embed(x, w).shape == (1, 4, 4)  # falls back to the reference
try:
    vitkernels.patch_embed(x, w, backend="cpu")
except BackendUnavailableError as exc:
    assert "not importable" in str(exc), exc
else:
    raise AssertionError("backend='cpu' ran without the extension")
print("OK")
"""
    env = dict(os.environ)
    env.pop("VITKERNELS_BACKEND", None)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "OK", result.stdout + result.stderr


def test_extension_is_built_when_required():
    if os.environ.get("VITKERNELS_REQUIRE_EXT") != "1":
        pytest.skip("VITKERNELS_REQUIRE_EXT is not set (make test sets it)")
    assert vitkernels._ext.extension() is not None, vitkernels._ext.extension_error()


@pytest.mark.gpu
@pytest.mark.ext
def test_cuda_patch_embed_matches_the_reference():
    if os.environ.get("VITKERNELS_REQUIRE_EXT") == "1":
        assert vitkernels._ext.has_cuda_kernels(), ("VITKERNELS_REQUIRE_EXT=1 but vitkernels._C has no CUDA kernels: "
                                                    + (vitkernels._ext.extension_error() or "built without nvcc"))
    elif not vitkernels._ext.has_cuda_kernels():
        pytest.skip("vitkernels._C was built without CUDA kernels (set VITKERNELS_REQUIRE_EXT=1 to fail instead)")
    # a video tubelet embedding: 2 x 3 x 2 = 12 patches after the cls row, channels-last 3-D input
    x = torch.randn(2, 3, 4, 48, 32, device="cuda").to(memory_format=torch.channels_last_3d).requires_grad_()
    w = torch.randn(16, 3, 2, 16, 16, device="cuda", requires_grad=True)
    b, pos, cls = (torch.randn(*s, device="cuda", requires_grad=True) for s in ((16,), (1, 13, 16), (1, 1, 16)))
    args = (x, w, b, pos, cls)

    def run(backend, dtype):
        xx, ww, bb, pp, cc = (t.to(dtype) for t in args)
        return vitkernels.patch_embed(xx, ww, bb, pos_embed=pp, prefix_tokens=cc, backend=backend)

    out, out_pt, out_ref = run("cuda", torch.float32), run("reference", torch.float32), run("reference", torch.float64)
    g = torch.randn_like(out)
    assert_close_2x(out, out_pt, out_ref)
    grads = torch.autograd.grad(out, args, g)
    grads_pt = torch.autograd.grad(out_pt, args, g)
    grads_ref = torch.autograd.grad(out_ref, args, g.double())
    for name, got, pt, want in zip(("x", "weight", "bias", "pos_embed", "prefix_tokens"), grads, grads_pt, grads_ref):
        assert_close_2x(got, pt, want, factor=3.0, floor=1e-5, name=f"d{name}")


# ---- the call memo: repeated calls skip the checks and the backend choice ---------------------------------


def test_a_repeated_call_skips_checks_and_dispatch_and_gives_the_same_result(monkeypatch):
    from vitkernels.ops import attention as attention_module

    q, k, v = attn_inputs()
    first = vitkernels.flash_attention(q, k, v, backend="reference")
    calls = []
    original = attention_module.check_attention_inputs
    monkeypatch.setattr(attention_module, "check_attention_inputs", lambda *a: calls.append(a) or original(*a))
    again = vitkernels.flash_attention(q, k, v, backend="reference")
    assert calls == [] and torch.equal(first, again)
    # new values in tensors of the same metadata: the memo answers, the math is new
    q2 = torch.randn_like(q)
    assert torch.equal(vitkernels.flash_attention(q2, k, v, backend="reference"),
                       vitkernels.ops.attention.attention_reference(q2, k, v, None, 16 ** -0.5, 0.0))
    assert calls == []
    # different metadata, argument values or environment: checked again
    vitkernels.flash_attention(q, k, v, scale=0.5, backend="reference")
    assert len(calls) == 1
    monkeypatch.setenv("VITKERNELS_BACKEND", "reference")
    vitkernels.flash_attention(q, k, v)
    assert len(calls) == 2


def test_the_memo_never_turns_a_refused_call_into_an_accepted_one():
    q, k, v = attn_inputs()
    vitkernels.flash_attention(q, k, v, dropout_p=1, backend="reference")  # int 1 is a valid probability
    with pytest.raises(TypeError, match="dropout_p must be a float, got bool"):
        vitkernels.flash_attention(q, k, v, dropout_p=True, backend="reference")  # True == 1, but not for us
    for _ in range(2):  # a refusal is raised on every call, never remembered
        with pytest.raises(ValueError, match="unit stride in its last"):
            strided = torch.randn(1, 2, 7, 32)[..., ::2]  # q's shape, last stride 2
            vitkernels.flash_attention(strided, k, v, backend="reference")
    qkv = torch.randn(1, 8, 8, 96)
    vitkernels.window_attention(qkv, num_heads=2, window_size=4, shift_size=2, backend="reference")
    with pytest.raises((TypeError, ValueError), match="shift_size"):
        vitkernels.window_attention(qkv, num_heads=2, window_size=4, shift_size=[True, 2], backend="reference")
    x, w = patch_inputs()
    vitkernels.patch_embed(x, w, backend="reference")
    with pytest.raises((TypeError, ValueError), match="weight"):
        vitkernels.patch_embed(x, w.double(), backend="reference")
    # unhashable arguments reach the checks and their messages, not a hashing error
    with pytest.raises((TypeError, ValueError), match="scale"):
        vitkernels.flash_attention(q, k, v, scale=[0.5], backend="reference")
    with pytest.raises(ValueError, match="backend="):
        vitkernels.patch_embed(x, w, backend=["reference"])


def test_registering_a_backend_forgets_the_remembered_choices(monkeypatch):
    x, w = patch_inputs()
    vitkernels.patch_embed(x, w)
    seen = []
    monkeypatch.setitem(dispatch._REGISTRY, "patch_embed", dict(dispatch._REGISTRY["patch_embed"]))
    dispatch.register("patch_embed", "cpu", reasons=lambda inputs: [],
                      run=lambda inputs: seen.append(inputs) or torch.zeros(()), kernels=lambda: None)
    vitkernels.patch_embed(x, w)
    assert len(seen) == 1
    monkeypatch.undo()
    dispatch.clear_call_memos()

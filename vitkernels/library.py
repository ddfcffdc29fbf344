"""The three ops as ``torch.library`` custom ops, so ``torch.compile(model, fullgraph=True)`` sees each one
as a single opaque node (no graph break, no tracing into dispatch or Triton launches).

Used only while compiling (``torch.compiler.is_compiling()``): eager calls keep the backends' own
autograd.Functions. flash_attention on the triton backend compiles to its own forward (saving the row
log-sum-exp) and backward kernels. Everything else: inside an op, dispatch picks the backend exactly as
in eager, and gradients come from a second custom op that replays the forward under autograd (like
activation checkpointing: the compiled backward recomputes the forward once) with the same dropout
seed, so any backend, the reference included, is differentiable under compile. Fake kernels give the
output shapes.
"""
from __future__ import annotations

import contextlib
import os
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

_EMPTY = "_"  # backend=None travels as this string (custom-op schemas have no Optional[str] default here)


def _backend(name: str) -> Optional[str]:
    return None if name == _EMPTY else name


@contextlib.contextmanager
def _seeded(seed):
    """Run with torch's CPU generator at ``seed`` (dropout draws its Philox seed / mask from it), restoring
    the caller's generator afterwards; seed < 0: no dropout, nothing to pin."""
    seed = int(seed)
    if seed < 0:
        yield
        return
    # manual_seed reseeds every device's generator: fork (and so restore) all of them
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


@contextlib.contextmanager
def _autograd_inside_custom_op():
    """A custom op's implementation runs below the Autograd dispatch keys (they are excluded in TLS), so
    ops there record no graph even under enable_grad. Re-include them for the replay, then restore."""
    keys = [torch._C.DispatchKey.AutogradFunctionality, torch._C.DispatchKey.AutogradOther]
    previous = [torch._C._dispatch_tls_is_dispatch_key_excluded(k) for k in keys]
    try:
        for k in keys:
            torch._C._dispatch_tls_set_dispatch_key_excluded(k, False)
        with torch.enable_grad():
            yield
    finally:
        for k, p in zip(keys, previous):
            torch._C._dispatch_tls_set_dispatch_key_excluded(k, p)


def _replay_grads(forward, tensors: Sequence[Optional[Tensor]], needs: Sequence[bool], dout: Tensor, seed):
    """Gradients of ``forward(*tensors)`` for the tensors flagged in ``needs`` (empty tensors elsewhere)."""
    with _autograd_inside_custom_op(), _seeded(seed):
        leaves = [t.detach().requires_grad_(bool(n)) if t is not None else None for t, n in zip(tensors, needs)]
        out = forward(*leaves)
        wanted = [t for t, n in zip(leaves, needs) if t is not None and n]
        grads = iter(torch.autograd.grad(out, wanted, dout, allow_unused=True) if wanted else ())
    result = []
    for t, n in zip(leaves, needs):
        g = next(grads) if (t is not None and n) else None
        if t is not None and n:
            # custom-op outputs must have their fake's strides: those of the input (empty_like)
            if g is None:
                result.append(torch.zeros_like(t))
            else:
                like = torch.empty_like(t)
                result.append(g if g.stride() == like.stride() else like.copy_(g))
        else:
            result.append(dout.new_empty(0))
    return result


def _grads_or_none(grads, needs):
    return tuple(g if n else None for g, n in zip(grads, needs))


# ---- flash_attention ----------------------------------------------------------------------------------


def _attention_eager(q, k, v, bias, scale, dropout_p, backend):
    from vitkernels.ops.attention import flash_attention

    return flash_attention(q, k, v, bias=bias, scale=scale, dropout_p=dropout_p, backend=_backend(backend))


@torch.library.custom_op("vitkernels::flash_attention", mutates_args=())
def flash_attention_op(q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], scale: float, dropout_p: float,
                       seed: Tensor, backend: str) -> Tensor:
    with _seeded(seed):
        return _attention_eager(q, k, v, bias, scale, dropout_p, backend).contiguous()


@flash_attention_op.register_fake
def _(q, k, v, bias, scale, dropout_p, seed, backend):
    return q.new_empty(q.shape[:-1] + (v.shape[-1],))


@torch.library.custom_op("vitkernels::flash_attention_backward", mutates_args=())
def flash_attention_backward_op(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], scale: float,
                                dropout_p: float, seed: Tensor, backend: str, needs: List[bool]) -> List[Tensor]:
    return _replay_grads(lambda q_, k_, v_, b_: _attention_eager(q_, k_, v_, b_, scale, dropout_p, backend),
                         (q, k, v, bias), needs, dout, seed)


@flash_attention_backward_op.register_fake
def _(dout, q, k, v, bias, scale, dropout_p, seed, backend, needs):
    return [torch.empty_like(t) if (t is not None and n) else dout.new_empty(0) for t, n in zip((q, k, v, bias), needs)]


def _attention_setup(ctx, inputs, output):
    q, k, v, bias, scale, dropout_p, seed, backend = inputs
    ctx.save_for_backward(q, k, v, bias, seed)
    ctx.attrs = (scale, dropout_p, backend)


def _attention_backward(ctx, dout):
    q, k, v, bias, seed = ctx.saved_tensors
    needs = [bool(n) for n in ctx.needs_input_grad[:4]]
    scale, dropout_p, backend = ctx.attrs
    grads = flash_attention_backward_op(dout, q, k, v, bias, scale, dropout_p, seed, backend, needs)
    return _grads_or_none(grads, needs) + (None, None, None, None)


flash_attention_op.register_autograd(_attention_backward, setup_context=_attention_setup)


# ---- flash_attention on the triton backend: its own forward/backward kernels, no replay ----------------


def _constant_result(fn):
    assume = getattr(getattr(torch, "_dynamo", None), "assume_constant_result", None)
    return assume(fn) if assume is not None else fn


@_constant_result
def triton_attention_direct(device_type: str, dtype_name: str, backend: str) -> bool:
    """Whether a compiled flash_attention call runs on the triton backend, so the graph can call its
    forward/backward kernels directly (saving the log-sum-exp) instead of replaying the forward. Decided
    once per compile from the device, dtype, backend argument and VITKERNELS_BACKEND."""
    from vitkernels import dispatch
    from vitkernels.ops.triton_limits import triton_reasons

    forced = backend if backend != _EMPTY else (os.environ.get(dispatch.ENV_VAR, "").strip() or None)
    if forced not in (None, "triton") or (forced is None and device_type != "cuda"):
        return False
    if not dispatch.backend_environment("triton")[0]:
        return False
    return not triton_reasons(torch.device(device_type), getattr(torch, dtype_name))


@torch.library.custom_op("vitkernels::flash_attention_triton", mutates_args=())
def flash_attention_triton_op(q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], scale: float,
                              dropout_p: float) -> Tuple[Tensor, Tensor, Tensor]:
    """(out, lse, dropout (seed, offset) as an int64 tensor of 2 on q's device)."""
    from vitkernels.ops.attention.triton import flash_attention_fwd_triton

    return flash_attention_fwd_triton(q, k, v, bias, scale, dropout_p)


@flash_attention_triton_op.register_fake
def _(q, k, v, bias, scale, dropout_p):
    return (q.new_empty(q.shape[:-1] + (v.shape[-1],)), q.new_empty(q.shape[:-1], dtype=torch.float32),
            q.new_empty((2,), dtype=torch.int64))


@torch.library.custom_op("vitkernels::flash_attention_triton_backward", mutates_args=())
def flash_attention_triton_backward_op(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor],
                                       out: Tensor, lse: Tensor, seed: Tensor, scale: float, dropout_p: float,
                                       bias_requires_grad: bool) -> List[Tensor]:
    from vitkernels.ops.attention.triton import flash_attention_bwd_triton

    dq, dk, dv, dbias = flash_attention_bwd_triton(dout, q, k, v, bias, out, lse, seed, scale, dropout_p,
                                                   bias_requires_grad)
    return [dq, dk, dv, dbias if dbias is not None else dout.new_empty(0)]


@flash_attention_triton_backward_op.register_fake
def _(dout, q, k, v, bias, out, lse, seed, scale, dropout_p, bias_requires_grad):
    return [q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape),
            bias.new_empty(bias.shape) if bias_requires_grad else dout.new_empty(0)]


def _triton_attention_setup(ctx, inputs, output):
    q, k, v, bias, scale, dropout_p = inputs
    out, lse, seed = output
    ctx.mark_non_differentiable(lse, seed)
    ctx.save_for_backward(q, k, v, bias, out, lse, seed)
    ctx.attrs = (scale, dropout_p)


def _triton_attention_backward(ctx, dout, _dlse, _dseed):
    q, k, v, bias, out, lse, seed = ctx.saved_tensors
    needs = [bool(n) for n in ctx.needs_input_grad[:4]]
    scale, dropout_p = ctx.attrs
    dq, dk, dv, dbias = flash_attention_triton_backward_op(dout, q, k, v, bias, out, lse, seed, scale, dropout_p,
                                                           bias is not None and needs[3])
    return _grads_or_none((dq, dk, dv, dbias), needs) + (None, None)


flash_attention_triton_op.register_autograd(_triton_attention_backward, setup_context=_triton_attention_setup)


# ---- window_attention ---------------------------------------------------------------------------------


def _window_eager(qkv, table, qkv_bias, num_heads, window_size, shift_size, scale, backend):
    from vitkernels.ops.window_attention import window_attention

    return window_attention(qkv, num_heads=num_heads, window_size=tuple(window_size), shift_size=tuple(shift_size),
                            rel_pos_bias=table, qkv_bias=qkv_bias, scale=scale, backend=_backend(backend))


@torch.library.custom_op("vitkernels::window_attention", mutates_args=())
def window_attention_op(qkv: Tensor, rel_pos_bias: Optional[Tensor], qkv_bias: Optional[Tensor], num_heads: int,
                        window_size: List[int], shift_size: List[int], scale: float, backend: str) -> Tensor:
    return _window_eager(qkv, rel_pos_bias, qkv_bias, num_heads, window_size, shift_size, scale, backend).contiguous()


@window_attention_op.register_fake
def _(qkv, rel_pos_bias, qkv_bias, num_heads, window_size, shift_size, scale, backend):
    return qkv.new_empty(qkv.shape[:-1] + (qkv.shape[-1] // 3,))


@torch.library.custom_op("vitkernels::window_attention_backward", mutates_args=())
def window_attention_backward_op(dout: Tensor, qkv: Tensor, rel_pos_bias: Optional[Tensor], qkv_bias: Optional[Tensor],
                                 num_heads: int, window_size: List[int], shift_size: List[int], scale: float,
                                 backend: str, needs: List[bool]) -> List[Tensor]:
    return _replay_grads(lambda x, t, b: _window_eager(x, t, b, num_heads, window_size, shift_size, scale, backend),
                         (qkv, rel_pos_bias, qkv_bias), needs, dout, -1)


@window_attention_backward_op.register_fake
def _(dout, qkv, rel_pos_bias, qkv_bias, num_heads, window_size, shift_size, scale, backend, needs):
    return [torch.empty_like(t) if (t is not None and n) else dout.new_empty(0)
            for t, n in zip((qkv, rel_pos_bias, qkv_bias), needs)]


def _window_setup(ctx, inputs, output):
    qkv, table, qkv_bias, *attrs = inputs
    ctx.save_for_backward(qkv, table, qkv_bias)
    ctx.attrs = attrs


def _window_backward(ctx, dout):
    qkv, table, qkv_bias = ctx.saved_tensors
    needs = [bool(n) for n in ctx.needs_input_grad[:3]]
    grads = window_attention_backward_op(dout, qkv, table, qkv_bias, *ctx.attrs, needs)
    return _grads_or_none(grads, needs) + (None,) * 5


window_attention_op.register_autograd(_window_backward, setup_context=_window_setup)


# ---- patch_embed --------------------------------------------------------------------------------------


def _patch_eager(x, weight, bias, pos_embed, prefix_tokens, backend):
    from vitkernels.ops.patch_embed import patch_embed

    return patch_embed(x, weight, bias, pos_embed=pos_embed, prefix_tokens=prefix_tokens, backend=_backend(backend))


@torch.library.custom_op("vitkernels::patch_embed", mutates_args=())
def patch_embed_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], pos_embed: Optional[Tensor],
                   prefix_tokens: Optional[Tensor], backend: str) -> Tensor:
    return _patch_eager(x, weight, bias, pos_embed, prefix_tokens, backend).contiguous()


@patch_embed_op.register_fake
def _(x, weight, bias, pos_embed, prefix_tokens, backend):
    num_patches = 1
    for s, p in zip(x.shape[2:], weight.shape[2:]):
        num_patches *= s // p
    num_prefix = 0 if prefix_tokens is None else prefix_tokens.shape[1]
    return x.new_empty((x.shape[0], num_prefix + num_patches, weight.shape[0]))


@torch.library.custom_op("vitkernels::patch_embed_backward", mutates_args=())
def patch_embed_backward_op(dout: Tensor, x: Tensor, weight: Tensor, bias: Optional[Tensor],
                            pos_embed: Optional[Tensor], prefix_tokens: Optional[Tensor], backend: str,
                            needs: List[bool]) -> List[Tensor]:
    return _replay_grads(lambda *ts: _patch_eager(*ts, backend), (x, weight, bias, pos_embed, prefix_tokens), needs,
                         dout, -1)


@patch_embed_backward_op.register_fake
def _(dout, x, weight, bias, pos_embed, prefix_tokens, backend, needs):
    return [torch.empty_like(t) if (t is not None and n) else dout.new_empty(0)
            for t, n in zip((x, weight, bias, pos_embed, prefix_tokens), needs)]


def _patch_setup(ctx, inputs, output):
    *tensors, backend = inputs
    ctx.save_for_backward(*tensors)
    ctx.backend = backend


def _patch_backward(ctx, dout):
    needs = [bool(n) for n in ctx.needs_input_grad[:5]]
    grads = patch_embed_backward_op(dout, *ctx.saved_tensors, ctx.backend, needs)
    return _grads_or_none(grads, needs) + (None,)


patch_embed_op.register_autograd(_patch_backward, setup_context=_patch_setup)


def compiling() -> bool:
    """True while torch.compile traces (the ops then go through these custom ops)."""
    is_compiling = getattr(getattr(torch, "compiler", None), "is_compiling", None)
    return bool(is_compiling and is_compiling())


def draw_seed(dropout_p: float) -> Tensor:
    """The seed (a 0-d int64 tensor, traced without a sync) a compiled dropout call replays in its
    backward; -1: no dropout."""
    if dropout_p > 0:
        return torch.randint(0, 2 ** 62, (), dtype=torch.int64)
    return torch.full((), -1, dtype=torch.int64)

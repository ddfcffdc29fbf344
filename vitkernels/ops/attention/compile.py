"""flash_attention under torch.compile: a forward op that returns (out, lse, dropout seed) and a backward op
that runs the same backend's backward kernels on them (see ``vitkernels.ops._compile``); nothing is replayed.

``attention_fwd`` / ``attention_bwd``: custom ops, any backend, dispatch inside (as in eager).
``attention_triton_fwd`` / ``attention_triton_bwd``: the Triton launchers as ``triton_op`` (torch >= 2.6), so
Inductor launches the kernels itself; taken for the triton backend on a CUDA device.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from vitkernels import dispatch
from vitkernels.ops import _compile
from vitkernels.ops.attention.checks import OP, AttentionInputs


def _kernels(q, k, v, bias, scale, dropout_p, backend: str):
    """The kernels dispatch picks for these (already checked) inputs: the same answer in both ops."""
    return dispatch.select(OP, AttentionInputs(q, k, v, bias, scale, dropout_p), _compile.backend_of(backend)).kernels()


def _fake_forward(q, v):
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    return (q.new_empty(q.shape[:-1] + (v.shape[-1],)), q.new_empty(q.shape[:-1], dtype=lse_dtype),
            q.new_empty((2,), dtype=torch.int64))


def _fake_backward(dout, q, k, v, bias, needs_bias):
    return [torch.empty_like(q), torch.empty_like(k), torch.empty_like(v),
            torch.empty_like(bias) if needs_bias else _compile.empty_grad(dout)]


def _outputs(out, lse, rng, dropout_p, q):
    rng = rng if dropout_p > 0 else torch.zeros(2, dtype=torch.int64, device=q.device)  # never a cached tensor
    return _compile.fresh(out, q), _compile.fresh(lse, q), _compile.fresh(rng, q)


def _grads(dq, dk, dv, dbias, q, k, v, bias, dout):
    return [_compile.strided_like(dq, q), _compile.strided_like(dk, k), _compile.strided_like(dv, v),
            _compile.strided_like(dbias, bias) if dbias is not None else _compile.empty_grad(dout)]


# ---- any backend: dispatch when the op runs -----------------------------------------------------------


@torch.library.custom_op("vitkernels::flash_attention_fwd", mutates_args=())
def attention_fwd(q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], scale: float, dropout_p: float,
                  backend: str) -> Tuple[Tensor, Tensor, Tensor]:
    out, lse, rng = _kernels(q, k, v, bias, scale, dropout_p, backend).forward(q, k, v, bias, scale, dropout_p)
    return _outputs(out, lse, rng, dropout_p, q)


@attention_fwd.register_fake
def _(q, k, v, bias, scale, dropout_p, backend):
    return _fake_forward(q, v)


@torch.library.custom_op("vitkernels::flash_attention_bwd", mutates_args=())
def attention_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], out: Tensor, lse: Tensor,
                  rng: Tensor, scale: float, dropout_p: float, backend: str, needs_bias: bool) -> List[Tensor]:
    kernels = _kernels(q, k, v, bias, scale, dropout_p, backend)
    dq, dk, dv, dbias = kernels.backward(dout, q, k, v, bias, out, lse, rng, scale, dropout_p, needs_bias)
    return _grads(dq, dk, dv, dbias, q, k, v, bias, dout)


@attention_bwd.register_fake
def _(dout, q, k, v, bias, out, lse, rng, scale, dropout_p, backend, needs_bias):
    return _fake_backward(dout, q, k, v, bias, needs_bias)


def _setup(ctx, inputs, output):
    q, k, v, bias, scale, dropout_p, backend = inputs
    out, lse, rng = output
    ctx.mark_non_differentiable(lse, rng)
    ctx.save_for_backward(q, k, v, bias, out, lse, rng)
    ctx.attrs = (scale, dropout_p, backend)


def _backward(ctx, dout, _dlse, _drng):
    q, k, v, bias, out, lse, rng = ctx.saved_tensors
    scale, dropout_p, backend = ctx.attrs
    needs = ctx.needs_input_grad[:4]
    grads = attention_bwd(dout, q, k, v, bias, out, lse, rng, scale, dropout_p, backend,
                          bias is not None and bool(needs[3]))
    return _compile.grads_or_none(grads, needs) + (None, None, None)


attention_fwd.register_autograd(_backward, setup_context=_setup)


# ---- the triton backend on a GPU: traced launchers -------------------------------------------------------


@_compile.triton_launcher_op("flash_attention_triton_fwd")
def attention_triton_fwd(q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], scale: float,
                         dropout_p: float) -> Tuple[Tensor, Tensor, Tensor]:
    from vitkernels.ops.attention.triton import flash_attention_fwd_triton

    out, lse, rng = flash_attention_fwd_triton(q, k, v, bias, scale, dropout_p)
    return _outputs(out, lse, rng, dropout_p, q)


@attention_triton_fwd.register_fake
def _(q, k, v, bias, scale, dropout_p):
    return _fake_forward(q, v)


@_compile.triton_launcher_op("flash_attention_triton_bwd")
def attention_triton_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], out: Tensor,
                         lse: Tensor, rng: Tensor, scale: float, dropout_p: float, needs_bias: bool) -> List[Tensor]:
    from vitkernels.ops.attention.triton import flash_attention_bwd_triton

    dq, dk, dv, dbias = flash_attention_bwd_triton(dout, q, k, v, bias, out, lse, rng, scale, dropout_p, needs_bias)
    return _grads(dq, dk, dv, dbias, q, k, v, bias, dout)


@attention_triton_bwd.register_fake
def _(dout, q, k, v, bias, out, lse, rng, scale, dropout_p, needs_bias):
    return _fake_backward(dout, q, k, v, bias, needs_bias)


def _triton_setup(ctx, inputs, output):
    q, k, v, bias, scale, dropout_p = inputs
    out, lse, rng = output
    ctx.mark_non_differentiable(lse, rng)
    ctx.save_for_backward(q, k, v, bias, out, lse, rng)
    ctx.attrs = (scale, dropout_p)


def _triton_backward(ctx, dout, _dlse, _drng):
    q, k, v, bias, out, lse, rng = ctx.saved_tensors
    scale, dropout_p = ctx.attrs
    needs = ctx.needs_input_grad[:4]
    grads = attention_triton_bwd(dout, q, k, v, bias, out, lse, rng, scale, dropout_p,
                                 bias is not None and bool(needs[3]))
    return _compile.grads_or_none(grads, needs) + (None, None)


attention_triton_fwd.register_autograd(_triton_backward, setup_context=_triton_setup)


def compiled_attention(inputs: AttentionInputs, backend: Optional[str]) -> Tensor:
    """The op's output while torch.compile traces (``inputs`` checked)."""
    q, k, v, bias = inputs.q, inputs.k, inputs.v, inputs.bias
    if _compile.traced_triton(OP, q.device.type, str(q.dtype).replace("torch.", ""), _compile.backend_arg(backend)):
        return attention_triton_fwd(q, k, v, bias, inputs.scale, inputs.dropout_p)[0]
    return attention_fwd(q, k, v, bias, inputs.scale, inputs.dropout_p, _compile.backend_arg(backend))[0]

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
from vitkernels.ops.attention.checks import OP, AttentionInputs, RelPos


def _rel(rel_h, rel_w, rel_t, rel_prefix) -> Optional[RelPos]:
    return RelPos(rel_h, rel_w, rel_t, rel_prefix) if rel_h is not None else None


def _kernels(q, k, v, bias, scale, dropout_p, rel_pos, backend: str):
    """The kernels dispatch picks for these (already checked) inputs: the same answer in both ops."""
    inputs = AttentionInputs(q, k, v, bias, scale, dropout_p, rel_pos)
    return dispatch.select(OP, inputs, _compile.backend_of(backend)).kernels()


def _fake_forward(q, v):
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    return (q.new_empty(q.shape[:-1] + (v.shape[-1],)), q.new_empty(q.shape[:-1], dtype=lse_dtype),
            q.new_empty((2,), dtype=torch.int64))


def _fake_backward(dout, q, k, v, bias, needs_bias, rel_h, rel_w, rel_t, needs_rel):
    rel = [torch.empty_like(t) if needs_rel and t is not None else _compile.empty_grad(dout)
           for t in (rel_h, rel_w, rel_t)]
    return [torch.empty_like(q), torch.empty_like(k), torch.empty_like(v),
            torch.empty_like(bias) if needs_bias else _compile.empty_grad(dout)] + rel


def _outputs(out, lse, rng, dropout_p, q):
    rng = rng if dropout_p > 0 else torch.zeros(2, dtype=torch.int64, device=q.device)  # never a cached tensor
    return _compile.fresh(out, q), _compile.fresh(lse, q), _compile.fresh(rng, q)


def _grads(dq, dk, dv, dbias, drel, q, k, v, bias, rel_h, rel_w, rel_t, dout):
    drel = drel if drel is not None else (None, None, None)
    rel = [_compile.strided_like(g, t) if g is not None else _compile.empty_grad(dout)
           for g, t in zip(drel, (rel_h, rel_w, rel_t))]
    return [_compile.strided_like(dq, q), _compile.strided_like(dk, k), _compile.strided_like(dv, v),
            _compile.strided_like(dbias, bias) if dbias is not None else _compile.empty_grad(dout)] + rel


# ---- any backend: dispatch when the op runs -----------------------------------------------------------


@torch.library.custom_op("vitkernels::flash_attention_fwd", mutates_args=())
def attention_fwd(q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], scale: float, dropout_p: float,
                  backend: str, rel_h: Optional[Tensor] = None, rel_w: Optional[Tensor] = None,
                  rel_t: Optional[Tensor] = None, rel_prefix: int = 0) -> Tuple[Tensor, Tensor, Tensor]:
    rel_pos = _rel(rel_h, rel_w, rel_t, rel_prefix)
    kernels = _kernels(q, k, v, bias, scale, dropout_p, rel_pos, backend)
    out, lse, rng = kernels.forward(q, k, v, bias, scale, dropout_p, rel_pos)
    return _outputs(out, lse, rng, dropout_p, q)


@attention_fwd.register_fake
def _(q, k, v, bias, scale, dropout_p, backend, rel_h=None, rel_w=None, rel_t=None, rel_prefix=0):
    return _fake_forward(q, v)


@torch.library.custom_op("vitkernels::flash_attention_bwd", mutates_args=())
def attention_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], out: Tensor, lse: Tensor,
                  rng: Tensor, scale: float, dropout_p: float, backend: str, needs_bias: bool,
                  rel_h: Optional[Tensor] = None, rel_w: Optional[Tensor] = None, rel_t: Optional[Tensor] = None,
                  rel_prefix: int = 0, needs_rel: bool = False) -> List[Tensor]:
    rel_pos = _rel(rel_h, rel_w, rel_t, rel_prefix)
    kernels = _kernels(q, k, v, bias, scale, dropout_p, rel_pos, backend)
    dq, dk, dv, dbias, drel, _ = kernels.backward(dout, q, k, v, bias, out, lse, rng, scale, dropout_p, needs_bias,
                                               rel_pos, needs_rel)
    return _grads(dq, dk, dv, dbias, drel, q, k, v, bias, rel_h, rel_w, rel_t, dout)


@attention_bwd.register_fake
def _(dout, q, k, v, bias, out, lse, rng, scale, dropout_p, backend, needs_bias, rel_h=None, rel_w=None, rel_t=None,
      rel_prefix=0, needs_rel=False):
    return _fake_backward(dout, q, k, v, bias, needs_bias, rel_h, rel_w, rel_t, needs_rel)


def _setup(ctx, inputs, output):
    q, k, v, bias, scale, dropout_p, backend, rel_h, rel_w, rel_t, rel_prefix = inputs
    out, lse, rng = output
    ctx.mark_non_differentiable(lse, rng)
    ctx.save_for_backward(q, k, v, bias, out, lse, rng, rel_h, rel_w, rel_t)
    ctx.attrs = (scale, dropout_p, backend, rel_prefix)


def _backward(ctx, dout, _dlse, _drng):
    q, k, v, bias, out, lse, rng, rel_h, rel_w, rel_t = ctx.saved_tensors
    scale, dropout_p, backend, rel_prefix = ctx.attrs
    needs = tuple(ctx.needs_input_grad) + (False,) * (11 - len(ctx.needs_input_grad))  # rel args left out
    grads = attention_bwd(dout, q, k, v, bias, out, lse, rng, scale, dropout_p, backend,
                          bias is not None and bool(needs[3]), rel_h, rel_w, rel_t, rel_prefix,
                          rel_h is not None and any(needs[7:10]))
    grads = _compile.grads_or_none(grads, needs[:4] + needs[7:10])
    return (grads[:4] + (None, None, None) + grads[4:] + (None,))[:len(ctx.needs_input_grad)]


attention_fwd.register_autograd(_backward, setup_context=_setup)


# ---- the triton backend on a GPU: traced launchers -------------------------------------------------------


@_compile.triton_launcher_op("flash_attention_triton_fwd")
def attention_triton_fwd(q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], scale: float,
                         dropout_p: float, rel_h: Optional[Tensor] = None, rel_w: Optional[Tensor] = None,
                         rel_t: Optional[Tensor] = None, rel_prefix: int = 0) -> Tuple[Tensor, Tensor, Tensor]:
    from vitkernels.ops.attention.triton import flash_attention_fwd_triton

    out, lse, rng = flash_attention_fwd_triton(q, k, v, bias, scale, dropout_p, _rel(rel_h, rel_w, rel_t, rel_prefix))
    return _outputs(out, lse, rng, dropout_p, q)


@attention_triton_fwd.register_fake
def _(q, k, v, bias, scale, dropout_p, rel_h=None, rel_w=None, rel_t=None, rel_prefix=0):
    return _fake_forward(q, v)


@_compile.triton_launcher_op("flash_attention_triton_bwd")
def attention_triton_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], out: Tensor,
                         lse: Tensor, rng: Tensor, scale: float, dropout_p: float, needs_bias: bool,
                         rel_h: Optional[Tensor] = None, rel_w: Optional[Tensor] = None,
                         rel_t: Optional[Tensor] = None, rel_prefix: int = 0, needs_rel: bool = False) -> List[Tensor]:
    from vitkernels.ops.attention.triton import flash_attention_bwd_triton

    dq, dk, dv, dbias, drel = flash_attention_bwd_triton(dout, q, k, v, bias, out, lse, rng, scale, dropout_p,
                                                         needs_bias, _rel(rel_h, rel_w, rel_t, rel_prefix), needs_rel)
    return _grads(dq, dk, dv, dbias, drel, q, k, v, bias, rel_h, rel_w, rel_t, dout)


@attention_triton_bwd.register_fake
def _(dout, q, k, v, bias, out, lse, rng, scale, dropout_p, needs_bias, rel_h=None, rel_w=None, rel_t=None,
      rel_prefix=0, needs_rel=False):
    return _fake_backward(dout, q, k, v, bias, needs_bias, rel_h, rel_w, rel_t, needs_rel)


def _triton_setup(ctx, inputs, output):
    q, k, v, bias, scale, dropout_p, rel_h, rel_w, rel_t, rel_prefix = inputs
    out, lse, rng = output
    ctx.mark_non_differentiable(lse, rng)
    ctx.save_for_backward(q, k, v, bias, out, lse, rng, rel_h, rel_w, rel_t)
    ctx.attrs = (scale, dropout_p, rel_prefix)


def _triton_backward(ctx, dout, _dlse, _drng):
    q, k, v, bias, out, lse, rng, rel_h, rel_w, rel_t = ctx.saved_tensors
    scale, dropout_p, rel_prefix = ctx.attrs
    needs = tuple(ctx.needs_input_grad) + (False,) * (10 - len(ctx.needs_input_grad))  # rel args left out
    grads = attention_triton_bwd(dout, q, k, v, bias, out, lse, rng, scale, dropout_p,
                                 bias is not None and bool(needs[3]), rel_h, rel_w, rel_t, rel_prefix,
                                 rel_h is not None and any(needs[6:9]))
    grads = _compile.grads_or_none(grads, needs[:4] + needs[6:9])
    return (grads[:4] + (None, None) + grads[4:] + (None,))[:len(ctx.needs_input_grad)]


attention_triton_fwd.register_autograd(_triton_backward, setup_context=_triton_setup)


def compiled_attention(inputs: AttentionInputs, backend: Optional[str], triton_can_run: bool = True) -> Tensor:
    """The op's output while torch.compile traces (``inputs`` checked; ``triton_can_run``: the triton
    backend's shape-dependent limits accept them)."""
    q, k, v, bias = inputs.q, inputs.k, inputs.v, inputs.bias
    rel = inputs.rel_pos
    rel_args = () if rel is None else (rel.rel_h, rel.rel_w, rel.rel_t, rel.prefix)
    if triton_can_run and _compile.traced_triton(OP, q.device.type, str(q.dtype).replace("torch.", ""),
                                                 _compile.backend_arg(backend)):
        return attention_triton_fwd(q, k, v, bias, inputs.scale, inputs.dropout_p, *rel_args)[0]
    return attention_fwd(q, k, v, bias, inputs.scale, inputs.dropout_p, _compile.backend_arg(backend), *rel_args)[0]

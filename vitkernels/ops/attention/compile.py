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
from vitkernels.ops.attention.checks import OP, AttentionInputs, RelPos, Rope


def _rel(rel_h, rel_w, rel_t, rel_prefix) -> Optional[RelPos]:
    return RelPos(rel_h, rel_w, rel_t, rel_prefix) if rel_h is not None else None


def _rope(cos, sin, rope_prefix, rotate_half) -> Optional[Rope]:
    return Rope(cos, sin, rope_prefix, rotate_half) if cos is not None else None


def _kernels(q, k, v, bias, scale, dropout_p, rel_pos, rope, backend: str):
    """The kernels dispatch picks for these (already checked) inputs: the same answer in both ops."""
    inputs = AttentionInputs(q, k, v, bias, scale, dropout_p, rel_pos, rope)
    return dispatch.select(OP, inputs, _compile.backend_of(backend)).kernels()


def _fake_forward(q, v):
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    return (q.new_empty(q.shape[:-1] + (v.shape[-1],)), q.new_empty(q.shape[:-1], dtype=lse_dtype),
            q.new_empty((2,), dtype=torch.int64))


def _fake_backward(dout, q, k, v, bias, needs_bias, rel_h, rel_w, rel_t, needs_rel, cos=None, sin=None,
                   needs_rope=False):
    rel = [torch.empty_like(t) if needs_rel and t is not None else _compile.empty_grad(dout)
           for t in (rel_h, rel_w, rel_t)]
    rope = [torch.empty_like(t) if needs_rope and t is not None else _compile.empty_grad(dout) for t in (cos, sin)]
    return [torch.empty_like(q), torch.empty_like(k), torch.empty_like(v),
            torch.empty_like(bias) if needs_bias else _compile.empty_grad(dout)] + rel + rope


def _outputs(out, lse, rng, dropout_p, q):
    rng = rng if dropout_p > 0 else torch.zeros(2, dtype=torch.int64, device=q.device)  # never a cached tensor
    return _compile.fresh(out, q), _compile.fresh(lse, q), _compile.fresh(rng, q)


def _grads(grads, q, k, v, bias, rel_h, rel_w, rel_t, cos, sin, dout):
    dq, dk, dv, dbias, drel, drope = grads
    drel = drel if drel is not None else (None, None, None)
    drope = drope if drope is not None else (None, None)
    extra = [_compile.strided_like(g, t) if g is not None else _compile.empty_grad(dout)
             for g, t in zip(tuple(drel) + tuple(drope), (rel_h, rel_w, rel_t, cos, sin))]
    return [_compile.strided_like(dq, q), _compile.strided_like(dk, k), _compile.strided_like(dv, v),
            _compile.strided_like(dbias, bias) if dbias is not None else _compile.empty_grad(dout)] + extra


# ---- any backend: dispatch when the op runs -----------------------------------------------------------


@torch.library.custom_op("vitkernels::flash_attention_fwd", mutates_args=())
def attention_fwd(q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], scale: float, dropout_p: float,
                  backend: str, rel_h: Optional[Tensor] = None, rel_w: Optional[Tensor] = None,
                  rel_t: Optional[Tensor] = None, rel_prefix: int = 0, cos: Optional[Tensor] = None,
                  sin: Optional[Tensor] = None, rope_prefix: int = 0,
                  rotate_half: bool = False) -> Tuple[Tensor, Tensor, Tensor]:
    rel_pos, rope = _rel(rel_h, rel_w, rel_t, rel_prefix), _rope(cos, sin, rope_prefix, rotate_half)
    kernels = _kernels(q, k, v, bias, scale, dropout_p, rel_pos, rope, backend)
    out, lse, rng = kernels.forward(q, k, v, bias, scale, dropout_p, rel_pos, rope)
    return _outputs(out, lse, rng, dropout_p, q)


@attention_fwd.register_fake
def _(q, k, v, bias, scale, dropout_p, backend, rel_h=None, rel_w=None, rel_t=None, rel_prefix=0, cos=None, sin=None,
      rope_prefix=0, rotate_half=False):
    return _fake_forward(q, v)


@torch.library.custom_op("vitkernels::flash_attention_bwd", mutates_args=())
def attention_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], out: Tensor, lse: Tensor,
                  rng: Tensor, scale: float, dropout_p: float, backend: str, needs_bias: bool,
                  rel_h: Optional[Tensor] = None, rel_w: Optional[Tensor] = None, rel_t: Optional[Tensor] = None,
                  rel_prefix: int = 0, needs_rel: bool = False, cos: Optional[Tensor] = None,
                  sin: Optional[Tensor] = None, rope_prefix: int = 0, rotate_half: bool = False,
                  needs_rope: bool = False) -> List[Tensor]:
    rel_pos, rope = _rel(rel_h, rel_w, rel_t, rel_prefix), _rope(cos, sin, rope_prefix, rotate_half)
    kernels = _kernels(q, k, v, bias, scale, dropout_p, rel_pos, rope, backend)
    grads = kernels.backward(dout, q, k, v, bias, out, lse, rng, scale, dropout_p, needs_bias, rel_pos, needs_rel,
                             rope, needs_rope)
    return _grads(grads, q, k, v, bias, rel_h, rel_w, rel_t, cos, sin, dout)


@attention_bwd.register_fake
def _(dout, q, k, v, bias, out, lse, rng, scale, dropout_p, backend, needs_bias, rel_h=None, rel_w=None, rel_t=None,
      rel_prefix=0, needs_rel=False, cos=None, sin=None, rope_prefix=0, rotate_half=False, needs_rope=False):
    return _fake_backward(dout, q, k, v, bias, needs_bias, rel_h, rel_w, rel_t, needs_rel, cos, sin, needs_rope)


_DEFAULTS = (None, None, None, 0, None, None, 0, False)  # rel_h rel_w rel_t rel_prefix cos sin rope_prefix rotate_half


def _split(inputs, first_rel: int):
    """The op's arguments with the trailing defaults filled in: (leading args, the 8 rel / rope args)."""
    inputs = tuple(inputs)
    rest = inputs[first_rel:] + _DEFAULTS[len(inputs) - first_rel:]
    return inputs[:first_rel], rest


def _setup(ctx, inputs, output):
    (q, k, v, bias, scale, dropout_p, backend), rest = _split(inputs, 7)
    rel_h, rel_w, rel_t, rel_prefix, cos, sin, rope_prefix, rotate_half = rest
    out, lse, rng = output
    ctx.mark_non_differentiable(lse, rng)
    ctx.save_for_backward(q, k, v, bias, out, lse, rng, rel_h, rel_w, rel_t, cos, sin)
    ctx.attrs = (scale, dropout_p, backend, rel_prefix, rope_prefix, rotate_half)


def _needs(ctx, first_rel: int):
    """needs_input_grad padded to every argument (trailing defaults left out of the call), and the flags of
    (q, k, v, bias) + (rel_h, rel_w, rel_t) + (cos, sin)."""
    needs = tuple(ctx.needs_input_grad) + (False,) * (first_rel + 8 - len(ctx.needs_input_grad))
    return needs, needs[:4] + needs[first_rel:first_rel + 3] + needs[first_rel + 4:first_rel + 6]


def _backward(ctx, dout, _dlse, _drng):
    q, k, v, bias, out, lse, rng, rel_h, rel_w, rel_t, cos, sin = ctx.saved_tensors
    scale, dropout_p, backend, rel_prefix, rope_prefix, rotate_half = ctx.attrs
    needs, flags = _needs(ctx, 7)
    grads = attention_bwd(dout, q, k, v, bias, out, lse, rng, scale, dropout_p, backend,
                          bias is not None and bool(flags[3]), rel_h, rel_w, rel_t, rel_prefix,
                          rel_h is not None and any(flags[4:7]), cos, sin, rope_prefix, rotate_half,
                          cos is not None and any(flags[7:9]))
    grads = _compile.grads_or_none(grads, flags)
    full = grads[:4] + (None, None, None) + grads[4:7] + (None,) + grads[7:9] + (None, None)
    return full[:len(ctx.needs_input_grad)]


attention_fwd.register_autograd(_backward, setup_context=_setup)


# ---- the triton backend on a GPU: traced launchers -------------------------------------------------------


@_compile.triton_launcher_op("flash_attention_triton_fwd")
def attention_triton_fwd(q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], scale: float,
                         dropout_p: float, rel_h: Optional[Tensor] = None, rel_w: Optional[Tensor] = None,
                         rel_t: Optional[Tensor] = None, rel_prefix: int = 0, cos: Optional[Tensor] = None,
                         sin: Optional[Tensor] = None, rope_prefix: int = 0,
                         rotate_half: bool = False) -> Tuple[Tensor, Tensor, Tensor]:
    from vitkernels.ops.attention.triton import TritonAttentionKernels

    out, lse, rng = TritonAttentionKernels.forward(q, k, v, bias, scale, dropout_p,
                                                   _rel(rel_h, rel_w, rel_t, rel_prefix),
                                                   _rope(cos, sin, rope_prefix, rotate_half))
    return _outputs(out, lse, rng, dropout_p, q)


@attention_triton_fwd.register_fake
def _(q, k, v, bias, scale, dropout_p, rel_h=None, rel_w=None, rel_t=None, rel_prefix=0, cos=None, sin=None,
      rope_prefix=0, rotate_half=False):
    return _fake_forward(q, v)


@_compile.triton_launcher_op("flash_attention_triton_bwd")
def attention_triton_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], out: Tensor,
                         lse: Tensor, rng: Tensor, scale: float, dropout_p: float, needs_bias: bool,
                         rel_h: Optional[Tensor] = None, rel_w: Optional[Tensor] = None,
                         rel_t: Optional[Tensor] = None, rel_prefix: int = 0, needs_rel: bool = False,
                         cos: Optional[Tensor] = None, sin: Optional[Tensor] = None, rope_prefix: int = 0,
                         rotate_half: bool = False, needs_rope: bool = False) -> List[Tensor]:
    from vitkernels.ops.attention.triton import TritonAttentionKernels

    grads = TritonAttentionKernels.backward(dout, q, k, v, bias, out, lse, rng, scale, dropout_p, needs_bias,
                                            _rel(rel_h, rel_w, rel_t, rel_prefix), needs_rel,
                                            _rope(cos, sin, rope_prefix, rotate_half), needs_rope)
    return _grads(grads, q, k, v, bias, rel_h, rel_w, rel_t, cos, sin, dout)


@attention_triton_bwd.register_fake
def _(dout, q, k, v, bias, out, lse, rng, scale, dropout_p, needs_bias, rel_h=None, rel_w=None, rel_t=None,
      rel_prefix=0, needs_rel=False, cos=None, sin=None, rope_prefix=0, rotate_half=False, needs_rope=False):
    return _fake_backward(dout, q, k, v, bias, needs_bias, rel_h, rel_w, rel_t, needs_rel, cos, sin, needs_rope)


def _triton_setup(ctx, inputs, output):
    (q, k, v, bias, scale, dropout_p), rest = _split(inputs, 6)
    rel_h, rel_w, rel_t, rel_prefix, cos, sin, rope_prefix, rotate_half = rest
    out, lse, rng = output
    ctx.mark_non_differentiable(lse, rng)
    ctx.save_for_backward(q, k, v, bias, out, lse, rng, rel_h, rel_w, rel_t, cos, sin)
    ctx.attrs = (scale, dropout_p, rel_prefix, rope_prefix, rotate_half)


def _triton_backward(ctx, dout, _dlse, _drng):
    q, k, v, bias, out, lse, rng, rel_h, rel_w, rel_t, cos, sin = ctx.saved_tensors
    scale, dropout_p, rel_prefix, rope_prefix, rotate_half = ctx.attrs
    needs, flags = _needs(ctx, 6)
    grads = attention_triton_bwd(dout, q, k, v, bias, out, lse, rng, scale, dropout_p,
                                 bias is not None and bool(flags[3]), rel_h, rel_w, rel_t, rel_prefix,
                                 rel_h is not None and any(flags[4:7]), cos, sin, rope_prefix, rotate_half,
                                 cos is not None and any(flags[7:9]))
    grads = _compile.grads_or_none(grads, flags)
    full = grads[:4] + (None, None) + grads[4:7] + (None,) + grads[7:9] + (None, None)
    return full[:len(ctx.needs_input_grad)]


attention_triton_fwd.register_autograd(_triton_backward, setup_context=_triton_setup)


def compiled_attention(inputs: AttentionInputs, backend: Optional[str], triton_can_run: bool = True) -> Tensor:
    """The op's output while torch.compile traces (``inputs`` checked; ``triton_can_run``: the triton
    backend's shape-dependent limits accept them)."""
    q, k, v, bias = inputs.q, inputs.k, inputs.v, inputs.bias
    rel, rope = inputs.rel_pos, inputs.rope
    extra = ()
    if rel is not None or rope is not None:
        extra = (None, None, None, 0) if rel is None else (rel.rel_h, rel.rel_w, rel.rel_t, rel.prefix)
    if rope is not None:
        extra += (rope.cos, rope.sin, rope.prefix, rope.rotate_half)
    if triton_can_run and _compile.traced_triton(OP, q.device.type, str(q.dtype).replace("torch.", ""),
                                                 _compile.backend_arg(backend)):
        return attention_triton_fwd(q, k, v, bias, inputs.scale, inputs.dropout_p, *extra)[0]
    return attention_fwd(q, k, v, bias, inputs.scale, inputs.dropout_p, _compile.backend_arg(backend), *extra)[0]

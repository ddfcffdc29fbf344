"""window_attention under torch.compile: a forward op that returns (out, lse) and a backward op that runs
the same backend's backward kernels on them (see ``vitkernels.ops._compile``); nothing is replayed.

``window_fwd`` / ``window_bwd``: custom ops, any backend, dispatch inside (as in eager).
``window_triton_fwd`` / ``window_triton_bwd``: the Triton launchers as ``triton_op`` (torch >= 2.6), so
Inductor launches the kernels itself; taken for the triton backend on a CUDA device.
"""
from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from vitkernels import dispatch
from vitkernels.ops import _compile
from vitkernels.ops.window_attention import geometry
from vitkernels.ops.window_attention.checks import OP, WindowInputs, check_window_inputs


def _inputs(qkv, table, qkv_bias, num_heads, window_size, shift_size, scale, logit_scale=None,
            cosine=False) -> WindowInputs:
    return check_window_inputs(qkv, num_heads, tuple(window_size), tuple(shift_size), table, qkv_bias,
                               None if cosine else scale, cosine, logit_scale)


def _kernels(inputs: WindowInputs, backend: str):
    return dispatch.select(OP, inputs, _compile.backend_of(backend)).kernels()


def _fake_forward(qkv, num_heads, window_size, shift_size):
    spatial = tuple(qkv.shape[1:-1])
    window, _ = geometry.resolve_window_shift(spatial, window_size, shift_size)
    padded = geometry.padded_size(spatial, window)
    num_windows = math.prod(p // w for p, w in zip(padded, window))
    lse_dtype = torch.float64 if qkv.dtype == torch.float64 else torch.float32
    return (qkv.new_empty(qkv.shape[:-1] + (qkv.shape[-1] // 3,)),
            qkv.new_empty((qkv.shape[0] * num_windows, num_heads, math.prod(window)), dtype=lse_dtype))


def _fake_backward(dout, qkv, table, qkv_bias, needs, logit_scale=None):
    needs = list(needs) + [False] * (4 - len(needs))
    return [torch.empty_like(t) if (t is not None and n) else _compile.empty_grad(dout)
            for t, n in zip((qkv, table, qkv_bias, logit_scale), needs)]


def _grads(grads, qkv, table, qkv_bias, logit_scale, dout):
    return [_compile.strided_like(g, t) if g is not None else _compile.empty_grad(dout)
            for g, t in zip(grads, (qkv, table, qkv_bias, logit_scale))]


# ---- any backend: dispatch when the op runs -----------------------------------------------------------


@torch.library.custom_op("vitkernels::window_attention_fwd", mutates_args=())
def window_fwd(qkv: Tensor, rel_pos_bias: Optional[Tensor], qkv_bias: Optional[Tensor], num_heads: int,
               window_size: List[int], shift_size: List[int], scale: float, backend: str,
               logit_scale: Optional[Tensor] = None, cosine: bool = False) -> Tuple[Tensor, Tensor]:
    inputs = _inputs(qkv, rel_pos_bias, qkv_bias, num_heads, window_size, shift_size, scale, logit_scale, cosine)
    out, lse, _ = _kernels(inputs, backend).forward(inputs)
    return _compile.fresh(out, qkv), _compile.fresh(lse, qkv)


@window_fwd.register_fake
def _(qkv, rel_pos_bias, qkv_bias, num_heads, window_size, shift_size, scale, backend, logit_scale=None,
      cosine=False):
    return _fake_forward(qkv, num_heads, window_size, shift_size)


@torch.library.custom_op("vitkernels::window_attention_bwd", mutates_args=())
def window_bwd(dout: Tensor, qkv: Tensor, rel_pos_bias: Optional[Tensor], qkv_bias: Optional[Tensor], out: Tensor,
               lse: Tensor, num_heads: int, window_size: List[int], shift_size: List[int], scale: float,
               backend: str, needs: List[bool], logit_scale: Optional[Tensor] = None,
               cosine: bool = False) -> List[Tensor]:
    inputs = _inputs(qkv, rel_pos_bias, qkv_bias, num_heads, window_size, shift_size, scale, logit_scale, cosine)
    grads = _kernels(inputs, backend).backward(dout, inputs, out, lse, tuple(needs) + (False,) * (4 - len(needs)))
    return _grads(grads, qkv, rel_pos_bias, qkv_bias, logit_scale, dout)


@window_bwd.register_fake
def _(dout, qkv, rel_pos_bias, qkv_bias, out, lse, num_heads, window_size, shift_size, scale, backend, needs,
      logit_scale=None, cosine=False):
    return _fake_backward(dout, qkv, rel_pos_bias, qkv_bias, needs, logit_scale)


def _needs(ctx, qkv_bias, table, logit_scale, scale_position):
    # A gradient only for what exists and asks for one (None inputs have nothing to differentiate)
    flags = tuple(ctx.needs_input_grad)
    wants_scale = len(flags) > scale_position and flags[scale_position]
    return [bool(n) and t is not None
            for n, t in zip(flags[:3] + (wants_scale,), (True, table, qkv_bias, logit_scale))]


def _setup(ctx, inputs, output):
    qkv, table, qkv_bias, num_heads, window_size, shift_size, scale, *rest = inputs
    backend = rest[0] if len(rest) in (1, 3) else None  # the triton op has no backend argument
    cosine_args = rest[-2:] if len(rest) >= 2 else (None, False)
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(qkv, table, qkv_bias, cosine_args[0], out, lse)
    ctx.attrs = (num_heads, window_size, shift_size, scale)
    ctx.backend, ctx.cosine = backend, bool(cosine_args[1])


def _backward(ctx, dout, _dlse):
    qkv, table, qkv_bias, logit_scale, out, lse = ctx.saved_tensors
    needs = _needs(ctx, qkv_bias, table, logit_scale, 8)
    grads = window_bwd(dout, qkv, table, qkv_bias, out, lse, *ctx.attrs, ctx.backend, needs, logit_scale, ctx.cosine)
    grads = _compile.grads_or_none(grads, needs)
    return (grads[:3] + (None,) * 5 + grads[3:] + (None,))[:len(ctx.needs_input_grad)]


window_fwd.register_autograd(_backward, setup_context=_setup)


# ---- the triton backend on a GPU: traced launchers -------------------------------------------------------


@_compile.triton_launcher_op("window_attention_triton_fwd")
def window_triton_fwd(qkv: Tensor, rel_pos_bias: Optional[Tensor], qkv_bias: Optional[Tensor], num_heads: int,
                      window_size: List[int], shift_size: List[int], scale: float,
                      logit_scale: Optional[Tensor] = None, cosine: bool = False) -> Tuple[Tensor, Tensor]:
    from vitkernels.ops.window_attention.triton import window_attention_fwd_triton

    out, lse = window_attention_fwd_triton(_inputs(qkv, rel_pos_bias, qkv_bias, num_heads, window_size, shift_size,
                                                   scale, logit_scale, cosine))
    return _compile.fresh(out, qkv), _compile.fresh(lse, qkv)


@window_triton_fwd.register_fake
def _(qkv, rel_pos_bias, qkv_bias, num_heads, window_size, shift_size, scale, logit_scale=None, cosine=False):
    return _fake_forward(qkv, num_heads, window_size, shift_size)


@_compile.triton_launcher_op("window_attention_triton_bwd")
def window_triton_bwd(dout: Tensor, qkv: Tensor, rel_pos_bias: Optional[Tensor], qkv_bias: Optional[Tensor],
                      out: Tensor, lse: Tensor, num_heads: int, window_size: List[int], shift_size: List[int],
                      scale: float, needs: List[bool], logit_scale: Optional[Tensor] = None,
                      cosine: bool = False) -> List[Tensor]:
    from vitkernels.ops.window_attention.triton import TritonWindowKernels

    inputs = _inputs(qkv, rel_pos_bias, qkv_bias, num_heads, window_size, shift_size, scale, logit_scale, cosine)
    grads = TritonWindowKernels.backward(dout, inputs, out, lse, tuple(needs) + (False,) * (4 - len(needs)))
    return _grads(grads, qkv, rel_pos_bias, qkv_bias, logit_scale, dout)


@window_triton_bwd.register_fake
def _(dout, qkv, rel_pos_bias, qkv_bias, out, lse, num_heads, window_size, shift_size, scale, needs,
      logit_scale=None, cosine=False):
    return _fake_backward(dout, qkv, rel_pos_bias, qkv_bias, needs, logit_scale)


def _triton_backward(ctx, dout, _dlse):
    qkv, table, qkv_bias, logit_scale, out, lse = ctx.saved_tensors
    needs = _needs(ctx, qkv_bias, table, logit_scale, 7)
    grads = window_triton_bwd(dout, qkv, table, qkv_bias, out, lse, *ctx.attrs, needs, logit_scale, ctx.cosine)
    grads = _compile.grads_or_none(grads, needs)
    return (grads[:3] + (None,) * 4 + grads[3:] + (None,))[:len(ctx.needs_input_grad)]


window_triton_fwd.register_autograd(_triton_backward, setup_context=_setup)


def compiled_window_attention(inputs: WindowInputs, backend: Optional[str], triton_can_run: bool) -> Tensor:
    """The op's output while torch.compile traces (``inputs`` checked; ``triton_can_run``: the triton
    backend's shape-dependent limits accept them)."""
    qkv, table, qkv_bias = inputs.qkv, inputs.rel_pos_bias, inputs.qkv_bias
    args = (qkv, table, qkv_bias, inputs.num_heads, list(inputs.window_size), list(inputs.shift_size), inputs.scale)
    cosine = (inputs.logit_scale, True) if inputs.cosine else ()
    if triton_can_run and _compile.traced_triton(OP, qkv.device.type, str(qkv.dtype).replace("torch.", ""),
                                                 _compile.backend_arg(backend)):
        return window_triton_fwd(*args, *cosine)[0]
    return window_fwd(*args, _compile.backend_arg(backend), *cosine)[0]

"""patch_embed under torch.compile: a forward op and a backward op that runs the same backend's backward
kernels (see ``vitkernels.ops._compile``); nothing is replayed (the backward needs only the inputs).

``patch_embed_fwd`` / ``patch_embed_bwd``: custom ops, any backend, dispatch inside (as in eager): the
extension's gather (``cpu`` / ``cuda``) is one opaque node, never traced as a constant.
``patch_embed_triton_fwd`` / ``patch_embed_triton_bwd``: the Triton launchers as ``triton_op`` (torch >= 2.6),
so Inductor launches the kernels itself; taken for the triton backend on a CUDA device.
"""
from __future__ import annotations

from typing import List, Optional

import torch
from torch import Tensor

from vitkernels import dispatch
from vitkernels.ops import _compile
from vitkernels.ops.patch_embed.checks import OP, PatchEmbedInputs


def _kernels(x, weight, bias, pos_embed, prefix_tokens, backend: str):
    inputs = PatchEmbedInputs(x, weight, bias, pos_embed, prefix_tokens)
    return dispatch.select(OP, inputs, _compile.backend_of(backend)).kernels()


def _fake_forward(x, weight, prefix_tokens):
    num_patches = 1
    for s, p in zip(x.shape[2:], weight.shape[2:]):
        num_patches *= s // p
    num_prefix = 0 if prefix_tokens is None else prefix_tokens.shape[1]
    return x.new_empty((x.shape[0], num_prefix + num_patches, weight.shape[0]))


def _fake_backward(dout, tensors, needs):
    return [torch.empty_like(t) if (t is not None and n) else _compile.empty_grad(dout) for t, n in zip(tensors, needs)]


def _grads(grads, tensors, dout):
    return [_compile.strided_like(g, t) if g is not None else _compile.empty_grad(dout) for g, t in zip(grads, tensors)]


@torch.library.custom_op("vitkernels::patch_embed_fwd", mutates_args=())
def patch_embed_fwd(x: Tensor, weight: Tensor, bias: Optional[Tensor], pos_embed: Optional[Tensor],
                    prefix_tokens: Optional[Tensor], backend: str) -> Tensor:
    kernels = _kernels(x, weight, bias, pos_embed, prefix_tokens, backend)
    return _compile.fresh(kernels.forward(x, weight, bias, pos_embed, prefix_tokens), x)


@patch_embed_fwd.register_fake
def _(x, weight, bias, pos_embed, prefix_tokens, backend):
    return _fake_forward(x, weight, prefix_tokens)


@torch.library.custom_op("vitkernels::patch_embed_bwd", mutates_args=())
def patch_embed_bwd(dout: Tensor, x: Tensor, weight: Tensor, bias: Optional[Tensor], pos_embed: Optional[Tensor],
                    prefix_tokens: Optional[Tensor], backend: str, needs: List[bool]) -> List[Tensor]:
    tensors = (x, weight, bias, pos_embed, prefix_tokens)
    grads = _kernels(*tensors, backend).backward(dout, *tensors, tuple(needs))
    return _grads(grads, tensors, dout)


@patch_embed_bwd.register_fake
def _(dout, x, weight, bias, pos_embed, prefix_tokens, backend, needs):
    return _fake_backward(dout, (x, weight, bias, pos_embed, prefix_tokens), needs)


def _needs(ctx, tensors):
    return [bool(n) and t is not None for n, t in zip(ctx.needs_input_grad[:5], tensors)]


def _setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:5])
    ctx.attrs = inputs[5:]  # the backend argument (generic op only)


def _backward(ctx, dout):
    tensors = ctx.saved_tensors
    needs = _needs(ctx, tensors)
    grads = patch_embed_bwd(dout, *tensors, *ctx.attrs, needs)
    return _compile.grads_or_none(grads, needs) + (None,)


patch_embed_fwd.register_autograd(_backward, setup_context=_setup)


@_compile.triton_launcher_op("patch_embed_triton_fwd")
def patch_embed_triton_fwd(x: Tensor, weight: Tensor, bias: Optional[Tensor], pos_embed: Optional[Tensor],
                           prefix_tokens: Optional[Tensor]) -> Tensor:
    from vitkernels.ops.patch_embed.triton import patch_embed_fwd_triton

    return _compile.fresh(patch_embed_fwd_triton(x, weight, bias, pos_embed, prefix_tokens), x)


@patch_embed_triton_fwd.register_fake
def _(x, weight, bias, pos_embed, prefix_tokens):
    return _fake_forward(x, weight, prefix_tokens)


@_compile.triton_launcher_op("patch_embed_triton_bwd")
def patch_embed_triton_bwd(dout: Tensor, x: Tensor, weight: Tensor, bias: Optional[Tensor],
                           pos_embed: Optional[Tensor], prefix_tokens: Optional[Tensor],
                           needs: List[bool]) -> List[Tensor]:
    from vitkernels.ops.patch_embed.triton import patch_embed_bwd_triton

    tensors = (x, weight, bias, pos_embed, prefix_tokens)
    return _grads(patch_embed_bwd_triton(dout, *tensors, tuple(needs)), tensors, dout)


@patch_embed_triton_bwd.register_fake
def _(dout, x, weight, bias, pos_embed, prefix_tokens, needs):
    return _fake_backward(dout, (x, weight, bias, pos_embed, prefix_tokens), needs)


def _triton_backward(ctx, dout):
    tensors = ctx.saved_tensors
    needs = _needs(ctx, tensors)
    return _compile.grads_or_none(patch_embed_triton_bwd(dout, *tensors, needs), needs)


patch_embed_triton_fwd.register_autograd(_triton_backward, setup_context=_setup)


def compiled_patch_embed(inputs: PatchEmbedInputs, backend: Optional[str]) -> Tensor:
    """The op's output while torch.compile traces (``inputs`` checked)."""
    x = inputs.x
    tensors = (x, inputs.weight, inputs.bias, inputs.pos_embed, inputs.prefix_tokens)
    if _compile.traced_triton(OP, x.device.type, str(x.dtype).replace("torch.", ""), _compile.backend_arg(backend)):
        return patch_embed_triton_fwd(*tensors)
    return patch_embed_fwd(*tensors, _compile.backend_arg(backend))

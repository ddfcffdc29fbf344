"""window_attention: Swin / Video Swin shifted-window attention over a whole feature map."""
from __future__ import annotations

import functools
from typing import List, Optional, Sequence, Union

import torch

from vitkernels import dispatch
from vitkernels.ops import _compile, _tracing
from vitkernels.ops._checks import autocast_cast, autocast_dtype
from vitkernels.ops.cpu_limits import cpu_reasons
from vitkernels.ops.triton_limits import triton_reasons
from vitkernels.ops.window_attention.checks import OP, WindowInputs, check_window_inputs
from vitkernels.ops.window_attention.compile import compiled_window_attention
from vitkernels.ops.window_attention.function import window_attention_function
from vitkernels.ops.window_attention.reference import ReferenceWindowKernels, window_attention_reference

IntOrTuple = Union[int, Sequence[int]]


def window_attention(
    qkv: torch.Tensor,
    *,
    num_heads: int,
    window_size: IntOrTuple,
    shift_size: IntOrTuple = 0,
    rel_pos_bias: Optional[torch.Tensor] = None,
    qkv_bias: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    cosine: bool = False,
    logit_scale: Optional[torch.Tensor] = None,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Shifted-window attention with cyclic shift, padding, partition, relative-position bias, shift
    mask and window reverse inside.

    Args:
        qkv: (B, H, W, 3C) (2-D) or (B, T, H, W, 3C) (3-D): the qkv Linear applied to the unpadded map,
            channels [q | k | v], each C = num_heads * head_dim, heads major.
        num_heads: heads; window_size, shift_size: int or tuple of 2 (3); 0 <= shift < window. A window
            not smaller than the map along a dim is clipped to the map, with no shift there (timm).
        rel_pos_bias: table ((2wh-1)(2ww-1), num_heads) for the window used (2-D, as timm builds it) or
            ((2wt-1)(2wh-1)(2ww-1), num_heads) for the configured window (3-D, as Video Swin). Gets a grad.
        qkv_bias: (3C,), the value padded tokens take; None: zeros.
        scale: default head_dim ** -0.5 (None with ``cosine``).
        cosine: Swin V2's scaled cosine attention: q and k L2-normalised per head inside the kernels
            (``F.normalize``), logits ``q_hat . k_hat * exp(min(logit_scale, log(100)))`` before the table
            (pass Swin V2's ``16 * sigmoid(cpb_mlp(...))`` table as ``rel_pos_bias``) and the shift mask.
        logit_scale: with ``cosine``: the per-head log scale, (num_heads,) or (num_heads, 1, 1) (Swin V2's
            ``attn.logit_scale``), float32 or qkv's dtype (kept as it is under autocast). Gets a grad
            (zero where the clamp at log(100) holds, as torch.clamp's).
        backend: None (dispatch picks), "reference", "triton", "cuda" or "cpu".

    Returns:
        (B, H, W, C) or (B, T, H, W, C): attention output before ``proj`` at the original positions.
        Under tracers and exporters, with meta or empty inputs: see ``vitkernels.ops._tracing``.
    """
    proxy = _tracing.fx_proxy(qkv, rel_pos_bias, qkv_bias, logit_scale)
    if proxy is not None:  # FX symbolic tracing: one node
        return _tracing.fx_leaf(proxy, window_attention, (qkv,),
                                dict(num_heads=num_heads, window_size=window_size, shift_size=shift_size,
                                     rel_pos_bias=rel_pos_bias, qkv_bias=qkv_bias, scale=scale, cosine=cosine,
                                     logit_scale=logit_scale, backend=backend))
    if isinstance(qkv, torch.Tensor) and (ac := autocast_dtype(qkv.device.type)) is not None:
        qkv, rel_pos_bias, qkv_bias = autocast_cast(ac, qkv, rel_pos_bias, qkv_bias)
        if isinstance(logit_scale, torch.Tensor) and logit_scale.is_floating_point() and logit_scale.dtype != torch.float32:
            logit_scale = logit_scale.to(ac)  # float32 stays: the logit scale is exponentiated (up to 100)
        with torch.autocast(qkv.device.type, enabled=False):
            return window_attention(qkv, num_heads=num_heads, window_size=window_size, shift_size=shift_size,
                                    rel_pos_bias=rel_pos_bias, qkv_bias=qkv_bias, scale=scale, cosine=cosine,
                                    logit_scale=logit_scale, backend=backend)
    if _tracing.plain_math_reason() is not None:  # jit.trace / ONNX export: record the reference math
        return _reference_run(check_window_inputs(qkv, num_heads, window_size, shift_size, rel_pos_bias, qkv_bias,
                                                  scale, cosine, logit_scale))
    if _compile.compiling():  # torch.compile: a forward op and a backward op (compile.py)
        inputs = check_window_inputs(qkv, num_heads, window_size, shift_size, rel_pos_bias, qkv_bias, scale, cosine,
                                     logit_scale)
        return compiled_window_attention(inputs, backend, triton_can_run=not _triton_shape_reasons(inputs))
    sig = dispatch.tensor_signature
    try:
        signature = (sig(qkv), sig(rel_pos_bias), sig(qkv_bias), type(num_heads), num_heads, _hashable(window_size),
                     _hashable(shift_size), type(scale), scale, type(cosine), cosine, sig(logit_scale), backend,
                     _CALLS.environment())
    except (AttributeError, TypeError, RuntimeError):  # not plain tensors / hashable: the checks say what is wrong
        signature = None
    known = _CALLS.get(signature)
    if known is not None:  # checked and dispatched before: same metadata, same answer (geometry included)
        impl, template = known
        return impl.run(template.with_tensors(qkv, rel_pos_bias, qkv_bias, logit_scale))
    inputs = check_window_inputs(qkv, num_heads, window_size, shift_size, rel_pos_bias, qkv_bias, scale, cosine,
                                 logit_scale)
    impl = dispatch.select(OP, inputs, backend)
    _CALLS.put(signature, (impl, inputs.with_tensors(None, None, None, None)))
    return impl.run(inputs)


_CALLS = dispatch.call_memo(OP)


def _hashable(size):
    """A window or shift size as a key: lists as tuples, each element with its type (True is not 1)."""
    items = tuple(size) if isinstance(size, (list, tuple)) else (size,)
    return type(size), tuple((type(i), i) for i in items)


def _reference_run(inputs: WindowInputs) -> torch.Tensor:
    return window_attention_reference(inputs.qkv, inputs.num_heads, inputs.window_size, inputs.shift_size,
                                      inputs.rel_pos_bias, inputs.qkv_bias, None if inputs.cosine else inputs.scale,
                                      inputs.cosine, inputs.logit_scale)


def _triton_reasons(inputs: WindowInputs) -> List[str]:
    return triton_reasons(inputs.device, inputs.dtype) + _triton_shape_reasons(inputs)


def _triton_shape_reasons(inputs: WindowInputs) -> List[str]:
    reasons = []
    if inputs.qkv.stride(-1) != 1:
        reasons.append(f"qkv must have unit stride in its channel dim, got strides {tuple(inputs.qkv.stride())}")
    if inputs.qkv_bias is not None and inputs.qkv_bias.stride(0) != 1:
        reasons.append(f"qkv_bias must have unit stride, got {inputs.qkv_bias.stride(0)}")
    if inputs.head_dim > 256:
        reasons.append(f"head_dim={inputs.head_dim} (supported up to 256)")
    return reasons


@functools.lru_cache(maxsize=None)  # the import statement costs a dict walk per call
def _triton_kernels():
    from vitkernels.ops.window_attention.triton import TritonWindowKernels  # imports triton: only when used

    return TritonWindowKernels


def _triton_run(inputs: WindowInputs) -> torch.Tensor:
    return window_attention_function(_triton_kernels(), inputs)


@functools.lru_cache(maxsize=None)  # the import statement costs a dict walk per call
def _cpu_kernels():
    from vitkernels.ops.window_attention.cpu import CpuWindowKernels

    return CpuWindowKernels


def _cpu_run(inputs: WindowInputs) -> torch.Tensor:
    return window_attention_function(_cpu_kernels(), inputs)


dispatch.register(OP, "reference", reasons=lambda inputs: [], run=_reference_run,
                  kernels=lambda: ReferenceWindowKernels)
dispatch.register(OP, "triton", reasons=_triton_reasons, run=_triton_run, kernels=_triton_kernels)
def _cpu_reasons(inputs: WindowInputs) -> List[str]:
    reasons = cpu_reasons(inputs.device, inputs.dtype)
    return reasons


dispatch.register(OP, "cpu", reasons=_cpu_reasons, run=_cpu_run, kernels=_cpu_kernels)

__all__ = ["window_attention", "window_attention_reference", "check_window_inputs", "WindowInputs"]

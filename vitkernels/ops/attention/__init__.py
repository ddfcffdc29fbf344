"""flash_attention: softmax(q k^T * scale + bias) v without an N x N matrix in memory."""
from __future__ import annotations

from typing import List, Optional

import torch

from vitkernels import dispatch
from vitkernels.ops import _compile, _tracing
from vitkernels.ops.attention.checks import OP, AttentionInputs, check_attention_inputs
from vitkernels.ops.attention.compile import compiled_attention
from vitkernels.ops.attention.function import AttentionFunction
from vitkernels.ops.attention.reference import ReferenceAttentionKernels, attention_reference
from vitkernels.ops._checks import autocast_cast, autocast_dtype
from vitkernels.ops.cpu_limits import cpu_reasons
from vitkernels.ops.triton_limits import triton_reasons


def flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    bias: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    dropout_p: float = 0.0,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Attention ``softmax(q @ k^T * scale + bias) @ v``, as
    ``F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale, dropout_p=dropout_p)``.

    Args:
        q: (B, H, Nq, D); k, v: (B, H, Nk, D). Any strides with a unit last stride (the permuted views of
            one ``(B, N, 3, H, D)`` qkv tensor go in as they are). fp16/bf16/fp32 (fp64 on ``reference``).
            D: a multiple of 8 from 16 to 256.
        bias: additive, broadcastable to (B, H, Nq, Nk), dtype of q; gets a gradient (summed over the
            broadcast dims) when it requires one. A 0/-inf key-padding mask is a (B, 1, 1, Nk) bias.
        scale: default ``D ** -0.5``.
        dropout_p: dropout on the probabilities, drawn from torch's RNG.
        backend: None (dispatch picks), "reference", "triton", "cuda" or "cpu".

    Returns:
        (B, H, Nq, D) in q's dtype. A row whose logits are all -inf gives zeros, never NaN.
        Under autocast, float inputs are taken in the autocast dtype. Under tracers and exporters, with
        meta or empty inputs: see ``vitkernels.ops._tracing``.
    """
    proxy = _tracing.fx_proxy(q, k, v, bias)
    if proxy is not None:  # FX symbolic tracing: one node
        return _tracing.fx_leaf(proxy, flash_attention, (q, k, v),
                                dict(bias=bias, scale=scale, dropout_p=dropout_p, backend=backend))
    if isinstance(q, torch.Tensor) and (ac := autocast_dtype(q.device.type)) is not None:
        q, k, v, bias = autocast_cast(ac, q, k, v, bias)
        with torch.autocast(q.device.type, enabled=False):
            return flash_attention(q, k, v, bias=bias, scale=scale, dropout_p=dropout_p, backend=backend)
    if _tracing.plain_math_reason() is not None:  # jit.trace / ONNX export: record the reference math
        return _reference_run(check_attention_inputs(q, k, v, bias, scale, dropout_p))
    if _compile.compiling():  # torch.compile: a forward op and a backward op (compile.py)
        return compiled_attention(check_attention_inputs(q, k, v, bias, scale, dropout_p), backend)
    signature = _signature(q, k, v, bias, scale, dropout_p, backend)
    known = _CALLS.get(signature)
    if known is not None:  # checked and dispatched before: same metadata, same answer
        impl, scale, dropout_p = known
        return impl.run(AttentionInputs(q, k, v, bias, scale, dropout_p))
    inputs = check_attention_inputs(q, k, v, bias, scale, dropout_p)
    impl = dispatch.select(OP, inputs, backend)
    _CALLS.put(signature, (impl, inputs.scale, inputs.dropout_p))
    return impl.run(inputs)


_CALLS = dispatch.call_memo(OP)


def _signature(q, k, v, bias, scale, dropout_p, backend):
    sig = dispatch.tensor_signature
    try:
        signature = (sig(q), sig(k), sig(v), sig(bias), type(scale), scale, type(dropout_p), dropout_p, backend,
                     _CALLS.environment())
        hash(signature)
        return signature
    except (AttributeError, TypeError, RuntimeError):  # not plain tensors / hashable: the checks say what is wrong
        return None


def _reference_run(inputs: AttentionInputs) -> torch.Tensor:
    return attention_reference(inputs.q, inputs.k, inputs.v, inputs.bias, inputs.scale, inputs.dropout_p)


def _triton_reasons(inputs: AttentionInputs) -> List[str]:
    return triton_reasons(inputs.device, inputs.dtype)


def _triton_kernels():
    from vitkernels.ops.attention.triton import TritonAttentionKernels  # imports triton: only when used

    return TritonAttentionKernels


def _triton_run(inputs: AttentionInputs) -> torch.Tensor:
    return AttentionFunction.apply(_triton_kernels(), inputs.q, inputs.k, inputs.v, inputs.bias, inputs.scale,
                                   inputs.dropout_p)


def _cpu_kernels():
    from vitkernels.ops.attention.cpu import CpuAttentionKernels

    return CpuAttentionKernels


def _cpu_run(inputs: AttentionInputs) -> torch.Tensor:
    return AttentionFunction.apply(_cpu_kernels(), inputs.q, inputs.k, inputs.v, inputs.bias, inputs.scale,
                                   inputs.dropout_p)


dispatch.register(OP, "reference", reasons=lambda inputs: [], run=_reference_run,
                  kernels=lambda: ReferenceAttentionKernels)
dispatch.register(OP, "triton", reasons=_triton_reasons, run=_triton_run, kernels=_triton_kernels)
dispatch.register(OP, "cpu", reasons=lambda inputs: cpu_reasons(inputs.device, inputs.dtype), run=_cpu_run,
                  kernels=_cpu_kernels)

__all__ = ["flash_attention", "attention_reference", "check_attention_inputs", "AttentionInputs"]

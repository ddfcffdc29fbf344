"""flash_attention: softmax(q k^T * scale + bias) v without an N x N matrix in memory."""
from __future__ import annotations

import functools
from typing import List, Optional, Tuple, Union

import torch

from vitkernels import dispatch
from vitkernels.ops import _compile, _tracing
from vitkernels.ops.attention.checks import OP, AttentionInputs, RelPos, Rope, check_attention_inputs
from vitkernels.ops.attention.compile import compiled_attention
from vitkernels.ops.attention.function import apply_attention
from vitkernels.ops.attention.reference import ReferenceAttentionKernels, attention_reference, with_rel_pos
from vitkernels.ops.attention.rel_pos import decomposed_rel_pos
from vitkernels.ops.attention.rope import apply_rope
from vitkernels.ops._checks import autocast_cast, autocast_dtype
from vitkernels.ops.cpu_limits import cpu_reasons
from vitkernels.ops.triton_limits import triton_reasons


def flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    bias: Optional[torch.Tensor] = None,
    rel_pos: Optional[Union[RelPos, Tuple[torch.Tensor, torch.Tensor]]] = None,
    rope: Optional[Union[Rope, Tuple[torch.Tensor, torch.Tensor]]] = None,
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
        rel_pos: a decomposed relative-position bias (SAM, ViTDet, MViTv2): ``RelPos(rel_h, rel_w,
            rel_t=None, prefix=0)`` or ``(rel_h, rel_w)``, per-axis terms of shape (B, H, Nq - prefix, K)
            over a row-major key grid; added tile by tile, never formed as Nq x Nk (see ``RelPos``).
            Combines with ``bias`` and dropout; its terms get gradients.
        rope: rotary position embedding (EVA-02, DINOv3-style 2-D RoPE): ``Rope(cos, sin, prefix=0,
            rotate_half=False)`` or ``(cos, sin)``, per-token tables (..., Nq - prefix, D) in timm's layout;
            q and k are rotated as the kernels load them (never written back) and the backward rotates dq
            and dk back (see ``Rope``). Needs Nq == Nk; combines with ``bias``, ``rel_pos`` and dropout;
            the tables get gradients when they require one.
        scale: default ``D ** -0.5``.
        dropout_p: dropout on the probabilities, drawn from torch's RNG.
        backend: None (dispatch picks), "reference", "triton", "cuda" or "cpu".

    Returns:
        (B, H, Nq, D) in q's dtype. A row whose logits are all -inf gives zeros, never NaN.
        Under autocast, float inputs are taken in the autocast dtype. Under tracers and exporters, with
        meta or empty inputs: see ``vitkernels.ops._tracing``.
    """
    rel_terms = _rel_terms(rel_pos)
    rope_tables = _rel_terms(rope)
    proxy = _tracing.fx_proxy(q, k, v, bias, *rel_terms, *rope_tables)
    if proxy is not None:  # FX symbolic tracing: one node
        return _tracing.fx_leaf(proxy, flash_attention, (q, k, v),
                                dict(bias=bias, rel_pos=rel_pos, rope=rope, scale=scale, dropout_p=dropout_p,
                                     backend=backend))
    if isinstance(q, torch.Tensor) and (ac := autocast_dtype(q.device.type)) is not None:
        q, k, v, bias = autocast_cast(ac, q, k, v, bias)
        if rel_terms:
            rel_pos = _cast_rel_pos(ac, rel_pos)
        if rope_tables:
            rope = _cast_rope(ac, rope)
        with torch.autocast(q.device.type, enabled=False):
            return flash_attention(q, k, v, bias=bias, rel_pos=rel_pos, rope=rope, scale=scale, dropout_p=dropout_p,
                                   backend=backend)
    if _tracing.plain_math_reason() is not None:  # jit.trace / ONNX export: record the reference math
        return _reference_run(check_attention_inputs(q, k, v, bias, scale, dropout_p, rel_pos, rope))
    if _compile.compiling():  # torch.compile: a forward op and a backward op (compile.py)
        inputs = check_attention_inputs(q, k, v, bias, scale, dropout_p, rel_pos, rope)
        return compiled_attention(inputs, backend, triton_can_run=not _triton_shape_reasons(inputs))
    signature = _signature(q, k, v, bias, rel_pos, rope, scale, dropout_p, backend)
    known = _CALLS.get(signature)
    if known is not None:  # checked and dispatched before: same metadata, same answer
        impl, scale, dropout_p = known
        if rel_pos is not None and not isinstance(rel_pos, RelPos):
            rel_pos = RelPos(*rel_pos)
        if rope is not None:
            rope = _rope_views(rope)
        return impl.run(AttentionInputs(q, k, v, bias, scale, dropout_p, rel_pos, rope))
    inputs = check_attention_inputs(q, k, v, bias, scale, dropout_p, rel_pos, rope)
    impl = dispatch.select(OP, inputs, backend)
    _CALLS.put(signature, (impl, inputs.scale, inputs.dropout_p))
    return impl.run(inputs)


_CALLS = dispatch.call_memo(OP)


def _rel_terms(rel_pos) -> tuple:
    """The tensors (or proxies) inside a rel_pos argument; () for None or anything unexpected (the checks
    then say what is wrong)."""
    if isinstance(rel_pos, torch.fx.Proxy):  # decomposed_rel_pos's node under FX
        return (rel_pos,)
    if rel_pos is None or not isinstance(rel_pos, (tuple, list)):
        return ()
    return tuple(t for t in rel_pos if isinstance(t, (torch.Tensor, torch.fx.Proxy)))


def _cast_rel_pos(dtype, rel_pos):
    if isinstance(rel_pos, RelPos):
        return rel_pos._replace(**{name: t.to(dtype) for name, t in zip(("rel_h", "rel_w", "rel_t"), rel_pos[:3])
                                   if isinstance(t, torch.Tensor) and t.is_floating_point()})
    return type(rel_pos)(autocast_cast(dtype, *rel_pos))


def _cast_rope(dtype, rope):
    """Under autocast: float32 tables stay (the kernels rotate in fp32, as timm with fp32 tables); others
    take the autocast dtype."""
    def cast(t):
        return t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float32 else t
    if isinstance(rope, Rope):
        return rope._replace(cos=cast(rope.cos), sin=cast(rope.sin))
    return type(rope)(cast(t) for t in rope)


def _rope_views(rope) -> Rope:
    """A memoised call's rope as the checks return it (4-D views of the tables, no copy)."""
    rope = rope if isinstance(rope, Rope) else Rope(*rope)
    lead = (None,) * (4 - rope.cos.dim())
    return rope._replace(cos=rope.cos[lead], sin=rope.sin[lead])


def _signature(q, k, v, bias, rel_pos, rope, scale, dropout_p, backend):
    sig = dispatch.tensor_signature
    try:
        rope_key = None
        if rope is not None:
            if type(rope) not in (Rope, tuple) or len(rope) not in (2, 4):
                return None
            rope_key = (type(rope), sig(rope[0]), sig(rope[1]),
                        tuple((type(a), a) for a in rope[2:]))
        rel = None
        if rel_pos is not None:
            if type(rel_pos) not in (RelPos, tuple) or len(rel_pos) not in (2, 4):
                return None
            terms = [t for t in rel_pos[:3] if t is not None]
            rel = (type(rel_pos), tuple(sig(t) for t in rel_pos[:3]),
                   (type(rel_pos[3]), rel_pos[3]) if len(rel_pos) == 4 else None,
                   torch.is_grad_enabled() and any(t.requires_grad for t in terms))  # triton's grid limit
        signature = (sig(q), sig(k), sig(v), sig(bias), rel, rope_key, type(scale), scale, type(dropout_p), dropout_p,
                     backend, _CALLS.environment())
        return signature
    except (AttributeError, TypeError, RuntimeError):  # not plain tensors / hashable: the checks say what is wrong
        return None


def _reference_run(inputs: AttentionInputs) -> torch.Tensor:
    q, k = inputs.q, inputs.k
    bias = with_rel_pos(inputs.bias, inputs.rel_pos, q.shape[-2], k.shape[-2])
    if inputs.rope is not None:
        q, k = apply_rope(q, inputs.rope), apply_rope(k, inputs.rope)
    return attention_reference(q, k, inputs.v, bias, inputs.scale, inputs.dropout_p)


def _triton_reasons(inputs: AttentionInputs) -> List[str]:
    return triton_reasons(inputs.device, inputs.dtype) + _triton_shape_reasons(inputs)


def _triton_shape_reasons(inputs: AttentionInputs) -> List[str]:
    rel = inputs.rel_pos
    if rel is None:
        return []
    from vitkernels.ops.attention.triton_configs import REL_AXIS_MAX

    reasons = []
    if max(rel.key_grid) > REL_AXIS_MAX and _rel_grad_wanted(rel):
        reasons.append(f"the {rel.describe()} has an axis longer than {REL_AXIS_MAX}: the triton kernels reduce "
                       "its gradient in registers (without a gradient, under torch.no_grad or with terms that "
                       "do not require grad, triton takes any grid); backend='cpu' or 'reference' take any grid")
    if any((t.shape[2] - 1) * abs(t.stride(2)) + (t.shape[3] - 1) * abs(t.stride(3)) >= 2 ** 31 for t in rel.terms):
        reasons.append("a rel_pos term's (Nq, K) slice spans 2^31 elements or more (the triton kernels index it "
                       "with 32-bit offsets); backend='cpu' or 'reference' take it")
    return reasons


def _rel_grad_wanted(rel: RelPos) -> bool:
    """Whether the backward would compute the rel_pos terms' gradient (so the memo keys on it too)."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in rel.terms)


@functools.lru_cache(maxsize=None)  # the import statement costs a dict walk per call
def _triton_kernels():
    from vitkernels.ops.attention.triton import TritonAttentionKernels  # imports triton: only when used

    return TritonAttentionKernels


def _triton_run(inputs: AttentionInputs) -> torch.Tensor:
    return apply_attention(_triton_kernels(), inputs)


@functools.lru_cache(maxsize=None)  # the import statement costs a dict walk per call
def _cpu_kernels():
    from vitkernels.ops.attention.cpu import CpuAttentionKernels

    return CpuAttentionKernels


def _cpu_run(inputs: AttentionInputs) -> torch.Tensor:
    return apply_attention(_cpu_kernels(), inputs)


dispatch.register(OP, "reference", reasons=lambda inputs: [], run=_reference_run,
                  kernels=lambda: ReferenceAttentionKernels)
dispatch.register(OP, "triton", reasons=_triton_reasons, run=_triton_run, kernels=_triton_kernels)
def _cpu_reasons(inputs: AttentionInputs) -> List[str]:
    reasons = cpu_reasons(inputs.device, inputs.dtype)
    return reasons


dispatch.register(OP, "cpu", reasons=_cpu_reasons, run=_cpu_run, kernels=_cpu_kernels)

__all__ = ["flash_attention", "attention_reference", "check_attention_inputs", "AttentionInputs", "RelPos", "Rope",
           "decomposed_rel_pos"]

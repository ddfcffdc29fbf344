"""patch_embed: patchify + projection + bias (+ pos_embed, prefix tokens) in one op."""
from __future__ import annotations

import functools
from typing import List, Optional

import torch

from vitkernels import dispatch
from vitkernels.ops import _compile, _tracing
from vitkernels.ops.patch_embed.checks import OP, PatchEmbedInputs, check_patch_embed_inputs
from vitkernels.ops.patch_embed.compile import compiled_patch_embed
from vitkernels.ops.patch_embed.function import apply_patch_embed
from vitkernels.ops.patch_embed.gather_gemm import GatherGemmKernels
from vitkernels.ops.patch_embed.reference import ReferencePatchEmbedKernels, patch_embed_reference
from vitkernels.ops._checks import autocast_cast, autocast_dtype
from vitkernels.ops.cpu_limits import cpu_reasons
from vitkernels.ops.triton_limits import triton_reasons


def patch_embed(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    pos_embed: Optional[torch.Tensor] = None,
    prefix_tokens: Optional[torch.Tensor] = None,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Patch embedding ``cat(prefix_tokens.expand(B), patches @ W^T + bias) + pos_embed``: a strided
    Conv2d/Conv3d (kernel == stride == patch) + flatten + transpose + cat + add, in one op.

    Args:
        x: (B, C, H, W) image or (B, C, T, H, W) video, any strides (channels-last too).
        weight: (E, C, ph, pw) or (E, C, pt, ph, pw), timm's ``PatchEmbed.proj.weight``; the patch size is
            ``weight.shape[2:]`` and must divide the map.
        bias: (E,). prefix_tokens: (1, P, E) (cls, or cls + dist), prepended.
        pos_embed: (1, P + Np, E), or (1, Np, E) when the prefix tokens get no position.
        backend: None (dispatch picks), "reference", "triton", "cuda" or "cpu".

    Returns:
        (B, P + Np, E) in x's dtype; patches in row-major (t, h, w) order. Under tracers and exporters,
        with meta or empty inputs: see ``vitkernels.ops._tracing``.
    """
    proxy = _tracing.fx_proxy(x, weight, bias, pos_embed, prefix_tokens)
    if proxy is not None:  # FX symbolic tracing: one node
        return _tracing.fx_leaf(proxy, patch_embed, (x, weight, bias),
                                dict(pos_embed=pos_embed, prefix_tokens=prefix_tokens, backend=backend))
    if isinstance(x, torch.Tensor) and (ac := autocast_dtype(x.device.type)) is not None:
        x, weight, bias, pos_embed, prefix_tokens = autocast_cast(ac, x, weight, bias, pos_embed, prefix_tokens)
        with torch.autocast(x.device.type, enabled=False):
            return patch_embed(x, weight, bias, pos_embed=pos_embed, prefix_tokens=prefix_tokens, backend=backend)
    if _tracing.plain_math_reason() is not None:  # jit.trace / ONNX export: record the reference math
        return _reference_run(check_patch_embed_inputs(x, weight, bias, pos_embed, prefix_tokens))
    if _compile.compiling():  # torch.compile: a forward op and a backward op (compile.py)
        return compiled_patch_embed(check_patch_embed_inputs(x, weight, bias, pos_embed, prefix_tokens), backend)
    sig = dispatch.tensor_signature
    try:
        signature = (sig(x), sig(weight), sig(bias), sig(pos_embed), sig(prefix_tokens), backend,
                     _CALLS.environment())
    except (AttributeError, TypeError, RuntimeError):  # not plain tensors / hashable: the checks say what is wrong
        signature = None
    impl = _CALLS.get(signature)
    if impl is not None:  # checked and dispatched before: same metadata, same answer
        return impl.run(PatchEmbedInputs(x, weight, bias, pos_embed, prefix_tokens))
    inputs = check_patch_embed_inputs(x, weight, bias, pos_embed, prefix_tokens)
    impl = dispatch.select(OP, inputs, backend)
    _CALLS.put(signature, impl)
    return impl.run(inputs)


_CALLS = dispatch.call_memo(OP)


def _reference_run(inputs: PatchEmbedInputs) -> torch.Tensor:
    return patch_embed_reference(inputs.x, inputs.weight, inputs.bias, inputs.pos_embed, inputs.prefix_tokens)


def _gather_gemm_run(inputs: PatchEmbedInputs) -> torch.Tensor:
    return apply_patch_embed(GatherGemmKernels, inputs)


def _device_reasons(device_type: str):
    def reasons(inputs: PatchEmbedInputs) -> List[str]:
        out = []
        if inputs.device.type != device_type:
            out.append(f"tensors are on {inputs.device}, this backend needs {device_type} tensors")
        if not inputs.weight.is_contiguous():
            out.append(f"weight must be contiguous (a Conv weight), got strides {tuple(inputs.weight.stride())}")
        return out
    return reasons


@functools.lru_cache(maxsize=None)  # the import statement costs a dict walk per call
def _cpu_kernels():
    from vitkernels.ops.patch_embed.cpu import CpuPatchEmbedKernels

    return CpuPatchEmbedKernels


def _cpu_run(inputs: PatchEmbedInputs) -> torch.Tensor:
    return apply_patch_embed(_cpu_kernels(), inputs)


def _cpu_reasons(inputs: PatchEmbedInputs) -> List[str]:
    # torch's conv computes every float dtype: only the device limits this backend
    return [r for r in cpu_reasons(inputs.device, inputs.dtype) if not r.startswith("dtype")]


@functools.lru_cache(maxsize=None)  # the import statement costs a dict walk per call
def _triton_kernels():
    from vitkernels.ops.patch_embed.triton import TritonPatchEmbedKernels  # imports triton: only when used

    return TritonPatchEmbedKernels


def _triton_run(inputs: PatchEmbedInputs) -> torch.Tensor:
    return apply_patch_embed(_triton_kernels(), inputs)


dispatch.register(OP, "reference", reasons=lambda inputs: [], run=_reference_run,
                  kernels=lambda: ReferencePatchEmbedKernels)
dispatch.register(OP, "triton", reasons=lambda inputs: triton_reasons(inputs.device, inputs.dtype), run=_triton_run,
                  kernels=_triton_kernels)
dispatch.register(OP, "cpu", reasons=_cpu_reasons, run=_cpu_run, kernels=_cpu_kernels)
dispatch.register(OP, "cuda", reasons=_device_reasons("cuda"), run=_gather_gemm_run, kernels=lambda: GatherGemmKernels)

__all__ = ["patch_embed", "patch_embed_reference", "check_patch_embed_inputs", "PatchEmbedInputs"]

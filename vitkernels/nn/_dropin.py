"""What every drop-in module shares: when a call must take the original module's own code, and the
module-level behaviour (pickling, TorchScript) of the classes ``patch_timm`` / ``replace_mha`` switch to.

A drop-in runs the fused path only where nobody can tell it from the original but by speed; the original
code runs (the same code as the unpatched module, so the same result or the same error) when:
- a tracer records the call: FX symbolic tracing (timm / torchvision feature extraction),
  ``torch.jit.trace``, ONNX export; the recorded graph is then the unpatched model's;
- a hook is registered on a module the fused path does not call (e.g. ``patch_embed.proj`` when the
  projection runs inside ``patch_embed``), or a global module hook is;
- the arguments are ones the fused path does not take; each drop-in lists its own.
"""
from __future__ import annotations

import importlib
from typing import Optional, Sequence

import torch
from torch import nn
from torch.nn.modules import module as _module

from vitkernels.ops import _tracing


def plain_path_reason(*inputs) -> Optional[str]:
    """Why a drop-in must run the original module's code for a call with these inputs, or None."""
    if _tracing.fx_proxy(*inputs) is not None:
        return "FX symbolic tracing"
    return _tracing.plain_math_reason()


def hooks_global() -> bool:
    return bool(_module._global_forward_hooks or _module._global_forward_pre_hooks
                or _module._global_backward_hooks or _module._global_backward_pre_hooks)


def observed(*modules: Optional[nn.Module]) -> bool:
    """Whether a hook would notice that one of ``modules`` (ones the fused path does not call) is skipped."""
    if hooks_global():
        return True
    for m in modules:
        if m is not None and (m._forward_hooks or m._forward_pre_hooks or m._backward_hooks
                              or getattr(m, "_backward_pre_hooks", None)):
            return True
    return False


def select_mixin(cls: type, mixins, classes) -> Optional[type]:
    """The mixin of ``mixins`` ((mixin, class names, methods it reimplements), ...) for ``cls``: the first
    entry whose first named class (looked up in ``classes``) ``cls`` derives from, provided ``cls``'s code for
    each of those methods is one of the named classes' (a subclass that overrides one keeps its own: None)."""
    for mixin, names, methods in mixins:
        known = [classes[n] for n in names]
        if issubclass(cls, known[0]):
            ok = all(any(getattr(cls, m) is getattr(k, m) for k in known) for m in methods)
            return mixin if ok else None
    return None


def extend_class(base: type, mixin: type, module_name: str) -> type:
    """``base`` with ``mixin`` in front, named as ``base`` (pickled through the drop-in's ``__reduce_ex__``)."""
    return type(base.__name__, (mixin, base), {"__module__": module_name, "__doc__": base.__doc__,
                                                "__qualname__": base.__qualname__})


def original_class(cls: type, marker: type) -> type:
    """The library class a fused class extends: the first module class in its MRO that is not a drop-in."""
    return next(c for c in cls.__mro__ if not issubclass(c, marker) and issubclass(c, nn.Module))


def script_error(module: nn.Module, original: str, restore: str) -> TypeError:
    name = type(module).__name__
    return TypeError(
        f"torch.jit.script: vitkernels' fused {name} cannot be compiled by TorchScript (its fused ops are "
        f"Python functions). Script the model with the original {original} modules: "
        f"torch.jit.script({restore}(copy.deepcopy(model))) gives the same parameters and outputs. "
        "torch.jit.trace, torch.export and torch.compile take the patched model as it is.")


def import_qualified(module_name: str, qualname: str):
    obj = importlib.import_module(module_name)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def autocast_on(device_type: str) -> bool:
    from vitkernels.ops._checks import autocast_dtype

    return autocast_dtype(device_type) is not None


def broadcastable(shape, target) -> bool:
    """Whether a tensor of ``shape`` broadcasts to ``target`` (as an attention mask must)."""
    if len(shape) > len(target):
        return False
    return all(s in (1, t) for s, t in zip(reversed(tuple(shape)), reversed(tuple(target))))


def standard_relative_position_index(index: Optional[torch.Tensor], window: Sequence[int]) -> bool:
    """Whether a Swin module's ``relative_position_index`` buffer is the index of ``window`` that
    ``window_attention`` computes itself (a module with another index, e.g. loaded from a state_dict, must
    run its own code). Reads the buffer: call it in eager mode (at patch and load time), not per call."""
    if index is None:
        return False
    if index.is_meta:  # nothing to compare: built on meta, the values come with a later load
        return True
    from vitkernels.ops.window_attention.geometry import relative_position_index

    expected = relative_position_index(tuple(window))
    return index.numel() == expected.numel() and torch.equal(index.detach().reshape(-1).cpu().long(),
                                                             expected.reshape(-1))

"""How the ops behave where a tracer, an exporter or a shapes-only tensor replaces a real call.

- FX symbolic tracing (``torch.fx.symbolic_trace``, timm's and torchvision's feature extraction): an op
  called with a ``torch.fx.Proxy`` becomes one ``call_function`` node of the graph (a leaf); the traced
  ``GraphModule`` calls the op for real, so it runs fused.
- ``torch.jit.trace`` and ONNX export (``dynamo=False`` traces; ``dynamo=True`` exports the decomposed
  graph): an op runs its pure-PyTorch reference, so the trace records the real computation, never a
  kernel's result as a constant and never a Python autograd function that ``torch.jit.save`` rejects.
- ``torch.export`` (without ONNX) and ``torch.compile`` keep the op as its registered ``vitkernels::`` op
  (``<op>/compile.py``).
- Meta tensors and empty tensors (a zero-size dim) carry no data to compute on: the reference gives the
  result torch gives (meta outputs; empty outputs, or zeros where a softmax has no key), on any backend.
"""
from __future__ import annotations

import sys
from typing import Any, Callable, Dict, Optional, Tuple

import torch

from vitkernels.ops import _compile


def fx_proxy(*values) -> Optional["torch.fx.Proxy"]:
    """The first ``torch.fx.Proxy`` among ``values`` (the op is being symbolically traced), else None."""
    for value in values:
        if isinstance(value, torch.fx.Proxy):
            return value
    return None


def fx_leaf(proxy: "torch.fx.Proxy", fn: Callable, args: Tuple[Any, ...], kwargs: Dict[str, Any]):
    """Record ``fn(*args, **kwargs)`` as one node of ``proxy``'s graph and return its output proxy."""
    return proxy.tracer.create_proxy("call_function", fn, args, kwargs)


def plain_math_reason() -> Optional[str]:
    """Why an op must run its plain PyTorch reference right now (a tracer records the ops it runs), or None.
    Cheap on the eager path (every drop-in call asks): the ONNX flag is read only inside an export."""
    if torch.jit.is_tracing():
        return "torch.jit.trace (ONNX export with dynamo=False traces too)"
    if not _compile.compiling():  # the dynamo ONNX exporter runs torch.export: compiling and exporting
        return None
    is_exporting = getattr(torch.compiler, "is_exporting", None)
    if is_exporting is not None and not is_exporting():
        return None
    onnx = sys.modules.get("torch.onnx")  # not imported: not exporting
    if onnx is not None and onnx.is_in_onnx_export():
        return "ONNX export"
    return None


def data_free(*tensors: Optional[torch.Tensor]) -> bool:
    """Whether a call has nothing to compute: a meta tensor or a tensor with a zero-size dim among the inputs."""
    return any(t is not None and (t.is_meta or t.numel() == 0) for t in tensors)

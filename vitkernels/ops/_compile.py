"""What every op's torch.compile registration shares (each op registers its own ops in ``<op>/compile.py``).

Under ``torch.compile`` an op is two ``torch.library`` ops: a forward that runs a backend's forward kernel
and returns, besides the output, everything its backward needs (the row log-sum-exp, the dropout seed),
and a backward that runs that backend's backward kernel on it. Nothing is replayed: the compiled backward
never runs the forward again, on any backend, the reference included (its kernels are the plain math of
the same forward/backward contract).

Two flavours of the pair:
- ``custom_op``: opaque to the compiler; dispatch picks the backend when the op runs, exactly as in
  eager. Every backend, every device.
- ``triton_op`` (torch >= 2.6), for the Triton backend on a CUDA device: Inductor traces the launcher, sees
  each Triton kernel (``wrap_triton``) and launches it itself, so the compiled graph has no opaque call
  and can be captured in a CUDA graph. The dropout seed is drawn on the device inside the graph, so each
  replay draws a new one. Chosen while tracing (``traced_triton``); under the Triton interpreter (CPU
  tensors) kernels cannot be traced and the custom_op flavour runs them.
"""
from __future__ import annotations

import os
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

NO_BACKEND = "_"  # backend=None travels as this string (custom-op schemas have no Optional[str] default here)


def backend_arg(backend: Optional[str]) -> str:
    return NO_BACKEND if backend is None else backend


def backend_of(arg: str) -> Optional[str]:
    return None if arg == NO_BACKEND else arg


def compiling() -> bool:
    """True while torch.compile / torch.export trace (the ops then go through their torch.library ops)."""
    is_compiling = getattr(getattr(torch, "compiler", None), "is_compiling", None)
    return bool(is_compiling and is_compiling())


def _constant_result(fn):
    assume = getattr(getattr(torch, "_dynamo", None), "assume_constant_result", None)
    return assume(fn) if assume is not None else fn


def triton_op_supported() -> bool:
    """torch >= 2.6 has ``torch.library.triton_op`` / ``wrap_triton``."""
    return hasattr(torch.library, "triton_op") and hasattr(torch.library, "wrap_triton")


@_constant_result
def traced_triton(op: str, device_type: str, dtype_name: str, backend: str) -> bool:
    """Whether a compiled call of ``op`` takes the traced Triton ops: triton_op exists, the call runs on the
    triton backend (named, or picked first for a CUDA tensor), Triton compiles for a real GPU (not the
    interpreter) and accepts the device and dtype. Decided once per compile from these constants and the
    environment (VITKERNELS_BACKEND, TRITON_INTERPRET); the op checks its shape-dependent limits beside it."""
    from vitkernels import dispatch
    from vitkernels.ops.triton_limits import triton_reasons

    if not triton_op_supported() or os.environ.get("TRITON_INTERPRET", "0") == "1":
        return False
    forced = backend_of(backend) or (os.environ.get(dispatch.ENV_VAR, "").strip() or None)
    if forced not in (None, "triton") or device_type != "cuda":
        return False
    if "triton" not in dispatch.implementations(op) or not dispatch.backend_environment("triton")[0]:
        return False
    return not triton_reasons(torch.device(device_type), getattr(torch, dtype_name))


def triton_launcher_op(name: str):
    """Decorator: a Triton launcher as the torch.library op ``vitkernels::<name>``: a ``triton_op`` (traced by
    Inductor) where torch has it, else a ``custom_op`` (opaque)."""
    def wrap(fn: Callable):
        if triton_op_supported():
            return torch.library.triton_op(f"vitkernels::{name}", fn, mutates_args=())
        return torch.library.custom_op(f"vitkernels::{name}", fn, mutates_args=())
    return wrap


def empty_grad(like: Tensor) -> Tensor:
    """The placeholder a backward op returns for a gradient nobody asked for (op outputs cannot be None)."""
    return like.new_empty(0)


def grads_or_none(grads: Sequence[Tensor], needs: Sequence[bool]):
    return tuple(g if n else None for g, n in zip(grads, needs))


def fresh(t: Optional[Tensor], like: Tensor) -> Tensor:
    """An op output as its fake describes it: contiguous, and not a view (op outputs may not alias their
    inputs); ``None`` (a gradient not computed) as the empty placeholder."""
    if t is None:
        return empty_grad(like)
    if t._base is None and t.is_contiguous():
        return t
    return t.clone(memory_format=torch.contiguous_format)


def strided_like(grad: Tensor, like: Tensor) -> Tensor:
    """A gradient with the strides its fake gives it (``torch.empty_like(like)``: the input's layout when
    that is dense, e.g. channels-last, else contiguous), and not a view (two gradients may be views of one
    buffer, and op outputs may not alias each other); copied only when the kernel wrote something else."""
    if grad._base is None and grad.is_contiguous() and like.is_contiguous():
        return grad
    target = torch.empty_like(like)
    return grad if grad._base is None and grad.stride() == target.stride() else target.copy_(grad)


def constant_tensors(fn: Callable) -> Callable:
    """For a cached builder of index/mask tensors (put it outside ``functools.lru_cache``): the tensors are
    built for real, outside any tracer, and cached; a tracer (a traced ``triton_op`` body) gets them as
    constants of its graph (``torch.tensor`` of their values), never as values computed from fake tensors."""
    import functools

    @functools.wraps(fn)
    def build(*args, **kwargs):
        from torch.utils._python_dispatch import _disable_current_modes

        if not _fake_mode_active():
            return fn(*args, **kwargs)
        with _disable_current_modes():
            real = fn(*args, **kwargs)
        if isinstance(real, tuple):
            return tuple(_graph_constant(t) for t in real)
        return _graph_constant(real)
    return build


def _fake_mode_active() -> bool:
    stack_len = getattr(torch._C, "_len_torch_dispatch_stack", None)
    if stack_len is not None and stack_len() == 0:  # no mode at all: the eager hot path, one C call
        return False
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

    return any(isinstance(mode, FakeTensorMode) for mode in _get_current_dispatch_mode_stack())


def _graph_constant(t: Tensor) -> Tensor:
    return torch.tensor(t.tolist(), dtype=t.dtype, device=t.device)  # traced: lifted as a constant

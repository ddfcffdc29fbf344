"""One dispatch layer for every op: a registry of backends per op, each with its reasons for refusing.

Backends declare what they cannot do as human-readable reasons (xFormers' ``not_supported_reasons``);
``can_run(inputs, raise_error)`` wraps them. ``backend=None`` walks a priority list by device and takes
the first backend with no reasons; a named backend (argument or ``VITKERNELS_BACKEND``) is checked and
never silently replaced. Everything is read at call time, never at import.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from vitkernels import _environ, _ext

BACKEND_NAMES = ("reference", "triton", "cuda", "cpu")
ENV_VAR = "VITKERNELS_BACKEND"

# Priority per device type; anything else (mps, xpu, meta, ...) only has the reference.
_PRIORITY = {
    "cuda": ("triton", "cuda", "reference"),
    "cpu": ("cpu", "reference"),
}


class BackendUnavailableError(ValueError):
    """A named backend cannot run these inputs (the message says why)."""


@dataclass(frozen=True)
class OpBackend:
    """One backend's implementation of one op.

    ``reasons(inputs) -> list[str]``: why these inputs cannot run here (empty: it can). Must be cheap:
    no syncs, no allocations. ``run(inputs) -> Tensor`` computes the op (autograd included).
    ``kernels() -> object``: the backend's forward/backward pair in the op's contract (see the op's
    ``function.py``): what its autograd.Function and its torch.compile ops call. Loaded on first use (it
    may import triton or the extension).
    """

    op: str
    name: str
    reasons: Callable[[Any], List[str]]
    run: Callable[[Any], torch.Tensor]
    kernels: Callable[[], Any]

    def not_supported_reasons(self, inputs) -> List[str]:
        ok, why = backend_environment(self.name)
        return ([] if ok else [why]) + list(self.reasons(inputs))

    def can_run(self, inputs, raise_error: bool = False) -> bool:
        reasons = self.not_supported_reasons(inputs)
        if reasons and raise_error:
            raise BackendUnavailableError(
                f"{self.op}: backend '{self.name}' cannot run these inputs ({inputs.describe()}): "
                + "; ".join(reasons)
            )
        return not reasons


_REGISTRY: Dict[str, Dict[str, OpBackend]] = {}


def register(op: str, name: str, *, reasons: Callable[[Any], List[str]], run: Callable[[Any], torch.Tensor],
             kernels: Callable[[], Any]) -> None:
    if name not in BACKEND_NAMES:
        raise ValueError(f"unknown backend name {name!r}; valid: {', '.join(BACKEND_NAMES)}")
    _REGISTRY.setdefault(op, {})[name] = OpBackend(op, name, reasons, run, kernels)
    clear_call_memos()  # a new backend may change what dispatch picks


def implementations(op: str) -> Dict[str, OpBackend]:
    """Backend name -> implementation of ``op`` (only the backends that have a kernel for it)."""
    return dict(_REGISTRY.get(op, {}))


def backend_environment(name: str) -> Tuple[bool, str]:
    """Whether this machine/build can run backend ``name`` at all, and why (not specific to an op)."""
    if name == "reference":
        return True, "pure PyTorch: any device, fp16/bf16/fp32/fp64"
    if name == "cpu":
        ext = _ext.extension()
        if ext is None:
            return False, _ext.extension_error()
        return True, "C++ CPU kernels of vitkernels._C"
    if name == "cuda":
        if _ext.extension() is None:
            return False, _ext.extension_error()
        if not _ext.has_cuda_kernels():
            return False, "vitkernels._C was built without CUDA kernels (build with CUDA_HOME set)"
        if not torch.cuda.is_available():
            return False, "no CUDA device is visible to torch"
        return True, "CUDA kernels of vitkernels._C"
    if name == "triton":
        try:
            import triton  # noqa: F401  (imported here, at call time, so TRITON_INTERPRET set later counts)
        except Exception as exc:
            return False, f"triton is not importable ({type(exc).__name__}: {exc})"
        version = getattr(triton, "__version__", "?")
        if os.environ.get("TRITON_INTERPRET", "0") == "1":
            return True, f"triton {version} under the interpreter (TRITON_INTERPRET=1)"
        if not torch.cuda.is_available():
            return False, (f"triton {version} is importable but no CUDA device is visible "
                           "(set TRITON_INTERPRET=1 before triton is imported to run kernels on CPU)")
        return True, f"triton {version} on {torch.cuda.get_device_name()}"
    raise ValueError(f"unknown backend name {name!r}; valid: {', '.join(BACKEND_NAMES)}")


def available_backends() -> Dict[str, Tuple[bool, str]]:
    """Backend name -> (usable on this machine, why), with the ops each one implements."""
    result = {}
    for name in BACKEND_NAMES:
        ok, why = backend_environment(name)
        ops = sorted(op for op, impls in _REGISTRY.items() if name in impls)
        if not ops:
            result[name] = (False, f"{why}; no op has a {name} kernel yet")
        else:
            result[name] = (ok, f"{why}; ops: {', '.join(ops)}")
    return result


def requested_backend(backend: Optional[str]) -> Optional[str]:
    if backend is not None:
        if not isinstance(backend, str) or backend not in BACKEND_NAMES:
            raise ValueError(f"backend={backend!r} is not a backend; valid: {', '.join(BACKEND_NAMES)} "
                             "(or None to let dispatch pick)")
        return backend
    env = os.environ.get(ENV_VAR, "").strip()
    if env:
        if env not in BACKEND_NAMES:
            raise ValueError(f"{ENV_VAR}={env!r} is not a backend; valid: {', '.join(BACKEND_NAMES)}")
        return env
    return None


DATA_FREE = "meta or empty tensors: nothing to compute, the reference gives torch's result on any backend"


def select(op: str, inputs, backend: Optional[str] = None) -> OpBackend:
    """The backend that runs ``op`` on ``inputs``: the named one (checked), or the first that can run;
    the reference for inputs with no data (``inputs.data_free``: meta tensors, a zero-size dim)."""
    impls = _REGISTRY.get(op, {})
    name = requested_backend(backend)
    if getattr(inputs, "data_free", False) and "reference" in impls:
        impl = impls["reference"]
        _log_choice(op, inputs, impl, DATA_FREE)
        return impl
    if name is not None:
        source = f"backend={name!r}" if backend is not None else f"{ENV_VAR}={name!r}"
        impl = impls.get(name)
        if impl is None:
            have = ", ".join(impls) or "none"
            raise BackendUnavailableError(
                f"{op}: {source} cannot run: the {name} backend has no {op} kernel yet "
                f"(implemented for {op}: {have})")
        reasons = impl.not_supported_reasons(inputs)
        if reasons:
            raise BackendUnavailableError(
                f"{op}: {source} cannot run these inputs ({inputs.describe()}): " + "; ".join(reasons))
        _log_choice(op, inputs, impl, source)
        return impl
    order = priority(inputs.device)
    refusals = []
    for candidate in order:
        impl = impls.get(candidate)
        if impl is None:
            refusals.append(f"{candidate}: no {op} kernel")
            continue
        reasons = impl.not_supported_reasons(inputs)
        if not reasons:
            _log_choice(op, inputs, impl, "dispatch", refusals)
            return impl
        refusals.append(f"{candidate}: " + "; ".join(reasons))
    raise BackendUnavailableError(f"{op}: no backend can run {inputs.describe()}: " + " | ".join(refusals))


def priority(device: torch.device) -> Tuple[str, ...]:
    """The order ``backend=None`` tries the backends in, for tensors on ``device``."""
    return _PRIORITY.get(device.type, ("reference",))


# ---------------------------------------------------------------------------------------------------- logging

LOG_ENV_VAR = "VITKERNELS_LOG"
log = logging.getLogger("vitkernels.dispatch")
_LOGGED: set = set()
_HANDLER: Optional[logging.Handler] = None


def _logging_requested() -> bool:
    """``VITKERNELS_LOG=dispatch`` (a comma list may name more), or the ``vitkernels.dispatch`` logger at INFO."""
    value = os.environ.get(LOG_ENV_VAR, "")
    if "dispatch" in (part.strip() for part in value.split(",")) or value.strip() in ("1", "all"):
        global _HANDLER
        if _HANDLER is None:  # the variable alone prints to stderr, as TORCH_LOGS does
            _HANDLER = logging.StreamHandler()
            _HANDLER.setFormatter(logging.Formatter("[vitkernels] %(message)s"))
            log.addHandler(_HANDLER)
            if log.level == logging.NOTSET or log.level > logging.INFO:
                log.setLevel(logging.INFO)
        return True
    return log.isEnabledFor(logging.INFO)


def _log_choice(op: str, inputs, impl: OpBackend, source: str, refusals: Sequence[str] = ()) -> None:
    """One line per distinct (op, inputs, backend): what dispatch chose and why the ones before it refused."""
    if not _logging_requested():
        return
    line = f"{op}: {inputs.describe()} -> {impl.name} ({source}"
    line += f"; passed over: {' | '.join(refusals)})" if refusals else ")"
    if line not in _LOGGED:
        _LOGGED.add(line)
        log.info(line)


def forget_logged_choices() -> None:
    """Log every choice again (the log prints each distinct one once per process)."""
    _LOGGED.clear()


# ---------------------------------------------------------------------------------------------------- call memo


def tensor_signature(t) -> Optional[tuple]:
    """What an input check and a backend's reasons can see of a tensor argument (type, shape, strides,
    dtype, device), hashable; None for None. Raises TypeError/AttributeError/RuntimeError for anything
    that is not a plain strided tensor (the caller then takes the checked path)."""
    if t is None:
        return None
    return type(t), t.shape, t.stride(), t.dtype, t.device


class CallMemo:
    """What the input checks and ``select`` decided for each call signature of one op, so a repeated call
    (every layer of every step) skips both: a ViT at small batch is otherwise bound by this host work.

    A signature holds everything the checks and the backends' reasons read: the tensors' metadata
    (``tensor_signature``), every other argument with its type (``True`` is not ``1``), the requested
    backend and the environment variables dispatch reads. Only calls that passed are remembered; a failing
    one raises on every call. Bounded: cleared when full."""

    def __init__(self, op: str, size: int = 1024):
        self.op, self.size = op, size
        self._memo: Dict[tuple, Any] = {}

    @staticmethod
    def environment() -> tuple:
        """The environment variables dispatch reads, as they are now (raw values)."""
        return _environ.raw(ENV_VAR), _environ.raw("TRITON_INTERPRET"), _environ.raw(LOG_ENV_VAR)

    def get(self, signature: Optional[tuple]):
        """The remembered answer, or None (also for a signature holding something unhashable: the caller
        then takes the checked path, whose checks say what is wrong)."""
        if signature is None:
            return None
        try:
            return self._memo.get(signature)
        except TypeError:
            return None

    def put(self, signature: Optional[tuple], value) -> None:
        if signature is None:
            return
        if len(self._memo) >= self.size:
            self._memo.clear()
        try:
            self._memo[signature] = value
        except TypeError:  # unhashable: never remembered
            pass

    def clear(self) -> None:
        self._memo.clear()


_MEMOS: List[CallMemo] = []


def call_memo(op: str) -> CallMemo:
    memo = CallMemo(op)
    _MEMOS.append(memo)
    return memo


def clear_call_memos() -> None:
    """Forget every remembered call (after changing what a backend can run in-process, e.g. in tests)."""
    for memo in _MEMOS:
        memo.clear()

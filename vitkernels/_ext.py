"""Lazy access to the compiled extension ``vitkernels._C`` (built from ``csrc/`` by setup.py).

The package must import and every reference must run without it: its absence only makes the
``cpu``/``cuda`` backends unable to run, and ``available_backends()`` says why.
"""
from __future__ import annotations

import functools
from typing import Optional, Tuple


@functools.lru_cache(maxsize=None)
def _load() -> Tuple[Optional[object], str]:
    try:
        from vitkernels import _C  # type: ignore[attr-defined]
    except Exception as exc:  # ImportError, or an undefined symbol from a stale build
        return None, (f"compiled extension vitkernels._C is not importable ({type(exc).__name__}: {exc}); build it "
                      "against the installed torch with `pip install --no-build-isolation .` (README, Install)")
    return _C, ""


def extension():
    """The ``vitkernels._C`` module, or None when it is not built / not importable."""
    return _load()[0]


def extension_error() -> str:
    """Why the extension could not be loaded ('' when it loaded)."""
    return _load()[1]


def has_cuda_kernels() -> bool:
    ext = extension()
    return ext is not None and bool(getattr(ext, "WITH_CUDA", False))

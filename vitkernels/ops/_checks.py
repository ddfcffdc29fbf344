"""Small helpers shared by the per-op input checkers: every message names the op, the argument, the
expected and the actual value."""
from __future__ import annotations

from typing import Iterable, Optional, Sequence, Tuple

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def require_tensor(op: str, name: str, value, *, optional: bool = False) -> Optional[torch.Tensor]:
    if value is None and optional:
        return None
    if not isinstance(value, torch.Tensor):
        expected = "a torch.Tensor or None" if optional else "a torch.Tensor"
        raise TypeError(f"{op}: {name} must be {expected}, got {type(value).__name__}")
    return value


def require_rank(op: str, name: str, t: torch.Tensor, ranks: Sequence[int], layout: str) -> None:
    if t.dim() not in ranks:
        ranks_txt = " or ".join(str(r) for r in ranks)
        raise ValueError(f"{op}: {name} must have {ranks_txt} dims {layout}, got {t.dim()} dims "
                         f"with shape {tuple(t.shape)}")


def require_float_dtype(op: str, name: str, t: torch.Tensor, dtypes: Iterable[torch.dtype] = FLOAT_DTYPES) -> None:
    dtypes = tuple(dtypes)
    if t.dtype not in dtypes:
        allowed = ", ".join(dtype_name(d) for d in dtypes)
        raise TypeError(f"{op}: {name} must have dtype in ({allowed}), got {dtype_name(t.dtype)}")


def require_same_dtype(op: str, name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if t.dtype != ref.dtype:
        raise TypeError(f"{op}: {name} must have the dtype of {ref_name} ({dtype_name(ref.dtype)}), "
                        f"got {dtype_name(t.dtype)} (no silent casts: convert it explicitly)")


def require_same_device(op: str, name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if t.device != ref.device:
        raise ValueError(f"{op}: {name} must be on the device of {ref_name} ({ref.device}), got {t.device}")


def require_shape(op: str, name: str, t: torch.Tensor, expected: Tuple[int, ...], meaning: str = "") -> None:
    if tuple(t.shape) != tuple(expected):
        extra = f" {meaning}" if meaning else ""
        raise ValueError(f"{op}: {name} must have shape {tuple(expected)}{extra}, got {tuple(t.shape)}")


def require_int(op: str, name: str, value, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{op}: {name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{op}: {name} must be >= {minimum}, got {value}")
    return value


def int_tuple(op: str, name: str, value, ndim: int, *, minimum: int) -> Tuple[int, ...]:
    """An int or a sequence of ``ndim`` ints, each >= minimum, as a tuple of ``ndim`` ints."""
    if isinstance(value, bool):
        raise TypeError(f"{op}: {name} must be an int or a tuple of {ndim} ints, got bool {value!r}")
    if isinstance(value, int):
        values = (value,) * ndim
    elif isinstance(value, (tuple, list, torch.Size)):
        values = tuple(value)
        if len(values) != ndim or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            raise ValueError(f"{op}: {name} must be an int or a tuple of {ndim} ints for a {ndim}-D map, "
                             f"got {value!r}")
    else:
        raise TypeError(f"{op}: {name} must be an int or a tuple of {ndim} ints, got {type(value).__name__}")
    if any(v < minimum for v in values):
        raise ValueError(f"{op}: {name} must be >= {minimum} in every dim, got {values}")
    return values


def optional_scale(op: str, scale) -> Optional[float]:
    if scale is None:
        return None
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"{op}: scale must be a float or None, got {type(scale).__name__}")
    scale = float(scale)
    if scale != scale or scale in (float("inf"), float("-inf")):
        raise ValueError(f"{op}: scale must be finite, got {scale}")
    return scale


def autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    """The autocast dtype when autocast is on for ``device_type`` (else None). The ops then take their
    float inputs in that dtype (autocast's contract, as for matmuls) and run with autocast off inside."""
    try:
        enabled = torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4: per-device functions
        enabled = torch.is_autocast_cpu_enabled() if device_type == "cpu" else torch.is_autocast_enabled()
    except RuntimeError:  # a device type autocast has no key for (meta): no autocast there, as for torch's ops
        return None
    if not enabled:
        return None
    try:
        return torch.get_autocast_dtype(device_type)
    except (AttributeError, TypeError):
        return torch.get_autocast_cpu_dtype() if device_type == "cpu" else torch.get_autocast_gpu_dtype()


def autocast_cast(dtype: torch.dtype, *tensors):
    return tuple(t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in tensors)

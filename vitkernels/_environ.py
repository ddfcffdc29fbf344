"""Environment variables read on every call (backend choice, tuning mode, the Triton interpreter), at a
third of ``os.environ.get``'s cost: os.environ's own dict, looked up with pre-encoded keys. Values are
read each time, never cached: a variable set or changed between calls takes effect on the next one."""
from __future__ import annotations

import os
from typing import Dict, Optional

_KEYS: Dict[str, object] = {}


def _key(name: str):
    key = _KEYS.get(name)
    if key is None:
        key = _KEYS[name] = getattr(os.environ, "encodekey", lambda n: n)(name)
    return key


def raw(name: str):
    """The variable's value as os.environ stores it (bytes on POSIX), or None when unset: cheap to compare
    and hash (call memos key on it)."""
    try:
        return os.environ._data.get(_key(name))  # type: ignore[attr-defined]
    except AttributeError:  # not CPython's os._Environ
        return os.environ.get(name)


def getenv(name: str, default: Optional[str] = None) -> Optional[str]:
    value = raw(name)
    if value is None:
        return default
    return value if isinstance(value, str) else os.environ.decodevalue(value)  # type: ignore[attr-defined]

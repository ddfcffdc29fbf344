"""The training CLI's optional dependencies, imported on first use so that ``import vitkernels`` needs none
of them; a missing one raises an ImportError that names the extra that installs it."""
from __future__ import annotations

import importlib

EXTRA = "pip install vitkernels[train]"

# import name -> the distribution pip installs it from
_DISTRIBUTIONS = {"sklearn": "scikit-learn", "tqdm": "tqdm", "timm": "timm", "torchvision": "torchvision",
                  "numpy": "numpy"}


def require(module: str, purpose: str):
    """Import ``module`` or raise an ImportError saying what needs it and how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        top = module.split(".")[0]
        dist = _DISTRIBUTIONS.get(top, top)
        raise ImportError(f"vitkernels.train needs {dist} for {purpose} (import {module!r} failed: {exc}); "
                          f"install the training extras: {EXTRA}") from exc

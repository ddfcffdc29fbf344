"""``python -m vitkernels.train``: train an image or video classifier (a vitkernels.models, timm or
torchvision model, patched with vitkernels' fused modules) on an ImageFolder or on scikit-learn's bundled
digits, on one process or under ``torchrun``. ``main(argv)`` is the CLI; ``run(argv)`` returns the trained
model and the summary. Needs the training extras (``pip install vitkernels[train]``), imported on first use.
"""
from vitkernels.train.cli import build_parser, main, run

__all__ = ["main", "run", "build_parser"]

"""Test setup: Triton kernels run on CPU under the interpreter, so TRITON_INTERPRET must be set before
triton is first imported (which may happen while collecting any test module)."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
# A forced backend in the caller's environment would change what every test dispatches to.
os.environ.pop("VITKERNELS_BACKEND", None)

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one)")
    config.addinivalue_line("markers", "slow: long cases, run explicitly with -m slow")


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device; none is visible to torch")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)

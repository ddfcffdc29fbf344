"""Test setup: Triton kernels run on CPU under the interpreter, so TRITON_INTERPRET must be set before
triton is first imported (which may happen while collecting any test module)."""
import hashlib
import os
import pathlib
import tempfile

os.environ.setdefault("TRITON_INTERPRET", "1")
# A forced backend in the caller's environment would change what every test dispatches to.
os.environ.pop("VITKERNELS_BACKEND", None)


def _source_digest() -> str:
    root = pathlib.Path(__file__).resolve().parent.parent / "vitkernels"
    digest = hashlib.sha1()
    for path in sorted(root.rglob("*.py")):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


# Inductor's on-disk cache keys a compiled graph without the custom ops' fake kernels: code compiled
# against an older vitkernels can be replayed for the current one. One cache per source version.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), f"vitkernels-inductor-{_source_digest()}"))

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one); runs with compiled Triton")
    config.addinivalue_line("markers", "triton: runs the Triton kernels (interpreted on CPU; compiled, on the GPU, "
                                       "in make test's GPU step)")
    config.addinivalue_line("markers", "ext: needs the compiled extension vitkernels._C")
    config.addinivalue_line("markers", "slow: long cases, run explicitly with -m slow")


def pytest_collection_modifyitems(config, items):
    interpreting = os.environ.get("TRITON_INTERPRET", "0") == "1"
    if not torch.cuda.is_available():
        skip_gpu = pytest.mark.skip(reason="needs a CUDA device; none is visible to torch")
    elif interpreting:
        # the interpreter would run the kernels' numpy model, not the GPU code: make test runs these in a
        # second pytest process with TRITON_INTERPRET=0 (tools/testplan.py)
        skip_gpu = pytest.mark.skip(reason="gpu tests run with compiled Triton (TRITON_INTERPRET=0): make test "
                                           "runs them in its GPU step")
    else:
        return
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)

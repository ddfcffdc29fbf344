"""The cpu backend gives bitwise the same results, forward and every gradient, with one thread as with
several (OMP_NUM_THREADS=1 against the default), for the three ops; and its GEMMs' fallback for torch builds
without a BLAS sgemm_ (at::addmm_) gives the same results within float32 rounding."""
import os
import subprocess
import sys

import pytest
import torch

from vitkernels import _ext

EXT_REQUIRED = os.environ.get("VITKERNELS_REQUIRE_EXT") == "1"
pytestmark = [pytest.mark.ext, pytest.mark.skipif(
    _ext.extension() is None and not EXT_REQUIRED,
    reason=f"the cpu backend needs the compiled extension: {_ext.extension_error()}")]

SCRIPT = r"""
import hashlib, torch, vitkernels
torch.manual_seed(0)
results = []
def leaves(*shapes):
    return [torch.randn(*s, requires_grad=True) for s in shapes]
def run(fn, ts, shape):
    out = fn(*ts)
    out.backward(torch.randn(shape))
    results.extend([out] + [t.grad for t in ts])
q, k, v, b = leaves((4, 6, 197, 64), (4, 6, 197, 64), (4, 6, 197, 64), (1, 6, 197, 197))
run(lambda q, k, v, b: vitkernels.flash_attention(q, k, v, bias=b, dropout_p=0.1, backend="cpu"), [q, k, v, b],
    (4, 6, 197, 64))
qkv, table, qb = leaves((3, 30, 30, 3 * 96), (169, 3), (3 * 96,))
run(lambda x, t, c: vitkernels.window_attention(x, num_heads=3, window_size=7, shift_size=3, rel_pos_bias=t,
                                                qkv_bias=c, backend="cpu"), [qkv, table, qb], (3, 30, 30, 96))
qkv, table, qb = leaves((1, 5, 9, 9, 3 * 64), (15 * 13 * 13, 2), (3 * 64,))
run(lambda x, t, c: vitkernels.window_attention(x, num_heads=2, window_size=(8, 7, 7), shift_size=(4, 3, 3),
                                                rel_pos_bias=t, qkv_bias=c, backend="cpu"), [qkv, table, qb],
    (1, 5, 9, 9, 64))
for patch, size in ((16, 64), (4, 32)):
    x, w, bias, pos, cls = leaves((4, 3, size, size), (48, 3, patch, patch), (48,), (1, 1 + (size // patch) ** 2, 48),
                                  (1, 1, 48))
    run(lambda x, w, b, p, c: vitkernels.patch_embed(x, w, b, pos_embed=p, prefix_tokens=c, backend="cpu"),
        [x, w, bias, pos, cls], (4, 1 + (size // patch) ** 2, 48))
digest = hashlib.sha1()
for t in results:
    digest.update(t.detach().contiguous().numpy().tobytes())
print(torch.get_num_threads(), digest.hexdigest())
"""


def _run(script, **env):
    done = subprocess.run([sys.executable, "-c", script], env=dict(os.environ, **env), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def _digest(threads):
    used, digest = _run(SCRIPT, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads)).split()
    return int(used), digest


def test_one_thread_gives_bitwise_the_multi_threaded_results():
    many = max(2, os.cpu_count() or 2)
    (t1, one), (tn, several) = _digest(1), _digest(many)
    assert (t1, tn) == (1, many)
    assert one == several, "results differ between OMP_NUM_THREADS=1 and the multi-threaded run"


FALLBACK = SCRIPT.split("digest = hashlib.sha1()")[0] + r"""
torch.save([t.detach() for t in results], OUT)
"""


def test_gemm_fallback_without_blas_gives_the_blas_results(tmp_path):
    # the kernels' at::addmm_ path (torch builds that export no sgemm_) on the same inputs as the BLAS path
    paths = {}
    for name, env in (("blas", {}), ("fallback", {"VITKERNELS_CPU_NO_BLAS": "1"})):
        paths[name] = str(tmp_path / f"{name}.pt")
        _run(f"OUT = {paths[name]!r}\n" + FALLBACK, **env)
    blas, fallback = (torch.load(paths[n]) for n in ("blas", "fallback"))
    assert len(blas) == len(fallback) > 0
    for a, b in zip(blas, fallback):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)

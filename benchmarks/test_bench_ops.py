"""pytest-benchmark suite over the same workloads as ``python -m vitkernels.bench`` (the first of each op):
``make bench-pytest``. Each timed call synchronizes the GPU; skipped candidates skip with their reason."""
import pytest
import torch

from vitkernels.bench.workloads import (DTYPES, attention_candidates, attention_workloads, patch_candidates,
                                        patch_workloads, window_candidates, window_workloads)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = DTYPES["bf16" if DEVICE.type == "cuda" else "fp32"]


def _cases():
    cases = []
    for op, workloads, candidates in (("attention", attention_workloads, attention_candidates),
                                      ("window", window_workloads, window_candidates),
                                      ("patch", patch_workloads, patch_candidates)):
        default = {"attention": "vit", "window": "swin", "patch": "vit"}[op]
        wl = workloads(default, DEVICE, None)[0]
        args = (wl.params, DTYPE, "fwd", DEVICE, None) + ((False,) if op == "attention" else ())
        for cand in candidates(*args):
            cases.append(pytest.param(cand, id=f"{op}-{wl.name}-{cand.name}"))
    return cases


@pytest.mark.parametrize("candidate", _cases())
def test_bench(benchmark, candidate):
    if candidate.skip:
        pytest.skip(candidate.skip)
    fn = candidate.build()

    def timed():
        with torch.no_grad():  # forward workloads: inference
            fn()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()
    benchmark(timed)

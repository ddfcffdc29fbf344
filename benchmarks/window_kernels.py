"""Where window attention's time goes: each Swin stage's shape, the op alone (no qkv Linear), forward and
forward + backward, timed with CUDA events (median), and the per-kernel CUDA time of one fwd+bwd from
torch.profiler. Beside it the two floors of the op: bytes it must move over the measured copy bandwidth
and its matrix flops over the measured bf16 GEMM rate.

    python -m benchmarks.window_kernels [--batch 64] [--stages 1,2,3,4] [--dtype bf16] [--json PATH]

On a machine without a GPU it runs one tiny case under the Triton interpreter (a dry run of the script).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

import torch

# (map, C, heads) of Swin-T's stages at 224 (window 7, shift 3 in every other block)
SWIN_T = {1: ((56, 56), 96, 3), 2: ((28, 28), 192, 6), 3: ((14, 14), 384, 12), 4: ((7, 7), 768, 24)}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def floors(device) -> dict:
    """Measured copy bandwidth (bytes read + written per s) and bf16 GEMM rate (flop/s)."""
    from triton.testing import do_bench

    x = torch.empty(256 * 2 ** 20, dtype=torch.uint8, device=device).random_()
    y = torch.empty_like(x)
    ms = do_bench(lambda: y.copy_(x), warmup=25, rep=100, return_mode="median")
    bandwidth = 2 * x.numel() / (ms * 1e-3)
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device=device)
    ms = do_bench(lambda: a @ a, warmup=25, rep=100, return_mode="median")
    return {"bandwidth": bandwidth, "bf16_flops": 2 * 8192 ** 3 / (ms * 1e-3)}


def case(stage: int, batch: int, dtype, device, shift: int = 3):
    import vitkernels

    spatial, C, heads = SWIN_T[stage]
    window = min(7, spatial[0])
    shift = shift if spatial[0] > window else 0
    qkv = torch.randn(batch, *spatial, 3 * C, device=device, dtype=dtype, requires_grad=True)
    table = torch.randn((2 * window - 1) ** 2, heads, device=device, dtype=dtype, requires_grad=True)
    bias = torch.randn(3 * C, device=device, dtype=dtype, requires_grad=True)
    dout = torch.randn(batch, *spatial, C, device=device, dtype=dtype)

    def fwd():
        with torch.no_grad():
            return vitkernels.window_attention(qkv, num_heads=heads, window_size=window, shift_size=shift,
                                               rel_pos_bias=table, qkv_bias=bias, backend="triton")

    def fwd_bwd():
        out = vitkernels.window_attention(qkv, num_heads=heads, window_size=window, shift_size=shift,
                                          rel_pos_bias=table, qkv_bias=bias, backend="triton")
        torch.autograd.grad(out, (qkv, table, bias), dout)

    tokens = batch * math.prod(spatial)
    n = window * window
    elt = torch.finfo(dtype).bits // 8
    # fwd reads qkv, writes out (+ lse); bwd reads qkv, out, dout, writes dqkv (+ lse, delta)
    bytes_fwd = tokens * 4 * C * elt
    bytes_bwd = tokens * (3 * C + C + C + 3 * C) * elt
    flops_fwd = 4 * tokens * n * C  # QK^T and PV over each window
    return dict(stage=stage, shape=f"B={batch} {spatial[0]}x{spatial[1]} C={C} heads={heads} w={window} s={shift}",
                fwd=fwd, fwd_bwd=fwd_bwd, bytes_fwd=bytes_fwd, bytes_fwd_bwd=bytes_fwd + bytes_bwd,
                flops_fwd=flops_fwd, flops_fwd_bwd=flops_fwd * 3.5)


def host_time(fn, calls: int = 30) -> float:
    """Host microseconds per call: calls queued back to back without waiting for the GPU (the queue holds
    them), so this is the Python + launch cost, whatever the kernels take."""
    import time

    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    host = (time.perf_counter() - start) / calls * 1e6
    torch.cuda.synchronize()
    return host


def sweep_groups(fn, do_bench) -> dict:
    """fwd+bwd ms for several program targets of the grouped d(table) / d(qkv_bias) reductions."""
    import importlib

    kernels = importlib.import_module("vitkernels.ops.window_attention.triton")
    saved = kernels.TARGET_PROGRAMS
    out = {}
    try:
        for target in (512, 1024, 2048, 4096):
            kernels.TARGET_PROGRAMS = target
            out[target] = round(do_bench(fn, warmup=25, rep=100, return_mode="median"), 4)
    finally:
        kernels.TARGET_PROGRAMS = saved
    return out


def kernel_breakdown(fn) -> list:
    """(kernel name, CUDA us per call) of one call, from torch.profiler (after a warm-up call)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            fn()
        torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        total = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if total > 0:
            rows.append((e.key[:70], total / 5))
    return sorted(rows, key=lambda r: -r[1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--stages", default="1,2,3,4")
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--sweep-groups", action="store_true",
                        help="also time fwd+bwd of stages 1 and 3 at several TARGET_PROGRAMS")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
        c = case(4, 1, torch.float32, "cpu")
        c["fwd"]()
        c["fwd_bwd"]()
        print("dry run (no GPU): stage 4 at batch 1 ran under the Triton interpreter")
        return 0
    from triton.testing import do_bench

    device = torch.device("cuda")
    dtype = DTYPES[args.dtype]
    fl = floors(device)
    print(f"{torch.cuda.get_device_name()}: copy {fl['bandwidth'] / 1e12:.2f} TB/s, bf16 GEMM "
          f"{fl['bf16_flops'] / 1e12:.0f} TFLOP/s")
    results = {"floors": fl, "cases": []}
    for stage in [int(s) for s in args.stages.split(",")]:
        c = case(stage, args.batch, dtype, device)
        row = {"stage": stage, "shape": c["shape"]}
        for mode in ("fwd", "fwd_bwd"):
            ms = do_bench(c[mode], warmup=25, rep=200, return_mode="median")
            floor = max(c[f"bytes_{mode}"] / fl["bandwidth"], c[f"flops_{mode}"] / fl["bf16_flops"]) * 1e3
            row[mode] = {"ms": ms, "floor_ms": floor}
        row["host_us"] = {mode: host_time(c[mode]) for mode in ("fwd", "fwd_bwd")}
        row["kernels_us"] = kernel_breakdown(c["fwd_bwd"])
        if args.sweep_groups and stage in (1, 3):
            row["fwd_bwd_ms_by_target_programs"] = sweep_groups(c["fwd_bwd"], do_bench)
        results["cases"].append(row)
        print(f"stage {stage} ({c['shape']}): fwd {row['fwd']['ms']:.3f} ms (floor {row['fwd']['floor_ms']:.3f}), "
              f"fwd+bwd {row['fwd_bwd']['ms']:.3f} ms (floor {row['fwd_bwd']['floor_ms']:.3f}); host time per call "
              f"fwd {row['host_us']['fwd']:.0f} us, fwd+bwd {row['host_us']['fwd_bwd']:.0f} us")
        if "fwd_bwd_ms_by_target_programs" in row:
            print("    fwd+bwd ms by TARGET_PROGRAMS:", row["fwd_bwd_ms_by_target_programs"])
        for name, us in row["kernels_us"][:8]:
            print(f"    {us:9.1f} us  {name}")
        sys.stdout.flush()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

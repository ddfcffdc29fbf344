"""Where flash_attention's time goes on a GPU: ViT shapes, forward and forward + backward of the triton
backend alone, timed with CUDA events (median), beside SDPA's best backend in the same run, the per-kernel
CUDA time of one fwd+bwd (torch.profiler), the host time per call, and the two floors (bytes over the
measured copy bandwidth, flops over the measured bf16 GEMM rate).

    python -m benchmarks.attention_kernels [--dtype bf16] [--json PATH]

On a machine without a GPU it runs one tiny case under the Triton interpreter (a dry run of the script).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from benchmarks.window_kernels import DTYPES, floors, host_time, kernel_breakdown

# name: (B, H, N, D, bias)
CASES = {
    "ViT-B/16 224": (64, 12, 197, 64, False),
    "ViT-B/16 224 + bias": (64, 12, 197, 64, True),
    "ViT-L/14 224": (32, 16, 257, 64, False),
    "ViT-B/16 384": (32, 12, 577, 64, False),
    "N=4096": (4, 12, 4096, 64, False),
}


def sdpa_best(q, k, v, bias, mode, do_bench):
    """The fastest SDPA backend that runs these inputs: (name, ms)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    best = (None, float("inf"))
    for backend in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
        def run():
            with sdpa_kernel([backend]):
                out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias)
                if mode == "fwd_bwd":
                    torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
        try:
            with torch.no_grad() if mode == "fwd" else torch.enable_grad():
                run()
                ms = do_bench(run, warmup=25, rep=100, return_mode="median")
        except RuntimeError:
            continue
        if ms < best[1]:
            best = (backend.name.lower(), ms)
    return best


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported
    import vitkernels

    if not torch.cuda.is_available():
        q, k, v = (torch.randn(2, 2, 20, 16, requires_grad=True) for _ in range(3))
        vitkernels.flash_attention(q, k, v, bias=torch.randn(1, 2, 20, 20), backend="triton").sum().backward()
        print("dry run (no GPU): one tiny case ran under the Triton interpreter")
        return 0
    from triton.testing import do_bench

    device, dtype = torch.device("cuda"), DTYPES[args.dtype]
    fl = floors(device)
    print(f"{torch.cuda.get_device_name()}: copy {fl['bandwidth'] / 1e12:.2f} TB/s, bf16 GEMM "
          f"{fl['bf16_flops'] / 1e12:.0f} TFLOP/s")
    results = {"floors": fl, "cases": []}
    for name, (B, H, N, D, with_bias) in CASES.items():
        q, k, v = (torch.randn(B, H, N, D, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
        bias = torch.randn(1, H, N, N, device=device, dtype=dtype, requires_grad=True) if with_bias else None
        leaves = (q, k, v) + ((bias,) if with_bias else ())
        dout = torch.randn(B, H, N, D, device=device, dtype=dtype)

        def fwd():
            with torch.no_grad():
                vitkernels.flash_attention(q, k, v, bias=bias, backend="triton")

        def fwd_bwd():
            out = vitkernels.flash_attention(q, k, v, bias=bias, backend="triton")
            torch.autograd.grad(out, leaves, dout)

        elt = torch.finfo(dtype).bits // 8
        io = B * H * N * D * elt
        bias_bytes = H * N * N * elt if with_bias else 0
        flops = 4 * B * H * N * N * D
        row = {"case": name, "shape": dict(B=B, H=H, N=N, D=D, bias=with_bias)}
        for mode, fn, nbytes, nflops in (("fwd", fwd, 4 * io + bias_bytes, flops),
                                         ("fwd_bwd", fwd_bwd, 12 * io + 3 * bias_bytes, 3.5 * flops)):
            ms = do_bench(fn, warmup=25, rep=200, return_mode="median")
            floor = max(nbytes / fl["bandwidth"], nflops / fl["bf16_flops"]) * 1e3
            peer, peer_ms = sdpa_best(q, k, v, bias, mode, do_bench)
            row[mode] = {"ms": ms, "floor_ms": floor, "host_us": host_time(fn), "sdpa": peer, "sdpa_ms": peer_ms}
        row["kernels_us"] = kernel_breakdown(fwd_bwd)
        results["cases"].append(row)
        for mode in ("fwd", "fwd_bwd"):
            r = row[mode]
            print(f"{name:22s} {mode:7s} {r['ms']:.3f} ms (floor {r['floor_ms']:.3f}, host {r['host_us']:.0f} us); "
                  f"SDPA {r['sdpa']} {r['sdpa_ms']:.3f} ms: {r['sdpa_ms'] / r['ms']:.2f}x")
        for kname, us in row["kernels_us"][:6]:
            print(f"    {us:9.1f} us  {kname}")
        sys.stdout.flush()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

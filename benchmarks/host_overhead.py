"""Host cost per call of each op's triton path: input checks, dispatch, launch setup and the launches, with
the GPU never waited for (calls are queued back to back, so the time is the CPU's, whatever the kernels
take). Small shapes, where a ViT at small batch is CPU-bound. ``--profile`` adds cProfile's top entries.

    python -m benchmarks.host_overhead [--calls 200] [--profile]

Without a GPU it runs under the Triton interpreter with the launches replaced by no-ops (a dry run that
still measures everything but the launches).
"""
from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import sys
import time

import torch


def cases(device, dtype):
    import vitkernels

    q, k, v = (torch.randn(2, 12, 197, 64, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    bias = torch.randn(1, 12, 197, 197, device=device, dtype=dtype, requires_grad=True)
    qkv = torch.randn(2, 7, 7, 3 * 768, device=device, dtype=dtype, requires_grad=True)
    table = torch.randn(169, 24, device=device, dtype=dtype, requires_grad=True)
    qkv_bias = torch.randn(3 * 768, device=device, dtype=dtype, requires_grad=True)
    img = torch.randn(2, 3, 224, 224, device=device, dtype=dtype, requires_grad=True)
    weight = torch.randn(768, 3, 16, 16, device=device, dtype=dtype, requires_grad=True)
    pbias = torch.randn(768, device=device, dtype=dtype, requires_grad=True)

    def attention():
        return vitkernels.flash_attention(q, k, v, bias=bias, backend="triton")

    def window():
        return vitkernels.window_attention(qkv, num_heads=24, window_size=7, rel_pos_bias=table, qkv_bias=qkv_bias,
                                           backend="triton")

    def patch():
        return vitkernels.patch_embed(img, weight, pbias, backend="triton")

    return {"attention B=2 N=197 +bias": (attention, (q, k, v, bias)), "window Swin stage 4 B=2": (window, (qkv, table, qkv_bias)),
            "patch embed B=2 /16": (patch, (img, weight, pbias))}


def per_call_us(fn, calls: int, sync) -> float:
    fn()
    sync()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = (time.perf_counter() - start) / calls * 1e6
    sync()
    return elapsed


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--profile", action="store_true", help="print cProfile's top entries per case")
    args = parser.parse_args(argv)
    gpu = torch.cuda.is_available()
    if not gpu:
        os.environ.setdefault("TRITON_INTERPRET", "1")
        from vitkernels.ops import tuning

        tuning.launch = lambda *a, **k: None  # launches are no-ops: what remains is the host path around them
        print("no GPU: launches replaced by no-ops under the Triton interpreter (host path only)")
    device = "cuda" if gpu else "cpu"
    sync = torch.cuda.synchronize if gpu else (lambda: None)
    dtype = torch.bfloat16 if gpu else torch.float32
    for name, (op, leaves) in cases(device, dtype).items():
        def fwd():
            with torch.no_grad():
                op()

        def fwd_bwd():
            out = op()
            torch.autograd.grad(out, leaves, torch.ones_like(out))

        modes = [("fwd", fwd)] + ([("fwd+bwd", fwd_bwd)] if gpu else [])
        for mode, fn in modes:
            print(f"{name:32s} {mode:8s} {per_call_us(fn, args.calls, sync):8.1f} us per call (host)")
            if args.profile:
                prof = cProfile.Profile()
                prof.enable()
                for _ in range(50):
                    fn()
                prof.disable()
                sync()
                text = io.StringIO()
                pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(14)
                print("\n".join(line for line in text.getvalue().splitlines()[6:] if line.strip()))
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())

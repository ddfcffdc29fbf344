"""Host cost per call of each op's triton path, with the GPU never waited for (calls are queued back to
back, so the time is the CPU's, whatever the kernels take). Small shapes, where a ViT at small batch is
CPU-bound. Each row splits the call:

* ``to launch``: from the call to its first kernel launch: input checks (or the call memo), dispatch, the
  autograd bookkeeping and the launch setup (allocations, arguments, config choice), what vitkernels adds;
* ``total``: the whole call, Triton's launcher and every further launch included.

Modes: ``infer`` (torch.no_grad, the kernels' forward without autograd), ``fwd`` (inputs that require
grad: through the autograd.Function) and, on a GPU, ``fwd+bwd``. ``--profile`` adds cProfile's top entries.

    python -m benchmarks.host_overhead [--calls 200] [--profile]

Without a GPU it runs under the Triton interpreter with ``tuning.launch`` replaced by a no-op: what it times
is vitkernels' host path, except in the cases with small tensor ops a GPU would queue (the ``+bias`` case's
padded bias copy, the window table's dense bias), which the CPU then computes; the cases without them
(``attention``, ``window ... no table``, ``patch embed``) are the pure host cost.
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
        return vitkernels.flash_attention(q, k, v, backend="triton")

    def attention_bias():
        return vitkernels.flash_attention(q, k, v, bias=bias, backend="triton")

    def window():
        return vitkernels.window_attention(qkv, num_heads=24, window_size=7, rel_pos_bias=table, qkv_bias=qkv_bias,
                                           backend="triton")

    def window_plain():
        return vitkernels.window_attention(qkv, num_heads=24, window_size=7, qkv_bias=qkv_bias, backend="triton")

    def patch():
        return vitkernels.patch_embed(img, weight, pbias, backend="triton")

    return {"attention B=2 N=197": (attention, (q, k, v)), "attention B=2 N=197 +bias": (attention_bias, (q, k, v, bias)), "window Swin stage 4 B=2": (window, (qkv, table, qkv_bias)),
            "window stage 4 B=2, no table": (window_plain, (qkv, qkv_bias)),
            "patch embed B=2 /16": (patch, (img, weight, pbias))}


_FIRST_LAUNCH = []


def stamp_launches(real_launch):
    """``tuning.launch`` wrapped to note when a call reaches its first launch."""
    def launch(*args, **kwargs):
        if not _FIRST_LAUNCH:
            _FIRST_LAUNCH.append(time.perf_counter())
        return real_launch(*args, **kwargs)
    return launch


def per_call_us(fn, calls: int, sync) -> tuple:
    """(host us to the first launch, host us per call), means over ``calls`` back-to-back calls."""
    fn()
    sync()
    to_launch = 0.0
    start = time.perf_counter()
    for _ in range(calls):
        _FIRST_LAUNCH.clear()
        t0 = time.perf_counter()
        fn()
        to_launch += (_FIRST_LAUNCH[0] if _FIRST_LAUNCH else time.perf_counter()) - t0
    elapsed = (time.perf_counter() - start) / calls * 1e6
    sync()
    return to_launch / calls * 1e6, elapsed


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--profile", action="store_true", help="print cProfile's top entries per case")
    args = parser.parse_args(argv)
    gpu = torch.cuda.is_available()
    if not gpu:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from vitkernels.ops import tuning

    if gpu:
        tuning.launch = stamp_launches(tuning.launch)
    else:  # launches are no-ops: what remains is the host path around them
        tuning.launch = stamp_launches(lambda *a, **k: None)
        print("no GPU: launches replaced by no-ops under the Triton interpreter (host path only)")
    device = "cuda" if gpu else "cpu"
    sync = torch.cuda.synchronize if gpu else (lambda: None)
    dtype = torch.bfloat16 if gpu else torch.float32
    print(f"{'case':32s} {'mode':8s} {'to launch':>10s} {'total':>10s}  (us per call, host)")
    for name, (op, leaves) in cases(device, dtype).items():
        def infer():
            with torch.no_grad():
                op()

        def fwd():
            op()

        def fwd_bwd():
            out = op()
            torch.autograd.grad(out, leaves, torch.ones_like(out))

        modes = [("infer", infer), ("fwd", fwd)] + ([("fwd+bwd", fwd_bwd)] if gpu else [])
        for mode, fn in modes:
            first, total = per_call_us(fn, args.calls, sync)
            print(f"{name:32s} {mode:8s} {first:10.1f} {total:10.1f}")
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

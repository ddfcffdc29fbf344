"""``python -m vitkernels`` (``make demo``): the backends of this machine, then each op on a ViT-B-like
shape on every backend that can run here: max error against the float64 reference and time."""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable, Dict, List

import torch

import vitkernels
from vitkernels import dispatch
from vitkernels.ops.attention.checks import check_attention_inputs
from vitkernels.ops.patch_embed.checks import check_patch_embed_inputs
from vitkernels.ops.window_attention.checks import check_window_inputs


def _workloads(device: torch.device, small: bool) -> List[Dict]:
    """(name, shape text, builder of fp32 args, op, checker) per op; ViT-B-like by default."""
    g = torch.Generator(device="cpu").manual_seed(0)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device)

    B = 2 if small else 8
    heads, n, d = 12, 197, 64
    q, k, v = (rnd(B, heads, n, d) for _ in range(3))
    rel = rnd(1, heads, n, n, scale=0.5)
    # Swin-T stage 1 (map 56, window 7, shift 3, 3 heads of 32); small: map 14
    side = 14 if small else 56
    c = 96
    qkv = rnd(B, side, side, 3 * c)
    table, qkv_bias = rnd(13 * 13, 3, scale=0.5), rnd(3 * c, scale=0.5)
    # ViT-B/16 patch embedding with a cls token and positions
    img = rnd(B, 3, 224, 224)
    w, b = rnd(768, 3, 16, 16, scale=0.02), rnd(768, scale=0.02)
    cls, pos = rnd(1, 1, 768, scale=0.02), rnd(1, 197, 768, scale=0.02)
    return [
        dict(op="flash_attention", shape=f"B={B} H={heads} N={n} D={d} + bias (1,H,N,N)",
             args=(q, k, v), kwargs=dict(bias=rel), fn=vitkernels.flash_attention,
             check=lambda q, k, v, bias: check_attention_inputs(q, k, v, bias)),
        dict(op="window_attention", shape=f"B={B} {side}x{side} C={c} heads=3 window 7 shift 3",
             args=(qkv,), kwargs=dict(num_heads=3, window_size=7, shift_size=3, rel_pos_bias=table,
                                      qkv_bias=qkv_bias),
             fn=vitkernels.window_attention,
             check=lambda qkv, **kw: check_window_inputs(qkv, kw["num_heads"], kw["window_size"],
                                                          kw["shift_size"], kw["rel_pos_bias"], kw["qkv_bias"])),
        dict(op="patch_embed", shape=f"B={B} 3x224x224 patch 16 E=768 + cls + pos",
             args=(img, w, b), kwargs=dict(pos_embed=pos, prefix_tokens=cls), fn=vitkernels.patch_embed,
             check=lambda x, w, b, **kw: check_patch_embed_inputs(x, w, b, kw["pos_embed"], kw["prefix_tokens"])),
    ]


def _time_ms(fn: Callable[[], None], device: torch.device, reps: int) -> float:
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    fn()  # warm-up (compilation, caches)
    sync()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _cast(obj, dtype):
    return obj.to(dtype) if isinstance(obj, torch.Tensor) and obj.is_floating_point() else obj


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vitkernels", description=__doc__)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--small", action="store_true", help="smaller batch and map (quick check)")
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args(argv)
    device = torch.device(args.device)

    print(f"vitkernels {vitkernels.__version__}, torch {torch.__version__}, device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""))
    print("\nBackends on this machine:")
    for name, (ok, why) in vitkernels.available_backends().items():
        print(f"  {name:<10} {'yes' if ok else 'no ':<4} {why}")

    header = f"{'op':<17} {'backend':<10} {'dtype':<8} {'max err vs fp64':>16} {'fwd ms':>9} {'fwd+bwd ms':>11}"
    print("\nfloat32 inputs; error against the float64 reference on the same inputs; median of "
          f"{args.reps} runs (wall time{', CUDA synchronized' if device.type == 'cuda' else ''})")
    for work in _workloads(device, args.small):
        print(f"\n{work['op']}: {work['shape']}")
        print(header)
        fn, wargs, wkw = work["fn"], work["args"], work["kwargs"]
        ref64 = fn(*[_cast(a, torch.float64) for a in wargs],
                   **{k: _cast(v, torch.float64) for k, v in wkw.items()}, backend="reference")
        inputs = work["check"](*wargs, **wkw)
        for name in dispatch.BACKEND_NAMES:
            impl = dispatch.implementations(work["op"]).get(name)
            if impl is None:
                print(f"{work['op']:<17} {name:<10} skipped: no {work['op']} kernel on this backend yet")
                continue
            reasons = impl.not_supported_reasons(inputs)
            if reasons:
                print(f"{work['op']:<17} {name:<10} skipped: {'; '.join(reasons)}")
                continue
            out = fn(*wargs, **wkw, backend=name)
            err = (out.double() - ref64).abs().max().item()
            fwd = _time_ms(lambda: fn(*wargs, **wkw, backend=name), device, args.reps)
            grad_args = [a.detach().requires_grad_(a.is_floating_point()) for a in wargs]
            grad_kw = {k: (v.detach().requires_grad_() if isinstance(v, torch.Tensor) else v) for k, v in wkw.items()}
            gout = torch.randn_like(out)

            def fwd_bwd():
                fn(*grad_args, **grad_kw, backend=name).backward(gout)

            both = _time_ms(fwd_bwd, device, args.reps)
            print(f"{work['op']:<17} {name:<10} {'float32':<8} {err:>16.3e} {fwd:>9.2f} {both:>11.2f}")
    return 0

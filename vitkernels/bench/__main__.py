"""``python -m vitkernels.bench {attention,window,patch,model}``: vitkernels' backends against their peers,
one table per op (median ms, TFLOP/s, GB/s, peak memory, speedup over the best peer), optionally saved
as JSON + markdown and drawn as a plot. On a machine without a GPU it runs the CPU subset (reference,
cpu backend, SDPA and timm on CPU) with small batches; peers that cannot run are listed with why."""
from __future__ import annotations

import argparse
import datetime
import os
import sys

import torch

from vitkernels.bench import core
from vitkernels.bench.workloads import COMPILE_PEERS, DEFAULT_WORKLOAD, DTYPES, OPS


def parse(argv):
    parser = argparse.ArgumentParser(prog="python -m vitkernels.bench", description=__doc__)
    parser.add_argument("op", choices=sorted(OPS))
    parser.add_argument("--workload", choices=["vit", "swin", "video", "long", "all"], default=None)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="default bf16 on a GPU, fp32 on CPU")
    parser.add_argument("--mode", choices=["fwd", "fwd+bwd"], default="fwd")
    parser.add_argument("--backends", nargs="*", default=None, help="vitkernels backends to time (default: all)")
    parser.add_argument("--bias", action="store_true", help="attention: add a learnable (1, H, N, N) bias")
    parser.add_argument("--batch", type=int, default=None, help="override every workload's batch")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--limit", type=int, default=None, help="only the first N workloads")
    parser.add_argument("--json", default=None, help="write the rows as JSON here")
    parser.add_argument("--markdown", default=None, help="write a markdown table here")
    parser.add_argument("--save", action="store_true",
                        help="write benchmarks/results/<date>-<device>-<op>.{json,md}")
    parser.add_argument("--plot", default=None, help="draw speedup (and memory) to this PNG")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="time torch.compile'd peers (default: on with a GPU, off on CPU)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(argv)
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    dtype_name = args.dtype or ("bf16" if gpu else "fp32")
    dtype = DTYPES[dtype_name]
    warmup = args.warmup if args.warmup is not None else (10 if gpu else 1)
    reps = args.reps if args.reps is not None else (50 if gpu else 3)
    COMPILE_PEERS["enabled"] = gpu if args.compile is None else args.compile
    workloads_fn, candidates_fn, cost_fn = OPS[args.op]
    workloads = workloads_fn(args.workload or DEFAULT_WORKLOAD[args.op], device, args.batch)[: args.limit]
    if not workloads:
        print(f"no {args.op} workload named {args.workload!r}", file=sys.stderr)
        return 2
    if not gpu:
        print("no GPU: timing the CPU subset (wall clock, small batches); triton runs only on a GPU")
    rows = []
    progress = core.Progress(len(workloads))
    for wl in workloads:
        if args.op == "attention":
            cands = candidates_fn(wl.params, dtype, args.mode, device, args.backends, args.bias)
            flops, io = cost_fn(wl.params, args.mode, dtype, args.bias)
        else:
            cands = candidates_fn(wl.params, dtype, args.mode, device, args.backends)
            flops, io = cost_fn(wl.params, args.mode, dtype)
        rows += core.measure(args.op, wl.name, wl.shape, cands, dtype_name, args.mode, flops, io, device, warmup, reps,
                             images=wl.params["B"] if args.op == "model" else None)
        progress.step(wl.name)
    print(core.table(rows))
    meta = core.metadata(device, argv)
    json_path, md_path = args.json, args.markdown
    if args.save:
        os.makedirs(os.path.join("benchmarks", "results"), exist_ok=True)
        tag = "gpu" if gpu else "cpu"
        stem = os.path.join("benchmarks", "results", f"{datetime.date.today().isoformat()}-{tag}-{args.op}")
        json_path, md_path = json_path or stem + ".json", md_path or stem + ".md"
    core.save(rows, meta, json_path, md_path)
    for path in (json_path, md_path):
        if path:
            print(f"wrote {path}")
    if args.plot:
        print(core.plot(rows, args.plot))
    return 0


if __name__ == "__main__":
    sys.exit(main())

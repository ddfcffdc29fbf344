"""python -m vitkernels.bench {attention,window,patch,model}: vitkernels' backends against their peers.

Times each vitkernels backend and each peer on named ViT workloads and prints, per workload, the median
time and its IQR, TFLOP/s, GB/s, peak memory and the speedup over the fastest peer that ran.

Peers run at their best: every torch SDPA backend is tried (one that refuses is listed with the error
torch raised), FlexAttention and timm's modules compiled with torch.compile, timm's eager modules, eager
Conv2d patch embedding. Rows print as they are timed, a progress line goes to stderr, and the --json /
--markdown / --save files are rewritten after every row: a stopped run keeps what it timed.

attention --workload sam: SAM ViT-B's global attention (64x64 token grid, 12 heads of 64) with its
decomposed relative-position bias, the einsums building it timed too: vitkernels' rel_pos terms against
timm's dense (B*H, N, N) bias (get_decomposed_rel_pos_bias) into SDPA with each backend forced, timm's
eager math, and that path under torch.compile. B=1, 2, 4, 8 on a GPU; B=1 on CPU (--batch for another).
On CPU a dense candidate that would not fit in the memory available is refused, saying so.

attention --workload eva: EVA-02-B/L attention with 2-D RoPE after the class token: vitkernels rotating q and
k inside the kernels against timm's EvaAttention path (apply_rot_embed_cat on q and k, then SDPA with each
backend forced, its eager math, or compiled). window --workload swinv2: Swin V2-T (window 8) stages 1 and 3,
scaled cosine attention with the CPB-MLP table: window_attention(cosine=True) on a timm
SwinTransformerV2Block's own parameters against that block's _attn, eager and compiled.

Without a GPU the CPU subset runs (small batches, wall clock; Triton is not timed on CPU). Each
candidate is called until at least --reps calls and --min-time seconds were timed; rows whose IQR is
over 10% of the median are flagged noisy. The JSON records the CPU, torch's thread count and the load."""
from __future__ import annotations

import argparse
import datetime
import os
import sys

import torch

from vitkernels import dispatch
from vitkernels.bench import core
from vitkernels.bench.workloads import (COMPILE_PEERS, CPU_DEFAULT_MAX_TOKENS, DEFAULT_WORKLOAD, DTYPES, OPS,
                                        WORKLOAD_KINDS)

EPILOG = """examples:
  python -m vitkernels.bench attention --workload vit --dtype bf16 --mode fwd+bwd --bias --plot att.png
  python -m vitkernels.bench window --workload swin --json window.json
  python -m vitkernels.bench attention --workload long --limit 1 --no-compile
  python -m vitkernels.bench attention --workload sam --mode fwd+bwd --batch 2
  python -m vitkernels.bench attention --workload eva --mode fwd+bwd
  python -m vitkernels.bench window --workload swinv2 --mode fwd+bwd
  python -m vitkernels.bench model --workload vit --mode fwd+bwd --save"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m vitkernels.bench", description=__doc__, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("op", choices=sorted(OPS), help="which op (or whole models) to time")
    parser.add_argument("--workload", default=None, metavar="NAME",
                        help="workload set; attention: vit, long, sam (SAM ViT-B global attention with "
                             "its decomposed rel-pos bias), eva (EVA-02 attention with 2-D RoPE), all (default vit); "
                             "window: swin, video, swinv2 (Swin V2 cosine attention), all (default swin); patch: vit, video, all (default vit); model: vit, swin, all "
                             "(default all)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="default: bf16 on a GPU, fp32 on CPU")
    parser.add_argument("--mode", choices=["fwd", "fwd+bwd"], default="fwd",
                        help="fwd: inference (no autograd graph); fwd+bwd: forward and backward (default: fwd)")
    parser.add_argument("--backends", nargs="+", default=None, metavar="NAME",
                        help=f"vitkernels backends to time, from {', '.join(dispatch.BACKEND_NAMES)} "
                             "(default: every backend of the op)")
    parser.add_argument("--bias", action="store_true",
                        help="attention: add a learnable (1, H, N, N) bias (default: off; the sam set has "
                             "its own rel-pos bias and takes none)")
    parser.add_argument("--batch", type=int, default=None,
                        help="batch size for every workload (default: per workload; smaller on CPU)")
    parser.add_argument("--device", default=None,
                        help="cpu or cuda[:i] (default: cuda when a GPU is visible, else cpu)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed calls first (default: 10 GPU, 3 CPU)")
    parser.add_argument("--reps", type=int, default=None,
                        help="at least this many timed calls (default: 50 GPU, 10 CPU)")
    parser.add_argument("--min-time", type=float, default=None, metavar="S",
                        help="and keep timing until S seconds were timed, at most "
                             f"{core.MAX_REPS} calls (default: 0.2 GPU, 1.0 CPU)")
    parser.add_argument("--limit", type=int, default=None, metavar="N",
                        help="only the first N workloads (default: all of the set)")
    parser.add_argument("--json", default=None, metavar="PATH", help="write the rows as JSON here, after every row")
    parser.add_argument("--markdown", default=None, metavar="PATH", help="write a markdown table here, after every row")
    parser.add_argument("--save", action="store_true",
                        help="write benchmarks/results/<date>-<cpu|gpu>-<op>.{json,md} (default: off)")
    parser.add_argument("--plot", default=None, metavar="PNG",
                        help="draw speedup (with IQR) and peak memory per workload to this PNG")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                        help="time torch.compile'd peers; compiling takes a while per shape, and with "
                             "--no-compile the speedups are against eager peers only (default: on)")
    return parser


def _device(parser, text):
    if text is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except RuntimeError as exc:
        parser.error(f"--device: {text!r} is not a device ({exc}); use cpu or cuda")
    if device.type not in ("cpu", "cuda"):
        parser.error(f"--device: {text!r}: the benchmark runs on cpu or cuda, not {device.type}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            parser.error(f"--device {text}: torch sees no CUDA GPU (torch.cuda.is_available() is False); "
                         "use --device cpu or leave --device out")
        if device.index is not None and device.index >= torch.cuda.device_count():
            parser.error(f"--device {text}: only {torch.cuda.device_count()} CUDA device(s) visible")
    return device


def parse(argv):
    parser = build_parser()
    args = parser.parse_args(argv)
    kinds = WORKLOAD_KINDS[args.op]
    if args.workload is not None and args.workload not in kinds:
        parser.error(f"--workload: {args.op} has the workload sets {', '.join(kinds)}; got {args.workload!r}")
    valid = dispatch.BACKEND_NAMES if args.op == "model" else tuple(dispatch.implementations(_OP_NAMES[args.op]))
    for name in args.backends or ():
        if name not in valid:
            parser.error(f"--backends: {args.op} has the vitkernels backends {', '.join(valid)}; got {name!r}")
    if args.bias and args.op != "attention":
        parser.error(f"--bias: only the attention op takes a bias (got op {args.op!r})")
    if args.bias and args.workload == "sam":
        parser.error("--bias: the sam workloads carry their own decomposed rel-pos bias and take no dense one")
    if args.bias and args.workload == "eva":
        parser.error("--bias: the eva workloads time EVA-02's rotary attention, which has no additive bias")
    for flag, value, low in (("--batch", args.batch, 1), ("--limit", args.limit, 1), ("--reps", args.reps, 1),
                             ("--warmup", args.warmup, 0)):
        if value is not None and value < low:
            parser.error(f"{flag} must be >= {low}; got {value}")
    if args.min_time is not None and not args.min_time >= 0:
        parser.error(f"--min-time must be >= 0 seconds; got {args.min_time}")
    args.device = _device(parser, args.device)
    return args


_OP_NAMES = {"attention": "flash_attention", "window": "window_attention", "patch": "patch_embed"}


def _warn(text: str) -> None:
    print(f"warning: {text}", file=sys.stderr, flush=True)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(argv)
    device = args.device
    gpu = device.type == "cuda"
    dtype_name = args.dtype or ("bf16" if gpu else "fp32")
    dtype = DTYPES[dtype_name]
    warmup = args.warmup if args.warmup is not None else (10 if gpu else 3)
    reps = args.reps if args.reps is not None else (50 if gpu else 10)
    min_time = args.min_time if args.min_time is not None else (0.2 if gpu else 1.0)
    COMPILE_PEERS["enabled"] = args.compile
    COMPILE_PEERS["why"] = "compiled peer off (--no-compile)"
    workloads_fn, candidates_fn, cost_fn = OPS[args.op]
    workloads = workloads_fn(args.workload or DEFAULT_WORKLOAD[args.op], device, args.batch)
    if not gpu and args.workload is None:  # the CPU default leaves out what takes minutes per call, saying so
        long = [w for w in workloads if w.params.get("N", 0) > CPU_DEFAULT_MAX_TOKENS]
        if long:
            workloads = [w for w in workloads if w not in long]
            names = ", ".join(f"{w.name} (N={w.params['N']})" for w in long)
            print(f"CPU default: left out {names}; "
                  f"name the set (--workload {DEFAULT_WORKLOAD[args.op]}) to time them too")
    workloads = workloads[: args.limit]
    if args.bias and any("grid" in w.params for w in workloads):
        print("note: --bias does not apply to the SAM rel-pos workloads (their bias is the decomposed rel-pos one)")

    meta = core.metadata(device, argv, {
        "timing": {"warmup": warmup, "min_reps": reps, "min_time_s": min_time, "max_reps": core.MAX_REPS,
                   "clock": "CUDA events" if gpu else "wall clock"},
        "compiled_peers": args.compile, "workloads_planned": [w.name for w in workloads], "complete": False})
    json_path, md_path = args.json, args.markdown
    if args.save:
        os.makedirs(os.path.join("benchmarks", "results"), exist_ok=True)
        tag = "gpu" if gpu else "cpu"
        stem = os.path.join("benchmarks", "results", f"{datetime.date.today().isoformat()}-{tag}-{args.op}")
        json_path, md_path = json_path or stem + ".json", md_path or stem + ".md"

    host = meta["host"]
    if not gpu:
        print(f"no GPU: timing the CPU subset (wall clock, small batches; {host['torch_threads']} torch threads on "
              f"{host['cpu_model']}); triton runs only on a GPU")
        load = (host["loadavg_start"] or [0.0])[0]
        if load > 0.5 * (host["usable_cores"] or 1):
            _warn(f"the load average is {load} on {host['usable_cores']} usable cores: CPU timings will be noisy")
    if not args.compile:
        _warn("compiled peers are off (--no-compile): 'vs best peer' is against eager peers only")

    rows = []
    progress = core.Progress(len(workloads))

    def record(row):
        progress.clear()
        print(core.format_row(row), flush=True)
        rows.append(row)
        if row.note:
            _warn(f"{row.candidate} on {row.workload}: {row.note} (load {core._loadavg()}); "
                  "rerun on a quieter machine or raise --min-time")
        core.save(rows, meta, json_path, md_path)

    try:
        for wl in workloads:
            progress.workload(wl.name)
            if args.op == "attention":
                cands = candidates_fn(wl.params, dtype, args.mode, device, args.backends, args.bias)
                flops, io = cost_fn(wl.params, args.mode, dtype, args.bias)
            else:
                cands = candidates_fn(wl.params, dtype, args.mode, device, args.backends)
                flops, io = cost_fn(wl.params, args.mode, dtype)
            progress.clear()
            print(f"\n{args.op} | {wl.name} | {wl.shape} | {dtype_name} | {args.mode}\n{core.HEADER}", flush=True)
            done = core.measure(args.op, wl.name, wl.shape, cands, dtype_name, args.mode, flops, io, device,
                                warmup, reps, images=wl.params["B"] if args.op == "model" else None,
                                min_time=min_time, on_row=record, on_start=lambda c: progress.candidate(c.name))
            best = core._best_peer(done)
            progress.clear()
            print(f"fastest peer: {best.candidate} ({best.median_ms:.3f} ms)" if best else
                  "fastest peer: none ran (no speedup to report)", flush=True)
            core.save(rows, meta, json_path, md_path)  # the peers' speedups, now final
            progress.step(wl.name)
    except KeyboardInterrupt:
        progress.clear()
        meta["interrupted"] = f"stopped after {len(rows)} rows"
        _warn(f"interrupted: {meta['interrupted']}; what was timed is kept")
        _finish(rows, meta, json_path, md_path, args.plot)
        return 130
    meta["complete"] = True
    _finish(rows, meta, json_path, md_path, args.plot)
    return 0


def _finish(rows, meta, json_path, md_path, plot_path) -> None:
    meta["host"]["loadavg_end"] = core._loadavg()
    meta["finished"] = datetime.datetime.now().isoformat(timespec="seconds")
    core.save(rows, meta, json_path, md_path)
    if rows:
        print("\n" + core.summary(rows))
    noisy = [r for r in rows if r.note]
    if noisy:
        _warn(f"{len(noisy)} of {sum(1 for r in rows if r.median_ms)} timed rows are noisy (IQR > "
              f"{100 * core.NOISY_IQR_FRACTION:.0f}% of the median; load {meta['host']['loadavg_start']} at start, "
              f"{meta['host']['loadavg_end']} at end)")
    if not meta.get("compiled_peers"):
        print("(compiled peers were off: speedups are against eager peers only)")
    for path in (json_path, md_path):
        if path:
            print(f"wrote {path}")
    if plot_path:
        print(core.plot(rows, plot_path, meta))


if __name__ == "__main__":
    sys.exit(main())

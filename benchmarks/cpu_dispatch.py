"""Does ``backend=None`` pick the fastest CPU backend? Times every backend that runs on CPU tensors (the C++
``cpu`` kernels and the pure-PyTorch ``reference``) for each op on the README / demo workloads, fp32 and
bf16, inference and training, and marks where dispatch's choice is slower than another backend.

    python -m benchmarks.cpu_dispatch [--rounds 7] [--quick] [--save]

Backends are timed in interleaved rounds (one call of each per round, the order rotated), so a slow spell
of this machine hits all of them; the figure is the median per backend. A choice counts as slower only when
its median is more than --tolerance (default 10%) above the fastest. ``--save`` writes
benchmarks/results/<date>-cpu-dispatch.{md,json}. Exit code 1 when dispatch picks a slower backend.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
from typing import Callable, Dict, List

import torch

import vitkernels
from vitkernels import dispatch
from vitkernels.bench.core import host_info

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _attention(B, H, N, D, bias):
    def make(dtype, grad):
        q, k, v = (torch.randn(B, N, 3, H, D, dtype=dtype).permute(2, 0, 3, 1, 4).unbind(0))
        leaves = [t.detach().requires_grad_(grad) for t in (q, k, v)]
        b = torch.randn(1, H, N, N, dtype=dtype, requires_grad=grad) if bias else None

        def call(backend):
            return vitkernels.flash_attention(*leaves, bias=b, backend=backend)
        return call
    return make


def _window(B, side, C, heads, window, shift):
    spatial = side if isinstance(side, tuple) else (side, side)
    window_t = window if isinstance(window, tuple) else (window,) * len(spatial)
    rows = 1
    for w in window_t:
        rows *= 2 * w - 1

    def make(dtype, grad):
        qkv = torch.randn(B, *spatial, 3 * C, dtype=dtype, requires_grad=grad)
        table = torch.randn(rows, heads, dtype=dtype, requires_grad=grad)
        qkv_bias = torch.randn(3 * C, dtype=dtype, requires_grad=grad)

        def call(backend):
            return vitkernels.window_attention(qkv, num_heads=heads, window_size=window, shift_size=shift,
                                               rel_pos_bias=table, qkv_bias=qkv_bias, backend=backend)
        return call
    return make


def _patch(B, chw, patch, E, prefix):
    def make(dtype, grad):
        x = torch.randn(B, *chw, dtype=dtype)
        w = (torch.randn(E, chw[0], *patch, dtype=dtype) * 0.02).requires_grad_(grad)
        b = torch.zeros(E, dtype=dtype, requires_grad=grad)
        num = 1
        for s, p in zip(chw[1:], patch):
            num *= s // p
        pos = (torch.randn(1, prefix + num, E, dtype=dtype) * 0.02).requires_grad_(grad)
        cls = torch.zeros(1, prefix, E, dtype=dtype, requires_grad=grad) if prefix else None

        def call(backend):
            return vitkernels.patch_embed(x, w, b, pos_embed=pos, prefix_tokens=cls, backend=backend)
        return call
    return make


WORKLOADS = [
    # (op, name, maker, in --quick)
    ("flash_attention", "ViT-B B=8 N=197 + bias", _attention(8, 12, 197, 64, True), True),
    ("flash_attention", "ViT-B B=8 N=197", _attention(8, 12, 197, 64, False), False),
    ("flash_attention", "ViT-L/14@336 B=2 N=577", _attention(2, 16, 577, 64, False), False),
    ("flash_attention", "B=64 H=3 N=49 D=32 + bias", _attention(64, 3, 49, 32, True), False),
    ("window_attention", "Swin-T s1 B=8 (demo)", _window(8, 56, 96, 3, 7, 3), True),
    ("window_attention", "Swin-T s1 B=1", _window(1, 56, 96, 3, 7, 3), False),
    ("window_attention", "Swin-T s3 B=1", _window(1, 14, 384, 12, 7, 3), False),
    ("window_attention", "Swin-T s4 B=1", _window(1, 7, 768, 24, 7, 3), False),
    ("window_attention", "VideoSwin-T s3 B=1", _window(1, (8, 14, 14), 384, 12, (8, 7, 7), (4, 3, 3)), False),
    ("patch_embed", "ViT-B/16@224 B=8 (demo)", _patch(8, (3, 224, 224), (16, 16), 768, 1), True),
    ("patch_embed", "ViT-L/14@336 B=8", _patch(8, (3, 336, 336), (14, 14), 1024, 1), False),
    ("patch_embed", "Swin patch4 B=8", _patch(8, (3, 224, 224), (4, 4), 96, 0), False),
    ("patch_embed", "video 2x16x16 B=1", _patch(1, (3, 16, 224, 224), (2, 16, 16), 768, 0), False),
]


def _runner(call: Callable, backend, grad: bool) -> Callable[[], None]:
    if not grad:
        def run():
            with torch.no_grad():
                call(backend)
        return run

    def run_bwd():
        out = call(backend)
        out.backward(torch.ones_like(out))
    return run_bwd


def time_interleaved(runs: Dict[str, Callable[[], None]], rounds: int) -> Dict[str, float]:
    """Median ms per candidate, one call of each per round, the order rotated every round."""
    names = list(runs)
    for name in names:  # warm-up (first-call setup, allocator)
        runs[name]()
        runs[name]()
    times = {name: [] for name in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            t0 = time.perf_counter()
            runs[name]()
            times[name].append((time.perf_counter() - t0) * 1e3)
    return {name: statistics.median(ts) for name, ts in times.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--tolerance", type=float, default=0.10)
    parser.add_argument("--quick", action="store_true", help="the demo workloads only")
    parser.add_argument("--save", action="store_true")
    args = parser.parse_args(argv)

    rows: List[Dict] = []
    header = (f"| op | workload | dtype | mode | {' | '.join('%s ms' % b for b in dispatch.priority(torch.device('cpu')))}"
              " | dispatch picks | fastest | ok |")
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for op, name, make, quick in WORKLOADS:
        if args.quick and not quick:
            continue
        for dtype_name, dtype in DTYPES.items():
            for mode in ("fwd", "fwd+bwd"):
                grad = mode == "fwd+bwd"
                call = make(dtype, grad)
                runs = {}
                for b in dispatch.priority(torch.device("cpu")):
                    try:
                        _runner(call, b, grad)()
                    except vitkernels.BackendUnavailableError:
                        continue
                    runs[b] = _runner(call, b, grad)
                medians = time_interleaved(runs, args.rounds)
                picked = _probe(call).picked
                fastest = min(medians, key=medians.get)
                ok = medians[picked] <= medians[fastest] * (1 + args.tolerance)
                row = dict(op=op, workload=name, dtype=dtype_name, mode=mode, ms=medians, picked=picked,
                           fastest=fastest, ok=ok)
                rows.append(row)
                cells = " | ".join(f"{medians[b]:.2f}" if b in medians else "-"
                                   for b in dispatch.priority(torch.device("cpu")))
                print(f"| {op} | {name} | {dtype_name} | {mode} | {cells} | {picked} | {fastest} | "
                      f"{'yes' if ok else 'NO'} |", flush=True)
    bad = [r for r in rows if not r["ok"]]
    print(f"\n{len(rows) - len(bad)} of {len(rows)} choices within {args.tolerance:.0%} of the fastest backend"
          f" (torch {torch.__version__}, {torch.get_num_threads()} threads)")
    if args.save:
        stamp = datetime.date.today().isoformat()
        base = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", f"{stamp}-cpu-dispatch")
        meta = dict(host=host_info(), argv=sys.argv, torch=torch.__version__, threads=torch.get_num_threads(),
                    rounds=args.rounds, tolerance=args.tolerance)
        with open(base + ".json", "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=1)
        with open(base + ".md", "w") as f:
            f.write(f"# CPU dispatch check ({stamp})\n\n`python -m benchmarks.cpu_dispatch "
                    f"{' '.join(sys.argv[1:])}`; {meta['host']}; medians of {args.rounds} interleaved rounds\n\n")
            f.write(header + "\n|" + "---|" * (header.count("|") - 1) + "\n")
            for r in rows:
                cells = " | ".join(f"{r['ms'][b]:.2f}" if b in r["ms"] else "-"
                                   for b in dispatch.priority(torch.device("cpu")))
                f.write(f"| {r['op']} | {r['workload']} | {r['dtype']} | {r['mode']} | {cells} | {r['picked']} | "
                        f"{r['fastest']} | {'yes' if r['ok'] else 'NO'} |\n")
        print(f"wrote {base}.md / .json")
    return 1 if bad else 0


class _Probe:
    """What dispatch decides for one call: the op's own entry point with a recording backend lookup."""

    def __init__(self, call):
        self.call = call
        self._picked = None

    @property
    def picked(self) -> str:
        if self._picked is None:
            chosen = []
            original = dispatch.select

            def spy(op, inputs, backend=None):
                impl = original(op, inputs, backend)
                chosen.append(impl.name)
                return impl
            dispatch.select = spy
            dispatch.clear_call_memos()
            try:
                with torch.no_grad():
                    self.call(None)
            finally:
                dispatch.select = original
                dispatch.clear_call_memos()
            self._picked = chosen[-1]
        return self._picked


_PROBES: Dict[int, _Probe] = {}


def _probe(call) -> _Probe:
    return _PROBES.setdefault(id(call), _Probe(call))


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark machinery: timing (CUDA events on a GPU, wall clock on CPU), one row per (workload,
candidate), tables, JSON / markdown records and plots."""
from __future__ import annotations

import dataclasses
import datetime
import json
import math
import platform
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional

import torch


@dataclasses.dataclass
class Candidate:
    """One thing to time on a workload: a vitkernels backend or a peer. ``build()`` returns the callable
    to time (it runs forward, or forward + backward); ``skip`` says why it cannot run here."""

    name: str
    kind: str  # "vitkernels" or "peer"
    build: Optional[Callable[[], Callable[[], object]]] = None
    skip: Optional[str] = None


@dataclasses.dataclass
class Row:
    op: str
    workload: str
    shape: str
    candidate: str
    kind: str
    dtype: str
    mode: str
    median_ms: Optional[float] = None
    iqr_ms: Optional[float] = None
    tflops: Optional[float] = None
    gbps: Optional[float] = None
    peak_mb: Optional[float] = None
    speedup_vs_best_peer: Optional[float] = None
    images_per_s: Optional[float] = None
    status: str = "ok"  # ok | skipped: why | oom | error: what


def time_callable(fn: Callable[[], object], device: torch.device, warmup: int, reps: int):
    """(median ms, IQR ms, peak MB or None). GPU: CUDA events around each call after warm-up; CPU: wall
    clock. Peak memory: max allocated during one call, on CUDA only."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        peak = (torch.cuda.max_memory_allocated(device) - base) / 2 ** 20
        times = []
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end))
    else:
        peak = None
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    q1, q3 = times[len(times) // 4], times[(3 * len(times)) // 4]
    return statistics.median(times), q3 - q1, peak


def measure(op: str, workload: str, shape: str, candidates: List[Candidate], dtype: str, mode: str,
            flops: float, bytes_moved: float, device: torch.device, warmup: int, reps: int,
            images: Optional[int] = None) -> List[Row]:
    rows = []
    for cand in candidates:
        row = Row(op, workload, shape, cand.name, cand.kind, dtype, mode)
        if cand.skip:
            row.status = f"skipped: {cand.skip}"
            rows.append(row)
            continue
        try:
            fn = cand.build()
            if mode == "fwd":  # inference: no autograd graph (parameters may require grad)
                inner = fn

                def fn():
                    with torch.no_grad():
                        return inner()
            ms, iqr, peak = time_callable(fn, device, warmup, reps)
            row.median_ms, row.iqr_ms, row.peak_mb = ms, iqr, peak
            if flops:
                row.tflops = flops / (ms * 1e-3) / 1e12
                row.gbps = bytes_moved / (ms * 1e-3) / 1e9
            if images:
                row.images_per_s = images / (ms * 1e-3)
        except torch.cuda.OutOfMemoryError:
            row.status = "oom"
        except Exception as exc:  # a peer that fails here is reported, not fatal
            row.status = f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()
        rows.append(row)
    peers = [r.median_ms for r in rows if r.kind == "peer" and r.median_ms]
    if peers:
        best = min(peers)
        for r in rows:
            if r.median_ms:
                r.speedup_vs_best_peer = best / r.median_ms
    return rows


def _fmt(value, spec):
    width = int(spec.split(".")[0] or 0)
    return "-".rjust(width) if value is None else format(value, spec)


def table(rows: List[Row]) -> str:
    """A plain-text table, one block per workload."""
    lines = []
    header = (f"{'candidate':<26} {'kind':<10} {'median ms':>10} {'IQR ms':>8} {'TFLOP/s':>8} {'GB/s':>8} "
              f"{'peak MB':>8} {'img/s':>8} {'vs best peer':>12}  status")
    current = None
    for r in rows:
        key = (r.op, r.workload, r.shape, r.dtype, r.mode)
        if key != current:
            current = key
            lines += ["", f"{r.op} | {r.workload} | {r.shape} | {r.dtype} | {r.mode}", header]
        lines.append(f"{r.candidate:<26} {r.kind:<10} {_fmt(r.median_ms, '10.3f')} {_fmt(r.iqr_ms, '8.3f')} "
                     f"{_fmt(r.tflops, '8.3f')} {_fmt(r.gbps, '8.1f')} {_fmt(r.peak_mb, '8.1f')} "
                     f"{_fmt(r.images_per_s, '8.1f')} "
                     f"{_fmt(r.speedup_vs_best_peer, '11.2f') + ('x' if r.speedup_vs_best_peer else ' ')}  "
                     f"{r.status}")
    return "\n".join(lines)


def markdown(rows: List[Row], meta: Dict) -> str:
    out = [f"# vitkernels benchmark: {meta['device']} ({meta['date']})", "",
           f"torch {meta['torch']}, triton {meta['triton']}, python {meta['python']}; command: `{meta['command']}`",
           "", "| op | workload | shape | dtype | mode | candidate | median ms | TFLOP/s | peak MB | vs best peer | status |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r.op} | {r.workload} | {r.shape} | {r.dtype} | {r.mode} | {r.candidate} | "
                   f"{_fmt(r.median_ms, '.3f')} | {_fmt(r.tflops, '.2f')} | {_fmt(r.peak_mb, '.1f')} | "
                   f"{_fmt(r.speedup_vs_best_peer, '.2f')} | {r.status} |")
    return "\n".join(out) + "\n"


def metadata(device: torch.device, argv: List[str]) -> Dict:
    try:
        import triton
        triton_version = triton.__version__
    except Exception:
        triton_version = "not installed"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu")
    return {"device": f"{device.type}: {name}", "date": datetime.date.today().isoformat(),
            "torch": torch.__version__, "triton": triton_version, "python": platform.python_version(),
            "command": "python -m vitkernels.bench " + " ".join(argv)}


def save(rows: List[Row], meta: Dict, json_path: Optional[str], md_path: Optional[str]) -> None:
    if json_path:
        with open(json_path, "w") as f:
            json.dump({"meta": meta, "rows": [dataclasses.asdict(r) for r in rows]}, f, indent=1)
    if md_path:
        with open(md_path, "w") as f:
            f.write(markdown(rows, meta))


def _token_count(shape: str) -> Optional[int]:
    for part in shape.split():
        if part.startswith("N="):
            return int(part[2:])
    return None


def plot(rows: List[Row], path: str) -> str:
    """Speedup over the best peer and peak memory (when measured) per candidate: against the token count
    N when the workloads differ in N (a sequence-length sweep), else one bar group per workload."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "plot skipped: matplotlib is not installed"
    timed = [r for r in rows if r.median_ms]
    if not timed:
        return "plot skipped: nothing was timed"
    cands = list(dict.fromkeys(r.candidate for r in timed))
    has_mem = any(r.peak_mb for r in timed)
    fig, axes = plt.subplots(1, 2 if has_mem else 1, figsize=(14 if has_mem else 8, 5))
    axes = list(axes) if has_mem else [axes]
    labels = list(dict.fromkeys(f"{r.workload}\n{r.shape}" for r in timed))
    counts = [_token_count(r.shape) for r in timed]
    # lines against N when N is what varies across the workloads (a long-sequence sweep), else bars
    by_n = all(counts) and len({_token_count(label) for label in labels}) == len(labels)
    width = 0.8 / len(cands)
    for i, cand in enumerate(cands):
        mine = [r for r in timed if r.candidate == cand]
        if by_n:
            mine.sort(key=lambda r: _token_count(r.shape))
            xs = [_token_count(r.shape) for r in mine]
            axes[0].plot(xs, [r.speedup_vs_best_peer or 0 for r in mine], marker="o", label=cand)
            if has_mem:
                axes[1].plot(xs, [r.peak_mb or 0 for r in mine], marker="o", label=cand)
        else:
            xs = [labels.index(f"{r.workload}\n{r.shape}") + i * width for r in mine]
            axes[0].bar(xs, [r.speedup_vs_best_peer or 0 for r in mine], width, label=cand)
            if has_mem:
                axes[1].bar(xs, [r.peak_mb or 0 for r in mine], width, label=cand)
    for ax, title in zip(axes, ["speedup over the best peer (higher is better)", "peak memory, MB"]):
        if by_n:
            ax.set_xscale("log", base=2)
            ax.set_xlabel("tokens N")
        else:
            ax.set_xticks([j + width * (len(cands) - 1) / 2 for j in range(len(labels))])
            ax.set_xticklabels(labels, fontsize=7)
        ax.set_title(title)
        ax.legend(fontsize=7)
    axes[0].axhline(1.0, color="gray", lw=0.8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return f"plot written to {path}"


class Progress:
    """A one-line progress bar on stderr for sweeps."""

    def __init__(self, total: int, enabled: bool = True):
        self.total, self.done, self.enabled = max(1, total), 0, enabled and sys.stderr.isatty()

    def step(self, label: str) -> None:
        self.done += 1
        if self.enabled:
            filled = math.floor(30 * self.done / self.total)
            sys.stderr.write(f"\r[{'#' * filled}{'.' * (30 - filled)}] {self.done}/{self.total} {label[:40]:<40}")
            sys.stderr.flush()
            if self.done == self.total:
                sys.stderr.write("\n")

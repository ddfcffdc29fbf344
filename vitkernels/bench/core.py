"""Benchmark machinery: timing (CUDA events on a GPU, wall clock on CPU) until the median is stable,
peak memory (the CUDA allocator's peak; on CPU, the torch profiler's allocation record), one row per
(workload, candidate), rows printed and saved as they land, machine records, tables and plots."""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import importlib.util
import itertools
import json
import os
import platform
import statistics
import sys
import time
import warnings
from typing import Callable, Dict, List, Optional

import torch

# a row whose IQR exceeds this fraction of its median is flagged noisy (and warned about)
NOISY_IQR_FRACTION = 0.10
# never more timed calls than this per candidate, whatever --min-time asks (fast calls on a GPU)
MAX_REPS = 2000


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
    q1_ms: Optional[float] = None
    q3_ms: Optional[float] = None
    reps: Optional[int] = None
    best_peer: Optional[str] = None  # the peer the speedup is taken against
    note: str = ""  # e.g. "noisy: IQR 23% of the median"


@dataclasses.dataclass
class Timing:
    median_ms: float
    q1_ms: float
    q3_ms: float
    reps: int

    @property
    def iqr_ms(self) -> float:
        return self.q3_ms - self.q1_ms


# ---------------------------------------------------------------------------------------------------- timing


def _quartiles(times: List[float]):
    """(q1, median, q3) with linear interpolation (statistics.quantiles needs two points)."""
    if len(times) == 1:
        return times[0], times[0], times[0]
    q1, _, q3 = statistics.quantiles(times, n=4, method="inclusive")
    return q1, statistics.median(times), q3


def time_callable(fn: Callable[[], object], device: torch.device, warmup: int, reps: int,
                  min_time: float = 0.0, max_reps: int = MAX_REPS) -> Timing:
    """Median and quartiles of ``fn``'s time in ms: ``warmup`` untimed calls, then at least ``reps`` timed
    calls and, beyond that, more until ``min_time`` seconds were timed (at most ``max_reps`` calls). GPU:
    CUDA events around each call, synchronized; CPU: wall clock."""
    for _ in range(warmup):
        fn()
    gpu = device.type == "cuda"
    if gpu:
        torch.cuda.synchronize(device)
    times: List[float] = []
    spent = 0.0
    while len(times) < max(1, reps) or (spent < min_time and len(times) < max_reps):
        if gpu:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            ms = start.elapsed_time(end)
        else:
            t0 = time.perf_counter()
            fn()
            ms = (time.perf_counter() - t0) * 1e3
        times.append(ms)
        spent += ms * 1e-3
    q1, med, q3 = _quartiles(sorted(times))
    return Timing(med, q1, q3, len(times))


@contextlib.contextmanager
def _quiet_stderr():
    """Silence the C++ profiler's start/stop log lines (written straight to fd 2)."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):
        yield
        return
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _cpu_peak_mb(fn: Callable[[], object]) -> Optional[float]:
    """Peak bytes the torch CPU allocator held during one call of ``fn``, above what it held when the call
    began, from the profiler's allocation events (each carries the running total). None when this
    torch's profiler does not expose them."""
    try:
        from torch._C._profiler import _EventType
        from torch.profiler import ProfilerActivity, profile
    except ImportError:
        return None
    with _quiet_stderr():
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
    try:
        events = prof.profiler.kineto_results.experimental_event_tree()
    except AttributeError:
        return None
    allocations = []
    stack = list(events)
    while stack:
        event = stack.pop()
        if event.tag == _EventType.Allocation and event.extra_fields.device.type == "cpu":
            fields = event.extra_fields
            allocations.append((event.start_time_ns, fields.alloc_size, fields.total_allocated))
        stack.extend(event.children)
    if not allocations:
        return 0.0
    allocations.sort()
    _, first_size, first_total = allocations[0]
    before = first_total - first_size
    return max(0, max(total for _, _, total in allocations) - before) / 2 ** 20


def peak_memory_mb(fn: Callable[[], object], device: torch.device) -> Optional[float]:
    """Peak memory one call of ``fn`` allocates above what was allocated before it, in MB."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2 ** 20
    if device.type == "cpu":
        return _cpu_peak_mb(fn)
    return None


def _clean(message: str) -> str:
    text = message.split(" (Triggered internally at")[0].strip()
    return text + " (no reason given)" if text.endswith(":") else text


def _error_status(exc: BaseException, caught: List[warnings.WarningMessage]) -> str:
    """``error: Type: first line`` plus what torch warned on the way (SDPA says why a backend refused)."""
    text = f"error: {type(exc).__name__}: {_clean(str(exc).splitlines()[0] if str(exc) else '')[:200]}"
    said = list(dict.fromkeys(_clean(str(w.message)) for w in caught))
    if said:
        text += " [torch warned: " + " | ".join(s[:200] for s in said[:3]) + "]"
    return text


def measure(op: str, workload: str, shape: str, candidates: List[Candidate], dtype: str, mode: str,
            flops: float, bytes_moved: float, device: torch.device, warmup: int, reps: int,
            images: Optional[int] = None, min_time: float = 0.0,
            on_row: Optional[Callable[[Row], None]] = None,
            on_start: Optional[Callable[[Candidate], None]] = None) -> List[Row]:
    """Time every candidate on one workload: the peers first, so that each vitkernels row, when it lands
    (``on_row``), already carries its final speedup over the fastest peer that ran. Peer rows get theirs
    when the workload is done."""
    order = [c for c in candidates if c.kind == "peer"] + [c for c in candidates if c.kind != "peer"]
    rows: List[Row] = []
    best: Optional[Row] = None

    for cand in order:
        if cand.kind != "peer" and best is None:  # the peers are done: fix every peer's speedup
            best = _best_peer(rows)
        row = Row(op, workload, shape, cand.name, cand.kind, dtype, mode)
        if cand.skip:
            row.status = f"skipped: {cand.skip}"
        else:
            if on_start is not None:
                on_start(cand)
            _run_one(cand, row, mode, device, warmup, reps, min_time, flops, bytes_moved, images)
        if best is not None and row.median_ms:
            row.speedup_vs_best_peer, row.best_peer = best.median_ms / row.median_ms, best.candidate
        rows.append(row)
        if on_row is not None:
            on_row(row)
    best = _best_peer(rows)
    if best is not None:
        for r in rows:
            if r.median_ms:
                r.speedup_vs_best_peer, r.best_peer = best.median_ms / r.median_ms, best.candidate
    return rows


def _best_peer(rows: List[Row]) -> Optional[Row]:
    timed = [r for r in rows if r.kind == "peer" and r.median_ms]
    return min(timed, key=lambda r: r.median_ms) if timed else None


def _run_one(cand: Candidate, row: Row, mode: str, device: torch.device, warmup: int, reps: int,
             min_time: float, flops: float, bytes_moved: float, images: Optional[int]) -> None:
    caught: List[warnings.WarningMessage] = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fn = cand.build()
            if mode == "fwd":  # inference: no autograd graph (parameters may require grad)
                inner = fn

                def fn():
                    with torch.no_grad():
                        return inner()
            fn()  # the first call raises what the candidate cannot do, with torch's warnings recorded
        timing = time_callable(fn, device, warmup, reps, min_time)
        row.median_ms, row.iqr_ms, row.q1_ms, row.q3_ms, row.reps = (
            timing.median_ms, timing.iqr_ms, timing.q1_ms, timing.q3_ms, timing.reps)
        row.peak_mb = peak_memory_mb(fn, device)
        if flops:
            row.tflops = flops / (timing.median_ms * 1e-3) / 1e12
            row.gbps = bytes_moved / (timing.median_ms * 1e-3) / 1e9
        if images:
            row.images_per_s = images / (timing.median_ms * 1e-3)
        if timing.median_ms > 0 and timing.iqr_ms > NOISY_IQR_FRACTION * timing.median_ms:
            row.note = f"noisy: IQR {100 * timing.iqr_ms / timing.median_ms:.0f}% of the median"
    except torch.cuda.OutOfMemoryError:
        row.status = "oom"
    except KeyboardInterrupt:
        raise
    except Exception as exc:  # a candidate that fails here is reported, not fatal
        row.status = _error_status(exc, caught)
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------------- text


def _fmt(value, spec):
    digits = "".join(itertools.takewhile(str.isdigit, spec))
    width = int(digits or 0)
    return "-".rjust(width) if value is None else format(value, spec)


HEADER = (f"{'candidate':<34} {'kind':<10} {'median ms':>10} {'IQR ms':>8} {'reps':>5} {'TFLOP/s':>8} {'GB/s':>8} "
          f"{'peak MB':>8} {'img/s':>8} {'vs best peer':>12}  status")


def workload_title(r: Row) -> str:
    return f"{r.op} | {r.workload} | {r.shape} | {r.dtype} | {r.mode}"


def format_row(r: Row) -> str:
    speedup = _fmt(r.speedup_vs_best_peer, "11.2f") + ("x" if r.speedup_vs_best_peer else " ")
    status = r.status + (f" ({r.note})" if r.note else "")
    return (f"{r.candidate:<34} {r.kind:<10} {_fmt(r.median_ms, '10.3f')} {_fmt(r.iqr_ms, '8.3f')} "
            f"{_fmt(r.reps, '5d')} {_fmt(r.tflops, '8.3f')} {_fmt(r.gbps, '8.1f')} {_fmt(r.peak_mb, '8.1f')} "
            f"{_fmt(r.images_per_s, '8.1f')} {speedup}  {status}")


def table(rows: List[Row]) -> str:
    """A plain-text table, one block per workload."""
    lines = []
    current = None
    for r in rows:
        if workload_title(r) != current:
            current = workload_title(r)
            lines += ["", current, HEADER]
        lines.append(format_row(r))
    return "\n".join(lines)


def summary(rows: List[Row]) -> str:
    """One line per workload: the fastest vitkernels row against the fastest peer."""
    lines = [f"{'workload':<34} {'fastest vitkernels':<46} {'fastest peer':<46} {'speedup':>8}"]
    for title in dict.fromkeys(workload_title(r) for r in rows):
        mine = [r for r in rows if workload_title(r) == title]
        ours = min((r for r in mine if r.kind != "peer" and r.median_ms), key=lambda r: r.median_ms, default=None)
        peer = _best_peer(mine)
        name = f"{mine[0].workload} ({mine[0].mode})"
        left = f"{ours.candidate} {ours.median_ms:.3f} ms" if ours else "none ran"
        right = f"{peer.candidate} {peer.median_ms:.3f} ms" if peer else "none ran"
        ratio = f"{peer.median_ms / ours.median_ms:7.2f}x" if ours and peer else "       -"
        lines.append(f"{name[:34]:<34} {left[:46]:<46} {right[:46]:<46} {ratio}")
    return "\n".join(lines)


def markdown(rows: List[Row], meta: Dict) -> str:
    host = meta.get("host", {})
    out = [f"# vitkernels benchmark: {meta['device']} ({meta['date']})", "",
           f"torch {meta['torch']}, triton {meta['triton']}, python {meta['python']}; command: `{meta['command']}`",
           "", f"host: {host.get('cpu_model', '?')}, {host.get('torch_threads', '?')} torch threads, "
           f"load {host.get('loadavg_start', '?')} at start; timing: {meta.get('timing', {})}; "
           f"compiled peers: {'on' if meta.get('compiled_peers') else 'off'}", "",
           "| op | workload | shape | dtype | mode | candidate | median ms | IQR ms | reps | TFLOP/s | peak MB "
           "| vs best peer | status |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        status = r.status + (f" ({r.note})" if r.note else "")
        out.append(f"| {r.op} | {r.workload} | {r.shape} | {r.dtype} | {r.mode} | {r.candidate} | "
                   f"{_fmt(r.median_ms, '.3f')} | {_fmt(r.iqr_ms, '.3f')} | {_fmt(r.reps, 'd')} | "
                   f"{_fmt(r.tflops, '.2f')} | {_fmt(r.peak_mb, '.1f')} | "
                   f"{_fmt(r.speedup_vs_best_peer, '.2f')} | {status.replace('|', '/')} |")
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------------------------------------------- records


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _loadavg() -> Optional[List[float]]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def host_info() -> Dict:
    """What CPU timings depend on: the CPU, the threads torch uses, the cores this process may use, the load."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    return {"cpu_model": _cpu_model(), "cpu_count": os.cpu_count(), "usable_cores": usable,
            "torch_threads": torch.get_num_threads(), "torch_interop_threads": torch.get_num_interop_threads(),
            "loadavg_start": _loadavg()}


def metadata(device: torch.device, argv: List[str], settings: Optional[Dict] = None) -> Dict:
    try:
        import triton
        triton_version = triton.__version__
    except Exception:
        triton_version = "not installed"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_model()
    meta = {"device": f"{device.type}: {name}", "date": datetime.date.today().isoformat(),
            "started": datetime.datetime.now().isoformat(timespec="seconds"),
            "torch": torch.__version__, "triton": triton_version, "python": platform.python_version(),
            "command": "python -m vitkernels.bench " + " ".join(argv), "host": host_info()}
    if device.type == "cuda":
        meta["cuda"] = torch.version.cuda
    meta.update(settings or {})
    return meta


def _write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)  # a reader (or a stop mid-write) never sees half a file


def save(rows: List[Row], meta: Dict, json_path: Optional[str], md_path: Optional[str]) -> None:
    if json_path:
        _write_atomic(json_path, json.dumps({"meta": meta, "rows": [dataclasses.asdict(r) for r in rows]}, indent=1))
    if md_path:
        _write_atomic(md_path, markdown(rows, meta))


# ---------------------------------------------------------------------------------------------------- plots


def _token_count(shape: str) -> Optional[int]:
    for part in shape.split():
        if part.startswith("N="):
            return int(part[2:])
    return None


def figure(rows: List[Row], meta: Optional[Dict] = None):
    """The plot as a matplotlib Figure: speedup over the fastest peer with its IQR (left) and peak memory
    (right, when measured) per candidate; against the token count N when the workloads differ only in N
    (a sequence-length sweep), else one bar group per workload. None when nothing was timed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timed = [r for r in rows if r.median_ms]
    if not timed:
        return None
    meta = meta or {}
    cands = list(dict.fromkeys(r.candidate for r in timed))
    workloads = list(dict.fromkeys(r.workload for r in timed))
    has_mem = any(r.peak_mb is not None for r in timed)
    counts = {r.workload: _token_count(r.shape) for r in timed}
    by_n = all(counts.values()) and len(set(counts.values())) == len(workloads) and len(workloads) > 2
    panels = 2 if has_mem else 1  # stacked, so that many workloads still get a wide x axis
    fig, axes = plt.subplots(panels, 1, figsize=(max(8.0, 0.9 * len(workloads) + 4), 4.8 * panels), squeeze=False)
    axes = list(axes[:, 0])
    # speedup over the fastest peer when a peer ran, else the time itself
    speedups = any(r.speedup_vs_best_peer for r in timed)
    width = 0.8 / len(cands)
    for i, cand in enumerate(cands):
        mine = [r for r in timed if r.candidate == cand]
        if speedups:  # the time's IQR as a range of speedups (the slower quartile is the smaller speedup)
            ys = [r.speedup_vs_best_peer or 0.0 for r in mine]
            lo = [y - y * r.median_ms / (r.q3_ms or r.median_ms) for y, r in zip(ys, mine)]
            hi = [y * r.median_ms / (r.q1_ms or r.median_ms) - y for y, r in zip(ys, mine)]
        else:
            ys = [r.median_ms for r in mine]
            lo = [r.median_ms - (r.q1_ms or r.median_ms) for r in mine]
            hi = [(r.q3_ms or r.median_ms) - r.median_ms for r in mine]
        if by_n:
            xs = [counts[r.workload] for r in mine]
            axes[0].errorbar(xs, ys, yerr=[lo, hi], marker="o", capsize=3, label=cand)
            if has_mem:
                axes[1].plot(xs, [r.peak_mb or 0 for r in mine], marker="o", label=cand)
        else:
            xs = [workloads.index(r.workload) + i * width for r in mine]
            axes[0].bar(xs, ys, width, yerr=[lo, hi], capsize=2, label=cand)
            if has_mem:
                axes[1].bar(xs, [r.peak_mb or 0 for r in mine], width, label=cand)
    where = meta.get("device", "")
    first = timed[0]
    context = f"{first.op}, {first.dtype}, {first.mode}" + (f", {where}" if where else "")
    mem_label = "peak memory, MB (CUDA allocator)" if where.startswith("cuda") else "peak memory, MB (torch CPU allocator)"
    titles = [("speedup over the fastest peer", "speedup (x, higher is better; whiskers: IQR)") if speedups
              else ("time per call (no peer ran)", "median ms (lower is better; whiskers: IQR)"),
              ("peak memory per call", mem_label)]
    for ax, (title, ylabel) in zip(axes, titles):
        if by_n:
            ax.set_xscale("log", base=2)
            ax.set_xlabel("tokens N")
        else:
            ax.set_xticks([j + width * (len(cands) - 1) / 2 for j in range(len(workloads))])
            ax.set_xticklabels(workloads, rotation=30, ha="right", fontsize=8)
            ax.set_xlabel("workload")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{title}\n{context}", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    if speedups:
        axes[0].axhline(1.0, color="gray", lw=0.8, ls="--")
    mems = [r.peak_mb for r in timed if r.peak_mb]
    if has_mem and mems and max(mems) > 50 * min(mems):
        axes[1].set_yscale("log")  # the scores-materialising peers dwarf the rest
    axes[0].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    return fig


def plot(rows: List[Row], path: str, meta: Optional[Dict] = None) -> str:
    if importlib.util.find_spec("matplotlib") is None:
        return "plot skipped: matplotlib is not installed"
    fig = figure(rows, meta)
    if fig is None:
        return "plot skipped: nothing was timed"
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=120)
    plt.close(fig)
    return f"plot written to {path}"


# ---------------------------------------------------------------------------------------------------- progress


class Progress:
    """Where a run is, on stderr: a line rewritten in place on a terminal, one line per step otherwise
    (logs and CI show it too), with the elapsed time."""

    def __init__(self, total: int, stream=None, enabled: bool = True):
        self.total, self.done, self.enabled = max(1, total), 0, enabled
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.t0 = time.monotonic()
        self.label = ""

    def _say(self, text: str) -> None:
        if not self.enabled:
            return
        elapsed = time.monotonic() - self.t0
        line = f"[{self.done}/{self.total} workloads, {elapsed:5.0f} s] {text}"
        if self.tty:
            self.stream.write("\r" + line[:110].ljust(110))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def workload(self, label: str) -> None:
        self.label = label
        self._say(f"{label}: starting")

    def candidate(self, name: str) -> None:
        self._say(f"{self.label}: timing {name}")

    def step(self, label: str = "") -> None:
        self.done += 1
        self._say(f"{label or self.label}: done")
        if self.tty and self.enabled and self.done == self.total:
            self.stream.write("\n")

    def clear(self) -> None:
        """Before printing a row on a terminal: end the in-place line."""
        if self.enabled and self.tty:
            self.stream.write("\r" + " " * 110 + "\r")
            self.stream.flush()

"""``make gpu-check``: GPU validation in one command, on any CUDA machine, with the Python that holds torch
(no venv, no downloads).

1. Build ``vitkernels._C`` for this GPU's architecture only, with every core, in the background while the
   tests compile Triton kernels (without nvcc, or when the build fails, it carries on and says so).
2. The ``gpu`` and ``triton`` tests with compiled Triton (``TRITON_INTERPRET=0``): all three ops, forward
   and every gradient, fp16 / bf16 / fp32, full ViT and Swin sizes (pytest-xdist workers when installed);
   then the tests that need the extension. They launch each kernel's first heuristic candidate
   (``VITKERNELS_AUTOTUNE=off`` unless set): ``test_tuning.py``'s gpu tests check every candidate and tune.
3. The benchmark subset against the peers, each at its best (SDPA with each backend, FlexAttention and
   timm compiled, eager conv): attention ViT-B N=197 D=64 fwd and fwd+bwd with and without a learnable
   bias, N=4096, Swin-T stage-1 window attention fwd+bwd, ViT-B/16 patch embedding, ViT-B/16 and Swin-T
   train steps. Each case prints as it lands.
4. ``benchmarks/results/<date>-<gpu>.{json,md}``, this GPU's tuned configs merged into the repo's table
   (``vitkernels/ops/tuned_configs.json``), and a short table printed last.

``--quick``: the ``gpu`` tests only (not the small-shape ``triton`` matrix, not ``slow``), no compiled peers,
no model train steps. ``--dry-run``: print the plan (commands, the tests each step selects, the benchmark
cases and their candidates) and run nothing; it works without a GPU, and the test suite runs it.
``--merge-tuned FILE``: merge the tuned configs of a results JSON (from a GPU run elsewhere) into the table.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from typing import Any, Dict, List, Optional, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_DIR = os.path.join("benchmarks", "results")


class Clock:
    def __init__(self):
        self.start = time.monotonic()

    def stamp(self) -> str:
        s = int(time.monotonic() - self.start)
        return f"{s // 60}:{s % 60:02d}"

    def say(self, message: str) -> None:
        print(f"[gpu-check {self.stamp()}] {message}", flush=True)


# ---------------------------------------------------------------------------------------------------- plan


@dataclasses.dataclass
class TestStep:
    name: str
    marker: str
    needs_ext: bool


def test_steps(quick: bool) -> List[TestStep]:
    if quick:
        main = TestStep("gpu tests (compiled Triton)", "gpu and not slow and not ext", False)
    else:
        main = TestStep("gpu + triton tests (compiled Triton)", "(gpu or triton) and not ext", False)
    return [main, TestStep("tests that need vitkernels._C", "gpu and ext", True)]


@dataclasses.dataclass
class BenchCase:
    op: str  # attention | window | patch | model
    label: str
    params: Dict[str, Any]
    mode: str  # fwd | fwd+bwd
    bias: bool = False
    quick: bool = True  # part of --quick

    @property
    def shape(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.params.items() if k != "name")


VIT_B = dict(B=64, H=12, N=197, D=64)
LONG = dict(B=4, H=12, N=4096, D=64)
SAM_B_GLOBAL = dict(B=4, H=12, N=4096, D=64, grid=(64, 64))  # SAM ViT-B's global block, decomposed rel-pos
EVA_B_ROPE = dict(B=64, H=12, N=257, D=64, rope_grid=(16, 16))  # EVA-02-B/14's attention with 2-D RoPE
SWIN_T_S1 = dict(B=64, spatial=(56, 56), C=96, heads=3, window=7, shift=3)
SWINV2_T_S1 = dict(B=64, spatial=(64, 64), C=96, heads=3, window=8, shift=4, cosine=True)  # swinv2_tiny_window8
VIT_B_PATCH = dict(B=128, chw=(3, 224, 224), patch=(16, 16), E=768, P=1)


def bench_cases(quick: bool) -> List[BenchCase]:
    cases = [
        BenchCase("attention", "attention ViT-B N=197 D=64", VIT_B, "fwd", quick=True),
        BenchCase("attention", "attention ViT-B N=197 D=64", VIT_B, "fwd+bwd", quick=False),
        BenchCase("attention", "attention ViT-B N=197 D=64 +bias", VIT_B, "fwd", bias=True, quick=False),
        BenchCase("attention", "attention ViT-B N=197 D=64 +bias", VIT_B, "fwd+bwd", bias=True, quick=True),
        BenchCase("attention", "attention N=4096 D=64", LONG, "fwd", quick=False),
        BenchCase("attention", "attention N=4096 D=64", LONG, "fwd+bwd", quick=True),
        BenchCase("attention", "attention SAM ViT-B global rel-pos", SAM_B_GLOBAL, "fwd", quick=False),
        BenchCase("attention", "attention SAM ViT-B global rel-pos", SAM_B_GLOBAL, "fwd+bwd", quick=True),
        BenchCase("attention", "attention EVA-02-B rope", EVA_B_ROPE, "fwd", quick=False),
        BenchCase("attention", "attention EVA-02-B rope", EVA_B_ROPE, "fwd+bwd", quick=True),
        BenchCase("window", "window Swin-T stage 1", SWIN_T_S1, "fwd", quick=False),
        BenchCase("window", "window Swin-T stage 1", SWIN_T_S1, "fwd+bwd", quick=True),
        BenchCase("window", "window Swin V2-T stage 1 cosine", SWINV2_T_S1, "fwd", quick=False),
        BenchCase("window", "window Swin V2-T stage 1 cosine", SWINV2_T_S1, "fwd+bwd", quick=True),
        BenchCase("patch", "patch embed ViT-B/16", VIT_B_PATCH, "fwd", quick=True),
        BenchCase("patch", "patch embed ViT-B/16", VIT_B_PATCH, "fwd+bwd", quick=False),
        BenchCase("model", "train step vit_base_patch16_224", dict(B=64, name="vit_base_patch16_224"), "fwd+bwd",
                  quick=False),
        BenchCase("model", "train step swin_tiny_patch4_window7_224",
                  dict(B=64, name="swin_tiny_patch4_window7_224"), "fwd+bwd", quick=False),
    ]
    return [c for c in cases if c.quick or not quick]


def _candidates(case: BenchCase, dtype, device):
    from vitkernels.bench import workloads

    _, candidates_fn, cost_fn = workloads.OPS[case.op]
    if case.op == "attention":
        return (candidates_fn(case.params, dtype, case.mode, device, None, case.bias),
                cost_fn(case.params, case.mode, dtype, case.bias))
    return candidates_fn(case.params, dtype, case.mode, device, None), cost_fn(case.params, case.mode, dtype)


def pytest_command(python: str, marker: str, extra: Sequence[str] = (), parallel: bool = True) -> List[str]:
    from tools.testplan import xdist_args

    return [python, "-m", "pytest", "-q", "-rfEs", "-m", marker, *(xdist_args() if parallel else []), "tests",
            *extra]


def build_command(python: str, build_lib: str = "<temporary folder>/lib") -> List[str]:
    # built beside the tree, moved into vitkernels/ once the first test step is over: pytest workers that
    # import vitkernels meanwhile never see a half-written (or replaced) shared object
    return [python, "setup.py", "build_ext", "--build-lib", build_lib]


def build_env(capability, jobs: int) -> Dict[str, str]:
    env = {"TORCH_CUDA_ARCH_LIST": f"{capability[0]}.{capability[1]}", "MAX_JOBS": str(jobs)}
    cuda_home = os.environ.get("CUDA_HOME")
    if not cuda_home and os.path.exists("/usr/local/cuda/bin/nvcc"):
        cuda_home = "/usr/local/cuda"
    if not cuda_home:
        try:
            from torch.utils.cpp_extension import CUDA_HOME

            cuda_home = CUDA_HOME
        except Exception:
            cuda_home = None
    if cuda_home:
        env["CUDA_HOME"] = cuda_home
    return env


# ---------------------------------------------------------------------------------------------------- steps


def has_nvcc(env: Dict[str, str]) -> bool:
    """setup.py builds the CUDA kernels only when $CUDA_HOME/bin/nvcc exists: the same test."""
    return bool(env.get("CUDA_HOME")) and os.path.exists(os.path.join(env["CUDA_HOME"], "bin", "nvcc"))


def start_build(python: str, capability, out_dir: str, clock: Clock):
    env = build_env(capability, os.cpu_count() or 1)
    log_path = os.path.join(out_dir, "build.log")
    # outside --out: a lent machine brings back only a few files from it, two folders deep at most
    build_lib = os.path.join(tempfile.mkdtemp(prefix="vitkernels-build-"), "lib")
    cmd = build_command(python, build_lib)
    clock.say(f"building vitkernels._C in the background: {' '.join(f'{k}={v}' for k, v in env.items())} "
              f"{shlex.join(cmd)} (log: {log_path})")
    if not has_nvcc(env):
        clock.say("no nvcc found (CUDA_HOME unset or without bin/nvcc): the extension gets its C++ CPU kernels only")
    log = open(log_path, "w")
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT)
    return proc, log, log_path, time.monotonic(), env, build_lib


def install_built(build_lib: str, dest: str = os.path.join(ROOT, "vitkernels")) -> List[str]:
    """Move the built vitkernels/_C*.so into the tree (os.replace: a new file, never one rewritten in place)."""
    moved = []
    src_dir = os.path.join(build_lib, "vitkernels")
    for name in sorted(os.listdir(src_dir)) if os.path.isdir(src_dir) else []:
        if name.startswith("_C") and name.endswith(".so"):
            os.replace(os.path.join(src_dir, name), os.path.join(dest, name))
            moved.append(name)
    return moved


def extension_has_cuda(python: str) -> Optional[bool]:
    """Whether the vitkernels._C now in the tree imports and holds CUDA kernels (None: it does not import)."""
    probe = subprocess.run([python, "-c", "import vitkernels._C as c; print(int(bool(getattr(c, 'WITH_CUDA', 0))))"],
                           cwd=ROOT, capture_output=True, text=True)
    if probe.returncode != 0:
        return None
    return probe.stdout.strip().endswith("1")


def finish_build(build, python: str, clock: Clock) -> Dict[str, Any]:
    proc, log, log_path, started, env, build_lib = build
    rc = proc.wait()
    log.close()
    seconds = time.monotonic() - started
    result = {"ok": rc == 0, "seconds": round(seconds, 1), "arch": env["TORCH_CUDA_ARCH_LIST"], "cuda_kernels": False}
    if rc == 0:
        moved = install_built(build_lib)
        cuda = extension_has_cuda(python)
        result.update(ok=bool(moved) and cuda is not None, cuda_kernels=bool(cuda), files=moved)
        if not result["ok"]:
            result["error"] = "the build produced no importable vitkernels/_C*.so"
            clock.say(f"vitkernels._C: {result['error']} (see {log_path}); carrying on without it")
        else:
            clock.say(f"vitkernels._C built in {seconds:.0f} s (sm_{env['TORCH_CUDA_ARCH_LIST'].replace('.', '')}; "
                      f"{'with' if cuda else 'WITHOUT'} CUDA kernels)")
    else:
        with open(log_path) as f:
            tail = f.read()[-3000:]
        result["error"] = tail.strip().splitlines()[-1] if tail.strip() else f"exit code {rc}"
        clock.say(f"building vitkernels._C FAILED (exit {rc}); carrying on without it: the cpu/cuda backends "
                  f"are reported unavailable, their tests skip. Last lines of {log_path}:\n{tail}")
    return result


def run_tests(python: str, step: TestStep, out_dir: str, index: int, clock: Clock, extra: Sequence[str],
              env_extra: Dict[str, str], parallel: bool, budget: Optional[float] = None) -> Dict[str, Any]:
    xml_path = os.path.join(out_dir, f"tests-{index}.xml")
    cmd = pytest_command(python, step.marker, [f"--junitxml={xml_path}", *extra], parallel)
    # correctness tests launch the heuristic's first candidate (VITKERNELS_AUTOTUNE=off): timing 4 candidates
    # per key would compile 4x the kernels; test_tuning.py checks every candidate and tunes for real
    env = {"VITKERNELS_AUTOTUNE": "off", **os.environ, "TRITON_INTERPRET": "0", **env_extra}
    clock.say(f"tests, step {index}: {step.name}: {shlex.join(cmd)}")
    started = time.monotonic()
    with open(os.path.join(out_dir, "tests.log"), "ab" if index > 1 else "wb") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        timers = []
        if budget is not None:
            # SIGINT first: pytest stops, reports what ran and still writes its junit XML; kill if it hangs
            timers = [threading.Timer(max(budget, 1.0), _interrupt, (proc, clock, step.name, budget)),
                      threading.Timer(max(budget, 1.0) + 45.0, proc.kill)]
            for t in timers:
                t.daemon = True
                t.start()
        while True:  # stream as it comes (pytest's progress dots have no newline)
            chunk = os.read(proc.stdout.fileno(), 4096)
            if not chunk:
                break
            sys.stdout.buffer.write(chunk)
            sys.stdout.flush()
            log.write(chunk)
        rc = proc.wait()
        for t in timers:
            t.cancel()
    summary = junit_summary(xml_path)
    summary.update(step=step.name, marker=step.marker, rc=rc, seconds=round(time.monotonic() - started, 1),
                   interrupted=bool(timers) and timers[0].finished.is_set() and rc != 0)
    if summary["interrupted"]:
        summary["failures"].append({"test": "(deadline)", "message": f"interrupted after {budget:.0f} s: the tests "
                                    "not reported here did not run"})
    clock.say(f"tests, step {index}: {summary['passed']} passed, {summary['failed']} failed, "
              f"{summary['skipped']} skipped in {summary['seconds']:.0f} s (exit {rc})")
    return summary


def _interrupt(proc, clock: Clock, name: str, budget: float) -> None:
    if proc.poll() is None:
        clock.say(f"{name}: over its {budget:.0f} s budget (--deadline): interrupting pytest")
        proc.send_signal(signal.SIGINT)


def junit_summary(path: str) -> Dict[str, Any]:
    """Counts and failures of a pytest junit XML (an absent file counts nothing: pytest did not get far)."""
    out = {"passed": 0, "failed": 0, "skipped": 0, "failures": [], "skips": {}}
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        out["failures"].append({"test": "(pytest)", "message": f"no junit XML at {path}"})
        out["failed"] = 1
        return out
    for case in root.iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        bad = case.find("failure") if case.find("failure") is not None else case.find("error")
        skip = case.find("skipped")
        if bad is not None:
            out["failed"] += 1
            out["failures"].append({"test": name, "message": (bad.get("message") or "")[:500]})
        elif skip is not None:
            out["skipped"] += 1
            reason = (skip.get("message") or "")[:200]
            out["skips"][reason] = out["skips"].get(reason, 0) + 1
        else:
            out["passed"] += 1
    return out


def run_bench(cases: List[BenchCase], device, clock: Clock, quick: bool, reps: int, warmup: int,
              stop_at: Optional[float] = None, on_case=None):
    import torch

    from vitkernels.bench import core, workloads

    workloads.COMPILE_PEERS["enabled"] = not quick
    workloads.COMPILE_PEERS["why"] = "compiled peers are off in gpu-check --quick"
    dtype = torch.bfloat16
    rows = []
    for i, case in enumerate(cases, 1):
        if stop_at is not None and time.monotonic() > stop_at:
            clock.say(f"bench {i}/{len(cases)}: {case.label} {case.mode}: not run (--deadline reached)")
            rows.append(core.Row(case.op, case.label, case.shape, "(not run)", "vitkernels", "bf16", case.mode,
                                 status="not run: --deadline reached"))
            continue
        clock.say(f"bench {i}/{len(cases)}: {case.label} {case.mode} (bf16; {case.shape})")
        try:
            cands, (flops, io) = _candidates(case, dtype, device)
            got = core.measure(case.op, case.label, case.shape, cands, "bf16", case.mode, flops, io, device, warmup,
                               reps, images=case.params["B"] if case.op == "model" else None)
        except Exception as exc:  # one broken case must not lose the others
            clock.say(f"bench {i}: FAILED to set up ({type(exc).__name__}: {exc})")
            got = [core.Row(case.op, case.label, case.shape, "(setup)", "vitkernels", "bf16", case.mode,
                            status=f"error: {type(exc).__name__}: {str(exc)[:160]}")]
        for row in got:
            row.workload = case.label  # the label names the case (bias included)
        print(core.table(got), flush=True)
        rows += got
        if on_case is not None:
            on_case(rows)
    return rows


# ---------------------------------------------------------------------------------------------------- results


def environment(device) -> Dict[str, Any]:
    import platform

    import torch

    try:
        import triton

        triton_version = triton.__version__
    except Exception as exc:
        triton_version = f"not importable ({type(exc).__name__})"
    info = {"date": datetime.date.today().isoformat(), "torch": torch.__version__, "triton": triton_version,
            "python": platform.python_version(), "cpus": os.cpu_count(), "command": "make gpu-check " +
            " ".join(sys.argv[1:])}
    if device is not None:
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, capability=f"{props.major}.{props.minor}", sm_count=props.multi_processor_count,
                    memory_gb=round(props.total_memory / 2 ** 30, 1), cuda=torch.version.cuda)
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20)
            info["driver"] = smi.stdout.strip().splitlines()[0] if smi.returncode == 0 and smi.stdout.strip() else None
        except (OSError, subprocess.SubprocessError):
            info["driver"] = None
    return info


def best_rows(rows) -> List[Dict[str, Any]]:
    """Per (case, mode): the fastest vitkernels row and the fastest peer that ran."""
    out = []
    keys = list(dict.fromkeys((r.workload, r.mode) for r in rows))
    for label, mode in keys:
        mine = [r for r in rows if (r.workload, r.mode) == (label, mode)]
        vk = min((r for r in mine if r.kind == "vitkernels" and r.median_ms), key=lambda r: r.median_ms, default=None)
        peer = min((r for r in mine if r.kind == "peer" and r.median_ms), key=lambda r: r.median_ms, default=None)
        # what dispatch picks on a GPU by default, shown beside the fastest backend (they can differ)
        triton = next((r for r in mine if r.candidate == "vitkernels:triton" and r.median_ms), None)
        out.append({"case": label, "mode": mode,
                    "vitkernels": vk.candidate if vk else None, "vitkernels_ms": vk.median_ms if vk else None,
                    "best_peer": peer.candidate if peer else None, "peer_ms": peer.median_ms if peer else None,
                    "speedup": (peer.median_ms / vk.median_ms) if (vk and peer) else None,
                    "triton_ms": triton.median_ms if triton else None,
                    "triton_speedup": (peer.median_ms / triton.median_ms) if (triton and peer) else None,
                    "vitkernels_status": None if vk else "; ".join(sorted({r.status for r in mine
                                                                           if r.kind == "vitkernels"}))})
    return out


def short_table(best: List[Dict[str, Any]]) -> str:
    lines = [f"{'case':<42} {'mode':<8} {'vitkernels ms':>13}  {'best peer':<26} {'peer ms':>9} {'vs peer':>8}"]
    for b in best:
        vk = f"{b['vitkernels_ms']:.3f}" if b["vitkernels_ms"] else "-"
        pm = f"{b['peer_ms']:.3f}" if b["peer_ms"] else "-"
        sp = f"{b['speedup']:.2f}x" if b["speedup"] else "-"
        lines.append(f"{b['case'][:42]:<42} {b['mode']:<8} {vk:>13}  {(b['best_peer'] or '-')[:26]:<26} {pm:>9} {sp:>8}"
                     + (f"  ({b['vitkernels_status'][:60]})" if b["vitkernels_status"] else ""))
    return "\n".join(lines)


def markdown(result: Dict[str, Any]) -> str:
    env = result["environment"]
    out = [f"# vitkernels gpu-check: {env.get('gpu', '?')} ({env['date']})", "",
           f"torch {env['torch']}, triton {env['triton']}, CUDA {env.get('cuda')}, driver {env.get('driver')}, "
           f"python {env['python']}, {env['cpus']} CPUs; command: `{env['command']}`; "
           f"{result['seconds']:.0f} s in all.", ""]
    if not result.get("complete", True):
        out += ["**Incomplete: the run stopped before its end (written after each step and case); what is below "
                "is what it measured until then.**", ""]
    out += ["## Tests (compiled Triton)", ""]
    for t in result["tests"]:
        out.append(f"- {t['step']} (`-m \"{t['marker']}\"`): {t['passed']} passed, {t['failed']} failed, "
                   f"{t['skipped']} skipped, {t['seconds']:.0f} s")
        for f in t["failures"]:
            out.append(f"  - FAILED `{f['test']}`: {f['message'][:200]}")
        for reason, n in t["skips"].items():
            out.append(f"  - skipped x{n}: {reason}")
    build = result.get("build") or {}
    out += ["", f"Extension: {'built' if build.get('ok') else 'not built'} "
                f"({build.get('arch', '-')}; {build.get('seconds', '-')} s){'; ' + build['error'] if build.get('error') else ''}",
            "", "## Benchmarks (bf16; median of CUDA-event timings)", "",
            "| case | mode | fastest vitkernels | ms | best peer | ms | vs best peer | triton vs best peer |",
            "|---|---|---|---|---|---|---|---|"]
    for b in result["summary"]:
        out.append(f"| {b['case']} | {b['mode']} | {b['vitkernels'] or '-'} | "
                   f"{'%.3f' % b['vitkernels_ms'] if b['vitkernels_ms'] else '-'} | {b['best_peer'] or '-'} | "
                   f"{'%.3f' % b['peer_ms'] if b['peer_ms'] else '-'} | "
                   f"{'%.2fx' % b['speedup'] if b['speedup'] else (b['vitkernels_status'] or '-')} | "
                   f"{'%.2fx' % b['triton_speedup'] if b.get('triton_speedup') else '-'} |")
    out += ["", "## Every row", "", "| case | mode | candidate | median ms | IQR ms | TFLOP/s | peak MB | img/s | status |",
            "|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        fmt = lambda v, spec: format(v, spec) if v is not None else "-"  # noqa: E731
        out.append(f"| {r['workload']} | {r['mode']} | {r['candidate']} | {fmt(r['median_ms'], '.3f')} | "
                   f"{fmt(r['iqr_ms'], '.3f')} | {fmt(r['tflops'], '.1f')} | {fmt(r['peak_mb'], '.0f')} | "
                   f"{fmt(r['images_per_s'], '.0f')} | {r['status']} |")
    return "\n".join(out) + "\n"


def write_results(result: Dict[str, Any], stem: str, out_dir: str, record: bool = True) -> List[str]:
    """``<stem>.json`` and ``.md``, the tuned configs merged into the repo table (``record``), and copies of
    the three in ``out_dir``. Returns the paths written."""
    os.makedirs(os.path.dirname(stem), exist_ok=True)
    with open(stem + ".json", "w") as f:
        json.dump(result, f, indent=1)
    with open(stem + ".md", "w") as f:
        f.write(markdown(result))
    paths = [stem + ".json", stem + ".md"]
    if record and result.get("tuned"):
        from vitkernels.ops import tuning

        record_tuned(result)
        paths.append(tuning.TABLE_PATH)
    for path in paths:
        if os.path.dirname(os.path.abspath(path)) != os.path.abspath(out_dir):
            shutil.copy(path, out_dir)
    return paths


def record_tuned(result: Dict[str, Any], table_path: Optional[str] = None) -> int:
    from vitkernels.ops import tuning

    env = result["environment"]
    info = {slug: {"name": env.get("gpu"), "torch": env["torch"], "triton": env["triton"], "date": env["date"]}
            for slug in result.get("tuned", {})}
    return tuning.merge_into_table(result.get("tuned", {}), info, table_path or tuning.TABLE_PATH)


# ---------------------------------------------------------------------------------------------------- main


def parse(argv):
    parser = argparse.ArgumentParser(prog="python -m tools.gpu_check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer tests and benchmark cases, no compiled peers")
    parser.add_argument("--dry-run", action="store_true", help="print the plan, run nothing (no GPU needed)")
    parser.add_argument("--out", default=os.path.join("build", "gpu-check"),
                        help="logs, junit XML and copies of the results go here (default: %(default)s)")
    parser.add_argument("--results-dir", default=RESULTS_DIR, help="where <date>-<gpu>.{json,md} go (default: %(default)s)")
    parser.add_argument("--no-build", action="store_true", help="use vitkernels._C as it is")
    parser.add_argument("--no-tests", action="store_true")
    parser.add_argument("--no-bench", action="store_true")
    parser.add_argument("--no-record", action="store_true", help="do not merge the tuned configs into the repo table")
    parser.add_argument("--serial", action="store_true", help="no pytest-xdist workers")
    parser.add_argument("--reps", type=int, default=50, help="timed repetitions per candidate (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=10, help="warm-up calls per candidate (default: %(default)s)")
    parser.add_argument("--ops", default="attention,window,patch,model",
                        help="benchmark cases of these ops only, comma-separated (default: %(default)s)")
    parser.add_argument("--deadline", type=float, default=None, metavar="SECONDS",
                        help="finish within about this many seconds (a lent machine's command limit): the first test "
                             "step is interrupted at 45%% of it, the second at 55%%, benchmark cases that have not "
                             "begun by 85%% are listed as not run; the results are written either way")
    parser.add_argument("--merge-tuned", metavar="RESULTS_JSON", default=None,
                        help="merge the tuned configs of a gpu-check results JSON into the repo table, then stop")
    parser.add_argument("pytest_args", nargs="*", help="extra pytest arguments (after --)")
    return parser.parse_args(argv)


def dry_run(args, python: str) -> int:
    """Print every command and what it selects; fail when a step selects no test or a case cannot list
    its candidates (so CI notices when the plan rots)."""
    import torch

    print("gpu-check plan (dry run: nothing is built, run or timed)")
    cuda = torch.cuda.is_available()
    print(f"  python {python}: torch {torch.__version__}; CUDA device: "
          f"{torch.cuda.get_device_name() if cuda else 'none visible (a real run stops here)'}")
    cap = torch.cuda.get_device_capability() if cuda else ("<major>", "<minor>")
    env = build_env(cap, os.cpu_count() or 1)
    print(f"  1. build (background): {' '.join(f'{k}={v}' for k, v in env.items())} "
          f"{shlex.join(build_command(python))}, then moved into vitkernels/")
    # collect every step's selection at once (TRITON_INTERPRET=1 only so the modules import without a GPU)
    procs = []
    for step in test_steps(args.quick):
        cmd = [python, "-m", "pytest", "--collect-only", "-q", "-m", step.marker, "tests"]
        procs.append((step, subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "TRITON_INTERPRET": "1"},
                                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)))
    rc = 0
    for i, (step, proc) in enumerate(procs, 2):
        out, _ = proc.communicate()
        ids = [line for line in out.splitlines() if "::" in line]
        print(f"  {i}. tests: {step.name}: TRITON_INTERPRET=0 "
              f"{shlex.join(pytest_command(python, step.marker, parallel=not args.serial))}")
        print(f"     selects {len(ids)} tests" + (f" in {len({i.split('::')[0] for i in ids})} files" if ids else ""))
        for node in ids[:3]:
            print(f"       {node}")
        if not ids:
            print(f"     ERROR: the marker expression {step.marker!r} selects no test:\n{out[-2000:]}")
            rc = 1
    device = torch.device("cpu")  # only lists the candidates: nothing is allocated on a GPU
    from vitkernels.bench import workloads

    workloads.COMPILE_PEERS["enabled"] = not args.quick
    workloads.COMPILE_PEERS["why"] = "compiled peers are off in gpu-check --quick"
    cases = bench_cases(args.quick)
    print(f"  {len(procs) + 2}. benchmarks: {len(cases)} cases, bf16, {args.warmup} warm-up + {args.reps} timed calls "
          "per candidate")
    for case in cases:
        try:
            cands, _ = _candidates(case, torch.bfloat16, device)
            names = ", ".join(c.name for c in cands)
        except Exception as exc:
            names, rc = f"ERROR: {type(exc).__name__}: {exc}", 1
        print(f"     {case.label} {case.mode} ({case.shape}): {names}")
    print(f"  {len(procs) + 3}. results: {args.results_dir}/<date>-<gpu>.{{json,md}}; tuned configs merged into "
          "vitkernels/ops/tuned_configs.json" + ("" if not args.no_record else " (off: --no-record)"))
    return rc


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(argv)
    python = sys.executable
    try:
        import torch
    except ImportError:
        print(f"gpu-check: {python} has no torch; run it with the Python that holds torch "
              "(make gpu-check PYTHON=/path/to/python)", file=sys.stderr)
        return 2
    if args.merge_tuned:
        with open(args.merge_tuned) as f:
            result = json.load(f)
        count = record_tuned(result)
        print(f"merged {count} tuned configs from {args.merge_tuned} into vitkernels/ops/tuned_configs.json")
        return 0
    if args.dry_run:
        return dry_run(args, python)
    if not torch.cuda.is_available():
        print("gpu-check: no CUDA device is visible to torch (torch.cuda.is_available() is False): nothing to "
              "validate here. `make gpu-check ARGS=--dry-run` lists what it would run.", file=sys.stderr)
        return 2
    os.environ["TRITON_INTERPRET"] = "0"  # before anything imports triton in this process (the benchmarks)
    clock = Clock()
    device = torch.device("cuda", torch.cuda.current_device())
    env = environment(device)
    clock.say(f"{env['gpu']} (sm_{env['capability'].replace('.', '')}, {env['sm_count']} SMs, {env['memory_gb']} GB), "
              f"torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}, driver {env['driver']}, "
              f"{env['cpus']} CPUs{' (--quick)' if args.quick else ''}")
    out_dir = os.path.abspath(args.out)
    os.makedirs(out_dir, exist_ok=True)
    # a cache of this run's own tunings: only what this run measured goes into the results and the table
    cache = os.path.join(out_dir, "autotune-cache")
    shutil.rmtree(cache, ignore_errors=True)
    os.environ["VITKERNELS_CACHE_DIR"] = cache
    result: Dict[str, Any] = {"environment": env, "quick": args.quick, "tests": [], "build": None, "rows": [],
                              "summary": [], "tuned": {}, "seconds": 0.0, "complete": False}
    from vitkernels.ops import tuning

    gpu = tuning.gpu_of(device)
    stem = os.path.join(ROOT, args.results_dir, f"{env['date']}-{gpu.slug}")

    def save(rows=None) -> None:
        """Written after every step and benchmark case: a run cut short (a lent machine's time limit) still
        leaves what it measured, in the results and in its --out copies."""
        if rows is not None:
            result["rows"] = [dataclasses.asdict(r) for r in rows]
            result["summary"] = best_rows(rows)
        result["tuned"] = tuning.cached_entries(gpu.slug)
        result["seconds"] = round(time.monotonic() - clock.start, 1)
        write_results(result, stem, out_dir, record=not args.no_record)

    build = None if args.no_build else start_build(python, torch.cuda.get_device_capability(device), out_dir, clock)
    steps = [] if args.no_tests else test_steps(args.quick)
    shares = [0.45, 0.55]
    for i, step in enumerate(steps, 1):
        budget = None
        if args.deadline is not None:
            budget = shares[min(i, len(shares)) - 1] * args.deadline - (time.monotonic() - clock.start)
        env_extra = {}
        if step.needs_ext:
            if build is not None:
                result["build"] = finish_build(build, python, clock)
                build = None
            if (result["build"] or {}).get("cuda_kernels"):  # else the CUDA test skips, saying why
                env_extra["VITKERNELS_REQUIRE_EXT"] = "1"
        result["tests"].append(run_tests(python, step, out_dir, i, clock, args.pytest_args, env_extra,
                                         parallel=not args.serial, budget=budget))
        save()
    if build is not None:
        result["build"] = finish_build(build, python, clock)

    stop_at = None if args.deadline is None else clock.start + 0.85 * args.deadline
    ops = {o.strip() for o in args.ops.split(",") if o.strip()}
    cases = [c for c in bench_cases(args.quick) if c.op in ops]
    rows = [] if args.no_bench else run_bench(cases, device, clock, args.quick, args.reps,
                                              args.warmup, stop_at, on_case=save)
    result["complete"] = True
    save(rows)
    if not args.no_record and result["tuned"]:
        count = sum(len(keys) for kernels in result["tuned"].values() for keys in kernels.values())
        clock.say(f"merged {count} tuned configs for {gpu.slug} into vitkernels/ops/tuned_configs.json")

    failed = sum(t["failed"] for t in result["tests"])
    print("", flush=True)
    clock.say(f"done: {env['gpu']}, torch {env['torch']}, triton {env['triton']}, {env['date']}")
    for t in result["tests"]:
        print(f"tests: {t['step']}: {t['passed']} passed, {t['failed']} failed, {t['skipped']} skipped")
        for f in t["failures"][:20]:
            print(f"  FAILED {f['test']}: {f['message'][:150]}")
    b = result["build"] or {}
    print(f"extension: {'built for sm_' + b['arch'].replace('.', '') if b.get('ok') else 'not built'}"
          + (f" ({b.get('error')})" if b.get("error") else ""))
    if rows:
        print(short_table(result["summary"]))
    print(f"results: {stem}.json, {stem}.md (copies and logs in {out_dir})")
    return 1 if failed or any(t["rc"] != 0 for t in result["tests"]) else 0


if __name__ == "__main__":
    sys.exit(main())

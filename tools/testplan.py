"""``make test`` / ``make test-slow``: the CPU suite with Triton interpreted and, where a CUDA device is
visible, the GPU tests with Triton compiled, each in its own pytest process.

TRITON_INTERPRET is read once, when triton is first imported, so one process cannot run the kernels both
ways. Step 1 runs every test with ``TRITON_INTERPRET=1`` (on a GPU machine its ``gpu`` tests skip, saying
they run in step 2); step 2, only with a GPU, runs the ``gpu`` and ``triton`` tests with
``TRITON_INTERPRET=0``: the same kernels compiled for the device, bf16 included, plus the full-size cases.

    python -m tools.testplan [--slow] [--dry-run] [--cuda | --no-cuda] [-- extra pytest args]
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
import shlex
import subprocess
import sys
from typing import Dict, List, Optional, Sequence


@dataclasses.dataclass
class Step:
    name: str
    env: Dict[str, str]
    pytest_args: List[str]

    def command(self, python: str = sys.executable) -> List[str]:
        return [python, "-m", "pytest", *self.pytest_args]

    def describe(self, python: str = sys.executable) -> str:
        env = " ".join(f"{k}={v}" for k, v in self.env.items())
        return f"{env} {shlex.join(self.command(python))}"


def xdist_args(workers: Optional[int] = None) -> List[str]:
    """``-n N`` when pytest-xdist is installed (the GPU step's Triton compiles are CPU-bound)."""
    if importlib.util.find_spec("xdist") is None:
        return []
    workers = workers or min(8, max(1, (os.cpu_count() or 1) // 2))
    return ["-n", str(workers)] if workers > 1 else []


def plan(cuda: bool, slow: bool = False, extra: Sequence[str] = (), parallel: bool = True) -> List[Step]:
    selection = "slow" if slow else "not slow"
    steps = [Step("CPU suite, Triton interpreted", {"TRITON_INTERPRET": "1"},
                  ["-q", "-m", selection, "tests", *extra])]
    if cuda:
        steps.append(Step("GPU tests, Triton compiled", {"TRITON_INTERPRET": "0"},
                          ["-q", "-m", f"(gpu or triton) and {selection}", *(xdist_args() if parallel else []),
                           "tests", *extra]))
    return steps


def cuda_visible() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: List[str] = []
    if "--" in argv:
        extra = argv[argv.index("--") + 1:]
        argv = argv[: argv.index("--")]
    parser = argparse.ArgumentParser(prog="python -m tools.testplan", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slow", action="store_true", help="the slow tests (make test-slow)")
    parser.add_argument("--dry-run", action="store_true", help="print the steps, run nothing")
    parser.add_argument("--cuda", action=argparse.BooleanOptionalAction, default=None,
                        help="plan as if a CUDA device were (not) visible (default: ask torch)")
    args = parser.parse_args(argv)
    cuda = cuda_visible() if args.cuda is None else args.cuda
    steps = plan(cuda, args.slow, extra)
    if not cuda:
        print("make test: no CUDA device visible: the gpu tests skip (the Triton kernels run interpreted)")
    rc = 0
    for i, step in enumerate(steps, 1):
        print(f"== make test step {i}/{len(steps)}: {step.name}\n   {step.describe()}", flush=True)
        if args.dry_run:
            continue
        result = subprocess.run(step.command(), env={**os.environ, **step.env})
        if result.returncode != 0:
            print(f"== step {i} ({step.name}) failed with exit code {result.returncode}", flush=True)
            rc = rc or result.returncode
    return rc


if __name__ == "__main__":
    sys.exit(main())

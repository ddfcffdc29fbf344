"""make test's interpreter/compiled split (tools/testplan.py, tests/conftest.py) and make gpu-check
(tools/gpu_check.py): its plan, its dry run (CI runs it, so the script cannot rot), its refusal without a
GPU, and the pieces that turn test and benchmark output into results."""
import json
import os
import subprocess
import sys
import textwrap
import time

import pytest

from tools import gpu_check, testplan
from vitkernels.bench.core import Row

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---- make test: interpreted CPU suite, compiled GPU step ------------------------------------------------


def test_plan_without_a_gpu_is_the_interpreted_suite():
    (step,) = testplan.plan(cuda=False)
    assert step.env == {"TRITON_INTERPRET": "1"}
    assert step.pytest_args == ["-q", "-m", "not slow", "tests"]


def test_plan_with_a_gpu_adds_the_compiled_step(monkeypatch):
    monkeypatch.setattr(testplan, "xdist_args", lambda workers=None: [])
    cpu, gpu = testplan.plan(cuda=True)
    assert cpu.env == {"TRITON_INTERPRET": "1"} and "not slow" in cpu.pytest_args
    assert gpu.env == {"TRITON_INTERPRET": "0"}
    assert gpu.pytest_args == ["-q", "-m", "(gpu or triton) and not slow", "tests"]
    slow_cpu, slow_gpu = testplan.plan(cuda=True, slow=True)
    assert slow_cpu.pytest_args[:3] == ["-q", "-m", "slow"] and "(gpu or triton) and slow" in slow_gpu.pytest_args


def test_testplan_dry_run_prints_both_steps(capsys):
    assert testplan.main(["--dry-run", "--cuda"]) == 0
    out = capsys.readouterr().out
    assert "step 1/2: CPU suite, Triton interpreted" in out and "TRITON_INTERPRET=1" in out
    assert "step 2/2: GPU tests, Triton compiled" in out and "TRITON_INTERPRET=0" in out


def test_makefile_runs_the_plan():
    make = subprocess.run(["make", "-n", "test", "test-slow"], cwd=ROOT, capture_output=True, text=True)
    assert make.returncode == 0, make.stderr
    assert "-m tools.testplan" in make.stdout and "-m tools.testplan --slow" in make.stdout
    assert "VITKERNELS_AOT_TRITON_PATH=" in make.stdout  # test-slow compiles with the GPU machines' triton too


FAKE_CUDA = textwrap.dedent("""
    import torch
    torch.cuda.is_available = lambda: True  # the split's decisions only; no kernel runs
""")


@pytest.mark.parametrize("interpret,expected", [("1", "skipped"), ("0", "passed")])
def test_gpu_tests_skip_under_the_interpreter_on_a_gpu_machine(tmp_path, interpret, expected):
    """On a machine with a GPU, the interpreted step skips gpu tests (saying where they run) and the
    compiled step runs them: driven through the real conftest with torch told a GPU is there."""
    (tmp_path / "fake_cuda_plugin.py").write_text(FAKE_CUDA)
    probe = tmp_path / "test_split_probe.py"
    probe.write_text("import pytest\n\n@pytest.mark.gpu\ndef test_probe():\n    pass\n")
    env = {**os.environ, "TRITON_INTERPRET": interpret,
           "PYTHONPATH": os.pathsep.join([str(tmp_path), ROOT, os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "fake_cuda_plugin", "-p", "tests.conftest",
                          "-p", "no:cacheprovider", "--rootdir", str(tmp_path), str(probe)],
                         cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=300)
    assert f"1 {expected}" in run.stdout, run.stdout + run.stderr
    if expected == "skipped":
        assert "gpu tests run with compiled Triton (TRITON_INTERPRET=0): make test runs them in its GPU step" \
            in run.stdout


# ---- make gpu-check ---------------------------------------------------------------------------------------


def test_gpu_check_dry_run_through_make():
    """`make gpu-check ARGS=--dry-run` lists every step: the build, the tests each step selects (at least
    one each), the benchmark cases with their candidates, and where the results go."""
    make = subprocess.run(["make", "gpu-check", "ARGS=--dry-run", f"PYTHON={sys.executable}"], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    out = make.stdout
    assert make.returncode == 0, out + make.stderr
    assert "build (background): TORCH_CUDA_ARCH_LIST=<major>.<minor>" in out and "setup.py build_ext --build-lib '<temporary folder>/lib'" in out
    assert "gpu + triton tests (compiled Triton): TRITON_INTERPRET=0" in out
    counts = [int(line.split("selects ")[1].split()[0]) for line in out.splitlines() if "selects " in line]
    assert len(counts) == 2 and counts[0] > 100 and counts[1] >= 1, out
    for case in gpu_check.bench_cases(quick=False):
        assert f"{case.label} {case.mode}" in out
    assert "vitkernels:triton" in out and "sdpa:flash" in out and "flex (compiled)" in out and "timm + torch.compile" in out
    assert "benchmarks/results/<date>-<gpu>.{json,md}" in out


def test_gpu_check_quick_is_a_subset():
    full, quick = gpu_check.bench_cases(False), gpu_check.bench_cases(True)
    assert 0 < len(quick) < len(full) and all(c in full for c in quick)
    assert {(c.op, c.mode, c.bias) for c in full} >= {("attention", "fwd", False), ("attention", "fwd+bwd", False),
                                                       ("attention", "fwd", True), ("attention", "fwd+bwd", True),
                                                       ("window", "fwd+bwd", False), ("patch", "fwd", False),
                                                       ("model", "fwd+bwd", False)}
    assert [s.marker for s in gpu_check.test_steps(True)] == ["gpu and not slow and not ext", "gpu and ext"]
    assert [s.marker for s in gpu_check.test_steps(False)] == ["(gpu or triton) and not ext", "gpu and ext"]


def test_gpu_check_without_a_gpu_stops_with_a_clear_message(monkeypatch, capsys):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main([]) == 2
    err = capsys.readouterr().err
    assert "no CUDA device is visible to torch" in err and "ARGS=--dry-run" in err


def test_build_env_targets_the_local_arch_with_every_core(monkeypatch):
    monkeypatch.setenv("CUDA_HOME", "/opt/cuda")
    env = gpu_check.build_env((9, 0), 16)
    assert env == {"TORCH_CUDA_ARCH_LIST": "9.0", "MAX_JOBS": "16", "CUDA_HOME": "/opt/cuda"}


def test_built_extension_is_moved_into_place_whole(tmp_path):
    built = tmp_path / "lib" / "vitkernels"
    built.mkdir(parents=True)
    (built / "_C.cpython-312-x86_64-linux-gnu.so").write_bytes(b"new")
    (built / "other.py").write_text("")
    dest = tmp_path / "tree"
    dest.mkdir()
    old = dest / "_C.cpython-312-x86_64-linux-gnu.so"
    old.write_bytes(b"old")
    inode = old.stat().st_ino
    assert gpu_check.install_built(str(tmp_path / "lib"), str(dest)) == ["_C.cpython-312-x86_64-linux-gnu.so"]
    assert old.read_bytes() == b"new" and old.stat().st_ino != inode  # replaced, not rewritten in place
    assert gpu_check.install_built(str(tmp_path / "nothing"), str(dest)) == []


def test_nvcc_is_detected_the_way_setup_py_does(tmp_path):
    assert not gpu_check.has_nvcc({}) and not gpu_check.has_nvcc({"CUDA_HOME": str(tmp_path)})
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "nvcc").write_text("")
    assert gpu_check.has_nvcc({"CUDA_HOME": str(tmp_path)})


def test_junit_summary_counts_and_failures(tmp_path):
    xml = tmp_path / "r.xml"
    xml.write_text("""<?xml version="1.0"?><testsuites><testsuite>
      <testcase classname="tests.a" name="t1"/>
      <testcase classname="tests.a" name="t2"><failure message="boom">trace</failure></testcase>
      <testcase classname="tests.b" name="t3"><skipped message="needs two CUDA devices"/></testcase>
      <testcase classname="tests.b" name="t4"><error message="setup"/></testcase>
    </testsuite></testsuites>""")
    s = gpu_check.junit_summary(str(xml))
    assert (s["passed"], s["failed"], s["skipped"]) == (1, 2, 1)
    assert s["failures"][0] == {"test": "tests.a::t2", "message": "boom"}
    assert s["skips"] == {"needs two CUDA devices": 1}
    missing = gpu_check.junit_summary(str(tmp_path / "none.xml"))
    assert missing["failed"] == 1  # pytest that wrote nothing is a failure, never a silent pass


def rows():
    r = [Row("attention", "att", "B=1", "vitkernels:triton", "vitkernels", "bf16", "fwd", median_ms=0.5),
         Row("attention", "att", "B=1", "vitkernels:reference", "vitkernels", "bf16", "fwd", median_ms=2.0),
         Row("attention", "att", "B=1", "sdpa:flash", "peer", "bf16", "fwd", median_ms=0.4),
         Row("attention", "att", "B=1", "sdpa:math", "peer", "bf16", "fwd", median_ms=1.0),
         Row("window", "win", "B=1", "vitkernels:triton", "vitkernels", "bf16", "fwd+bwd",
             status="error: RuntimeError: boom"),
         Row("window", "win", "B=1", "timm eager", "peer", "bf16", "fwd+bwd", median_ms=3.0)]
    return r


def test_best_rows_and_short_table():
    best = gpu_check.best_rows(rows())
    assert best[0]["vitkernels"] == "vitkernels:triton" and best[0]["best_peer"] == "sdpa:flash"
    assert best[0]["speedup"] == pytest.approx(0.8)
    assert best[0]["triton_ms"] == 0.5 and best[0]["triton_speedup"] == pytest.approx(0.8)
    assert best[1]["vitkernels_ms"] is None and "boom" in best[1]["vitkernels_status"]
    assert best[1]["triton_speedup"] is None
    table = gpu_check.short_table(best)
    assert "0.80x" in table and "sdpa:flash" in table and "error: RuntimeError: boom" in table


def test_results_markdown_and_tuned_table(tmp_path):
    result = {"environment": {"gpu": "NVIDIA H100", "date": "2026-11-27", "torch": "2.11.0", "triton": "3.6.0",
                              "cuda": "13.0", "driver": "580", "python": "3.12.3", "cpus": 16,
                              "command": "make gpu-check"},
              "seconds": 300.0, "build": {"ok": True, "arch": "9.0", "seconds": 50.0},
              "tests": [{"step": "gpu", "marker": "gpu", "passed": 3, "failed": 1, "skipped": 0, "seconds": 9.0,
                         "failures": [{"test": "t::x", "message": "bad"}], "skips": {}}],
              "rows": [dict(r.__dict__) for r in rows()], "summary": gpu_check.best_rows(rows()),
              "tuned": {"nvidia-h100": {"flash_attn_fwd": {"N_Q=256": {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 4,
                                                                       "num_stages": 3, "ms": 0.1}}}}}
    md = gpu_check.markdown(result)
    assert "# vitkernels gpu-check: NVIDIA H100 (2026-11-27)" in md and "FAILED `t::x`" in md
    assert "| att | fwd | vitkernels:triton | 0.500 | sdpa:flash | 0.400 | 0.80x | 0.80x |" in md
    assert "Incomplete" not in md
    table = tmp_path / "table.json"
    assert gpu_check.record_tuned(result, str(table)) == 1
    saved = json.loads(table.read_text())["gpus"]["nvidia-h100"]
    assert saved["name"] == "NVIDIA H100" and saved["triton"] == "3.6.0"
    assert saved["kernels"]["flash_attn_fwd"]["N_Q=256"]["BLOCK_M"] == 128


def test_results_are_written_as_they_come_and_copied_for_a_lent_machine(tmp_path, monkeypatch):
    """A run cut short still leaves its results: write_results runs after every step and case, marks an
    unfinished run, merges the tuned configs and copies json, md and the table into --out."""
    from vitkernels.ops import tuning

    table = tmp_path / "table.json"
    monkeypatch.setattr(tuning, "TABLE_PATH", str(table))
    out = tmp_path / "out"
    out.mkdir()
    result = {"environment": {"gpu": "NVIDIA H200", "date": "2026-11-27", "torch": "2.11.0", "triton": "3.6.0",
                              "python": "3.12.3", "cpus": 16, "command": "make gpu-check"},
              "seconds": 12.0, "build": None, "tests": [], "complete": False,
              "rows": [dict(r.__dict__) for r in rows()], "summary": gpu_check.best_rows(rows()),
              "tuned": {"nvidia-h200": {"flash_attn_fwd": {"N_Q=256": {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4,
                                                                       "num_stages": 2, "ms": 0.1}}}}}
    stem = str(tmp_path / "results" / "2026-11-27-nvidia-h200")
    paths = gpu_check.write_results(result, stem, str(out))
    assert paths == [stem + ".json", stem + ".md", str(table)]
    assert sorted(os.listdir(out)) == ["2026-11-27-nvidia-h200.json", "2026-11-27-nvidia-h200.md", "table.json"]
    assert "Incomplete" in (out / "2026-11-27-nvidia-h200.md").read_text()
    assert json.loads((out / "2026-11-27-nvidia-h200.json").read_text())["complete"] is False
    assert json.loads(table.read_text())["gpus"]["nvidia-h200"]["kernels"]["flash_attn_fwd"]["N_Q=256"]["BLOCK_M"] == 64
    assert gpu_check.write_results(result, stem, str(out), record=False) == [stem + ".json", stem + ".md"]


def test_a_test_step_over_its_deadline_is_interrupted_and_reported(tmp_path):
    """--deadline: pytest gets SIGINT at its budget, reports what ran, and the step says it was cut short."""
    (tmp_path / "test_sleepy.py").write_text(textwrap.dedent("""
        import time
        import pytest

        @pytest.mark.sleepy
        def test_quick():
            pass

        @pytest.mark.sleepy
        def test_sleeps():
            time.sleep(60)
    """))
    out = tmp_path / "out"
    out.mkdir()
    step = gpu_check.TestStep("sleepy", "sleepy", False)  # a marker that selects nothing under tests/
    started = time.monotonic()
    summary = gpu_check.run_tests(sys.executable, step, str(out), 1, gpu_check.Clock(),
                                  [str(tmp_path / "test_sleepy.py"), "-p", "no:cacheprovider",
                                   "-W", "ignore::pytest.PytestUnknownMarkWarning"], {}, parallel=False,
                                  budget=8.0)
    assert time.monotonic() - started < 40
    assert summary["interrupted"] and summary["rc"] != 0
    assert any(f["test"] == "(deadline)" for f in summary["failures"])
    assert (out / "tests.log").exists()

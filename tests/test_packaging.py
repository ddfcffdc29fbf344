"""Installing like any PyTorch extension: a wheel from pyproject.toml with the package data, the licence and
the version; without torch at build time (what pip's build isolation gives) the wheel has no extension and
the build says so; with torch, the extension is in it and imports (slow)."""
import os
import pathlib
import subprocess
import sys
import zipfile

import pytest

import vitkernels

REPO = pathlib.Path(__file__).resolve().parent.parent


def build_wheel(out_dir, env_extra=None, pythonpath=None):
    env = {**os.environ, **(env_extra or {})}
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join([str(pythonpath), env.get("PYTHONPATH", "")])
    # --no-build-isolation: the test machine may have no package index; the build backend is setuptools
    # -v: the build backend's own output (its warnings) is part of what is checked
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-v",
                           "-w", str(out_dir), str(REPO)], capture_output=True, text=True, env=env, timeout=1500)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    wheels = list(pathlib.Path(out_dir).glob("vitkernels-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0], done


def test_wheel_without_torch_at_build_time_has_the_package_and_says_the_extension_is_missing(tmp_path):
    fake = tmp_path / "fake_site" / "torch"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('torch hidden by build isolation (test stand-in)')\n")
    wheel, done = build_wheel(tmp_path / "dist", {"VITKERNELS_REQUIRE_EXT": "0"}, pythonpath=fake.parent)
    assert f"vitkernels-{vitkernels.__version__}-" in wheel.name
    names = zipfile.ZipFile(wheel).namelist()
    assert "vitkernels/py.typed" in names and "vitkernels/ops/tuned_configs.json" in names
    assert "vitkernels/ops/attention/compile.py" in names
    assert not any(n.startswith("vitkernels/_C") for n in names)
    assert any(n.endswith(".dist-info/licenses/LICENSE") or n.endswith(".dist-info/LICENSE") for n in names)
    metadata = next(n for n in names if n.endswith(".dist-info/METADATA"))
    text = zipfile.ZipFile(wheel).read(metadata).decode()
    assert "Requires-Dist: torch>=2.4" in text and f"Version: {vitkernels.__version__}" in text
    log = done.stdout + done.stderr
    assert "building without the compiled extension" in log and "--no-build-isolation" in log  # says how
    assert "BuildBackendWarning" not in log and "DeprecationWarning" not in log, log[-3000:]  # metadata is current


def test_requiring_the_extension_without_torch_fails_the_build(tmp_path):
    fake = tmp_path / "fake_site" / "torch"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('no torch')\n")
    env = {**os.environ, "VITKERNELS_REQUIRE_EXT": "1", "PYTHONPATH": str(fake.parent)}
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-q",
                           "-w", str(tmp_path / "dist"), str(REPO)], capture_output=True, text=True, env=env,
                          timeout=600)
    assert done.returncode != 0
    assert "VITKERNELS_REQUIRE_EXT=1" in done.stdout + done.stderr


@pytest.mark.slow
@pytest.mark.ext
def test_wheel_built_against_the_installed_torch_carries_an_extension_that_imports(tmp_path):
    """``python -m build --wheel --no-isolation``'s equivalent, CPU kernels only (CUDA_HOME unset)."""
    env = {k: v for k, v in os.environ.items() if k != "CUDA_HOME"}
    env["CUDA_HOME"] = ""
    wheel, _ = build_wheel(tmp_path / "dist", {**env, "VITKERNELS_REQUIRE_EXT": "1"})
    names = zipfile.ZipFile(wheel).namelist()
    assert any(n.startswith("vitkernels/_C") and n.endswith(".so") for n in names), names
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, timeout=600)
    code = ("import vitkernels, vitkernels._C, torch; from vitkernels import dispatch; "
            "assert vitkernels.__file__.startswith(%r) and vitkernels._C.__file__.startswith(%r); "
            "print(dispatch.backend_environment('cpu'))" % (str(target), str(target)))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(target)}, cwd=str(tmp_path))
    assert done.returncode == 0 and "True" in done.stdout, done.stderr[-2000:]

"""Builds vitkernels._C from csrc/ (the package metadata is in pyproject.toml).

- C++ CPU kernels are always built; CUDA kernels (csrc/cuda/*.cu) when CUDA_HOME holds nvcc (set
  TORCH_CUDA_ARCH_LIST to keep the build short).
- The extension is compiled against the torch it will run with, so build it where that torch is
  importable: ``pip install --no-build-isolation .`` (or ``-e .``; ``python -m build --no-isolation``).
- Without torch at build time (a plain ``pip install .``: build isolation hides torch) the package is
  installed without vitkernels._C: the reference and Triton backends work, ``cpu``/``cuda`` report that the
  extension is missing and how to build it. VITKERNELS_REQUIRE_EXT=1 makes that an error instead;
  VITKERNELS_NO_EXT=1 skips the extension on purpose.
"""
import glob
import os
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def extensions():
    if os.environ.get("VITKERNELS_NO_EXT", "0") == "1":
        return [], {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
    except ImportError as exc:
        message = (f"vitkernels: torch is not importable at build time ({exc}); building without the compiled "
                   "extension vitkernels._C (the cpu/cuda backends). With torch installed, build it with "
                   "`pip install --no-build-isolation .`")
        if os.environ.get("VITKERNELS_REQUIRE_EXT", "0") == "1":
            raise SystemExit(message + " (VITKERNELS_REQUIRE_EXT=1)")
        print("WARNING: " + message, file=sys.stderr)
        return [], {}

    def rel(pattern):  # setuptools wants paths relative to setup.py
        return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))

    sources = ["csrc/bindings.cpp"] + rel("csrc/cpu/*.cpp")
    # -fno-trapping-math: lets GCC vectorise the float->int steps of the CPU kernels' exp (no value changes).
    # -fopenmp: at::parallel_for is an OpenMP loop in torch's headers; without it the CPU kernels run on one
    # thread (torch's Linux wheels use the same libgomp).
    cxx_flags = ["-O3", "-fno-trapping-math"]
    link_flags = []
    if sys.platform.startswith("linux"):
        cxx_flags.append("-fopenmp")
        link_flags.append("-fopenmp")
    cuda_home = os.environ.get("CUDA_HOME", "")
    with_cuda = bool(cuda_home) and os.path.exists(os.path.join(cuda_home, "bin", "nvcc"))
    if with_cuda:
        ext = CUDAExtension(
            "vitkernels._C",
            sources + rel("csrc/cuda/*.cu"),
            define_macros=[("WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "--expt-relaxed-constexpr"]},
            extra_link_args=link_flags,
        )
    else:
        ext = CppExtension("vitkernels._C", sources, extra_compile_args={"cxx": cxx_flags},
                           extra_link_args=link_flags)
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = extensions()

setup(ext_modules=ext_modules, cmdclass=cmdclass)

"""Installs vitkernels and builds vitkernels._C from csrc/.

C++ CPU kernels are always built. CUDA kernels (csrc/cuda/*.cu) are built when the CUDA_HOME environment
variable is set and holds nvcc (set TORCH_CUDA_ARCH_LIST to keep the build short). VITKERNELS_NO_EXT=1
skips the extension: the package still imports and its references run.
"""
import glob
import os

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def extensions():
    if os.environ.get("VITKERNELS_NO_EXT", "0") == "1":
        return [], {}
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    def rel(pattern):  # setuptools wants paths relative to setup.py
        return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))

    sources = ["csrc/bindings.cpp"] + rel("csrc/cpu/*.cpp")
    cxx_flags = ["-O3"]
    cuda_home = os.environ.get("CUDA_HOME", "")
    with_cuda = bool(cuda_home) and os.path.exists(os.path.join(cuda_home, "bin", "nvcc"))
    if with_cuda:
        ext = CUDAExtension(
            "vitkernels._C",
            sources + rel("csrc/cuda/*.cu"),
            define_macros=[("WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "--expt-relaxed-constexpr"]},
        )
    else:
        ext = CppExtension("vitkernels._C", sources, extra_compile_args={"cxx": cxx_flags})
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = extensions()

setup(
    name="vitkernels",
    version="0.1.0",
    description="Fused GPU kernels for Vision Transformers: flash attention, Swin window attention, patch embedding",
    packages=find_packages(include=["vitkernels", "vitkernels.*"]),
    package_data={"vitkernels.ops": ["tuned_configs.json"]},  # configs tuned on GPUs, read at launch
    python_requires=">=3.9",
    install_requires=["torch>=2.4"],
    extras_require={"triton": ["triton>=3.0"], "test": ["pytest", "timm"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)

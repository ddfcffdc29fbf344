"""Ahead-of-time compilation of Triton kernels for real GPU targets, without a GPU.

The interpreter runs kernel code as numpy and accepts things the compiler rejects; compiling each kernel
to a cubin with Triton's own ptxas for sm_80 and sm_90 catches those, and reports the shared memory
and registers a config needs. Run in a process without TRITON_INTERPRET (kernels must be JITFunctions). The stdout's last line is
JSON: the Triton version that compiled and one {"shared", "n_regs"} per case.
"""
from __future__ import annotations

import json
import os
import sys

import triton
from triton.backends.compiler import GPUTarget

FLOAT_SCALARS = {"sm_scale", "dropout_p", "keep_scale"}
FP32_POINTERS = {"LSE", "Delta", "DPad", "DSSum", "DSPart", "DPadPart", "DRelH", "DRelW", "DRelT"}
FP32_POINTERS |= {"LogitScale", "DScalePart"}  # window_attention(cosine=True): a float32 logit scale (timm's)
INT8_POINTERS = {"Mask"}
INT64_POINTERS = {"Seed"}  # dropout's (seed, offset) on the device
FP32_TABLES = {"Cos", "Sin"}  # rope tables: float32, as timm builds them (the heavier case with fp16 / bf16 q)
# tensors of the op's dtype; every other non-constexpr argument not named above is an int32 size/stride
DATA_POINTERS = {"Q", "K", "V", "Bias", "RelH", "RelW", "RelT", "Out", "DOut", "DQ", "DK", "DV", "DBias", "QKV", "QKVBias", "Table", "DQKV",
                 "X", "W", "Pos", "Prefix", "DW", "DX"}


def signature(fn, dtype: str, constexprs: dict) -> dict:
    sig = {}
    for p in fn.params:
        name = p.name
        if p.is_constexpr:
            sig[name] = "constexpr"
        elif name in DATA_POINTERS:
            sig[name] = f"*{dtype}"
        elif name in FP32_POINTERS:
            sig[name] = "*fp32"
        elif name in INT8_POINTERS:
            sig[name] = "*i8"
        elif name in FLOAT_SCALARS:
            sig[name] = "fp32"
        elif name in INT64_POINTERS:
            sig[name] = "*i64"
        elif name in FP32_TABLES:
            sig[name] = "*fp32"
        else:
            sig[name] = "i32"
    return sig


def with_defaults(kernel, constexprs: dict) -> dict:
    """``constexprs`` plus the kernel's defaults for the constexprs it leaves out, as a launch fills them in
    (an ASTSource gets None for an absent one: ``x // ALIGN`` would not compile, ``if FLAG`` reads False)."""
    defaults = {p.name: p.default for p in kernel.params if p.is_constexpr and p.has_default}
    return dict(defaults, **constexprs)


def compile_kernel(kernel, dtype: str, constexprs: dict, arch: int, num_warps: int, num_stages: int) -> dict:
    constexprs = with_defaults(kernel, constexprs)
    src = triton.compiler.ASTSource(fn=kernel, signature=signature(kernel, dtype, constexprs), constexprs=constexprs)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                              options=dict(num_warps=num_warps, num_stages=num_stages))
    return {"shared": compiled.metadata.shared, "n_regs": getattr(compiled, "n_regs", None),
            "n_spills": getattr(compiled, "n_spills", None)}


def _compile_case(case) -> dict:
    import importlib

    module, name, dtype, constexprs, arch, warps, stages = case
    return compile_kernel(getattr(importlib.import_module(module), name), dtype, constexprs, arch, warps, stages)


def _main() -> None:
    # argv[1]: JSON list of [module, kernel name, dtype, constexprs, arch, warps, stages]
    from concurrent.futures import ProcessPoolExecutor

    cases = json.loads(sys.argv[1])
    with ProcessPoolExecutor(max_workers=max(2, os.cpu_count() or 1)) as pool:  # ptxas is single-threaded
        results = list(pool.map(_compile_case, cases))
    print(json.dumps({"triton": triton.__version__, "results": results}))


# ---- what the compiler makes of a kernel with Triton's run-time specializations --------------------------


def specialized_ptx(module: str, name: str, dtype: str, constexprs: dict, ones: list, div16: list, arch: int = 90,
                    num_warps: int = 4, num_stages: int = 2) -> str:
    """The PTX of a compile as a launch would make it: integer arguments equal to 1 (``ones``: unit strides)
    become constants, and pointers plus the integers in ``div16`` carry the 16-divisibility hint Triton
    derives from the actual values."""
    import importlib

    kernel = getattr(importlib.import_module(module), name)
    names = [p.name for p in kernel.params]
    ones = [n for n in ones if n in names]  # the lists name every kernel's strides: keep this one's
    consts = dict(with_defaults(kernel, constexprs), **{n: 1 for n in ones})
    sig = signature(kernel, dtype, consts)
    for n in ones:
        sig[n] = "constexpr"
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names)
             if sig[n] != "constexpr" and (sig[n].startswith("*") or n in div16)}
    src = triton.compiler.ASTSource(fn=kernel, signature=sig, constexprs=consts, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options=dict(num_warps=num_warps, num_stages=num_stages)).asm["ptx"]


def specialized_ptx_stats(module: str, name: str, dtype: str, constexprs: dict, ones: list, div16: list,
                          arch: int = 90, num_warps: int = 4, num_stages: int = 2) -> dict:
    """Counts of the global-load forms in the PTX of ``specialized_ptx``: ``cp_async`` (pipelined copies),
    ``vector`` (ld.global.v2/v4), ``scalar16`` (ld.global.b16/u16: one 16-bit element per instruction)."""
    import re

    ptx = specialized_ptx(module, name, dtype, constexprs, ones, div16, arch, num_warps, num_stages)
    return {"cp_async": len(re.findall(r"cp\.async\.c[ag]", ptx)),
            "vector": len(re.findall(r"ld\.global(?:\.\w+)*\.v[24]\.", ptx)),
            "scalar16": len(re.findall(r"ld\.global(?:\.\w+)*\.[bu]16\s", ptx))}


def _ptx_main(cases) -> None:
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=max(2, os.cpu_count() or 1)) as pool:
        results = list(pool.map(_ptx_case, cases))
    print(json.dumps({"triton": triton.__version__, "results": results}))


def _ptx_case(case) -> dict:
    return specialized_ptx_stats(**case)


def register_usage(module: str, name: str, dtype: str, constexprs: dict, ones: list, div16: list, arch: int = 90,
                   num_warps: int = 4, num_stages: int = 2) -> dict:
    """Registers and spills per thread, from ptxas -v on the PTX of a launch-specialized compile (as
    ``specialized_ptx_stats``): {"registers", "spill_stores", "spill_loads"} (bytes)."""
    import re
    import subprocess
    import tempfile

    ptx = specialized_ptx(module, name, dtype, constexprs, ones, div16, arch, num_warps, num_stages)
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        report = subprocess.run([ptxas, "-v", f"--gpu-name=sm_{arch}{'a' if arch == 90 else ''}", path, "-o",
                                 os.path.join(tmp, "kernel.cubin")], capture_output=True, text=True, check=True).stderr
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", report)
    return {"registers": int(re.search(r"Used (\d+) registers", report).group(1)),
            "spill_stores": int(spills.group(1)), "spill_loads": int(spills.group(2))}


def _usage_case(case) -> dict:
    return register_usage(**case)


def _usage_main(cases) -> None:
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=max(2, os.cpu_count() or 1)) as pool:
        results = list(pool.map(_usage_case, cases))
    print(json.dumps({"triton": triton.__version__, "results": results}))


if __name__ == "__main__":
    # ``--ptx CASES`` / ``--usage CASES``: JSON lists of specialized_ptx_stats / register_usage keyword dicts;
    # otherwise the compile suite
    if sys.argv[1] == "--ptx":
        _ptx_main(json.loads(sys.argv[2]))
    elif sys.argv[1] == "--usage":
        _usage_main(json.loads(sys.argv[2]))
    else:
        _main()

"""The patch-embedding GEMMs (forward, dW, dX) as the compiler builds them for an H100 (sm_90), from the
PTX: their image / weight / dY loads are wide and pipelined at /16 (ViT-B/16) and /14 (ViT-L/14, DINOv2,
EVA), on NCHW and channels-last images, and on channels_last_3d video (2x16x16 tubelets), bf16.

Each kernel is compiled with the specializations a real launch gets, derived from the very arguments the
launcher passes (``fwd_launch`` / ``dw_launch`` / ``dx_launch`` on meta tensors of the real shapes):
integers equal to 1 become constants, integers divisible by 16 and every pointer carry the 16-divisibility
hint, tensors keep their real dtypes (dW's fp32 split sums included). One config per kernel: the heuristic's
first candidate for the shape, as ``VITKERNELS_AUTOTUNE=off`` launches it.

What the hardware allows (2-byte elements; a vector load needs its address aligned to its width):
  - /16, both layouts: every patch row starts at a multiple of 32 bytes (NCHW: a 16-element row; channels-
    last RGB: a 48-element run of (w, c) pairs, in the k-order (dt, dh, dw, c)), so the gather and the
    weight load as 16-byte cp.async. (Before the channels-last k-order, a channels-last image was gathered
    in the weight's (c, dh, dw) order: 32 scalar 16-bit loads per thread and stage.)
  - /14 NCHW: a patch row of 14 elements (28 bytes) starts at a multiple of 28 bytes, i.e. 4-byte aligned
    for odd patch columns. No k-order or padded tile (16 columns masked to 14) changes where a row starts,
    and a TMA box cannot step by patches (its global strides must be multiples of 16 bytes, not 28), so
    4-byte (2-element) copies are the widest the image gather can use; ``/14`` cases assert those (4-byte
    cp.async) and no 16-bit scalar load. The weight's (E, K = 588) rows are padded to 592 elements by the launcher, so the
    weight loads stay 16-byte cp.async.
  - /14 channels-last RGB: a row run is 42 elements (84 bytes) and starts at a multiple of 84 bytes: 4-byte
    alignment again, same assertion.
"""
from __future__ import annotations

import inspect
import json
import os
import re
import subprocess
import sys
from concurrent.futures import ProcessPoolExecutor

import pytest
import torch

triton = pytest.importorskip("triton")

from vitkernels.ops import tuning  # noqa: E402

PATCH = "vitkernels.ops.patch_embed.triton"
H100 = tuning.GPU("NVIDIA H100 (AOT)", "aot-sm90", (9, 0), 132, 227 * 1024)
# (image, patch, E, prefix tokens): ViT-B/16 and ViT-L/14 at 224, batch 64, a cls token and full pos_embed;
# VideoMAE's ViT-B 2x16x16 tubelets on 16 frames, batch 8, no prefix
SHAPES = {"p16": ((64, 3, 224, 224), (16, 16), 768, 1), "p14": ((64, 3, 224, 224), (14, 14), 1024, 1),
          "t2p16": ((8, 3, 16, 224, 224), (2, 16, 16), 768, 0)}
LAYOUTS = {"nchw": (torch.contiguous_format, torch.contiguous_format),  # (image, video) memory formats
           "cl": (torch.channels_last, torch.channels_last_3d)}
KERNELS = ("fwd", "dw", "dx")


def _arg_type(value) -> str:
    if isinstance(value, torch.Tensor):
        return {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32"}[value.dtype]
    assert isinstance(value, int) and not isinstance(value, bool), value
    return "i32" if -2 ** 31 <= value < 2 ** 31 else "i64"


def launch_case(shape: str, layout: str, kernel: str) -> dict:
    """The compile a real launch of ``kernel`` makes for this shape and layout: kernel name, signature,
    constexprs (config, flags, unit integers), the 16-divisible integers, warps and stages."""
    from vitkernels.ops.patch_embed import triton as pe
    from vitkernels.ops.patch_embed import triton_configs as configs

    x_shape, patch, E, P = SHAPES[shape]
    meta = dict(dtype=torch.bfloat16, device="meta")
    x = torch.empty(x_shape, **meta).contiguous(memory_format=LAYOUTS[layout][len(x_shape) - 4])
    w = torch.empty(E, x_shape[1], *patch, **meta)
    num_patches = 1
    for size, p in zip(x_shape[2:], patch):
        num_patches *= size // p
    if kernel == "fwd":
        bias, pos = torch.empty(E, **meta), torch.empty(1, P + num_patches, E, **meta)
        _, _, args, constexprs, key = pe.fwd_launch(x, w, bias, pos, torch.empty(1, P, E, **meta) if P else None)
        fn, spec = pe._patch_embed_fwd_kernel, configs.PATCH_FWD
    else:
        dout = torch.empty(x_shape[0], P + num_patches, E, **meta)
        if kernel == "dw":
            _, _, _, args, constexprs, key = pe.dw_launch(dout, x, w)
            fn, spec = pe._patch_embed_bwd_dw_kernel, configs.PATCH_BWD_DW
        else:
            _, _, args, constexprs, key = pe.dx_launch(dout, x, w)
            fn, spec = pe._patch_embed_bwd_dx_kernel, configs.PATCH_BWD_DX
    config = spec.candidates(key, H100)[0]
    params = list(inspect.signature(getattr(fn, "fn", fn)).parameters.values())
    consts = dict(constexprs, **config.meta)
    signature, div16 = {}, []
    for param, value in zip(params, args):
        if "constexpr" in str(param.annotation):
            consts[param.name] = value
        elif isinstance(value, int) and value == 1:  # Triton makes an integer equal to 1 a constant
            consts[param.name] = 1
        else:
            signature[param.name] = _arg_type(value)
            if isinstance(value, torch.Tensor) or value % 16 == 0:  # pointers: 16-byte aligned allocations
                div16.append(param.name)
    signature = {p.name: "constexpr" if p.name in consts else signature[p.name] for p in params}  # param order
    return dict(name=getattr(fn, "fn", fn).__name__, signature=signature, constexprs=consts, div16=div16,
                num_warps=config.num_warps, num_stages=config.num_stages)


def ptx_of(case: dict) -> str:
    """Compiled as ``tests.triton_aot.specialized_ptx`` does, with the launch's own argument types."""
    import importlib

    from triton.backends.compiler import GPUTarget

    fn = getattr(importlib.import_module(PATCH), case["name"])
    names = [p.name for p in fn.params]
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in case["div16"]}
    src = triton.compiler.ASTSource(fn=fn, signature=case["signature"], constexprs=case["constexprs"], attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=case["num_warps"], num_stages=case["num_stages"])).asm["ptx"]


def load_stats(ptx: str) -> dict:
    """Global loads by form: 16-bit and 32-bit scalars, vectors (v2 / v4), cp.async by copy size in bytes."""
    stats = {"scalar16": len(re.findall(r"ld\.global(?:\.\w+)*\.[bu]16\s", ptx)),
             "scalar32": len(re.findall(r"ld\.global(?:\.\w+)*\.[bu]32\s", ptx)),
             "vector": len(re.findall(r"ld\.global(?:\.\w+)*\.v[24]\.", ptx))}
    for size in (4, 8, 16):
        stats[f"cp_async{size}"] = len(re.findall(
            rf"cp\.async\.c[ag]\.shared\.global(?:\.\w+)*\s*\[[^\]]*\],\s*\[[^\]]*\],\s*(?:0x{size:x}|{size})\b", ptx))
    return stats


def _stats_of(case: dict) -> dict:
    return load_stats(ptx_of(case))


CASES = ([(s, lay, k) for s in ("p16", "p14") for lay in LAYOUTS for k in KERNELS]
         + [("t2p16", "cl", k) for k in KERNELS])
IDS = [f"{k}-{s}-{lay}" for s, lay, k in CASES]


SIDE_TRITON = os.environ.get("VITKERNELS_AOT_TRITON_PATH")  # make test-slow: the GPU machines' triton (3.6)


def compile_stats(triton_path=None):
    """(triton version, stats per case id), compiled in a subprocess without the interpreter (kernels must be
    JITFunctions); ``triton_path``: a directory holding another triton, put first on PYTHONPATH."""
    cases = [launch_case(*c) for c in CASES]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if triton_path:
        env["PYTHONPATH"] = os.pathsep.join([triton_path] + [p for p in [env.get("PYTHONPATH")] if p])
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    result = subprocess.run([sys.executable, "-m", "tests.ops.test_patch_embed_ptx", json.dumps(cases)],
                            capture_output=True, text=True, env=env, cwd=root, timeout=1800)
    assert result.returncode == 0, result.stderr[-4000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    return out["triton"], dict(zip(IDS, out["results"]))


@pytest.fixture(scope="module")
def stats():
    return compile_stats()[1]


def test_launch_specializations_follow_the_layout():
    """The derived specializations are the layouts' real ones: unit x stride along w (NCHW) or c
    (channels-last), the /14 weight rows' stride (588 padded to 592) 16-divisible, C and the k-order
    constexprs, dW's fp32 split sums."""
    nchw, cl = launch_case("p16", "nchw", "fwd"), launch_case("p16", "cl", "fwd")
    assert nchw["constexprs"]["stride_xw"] == 1 and "stride_xc" in nchw["div16"]
    assert not nchw["constexprs"]["CHANNELS_LAST"] and nchw["constexprs"]["C_IN"] == 3
    assert cl["constexprs"]["stride_xc"] == 1 and cl["signature"]["stride_xw"] == "i32"
    assert "stride_xw" not in cl["div16"] and "stride_xh" in cl["div16"]  # 3 and 672 = 224 * 3
    assert cl["constexprs"]["CHANNELS_LAST"]
    p14 = launch_case("p14", "nchw", "dx")
    assert "stride_we" in p14["div16"] and p14["constexprs"]["C_IN"] == 3  # (E, 588) rows padded to 592
    assert launch_case("p16", "nchw", "dw")["signature"]["DW"] == "*fp32"  # batch 64: split-K partial sums


def check_wide(case: str, s: dict) -> None:
    """No 16-bit scalar global load anywhere in the kernel, and the main loop's operands come by cp.async:
    16-byte copies for the weight rows and dY always; for the image gather 16-byte copies at /16, 4-byte ones
    at /14 (the most a 28-byte / 84-byte patch row's alignment allows: module docstring). The forward's
    epilogue reads the bias 2 elements per 32-bit load (the MMA result layout): not in the loop."""
    assert s["scalar16"] == 0, s
    assert s["cp_async16"] > 0, s
    if "p16-" in case:
        assert s["cp_async4"] == 0 and s["cp_async8"] == 0, s
    elif not case.startswith("dx"):  # dX reads no image: dY and W only
        assert s["cp_async4"] > 0, s


@pytest.mark.parametrize("case", IDS)
def test_patch_embed_loads_are_wide_and_pipelined(stats, case):
    check_wide(case, stats[case])


@pytest.mark.slow
def test_patch_embed_loads_are_wide_with_the_gpu_machines_triton():
    """The same checks compiled by triton 3.6, the lent GPU machines' version."""
    if not SIDE_TRITON:
        pytest.skip("VITKERNELS_AOT_TRITON_PATH is not set (make test-slow installs triton 3.6 and sets it)")
    version, stats = compile_stats(SIDE_TRITON)
    assert version == os.path.basename(SIDE_TRITON.rstrip("/")).replace("triton-", ""), version
    for case, s in stats.items():
        check_wide(case, s)


if __name__ == "__main__":  # argv[1]: JSON list of launch_case dicts; prints the version and one stats dict per case
    with ProcessPoolExecutor(max_workers=max(2, os.cpu_count() or 1)) as pool:
        results = list(pool.map(_stats_of, json.loads(sys.argv[1])))
    print(json.dumps({"triton": triton.__version__, "results": results}))

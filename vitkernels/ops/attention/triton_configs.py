"""How the flash-attention kernels are tuned: search spaces, heuristic candidates, shared-memory
estimates and tune keys (plain data: no triton import, testable anywhere; see ``ops/tuning.py``).

Heuristics, best guess first. Forward: 128-query tiles with 64 keys for D <= 64 (FlashAttention-2's
Hopper/Ampere sweet spot: the Q tile stays in registers, K/V stream through 3 stages); D = 96/128 keeps
128 x 64 with 8 warps; fp32 runs IEEE dots at half the tile. dK/dV holds two (keys x D) fp32
accumulators, so it takes wider key tiles and narrower query steps; dQ the mirror image. Tiles never
exceed the (bucketed) sequence: N = 49 gets 64 x 64, N = 1 16 x 16.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional

from vitkernels.ops.tuning import (
    ELEMENT_SIZE,
    GPU,
    Config,
    TunedKernel,
    bucket,
    dtype_name,
    product_space,
)


def _c(block_m: int, block_n: int, warps: int, stages: int) -> Config:
    return Config.of(warps, stages, BLOCK_M=block_m, BLOCK_N=block_n)


def block_d(head_dim: int) -> int:
    return max(16, 1 << max(0, head_dim - 1).bit_length())


def shared_memory_estimate(block_m: int, block_n: int, block_d_: int, num_stages: int, elem: int,
                           backward: bool = False) -> int:
    """Bytes of shared memory a config needs, roughly (fitted to ptxas on sm_90 at D=128): forward holds
    the query tile and pipelined key/value tiles; backward holds both tile pairs plus layout shuffles."""
    if backward:
        return elem * block_d_ * (block_m + block_n) * (4 + max(1, num_stages)) // 2
    return elem * block_d_ * (block_m + 2 * block_n * max(1, num_stages))


def _shared(backward: bool):
    def estimate(config: Config, key: Dict[str, Any]) -> int:
        m = config.meta
        return shared_memory_estimate(m["BLOCK_M"], m["BLOCK_N"], block_d(key["D"]), config.num_stages,
                                      ELEMENT_SIZE[key["dtype"]], backward)
    return estimate


def _limits(key: Dict[str, Any]) -> Dict[str, int]:
    return {"BLOCK_M": key["N_Q"], "BLOCK_N": key["N_K"]}


def _older_gpu(configs: List[Config], gpu: GPU) -> List[Config]:
    """Before Ampere there is no cp.async to pipeline: two stages at most."""
    if gpu.capability != (0, 0) and gpu.capability < (8, 0):
        return [c.replace(num_stages=min(c.num_stages, 2)) for c in configs]
    return configs


def fwd_heuristic(key: Dict[str, Any], gpu: GPU) -> List[Config]:
    d, dtype = key["D"], key["dtype"]
    if dtype == "fp32":
        picks = [_c(64, 32, 4, 2), _c(64, 64, 4, 2), _c(32, 64, 4, 2), _c(128, 32, 8, 2)]
    elif d <= 64:
        picks = [_c(128, 64, 4, 3), _c(128, 128, 8, 3), _c(64, 64, 4, 3), _c(128, 32, 4, 4)]
    elif d <= 128:
        picks = [_c(128, 64, 8, 3), _c(128, 32, 4, 3), _c(64, 64, 4, 3), _c(128, 128, 8, 2)]
    else:
        picks = [_c(64, 64, 4, 2), _c(64, 32, 4, 2), _c(128, 32, 8, 2), _c(32, 64, 4, 2)]
    return _older_gpu(picks, gpu)


def dkdv_heuristic(key: Dict[str, Any], gpu: GPU) -> List[Config]:
    """BLOCK_N: the program's key tile (accumulated); BLOCK_M: the query step of its loop."""
    d, dtype = key["D"], key["dtype"]
    if dtype == "fp32":
        picks = [_c(32, 64, 4, 1), _c(64, 64, 8, 1), _c(32, 32, 4, 1), _c(64, 32, 4, 1)]
    elif d <= 64:
        picks = [_c(64, 128, 8, 2), _c(32, 128, 4, 2), _c(64, 64, 4, 2), _c(32, 64, 4, 1)]
    elif d <= 128:
        picks = [_c(64, 64, 8, 2), _c(32, 128, 8, 2), _c(32, 64, 4, 2), _c(64, 128, 8, 1)]
    else:
        picks = [_c(32, 64, 4, 1), _c(32, 32, 4, 1), _c(64, 64, 8, 1)]
    return _older_gpu(picks, gpu)


def dq_heuristic(key: Dict[str, Any], gpu: GPU) -> List[Config]:
    """BLOCK_M: the program's query tile (accumulated); BLOCK_N: the key step of its loop."""
    d, dtype = key["D"], key["dtype"]
    if dtype == "fp32":
        picks = [_c(64, 32, 4, 1), _c(64, 64, 8, 1), _c(32, 32, 4, 1), _c(32, 64, 4, 1)]
    elif d <= 64:
        picks = [_c(128, 64, 8, 2), _c(64, 128, 8, 2), _c(64, 64, 4, 2), _c(128, 32, 4, 2)]
    elif d <= 128:
        picks = [_c(64, 64, 8, 2), _c(128, 64, 8, 2), _c(64, 32, 4, 2), _c(128, 32, 8, 1)]
    else:
        picks = [_c(32, 64, 4, 1), _c(64, 32, 4, 1), _c(64, 64, 8, 1)]
    return _older_gpu(picks, gpu)


def dbias_heuristic(key: Dict[str, Any], gpu: GPU) -> List[Config]:
    """One program per dBias tile: its (M x N) fp32 accumulator and the dS recompute of each step."""
    if key["dtype"] == "fp32" or key["D"] > 128:
        picks = [_c(32, 64, 4, 1), _c(64, 64, 8, 1), _c(32, 32, 4, 1)]
    else:
        picks = [_c(64, 64, 4, 2), _c(64, 128, 8, 2), _c(32, 64, 4, 2), _c(128, 64, 8, 2)]
    return _older_gpu(picks, gpu)


FWD_SPACE = product_space((4, 8), (2, 3, 4), BLOCK_M=(32, 64, 128), BLOCK_N=(32, 64, 128))
BWD_SPACE = product_space((4, 8), (1, 2), BLOCK_M=(32, 64, 128), BLOCK_N=(32, 64, 128))
INTERPRETER_CONFIG = _c(32, 32, 1, 1)

ATTN_FWD = TunedKernel("flash_attn_fwd", FWD_SPACE, fwd_heuristic, _shared(False), _limits, INTERPRETER_CONFIG)
ATTN_BWD_DKDV = TunedKernel("flash_attn_bwd_dkdv", BWD_SPACE, dkdv_heuristic, _shared(True), _limits,
                            INTERPRETER_CONFIG)
ATTN_BWD_DQ = TunedKernel("flash_attn_bwd_dq", BWD_SPACE, dq_heuristic, _shared(True), _limits, INTERPRETER_CONFIG)
ATTN_BWD_DBIAS = TunedKernel("flash_attn_bwd_dbias", BWD_SPACE, dbias_heuristic, _shared(True), _limits,
                             INTERPRETER_CONFIG)
KERNELS = (ATTN_FWD, ATTN_BWD_DKDV, ATTN_BWD_DQ, ATTN_BWD_DBIAS)


def bias_pattern(bias_strides: Optional[tuple]) -> str:
    """Which of (B, H, Nq, Nk) the bias varies along ('1') or broadcasts ('0'): the access pattern and
    the dBias reduction both change with it."""
    if bias_strides is None:
        return "none"
    return "".join("0" if s == 0 else "1" for s in bias_strides)


def tune_key(dtype, n_q: int, n_k: int, head_dim: int, bias_strides: Optional[tuple], dropout: bool,
             **extra: Any) -> Dict[str, Any]:
    """Everything that changes the best config or the compiled code: bucketed sizes, head dim, dtype, the
    bias and its broadcast pattern, dropout (+ kernel-specific flags in ``extra``)."""
    return {"N_Q": bucket(n_q), "N_K": bucket(n_k), "D": head_dim, "dtype": dtype_name(dtype),
            "bias": bias_pattern(bias_strides), "dropout": int(bool(dropout)), **extra}

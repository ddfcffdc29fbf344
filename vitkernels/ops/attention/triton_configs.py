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
    before_ampere,
    bucket,
    dtype_name,
    product_space,
)


# Longest key-grid axis of a rel_pos the triton kernels take: the backward reduces d(rel) per query row in
# registers against a one-hot (keys x axis) tile, padded to a power of two
REL_AXIS_MAX = 128


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


def rope_shared_memory(rows: int, block_d_: int, num_stages: int, elem: int, half: bool) -> int:
    """Bytes a rope adds (fitted to ptxas on sm_90): the pipelined loads of each rotated tile (``rows`` x D)
    also stage its cos and sin, taken as float32 (timm's tables; q's-dtype tables need less), and with the
    half layout its partner half, in every stage but the one being consumed."""
    return max(1, num_stages - 1) * rows * block_d_ * (8 + (elem if half else 0))


def shared_memory_of(backward: bool, rope_rows=None):
    """The spec's shared-memory estimate for attention-shaped kernels (keys with "D" and "dtype", and
    "rope" with one); ``rope_rows``: the rows of the tiles a program rotates in its loop, from the meta."""
    def estimate(config: Config, key: Dict[str, Any]) -> int:
        m = config.meta
        elem = ELEMENT_SIZE[key["dtype"]]
        total = shared_memory_estimate(m["BLOCK_M"], m["BLOCK_N"], block_d(key["D"]), config.num_stages, elem,
                                       backward)
        if key.get("rope") and rope_rows is not None:
            total += rope_shared_memory(rope_rows(m), block_d(key["D"]), config.num_stages, elem,
                                        key["rope"] == "half")
        return total
    return estimate


def _limits(key: Dict[str, Any]) -> Dict[str, int]:
    return {"BLOCK_M": key["N_Q"], "BLOCK_N": key["N_K"]}


# Candidates per kernel, by dtype / head-dim class, as (BLOCK_M, BLOCK_N, warps, stages), best guess first.
# dK/dV: BLOCK_N is the program's key tile (accumulated), BLOCK_M the query step of its loop; dQ the
# mirror image; dBias: one program per (M x N) tile of dBias, recomputing dS at each step.
PICKS = {
    "fwd": {"fp32": [(64, 32, 4, 2), (64, 64, 4, 2), (32, 64, 4, 2), (128, 32, 8, 2)],
            64: [(128, 64, 4, 3), (128, 128, 8, 3), (64, 64, 4, 3), (128, 32, 4, 4)],
            128: [(128, 64, 8, 3), (128, 32, 4, 3), (64, 64, 4, 3), (128, 128, 8, 2)],
            256: [(64, 64, 4, 2), (64, 32, 4, 2), (128, 32, 8, 2), (32, 64, 4, 2)]},
    "dkdv": {"fp32": [(32, 64, 4, 1), (64, 64, 8, 1), (32, 32, 4, 1), (64, 32, 4, 1)],
             64: [(64, 128, 8, 2), (32, 128, 4, 2), (64, 64, 4, 2), (32, 64, 4, 1)],
             128: [(64, 64, 8, 2), (32, 128, 8, 2), (32, 64, 4, 2), (64, 128, 8, 1)],
             256: [(32, 64, 4, 1), (32, 32, 4, 1), (64, 64, 8, 1)]},
    "dq": {"fp32": [(64, 32, 4, 1), (64, 64, 8, 1), (32, 32, 4, 1), (32, 64, 4, 1)],
           64: [(128, 64, 8, 2), (64, 128, 8, 2), (64, 64, 4, 2), (128, 32, 4, 2)],
           128: [(64, 64, 8, 2), (128, 64, 8, 2), (64, 32, 4, 2), (128, 32, 8, 1)],
           256: [(32, 64, 4, 1), (64, 32, 4, 1), (64, 64, 8, 1)]},
    "dbias": {"fp32": [(32, 64, 4, 1), (64, 64, 8, 1), (32, 32, 4, 1)],
              64: [(64, 64, 4, 2), (64, 128, 8, 2), (32, 64, 4, 2), (128, 64, 8, 2)],
              128: [(64, 64, 4, 2), (64, 128, 8, 2), (32, 64, 4, 2), (128, 64, 8, 2)],
              256: [(32, 64, 4, 1), (64, 64, 8, 1), (32, 32, 4, 1)]},
}


# With a rel_pos: the forward's tile also holds the gathered terms' offsets, the dQ program the (M x 64)
# gradient accumulators. Configs without register spills on sm_90 first (ptxas -v of the AOT compile, SAM's
# 64 x 64 grid, D = 64, fp16 and bf16; fp32 dQ: the least spilling); the head-dim rows above still apply
# past D = 128.
REL_PICKS = {
    "fwd": {"fp32": [(64, 32, 8, 2), (32, 64, 4, 2), (64, 32, 4, 2)],
            64: [(128, 64, 8, 3), (64, 64, 4, 3), (128, 64, 8, 2), (64, 64, 4, 2)]},
    "dq": {"fp32": [(32, 32, 8, 1), (64, 16, 8, 1), (64, 32, 8, 1)],
           64: [(64, 32, 8, 2), (32, 64, 8, 2), (64, 64, 8, 2), (128, 32, 8, 2)],
           # a grid axis of 65..128: twice the accumulators; the least spilling (92 bytes at 64 x 32)
           128: [(64, 32, 8, 2), (32, 64, 8, 2), (32, 32, 4, 2)]},
}


# With a rope: each rotated q / k tile also holds its cos and sin (float32) and, in the epilogues, the rotation of
# the gradient. Configs without register spills on sm_90 first (ptxas -v of the AOT compile, bf16, both layouts,
# D = 64 for the 64 rows, D = 80 (a padded 128 block) for the 128 rows, triton 3.8 and the GPU machines' 3.6; fp32,
# whose IEEE dots spill without a rope too, and dBias past D = 64: the least spilling first). The head-dim rows
# above still apply past D = 128.
ROPE_PICKS = {
    "fwd": {"fp32": [(32, 32, 8, 2), (64, 32, 8, 2), (128, 32, 8, 2)],
            64: [(128, 64, 8, 3), (128, 64, 8, 2), (128, 32, 8, 3), (64, 64, 4, 2)],
            128: [(128, 32, 8, 3), (128, 64, 8, 2), (64, 32, 4, 3), (128, 32, 8, 2)]},  # the last: A100's
    "dkdv": {"fp32": [(32, 32, 8, 1), (32, 32, 4, 1)],
             64: [(32, 128, 8, 2), (64, 64, 8, 2), (32, 64, 8, 2), (32, 64, 4, 2)],
             128: [(32, 64, 8, 2), (32, 32, 8, 2), (32, 64, 8, 1)]},
    "dq": {"fp32": [(32, 32, 8, 1), (32, 32, 4, 1)],
           64: [(128, 64, 8, 2), (64, 64, 8, 2), (128, 32, 8, 2), (64, 32, 8, 2)],
           128: [(64, 32, 8, 2), (32, 64, 8, 2)],
           # with a rel_pos gradient too: its (M x 64) accumulators on top (SAM's 64 x 64 grid, D = 64)
           "rel": [(64, 16, 8, 2), (64, 32, 8, 2)]},
    "dbias": {"fp32": [(32, 32, 8, 1), (32, 32, 4, 1)],
              # narrow key tiles: dS is recomputed with both q and k rotated at every step (no spill at D = 64
              # with triton 3.6 and 3.8; 12 to 16 bytes at D = 80)
              64: [(64, 16, 8, 2), (64, 64, 8, 2), (64, 32, 8, 2)],
              128: [(64, 16, 8, 2), (64, 32, 8, 2), (32, 32, 8, 2)]},
}


def heuristic_of(kernel: str):
    """The heuristic of one attention kernel: its PICKS row for the key's dtype and head-dim class (its
    REL_PICKS row with a rel_pos, its ROPE_PICKS row with a rope, up to D = 128), with at most two stages
    before Ampere (no cp.async to pipeline)."""
    table = PICKS[kernel]

    def heuristic(key: Dict[str, Any], gpu: GPU) -> List[Config]:
        d = key["D"]
        row = table["fp32"] if key["dtype"] == "fp32" else table[64 if d <= 64 else 128 if d <= 128 else 256]
        if key.get("rel") and kernel in REL_PICKS and d <= 128:
            wide = key.get("rel_pad", 0) > 64 and kernel == "dq"
            row = REL_PICKS[kernel]["fp32" if key["dtype"] == "fp32" else 128 if wide else 64]
        if key.get("rope") and d <= 128:
            picks = ROPE_PICKS[kernel]
            rel_grad = key.get("rel_pad") and key["dtype"] != "fp32" and "rel" in picks
            row = picks["rel" if rel_grad else "fp32" if key["dtype"] == "fp32" else 64 if d <= 64 else 128]
        return before_ampere([_c(*p) for p in row], gpu)
    return heuristic


FWD_SPACE = product_space((4, 8), (2, 3, 4), BLOCK_M=(32, 64, 128), BLOCK_N=(32, 64, 128))
BWD_SPACE = product_space((4, 8), (1, 2), BLOCK_M=(32, 64, 128), BLOCK_N=(32, 64, 128))
INTERPRETER_CONFIG = _c(32, 32, 1, 1)

# the tiles each kernel rotates in its loop with a rope: key tiles (forward, dQ), query tiles (dK/dV), both (dBias)
ATTN_FWD = TunedKernel("flash_attn_fwd", FWD_SPACE, heuristic_of("fwd"),
                       shared_memory_of(False, lambda m: m["BLOCK_N"]), _limits, INTERPRETER_CONFIG)
# version 2: dK/dV forms S^T = K Q^T; dQ may write dBias (the H200-tuned configs were for the old code)
ATTN_BWD_DKDV = TunedKernel("flash_attn_bwd_dkdv", BWD_SPACE, heuristic_of("dkdv"),
                            shared_memory_of(True, lambda m: m["BLOCK_M"]), _limits, INTERPRETER_CONFIG, version=2)
ATTN_BWD_DQ = TunedKernel("flash_attn_bwd_dq", BWD_SPACE, heuristic_of("dq"),
                          shared_memory_of(True, lambda m: m["BLOCK_N"]), _limits, INTERPRETER_CONFIG, version=2)
ATTN_BWD_DBIAS = TunedKernel("flash_attn_bwd_dbias", BWD_SPACE, heuristic_of("dbias"),
                             shared_memory_of(True, lambda m: m["BLOCK_M"] + m["BLOCK_N"]), _limits,
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

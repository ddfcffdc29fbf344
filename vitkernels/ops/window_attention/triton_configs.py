"""How the window-attention kernels are tuned (plain data, no triton import; see ``ops/tuning.py``).

A window is small (7x7 = 49, 8x8 = 64, 12x12 = 144, Video Swin 8x7x7 = 392 tokens), so tiles are 32 or 64
rows. Windows that fit one 64-token tile take a single key step (stages do not matter, fewer warps
keep more programs resident); bigger windows pipeline their key steps.
"""
from __future__ import annotations

from typing import Any, Dict, List

from vitkernels.ops.attention.triton_configs import block_d, shared_memory_of
from vitkernels.ops.tuning import ELEMENT_SIZE, GPU, Config, TunedKernel, dtype_name, product_space


def _c(block_m: int, block_n: int, warps: int, stages: int) -> Config:
    return Config.of(warps, stages, BLOCK_M=block_m, BLOCK_N=block_n)


def heuristic(key: Dict[str, Any], gpu: GPU) -> List[Config]:
    if key["N_TOK"] <= 64:
        return [_c(64, 64, 4, 1), _c(64, 64, 2, 1), _c(32, 64, 2, 1), _c(32, 32, 2, 1)]
    if key["dtype"] == "fp32":
        return [_c(32, 64, 4, 2), _c(64, 32, 4, 2), _c(32, 32, 2, 2), _c(64, 64, 4, 1)]
    return [_c(64, 64, 4, 2), _c(32, 64, 4, 2), _c(64, 32, 4, 2), _c(32, 32, 2, 2)]


def _limits(key: Dict[str, Any]) -> Dict[str, int]:
    # GRAD_PAD sums padding keys per granule of 16, so no block goes below 32 (tl.dot needs 16 anyway)
    extent = max(32, 1 << max(0, key["N_TOK"] - 1).bit_length())
    return {"BLOCK_M": extent, "BLOCK_N": extent}


SPACE = product_space((2, 4), (1, 2), BLOCK_M=(32, 64), BLOCK_N=(32, 64))
INTERPRETER_CONFIG = _c(32, 32, 1, 1)

WINDOW_FWD = TunedKernel("window_attn_fwd", SPACE, heuristic, shared_memory_of(False), _limits, INTERPRETER_CONFIG)
WINDOW_BWD_DKDV = TunedKernel("window_attn_bwd_dkdv", SPACE, heuristic, shared_memory_of(True), _limits, INTERPRETER_CONFIG)
WINDOW_BWD_DQ = TunedKernel("window_attn_bwd_dq", SPACE, heuristic, shared_memory_of(True), _limits, INTERPRETER_CONFIG)
# v2: one program per (tile, group of windows, head), no longer one per tile walking every window
WINDOW_BWD_DTABLE = TunedKernel("window_attn_bwd_dtable", SPACE, heuristic, shared_memory_of(True), _limits,
                                INTERPRETER_CONFIG, version=2)


def fused_heuristic(key: Dict[str, Any], gpu: GPU) -> List[Config]:
    """The fused backward has one tile per window (its size is the window's, not a choice): only warps and
    whether the next window's loads are pipelined behind this window's math. Cosine attention's backward
    (normalisation, split dots, d logit_scale) takes ~245 registers at 8 warps unpipelined, all 255 when
    pipelined, and spills at 4 warps: 8 warps, 1 stage first; so for head dims over 32 (ptxas -v, sm_90,
    fp16). At D = 32 the plain backward fits 4 warps, 2 stages (254-255 registers, no spill)."""
    if key.get("cosine"):
        return [Config.of(8, 1), Config.of(8, 2), Config.of(4, 2), Config.of(4, 1)]
    if block_d(key["D"]) > 32:
        # D = 40 / 64 (64-wide tiles): at 4 warps it spills 40-290 bytes; at 8 warps, 1 stage, 0-52
        return [Config.of(8, 1), Config.of(8, 2), Config.of(4, 2), Config.of(4, 1)]
    return [Config.of(4, 2), Config.of(8, 2), Config.of(8, 1), Config.of(4, 1)]


def fused_shared_memory(config: Config, key: Dict[str, Any]) -> int:
    """q, k, v, dO tiles per stage plus the (N x N) fp32 tiles the dots exchange through shared memory;
    cosine in fp16 / bf16 adds the q and k residues of its split dots."""
    block = max(16, 1 << max(0, key["N_TOK"] - 1).bit_length())
    elt = ELEMENT_SIZE[key["dtype"]]
    tiles = 6 if key.get("cosine") and key["dtype"] != "fp32" else 4
    return tiles * block * block_d(key["D"]) * elt * max(1, config.num_stages) + 2 * block * block * 4


FUSED_FWD_PICKS = (Config.of(8, 2, BLOCK_W=4), Config.of(4, 2, BLOCK_W=4), Config.of(8, 2, BLOCK_W=8),
                   Config.of(8, 1, BLOCK_W=2))
# the most windows a heuristic pick gives a program: the launcher packs heads only while every pick fills the GPU
FUSED_FWD_MAX_BLOCK_W = max(c.meta["BLOCK_W"] for c in FUSED_FWD_PICKS)


def fused_fwd_heuristic(key: Dict[str, Any], gpu: GPU) -> List[Config]:
    """The fused forward: BLOCK_W windows per program (more amortise the program, fewer fill the GPU); the
    launcher packs HEADS_PER_PROGRAM heads of each window on top, from the shape."""
    return list(FUSED_FWD_PICKS)


WINDOW_FWD_FUSED = TunedKernel("window_attn_fwd_fused", product_space((2, 4, 8), (1, 2), BLOCK_W=(1, 2, 4, 8, 16)),
                               fused_fwd_heuristic, fused_shared_memory, lambda key: {}, Config.of(1, 1, BLOCK_W=2))
WINDOW_BWD_FUSED = TunedKernel("window_attn_bwd_fused", product_space((2, 4, 8), (1, 2)), fused_heuristic,
                               fused_shared_memory, lambda key: {}, Config.of(1, 1),
                               version=2)  # 2: dV / dK / dQ stored as formed
KERNELS = (WINDOW_FWD, WINDOW_BWD_DKDV, WINDOW_BWD_DQ, WINDOW_BWD_DTABLE, WINDOW_FWD_FUSED, WINDOW_BWD_FUSED)


def tune_key(dtype, n_tok: int, head_dim: int, dims: int, shift: bool, table: bool, qkv_bias: bool,
             padded: bool, **extra: Any) -> Dict[str, Any]:
    """Window tokens (exact: few distinct values), head dim, dtype, and every flag that changes the code:
    2-D (roll, then pad) or 3-D (pad, then roll), shift mask, table, qkv_bias, padding."""
    return {"N_TOK": n_tok, "D": head_dim, "dtype": dtype_name(dtype), "dims": dims, "shift": int(shift),
            "table": int(table), "qkv_bias": int(qkv_bias), "padded": int(padded), **extra}

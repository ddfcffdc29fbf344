"""How the patch-embedding GEMM kernels are tuned (plain data, no triton import; see ``ops/tuning.py``).

Forward: M = B * patches rows, N = E columns, K = C * patch features (ViT-B/16: M = 196 B, N = 768,
K = 768). Half precision takes the classic 128 x 128 x 64 tile with 8 warps and 3 stages, then narrower
ones; fp32 (IEEE dots) halves the tile. dW walks all patches (BLOCK_M is its step) for one (E x K) tile;
dX walks E for one (patch x K) tile: the same space serves the three.
"""
from __future__ import annotations

from typing import Any, Dict, List

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


def _c(block_m: int, block_n: int, block_k: int, warps: int, stages: int) -> Config:
    return Config.of(warps, stages, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k)


def heuristic(key: Dict[str, Any], gpu: GPU) -> List[Config]:
    if key["dtype"] == "fp32":
        picks = [_c(64, 64, 32, 4, 3), _c(128, 64, 32, 8, 3), _c(64, 128, 32, 8, 3), _c(32, 64, 32, 4, 2)]
    else:
        picks = [_c(128, 128, 64, 8, 3), _c(128, 64, 32, 4, 4), _c(64, 128, 32, 4, 4), _c(64, 64, 32, 4, 3)]
    return before_ampere(picks, gpu)


def gemm_shared_memory_estimate(block_m: int, block_n: int, block_k: int, num_stages: int, elem: int) -> int:
    """Bytes of shared memory of a pipelined GEMM config: (A tile + B tile) per stage."""
    return elem * (block_m * block_k + block_k * block_n) * max(1, num_stages)


def _shared(config: Config, key: Dict[str, Any]) -> int:
    m = config.meta
    return gemm_shared_memory_estimate(m["BLOCK_M"], m["BLOCK_N"], m["BLOCK_K"], config.num_stages,
                                       ELEMENT_SIZE[key["dtype"]])


def _limits(key: Dict[str, Any]) -> Dict[str, int]:
    return {"BLOCK_M": bucket(key["M"], hi=1 << 30), "BLOCK_N": bucket(key["N_EMB"], hi=1 << 30),
            "BLOCK_K": bucket(key["K_DIM"], hi=1 << 30)}


SPACE = product_space((4, 8), (2, 3, 4), BLOCK_M=(32, 64, 128), BLOCK_N=(64, 128), BLOCK_K=(32, 64))
INTERPRETER_CONFIG = _c(32, 32, 32, 1, 1)

# version 2: the weight read as (E, K) rows in x's k-order, C and K constexprs
PATCH_FWD = TunedKernel("patch_embed_fwd", SPACE, heuristic, _shared, _limits, INTERPRETER_CONFIG, version=2)
PATCH_BWD_DW = TunedKernel("patch_embed_bwd_dw", SPACE, heuristic, _shared, _limits, INTERPRETER_CONFIG, version=2)
PATCH_BWD_DX = TunedKernel("patch_embed_bwd_dx", SPACE, heuristic, _shared, _limits, INTERPRETER_CONFIG, version=2)
KERNELS = (PATCH_FWD, PATCH_BWD_DW, PATCH_BWD_DX)


def tune_key(dtype, m: int, n_emb: int, k_dim: int, **flags: Any) -> Dict[str, Any]:
    """GEMM sizes (M bucketed; E and K exact: a model has few), dtype and the epilogue's flags."""
    return {"M": bucket(m, hi=1 << 20), "N_EMB": n_emb, "K_DIM": k_dim, "dtype": dtype_name(dtype),
            **{k: int(v) for k, v in flags.items()}}

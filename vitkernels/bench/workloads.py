"""Named workloads per op and the candidates timed on them: every vitkernels backend (refusals carry the
backend's reason) and the peers users compare against (torch SDPA with each backend forced,
FlexAttention compiled, timm's eager modules and their torch.compile, eager Conv2d patch embedding,
timm's dense decomposed rel-pos bias into SDPA for SAM's global attention)."""
from __future__ import annotations

import contextlib
import importlib
import math
import os
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

from vitkernels import dispatch
from vitkernels.bench.core import Candidate

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# on unless __main__ gets --no-compile or tools/gpu_check.py runs --quick (each sets its reason)
COMPILE_PEERS = {"enabled": True, "why": "compiled peer off"}


def _compile_skip() -> Optional[str]:
    if COMPILE_PEERS["enabled"]:
        return None
    return COMPILE_PEERS["why"]


@dataclass
class Workload:
    name: str
    shape: str
    params: Dict


def _gpu(device) -> bool:
    return device.type == "cuda"


def _available_gb() -> float:
    """Memory the OS can still hand out (MemAvailable), in GB; inf when unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 2 ** 20
    except OSError:
        pass
    return float("inf")


def _dense_scores_refusal(device, dense_gb: float) -> Optional[str]:
    """Why a candidate that materialises the B*H*N*N scores is not attempted: only on CPU, where an
    allocation beyond what the OS has wakes the OOM killer instead of raising (on a GPU it is attempted
    and an out-of-memory shows as "oom")."""
    if _gpu(device):
        return None
    available = _available_gb()
    if dense_gb > 0.8 * available:
        return (f"would materialise ~{dense_gb:.1f} GB of B*H*N*N scores with {available:.1f} GB available "
                "(not attempted: on CPU that risks the OOM killer)")
    return None


def _vitkernels_backends(op: str, probe, backends, device, extra=None):
    """(name, why it cannot run or None) for each vitkernels backend of ``op`` that was asked for."""
    for name, impl in dispatch.implementations(op).items():
        if backends and name not in backends:
            continue
        reasons = impl.not_supported_reasons(probe)
        if not reasons and extra is not None:
            reasons = extra(name)
        if not reasons and name == "triton" and not _gpu(device):
            reasons = ["the Triton interpreter is a correctness tool, not timed"]
        yield name, "; ".join(reasons) or None


# ---------------------------------------------------------------------------------------------------- attention
# (name, heads, N, D); batch per device. Without --workload, a CPU run leaves out N > CPU_DEFAULT_MAX_TOKENS
# (and says so): naming the set times them too.
CPU_DEFAULT_MAX_TOKENS = 1025
ATTENTION = {
    "vit": [("ViT-S/16@224", 6, 197, 64), ("ViT-B/16@224", 12, 197, 64), ("ViT-L/16@224", 16, 197, 64),
            ("ViT-B/16@384", 12, 577, 64), ("ViT-L/16@384", 16, 577, 64), ("ViT-H/14@224", 16, 257, 80),
            ("ViT-B/16@512", 12, 1025, 64), ("SAM ViT-H global", 16, 4096, 80)],
    "long": [("long 16k", 8, 16384, 64), ("long 64k", 4, 65536, 64)],
}
# attention --workload sam: SAM ViT-B's global attention blocks (1024x1024 image: a 64x64 token grid, 12 heads
# of 64) with their decomposed relative-position bias: (name, heads, (h, w) token grid, D), one workload per
# batch of SAM_BATCHES (CPU: B=1 only, one fwd call is seconds there; --batch picks another).
SAM_REL_POS = [("SAM ViT-B global rel-pos", 12, (64, 64), 64)]
SAM_BATCHES = {"gpu": (1, 2, 4, 8), "cpu": (1,)}


# attention --workload eva: EVA-02's attention with 2-D RoPE (timm's [sin | cos] table, interleaved pairs, the
# class token unrotated): (name, heads, (h, w) token grid, D); batch 64 on a GPU, 2 on CPU.
EVA_ROPE = [("EVA-02-B/14@224 rope", 12, (16, 16), 64), ("EVA-02-L/14@448 rope", 16, (32, 32), 64)]


def attention_workloads(kind: str, device, batch: Optional[int]) -> List[Workload]:
    kinds = ["vit", "long", "sam", "eva"] if kind == "all" else [kind]
    out = []
    for k in kinds:
        if k == "sam":
            out += rel_pos_workloads(device, batch)
            continue
        if k == "eva":
            for name, heads, grid, d in EVA_ROPE:
                b = batch or (64 if _gpu(device) else 2)
                n = 1 + math.prod(grid)
                out.append(Workload(name, f"B={b} H={heads} N={n} D={d} rope={'x'.join(map(str, grid))}+cls",
                                    dict(B=b, H=heads, N=n, D=d, rope_grid=tuple(grid))))
            continue
        for name, heads, n, d in ATTENTION.get(k, []):
            b = batch or (1 if n >= 16384 else (64 if _gpu(device) else 2))
            out.append(Workload(name, f"B={b} H={heads} N={n} D={d}", dict(B=b, H=heads, N=n, D=d)))
    return out


def rel_pos_workloads(device, batch: Optional[int]) -> List[Workload]:
    out = []
    for name, heads, grid, d in SAM_REL_POS:
        n = math.prod(grid)
        for b in (batch,) if batch else SAM_BATCHES["gpu" if _gpu(device) else "cpu"]:
            out.append(Workload(f"{name} B={b}", f"B={b} H={heads} N={n} D={d} rel_pos={'x'.join(map(str, grid))}",
                                dict(B=b, H=heads, N=n, D=d, grid=tuple(grid))))
    return out


def attention_cost(p, mode, dtype, with_bias) -> Tuple[float, float]:
    if "grid" in p:
        return rel_pos_cost(p, mode, dtype)
    fwd = 4.0 * p["B"] * p["H"] * p["N"] ** 2 * p["D"]
    flops = fwd * (3.5 if mode == "fwd+bwd" else 1.0)  # backward = 2.5 x forward (recomputes QK^T)
    elem = torch.tensor([], dtype=dtype).element_size()
    io = 4 * p["B"] * p["H"] * p["N"] * p["D"] * elem + (p["H"] * p["N"] ** 2 * elem if with_bias else 0)
    return flops, io * (2 if mode == "fwd+bwd" else 1)


def _dense_bytes(p, elem, extra=1):
    return p["B"] * p["H"] * p["N"] ** 2 * elem * extra


def attention_candidates(p, dtype, mode, device, backends, with_bias) -> List[Candidate]:
    from vitkernels.ops.attention.checks import check_attention_inputs

    if "grid" in p:  # a decomposed rel-pos workload (--workload sam): its own bias, never a dense --bias one
        return rel_pos_candidates(p, dtype, mode, device, backends)
    if "rope_grid" in p:  # EVA-02's rotary attention (--workload eva)
        return rope_candidates(p, dtype, mode, device, backends)
    B, H, N, D = p["B"], p["H"], p["N"], p["D"]
    grad = mode == "fwd+bwd"

    def make():
        base = torch.randn(B, N, 3, H, D, device=device, dtype=dtype, requires_grad=grad)
        bias = torch.randn(1, H, N, N, device=device, dtype=dtype, requires_grad=grad) if with_bias else None
        return base, bias

    def runner(call):
        def build():
            base, bias = make()
            q, k, v = base.permute(2, 0, 3, 1, 4).unbind(0)
            g = torch.randn(B, H, N, D, device=device, dtype=dtype)

            def run():
                out = call(q, k, v, bias)
                if grad:
                    out.backward(g)
            return run
        return build

    cands = []
    probe = torch.empty(0, device=device, dtype=dtype)
    q_probe = probe.new_empty(1, H, 1, D)
    inputs = check_attention_inputs(q_probe, q_probe, q_probe)
    dense_gb = _dense_bytes(p, probe.element_size(), 3 if grad else 2) / 2 ** 30
    too_dense = _dense_scores_refusal(device, dense_gb)

    def too_big(name):
        return [too_dense] if name == "reference" and too_dense else []

    for name, skip in _vitkernels_backends("flash_attention", inputs, backends, device, too_big):
        cands.append(Candidate(f"vitkernels:{name}", "vitkernels", skip=skip,
                               build=runner(lambda q, k, v, b, _n=name: _flash(q, k, v, b, _n))))
    from torch.nn.attention import SDPBackend, sdpa_kernel

    # every SDPA backend is attempted on every device: one that cannot run these inputs reports the error
    # (and the warnings) torch gave, so the fastest peer is whichever really ran fastest
    for label, be in (("math", SDPBackend.MATH), ("flash", SDPBackend.FLASH_ATTENTION),
                      ("efficient", SDPBackend.EFFICIENT_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION)):
        skip = too_dense if label == "math" else None

        def call(q, k, v, b, _be=be):
            with sdpa_kernel([_be]):
                return F.scaled_dot_product_attention(q, k, v, attn_mask=b)
        cands.append(Candidate(f"sdpa:{label}", "peer", build=runner(call), skip=skip))
    cands.append(_flex_candidate(runner, device, grad, with_bias))
    return cands


def _flash(q, k, v, bias, backend):
    from vitkernels import flash_attention

    return flash_attention(q, k, v, bias=bias, backend=backend)


def _compiled_flex(device, grad):
    """(compiled flex_attention, None), or (None, why it cannot run here)."""
    try:
        from torch.nn.attention.flex_attention import flex_attention
    except ImportError as exc:
        return None, f"FlexAttention unavailable ({exc})"
    if _compile_skip():
        return None, _compile_skip()
    return torch.compile(flex_attention, dynamic=False), None


def _flex_candidate(runner, device, grad, with_bias) -> Candidate:
    compiled, why = _compiled_flex(device, grad)
    if why:
        return Candidate("flex (compiled)", "peer", skip=why)

    def call(q, k, v, bias):
        if bias is None:
            return compiled(q, k, v)

        def score_mod(score, b, h, q_idx, kv_idx):
            return score + bias[0, h, q_idx, kv_idx]
        return compiled(q, k, v, score_mod=score_mod)
    return Candidate("flex (compiled)", "peer", build=runner(call))


# ---------------------------------------------------------------------------------------------------- rel-pos
# SAM's global attention with its decomposed relative-position bias. Every candidate starts from the same
# (B, N, 3, H, D) qkv and the two (2 * side - 1, D) tables, and its timed call builds the bias terms from the
# queries (the einsums are part of every peer's work too): vitkernels adds the small per-axis terms
# (decomposed_rel_pos) inside the kernel; timm's path forms the dense (B*H, N, N) bias with
# get_decomposed_rel_pos_bias and hands it to SDPA (each backend forced) or to its eager math. In fwd+bwd the
# gradients reach qkv and both tables.

# how many dense (B, H, N, N) tensors each candidate holds at once (bias, scores, probabilities, gradients),
# (fwd, fwd+bwd), for the CPU refusal: the torch CPU allocator's peak at B=1 H=12 N=1024 fp32 was 2.1/- (fused
# SDPA; CPU flash refuses the bias gradient), 3.3/3.5 (math), 3.1/3.3 (eager), 1.1/2.4 (compiled), 4.1/6.3
# (vitkernels' reference) matrices; rounded up
REL_POS_DENSE = {"sdpa fused": (2.5, 4), "sdpa:math": (4, 4.5), "eager": (3.5, 4), "compiled": (1.5, 3),
                 "reference": (4.5, 7)}


def _rel_pos_inputs(p, dtype, device, grad):
    """(qkv (B, N, 3, H, D), table_h, table_w), seeded: the same numbers for every candidate."""
    B, H, N, D = p["B"], p["H"], p["N"], p["D"]
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(B, N, 3, H, D, generator=gen, dtype=torch.float32)
    tables = [torch.randn(2 * side - 1, D, generator=gen, dtype=torch.float32) * 0.1 for side in p["grid"]]
    return [t.to(device=device, dtype=dtype).requires_grad_(grad) for t in [base] + tables]


def sam_vitkernels(q, k, v, table_h, table_w, grid, backend=None):
    """vitkernels: the per-axis terms (decomposed_rel_pos) added inside flash_attention's tiles."""
    from vitkernels import decomposed_rel_pos, flash_attention

    return flash_attention(q, k, v, rel_pos=decomposed_rel_pos(q, grid, grid, table_h, table_w), backend=backend)


def timm_rel_pos_bias(q, table_h, table_w, grid):
    """timm's samvit bias: get_decomposed_rel_pos_bias on the (B*H, N, D) queries (unscaled) gives the dense
    (B*H, N, N) bias; returned as its (B, H, N, N) view."""
    from timm.models.vision_transformer_sam import get_decomposed_rel_pos_bias

    B, H, N, D = q.shape
    return get_decomposed_rel_pos_bias(q.reshape(B * H, N, D), table_h, table_w, grid, grid).view(B, H, N, N)


def sam_timm_sdpa(q, k, v, table_h, table_w, grid, sdpa_backend=None):
    """timm's fused path: SDPA with the dense bias as attn_mask (timm calls it on (B*H, N, D); the (B, H, N, D)
    views here are the same math, and the layout SDPA's fused CUDA kernels need: they refuse 3-D inputs)."""
    bias = timm_rel_pos_bias(q, table_h, table_w, grid)
    if sdpa_backend is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    from torch.nn.attention import sdpa_kernel

    with sdpa_kernel([sdpa_backend]):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)


def sam_timm_eager(q, k, v, table_h, table_w, grid):
    """timm's eager path (fused_attn off): q * scale @ k^T + bias, softmax, @ v."""
    bias = timm_rel_pos_bias(q, table_h, table_w, grid)
    attn = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
    attn = attn + bias
    return attn.softmax(dim=-1) @ v


def rel_pos_cost(p, mode, dtype) -> Tuple[float, float]:
    """FLOPs: QK^T and PV plus the two einsums of the terms; bytes: what a fused kernel must move (q, k, v,
    out and the terms; the dense peers move far more)."""
    B, H, N, D = p["B"], p["H"], p["N"], p["D"]
    terms = sum(p["grid"])
    fwd = 4.0 * B * H * N ** 2 * D + 2.0 * B * H * N * terms * D
    flops = fwd * (3.5 if mode == "fwd+bwd" else 1.0)
    elem = torch.tensor([], dtype=dtype).element_size()
    io = (4 * B * H * N * D + B * H * N * terms) * elem
    return flops, io * (2 if mode == "fwd+bwd" else 1)


def _timm_missing() -> Optional[str]:
    try:
        importlib.import_module("timm.models.vision_transformer_sam")
    except ImportError as exc:
        return f"timm unavailable ({exc})"
    return None


def rel_pos_candidates(p, dtype, mode, device, backends) -> List[Candidate]:
    from torch.nn.attention import SDPBackend

    from vitkernels.ops.attention.checks import RelPos, check_attention_inputs

    B, H, N, D, grid = p["B"], p["H"], p["N"], p["D"], tuple(p["grid"])
    grad = mode == "fwd+bwd"

    def runner(call):
        def build():
            base, table_h, table_w = _rel_pos_inputs(p, dtype, device, grad)
            q, k, v = base.permute(2, 0, 3, 1, 4).unbind(0)  # views, as a block's qkv Linear leaves them
            g = torch.randn(B, H, N, D, device=device, dtype=dtype)

            def run():
                out = call(q, k, v, table_h, table_w, grid)
                if grad:
                    out.backward(g)
            return run
        return build

    matrix_gb = _dense_bytes(p, torch.tensor([], dtype=dtype).element_size()) / 2 ** 30

    def too_dense(kind):
        return _dense_scores_refusal(device, matrix_gb * REL_POS_DENSE[kind][1 if grad else 0])

    # the probe: zero-size-in-memory views of the real shapes, so every backend's limits see the key grid
    empty = torch.empty(1, 1, 1, D, device=device, dtype=dtype)
    qkv = empty.expand(B, H, N, D)
    terms = [empty[..., :1].expand(B, H, N, side) for side in grid]
    probe = check_attention_inputs(qkv, qkv, qkv, rel_pos=RelPos(*terms))

    def too_big(name):
        return [too_dense("reference")] if name == "reference" and too_dense("reference") else []

    cands = []
    for name, skip in _vitkernels_backends("flash_attention", probe, backends, device, too_big):
        cands.append(Candidate(f"vitkernels:{name}", "vitkernels", skip=skip,
                               build=runner(lambda *a, _n=name: sam_vitkernels(*a, backend=_n))))

    missing = _timm_missing()
    # every SDPA backend is attempted, as for the other attention workloads: one that cannot take these inputs
    # (a float mask that needs a gradient, on CPU flash) reports torch's error
    for label, be in (("math", SDPBackend.MATH), ("flash", SDPBackend.FLASH_ATTENTION),
                      ("efficient", SDPBackend.EFFICIENT_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION)):
        skip = missing or too_dense("sdpa:math" if label == "math" else "sdpa fused")
        cands.append(Candidate(f"timm bias + sdpa:{label}", "peer", skip=skip,
                               build=runner(lambda *a, _be=be: sam_timm_sdpa(*a, sdpa_backend=_be))))
    cands.append(Candidate("timm eager math", "peer", skip=missing or too_dense("eager"), build=runner(sam_timm_eager)))

    def compiled_build():
        return runner(torch.compile(sam_timm_sdpa, dynamic=False))()
    cands.append(Candidate("timm bias + sdpa (compiled)", "peer", build=compiled_build,
                           skip=missing or _compile_skip() or too_dense("compiled")))
    return cands


# EVA-02's attention with 2-D RoPE. Every candidate starts from the same (B, N, 3, H, D) qkv and timm's
# RotaryEmbeddingCat table ((N - 1, 2D), [sin | cos], fp32 as timm keeps it): vitkernels rotates q and k inside
# the kernels (flash_attention(rope=...)); timm's path (EvaAttention) rotates them with apply_rot_embed_cat after
# the class token, concatenates, and calls SDPA (each backend forced), its eager math, or all of it compiled.


def _rope_table(p, device):
    from timm.layers import RotaryEmbeddingCat

    return RotaryEmbeddingCat(p["D"], in_pixels=False).get_embed(p["rope_grid"]).to(device)


def eva_vitkernels(q, k, v, emb, backend=None):
    from vitkernels import Rope, flash_attention

    sin, cos = emb.chunk(2, dim=-1)
    return flash_attention(q, k, v, rope=Rope(cos, sin, prefix=1), backend=backend)


def _timm_rotated(q, k, v, emb):
    from timm.layers import apply_rot_embed_cat

    q = torch.cat([q[:, :, :1], apply_rot_embed_cat(q[:, :, 1:], emb)], dim=2).type_as(v)
    k = torch.cat([k[:, :, :1], apply_rot_embed_cat(k[:, :, 1:], emb)], dim=2).type_as(v)
    return q, k


def eva_timm_sdpa(q, k, v, emb, sdpa_backend=None):
    """timm's EvaAttention (fused_attn): rotate q and k after the class token, then SDPA."""
    q, k = _timm_rotated(q, k, v, emb)
    if sdpa_backend is None:
        return F.scaled_dot_product_attention(q, k, v)
    from torch.nn.attention import sdpa_kernel

    with sdpa_kernel([sdpa_backend]):
        return F.scaled_dot_product_attention(q, k, v)


def eva_timm_eager(q, k, v, emb):
    """timm's EvaAttention with fused_attn off: rotate, q * scale @ k^T, softmax, @ v."""
    q, k = _timm_rotated(q, k, v, emb)
    return ((q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)).softmax(dim=-1) @ v


def rope_candidates(p, dtype, mode, device, backends) -> List[Candidate]:
    from torch.nn.attention import SDPBackend

    from vitkernels.ops.attention.checks import Rope, check_attention_inputs

    B, H, N, D = p["B"], p["H"], p["N"], p["D"]
    grad = mode == "fwd+bwd"
    missing = _timm_missing()

    def runner(call):
        def build():
            torch.manual_seed(0)
            base = torch.randn(B, N, 3, H, D, device=device, dtype=dtype, requires_grad=grad)
            emb = _rope_table(p, device)
            q, k, v = base.permute(2, 0, 3, 1, 4).unbind(0)  # views, as EvaAttention's qkv Linear leaves them
            g = torch.randn(B, H, N, D, device=device, dtype=dtype)

            def run():
                out = call(q, k, v, emb)
                if grad:
                    out.backward(g)
            return run
        return build

    dense_gb = _dense_bytes(p, torch.tensor([], dtype=dtype).element_size(), 3 if grad else 2) / 2 ** 30
    too_dense = _dense_scores_refusal(device, dense_gb)
    empty = torch.empty(1, 1, 1, D, device=device, dtype=dtype)
    table = torch.empty(1, D, device=device).expand(N - 1, D)
    probe = check_attention_inputs(empty.expand(B, H, N, D), empty.expand(B, H, N, D), empty.expand(B, H, N, D),
                                   rope=Rope(table, table, prefix=1))

    def too_big(name):
        return [too_dense] if name == "reference" and too_dense else []

    cands = []
    for name, skip in _vitkernels_backends("flash_attention", probe, backends, device, too_big):
        cands.append(Candidate(f"vitkernels:{name}", "vitkernels", skip=skip or missing,
                               build=runner(lambda *a, _n=name: eva_vitkernels(*a, backend=_n))))
    for label, be in (("math", SDPBackend.MATH), ("flash", SDPBackend.FLASH_ATTENTION),
                      ("efficient", SDPBackend.EFFICIENT_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION)):
        cands.append(Candidate(f"timm rope + sdpa:{label}", "peer", skip=missing or (too_dense if label == "math" else None),
                               build=runner(lambda *a, _be=be: eva_timm_sdpa(*a, sdpa_backend=_be))))
    cands.append(Candidate("timm rope + eager math", "peer", skip=missing or too_dense, build=runner(eva_timm_eager)))

    def compiled_build():
        return runner(torch.compile(eva_timm_sdpa, dynamic=False))()
    cands.append(Candidate("timm rope + sdpa (compiled)", "peer", build=compiled_build,
                           skip=missing or _compile_skip()))
    return cands


# ---------------------------------------------------------------------------------------------------- window
# (name, map (T,)H,W, C, heads, window, shift)
WINDOW = {
    "swin": [("Swin-T s1", (56, 56), 96, 3, 7, 3), ("Swin-T s2", (28, 28), 192, 6, 7, 3),
             ("Swin-T s3", (14, 14), 384, 12, 7, 3), ("Swin-T s4", (7, 7), 768, 24, 7, 3),
             ("Swin-B@384 s1", (96, 96), 128, 4, 12, 6), ("Swin-B@384 s3", (24, 24), 512, 16, 12, 6)],
    "video": [("VideoSwin-T s1", (8, 56, 56), 96, 3, (8, 7, 7), (4, 3, 3)),
              ("VideoSwin-T s3", (8, 14, 14), 384, 12, (8, 7, 7), (4, 3, 3))],
    # Swin V2 (scaled cosine attention, the CPB-MLP table): swinv2_tiny_window8_256's stages 1 and 3
    "swinv2": [("SwinV2-T/w8 s1", (64, 64), 96, 3, 8, 4), ("SwinV2-T/w8 s3", (16, 16), 384, 12, 8, 4)],
}


def window_workloads(kind: str, device, batch: Optional[int]) -> List[Workload]:
    kinds = ["swin", "video", "swinv2"] if kind == "all" else [kind]
    out = []
    for k in kinds:
        for name, spatial, c, heads, w, s in WINDOW.get(k, []):
            b = batch or (64 if _gpu(device) else 1)
            if not _gpu(device) and len(spatial) == 3 and not batch:
                b = 1
            params = dict(B=b, spatial=spatial, C=c, heads=heads, window=w, shift=s)
            if k == "swinv2":
                params["cosine"] = True
            out.append(Workload(name, f"B={b} map={'x'.join(map(str, spatial))} C={c} heads={heads} w={w} s={s}"
                                + (" cosine" if k == "swinv2" else ""), params))
    return out


def window_cost(p, mode, dtype) -> Tuple[float, float]:
    nd = len(p["spatial"])
    window = (p["window"],) * nd if isinstance(p["window"], int) else p["window"]
    n_tok = math.prod(window)
    tokens = p["B"] * math.prod(math.ceil(s / w) * w for s, w in zip(p["spatial"], window))
    attn = 4.0 * tokens * n_tok * p["C"]  # per token: N keys x 2 products x C channels (all heads)
    linear = 2.0 * p["B"] * math.prod(p["spatial"]) * p["C"] * 3 * p["C"]
    flops = (attn + linear) * (3.0 if mode == "fwd+bwd" else 1.0)
    elem = torch.tensor([], dtype=dtype).element_size()
    io = p["B"] * math.prod(p["spatial"]) * p["C"] * 5 * elem  # x, qkv (3C), out
    return flops, io * (2 if mode == "fwd+bwd" else 1)


def window_candidates(p, dtype, mode, device, backends) -> List[Candidate]:
    from vitkernels import window_attention
    from vitkernels.ops.window_attention.checks import check_window_inputs

    if p.get("cosine"):
        return swinv2_candidates(p, dtype, mode, device, backends)

    B, spatial, C, heads = p["B"], p["spatial"], p["C"], p["heads"]
    nd = len(spatial)
    window = (p["window"],) * nd if isinstance(p["window"], int) else tuple(p["window"])
    shift = (p["shift"],) * nd if isinstance(p["shift"], int) else tuple(p["shift"])
    grad = mode == "fwd+bwd"
    rows = math.prod(2 * w - 1 for w in window)

    def params():
        torch.manual_seed(0)
        x = torch.randn(B, *spatial, C, device=device, dtype=dtype, requires_grad=grad)
        lin = torch.nn.Linear(C, 3 * C, device=device, dtype=dtype)
        table = torch.nn.Parameter(torch.randn(rows, heads, device=device, dtype=dtype) * 0.02)
        return x, lin, table

    def with_backward(fn, x):
        g = torch.randn(*x.shape[:-1], C, device=device, dtype=dtype)

        def run():
            out = fn()
            if grad:
                out.backward(g)
        return run

    cands = []
    probe = check_window_inputs(torch.empty(B, *spatial, 3 * C, device=device, dtype=dtype), heads, window, shift,
                                torch.empty(rows, heads, device=device, dtype=dtype), None)
    for name, skip in _vitkernels_backends("window_attention", probe, backends, device):
        def build(_name=name):
            x, lin, table = params()
            return with_backward(lambda: window_attention(lin(x), num_heads=heads, window_size=window, shift_size=shift,
                                                          rel_pos_bias=table, qkv_bias=lin.bias, backend=_name), x)
        cands.append(Candidate(f"vitkernels:{name}", "vitkernels", build=build, skip=skip))

    if nd == 2:
        def timm_block(compiled):
            def build():
                from timm.models.swin_transformer import SwinTransformerBlock

                x, _, _ = params()
                blk = SwinTransformerBlock(C, spatial, num_heads=heads, window_size=window, shift_size=shift,
                                           device=device, dtype=dtype)
                blk.attn.proj = torch.nn.Identity()  # the op stops before proj
                fn = torch.compile(blk._attn) if compiled else blk._attn
                return with_backward(lambda: fn(x), x)
            return build
        cands.append(Candidate("timm eager", "peer", build=timm_block(False)))
        cands.append(Candidate("timm eager (compiled)", "peer", build=timm_block(True), skip=_compile_skip()))
        cands.append(_flex_window_candidate(params, with_backward, spatial, C, heads, window, shift, device, grad))
    else:
        cands.append(Candidate("timm eager", "peer", skip="timm has no Video Swin block"))

        def reference_build():
            from vitkernels.ops.window_attention.reference import window_attention_reference

            x, lin, table = params()
            return with_backward(lambda: window_attention_reference(lin(x), heads, window, shift, table, lin.bias), x)
        cands.append(Candidate("eager roll/pad/partition", "peer", build=reference_build))
    return cands


def swinv2_candidates(p, dtype, mode, device, backends) -> List[Candidate]:
    """Swin V2's block attention (before proj) on one timm SwinTransformerV2Block's parameters: vitkernels takes
    the block's qkv weight, q/k/v biases, CPB-MLP table (16 * sigmoid, computed per call as timm does) and logit
    scale into window_attention(cosine=True); timm runs the block's _attn, eager and compiled."""
    from vitkernels import window_attention
    from vitkernels.ops.window_attention.checks import check_window_inputs

    B, spatial, C, heads, window, shift = p["B"], p["spatial"], p["C"], p["heads"], p["window"], p["shift"]
    grad = mode == "fwd+bwd"
    missing = None
    try:
        importlib.import_module("timm.models.swin_transformer_v2")
    except ImportError as exc:
        missing = f"timm unavailable ({exc})"

    def block_and_input():
        from timm.models.swin_transformer_v2 import SwinTransformerV2Block

        torch.manual_seed(0)
        blk = SwinTransformerV2Block(C, spatial, num_heads=heads, window_size=window, shift_size=shift,
                                     device=device, dtype=dtype)
        blk.attn.proj = torch.nn.Identity()  # the op stops before proj
        x = torch.randn(B, *spatial, C, device=device, dtype=dtype, requires_grad=grad)
        return blk, x

    def timed(fn, x):
        g = torch.randn(*x.shape[:-1], C, device=device, dtype=dtype)

        def run():
            out = fn()
            if grad:
                out.backward(g)
        return run

    def ours(blk, x, backend):
        attn = blk.attn
        qkv_bias = torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))
        table = 16 * torch.sigmoid(attn.cpb_mlp(attn.relative_coords_table).view(-1, heads))
        return window_attention(F.linear(x, attn.qkv.weight, qkv_bias), num_heads=heads, window_size=blk.window_size,
                                shift_size=blk.shift_size, rel_pos_bias=table, qkv_bias=qkv_bias, cosine=True,
                                logit_scale=attn.logit_scale, backend=backend)

    rows = math.prod(2 * w - 1 for w in (window,) * len(spatial))
    probe = check_window_inputs(torch.empty(B, *spatial, 3 * C, device=device, dtype=dtype), heads, window, shift,
                                torch.empty(rows, heads, device=device, dtype=dtype), None, None, True,
                                torch.empty(heads, 1, 1, device=device, dtype=torch.float32))
    cands = []
    for name, skip in _vitkernels_backends("window_attention", probe, backends, device):
        def build(_name=name):
            blk, x = block_and_input()
            return timed(lambda: ours(blk, x, _name), x)
        cands.append(Candidate(f"vitkernels:{name}", "vitkernels", build=build, skip=skip or missing))

    def timm_build(compiled):
        def build():
            blk, x = block_and_input()
            fn = torch.compile(blk._attn) if compiled else blk._attn
            return timed(lambda: fn(x), x)
        return build
    cands.append(Candidate("timm eager", "peer", build=timm_build(False), skip=missing))
    cands.append(Candidate("timm eager (compiled)", "peer", build=timm_build(True), skip=missing or _compile_skip()))
    return cands


def _flex_window_candidate(params, with_backward, spatial, C, heads, window, shift, device, grad) -> Candidate:
    compiled, why = _compiled_flex(device, grad)
    if why:
        return Candidate("flex (compiled)", "peer", skip=why)
    from vitkernels.ops.window_attention import geometry
    from vitkernels.ops.window_attention.reference import _partition, _reverse

    def build():
        x, lin, table = params()
        win, sh = geometry.resolve_window_shift(spatial, window, shift)
        padded = geometry.padded_size(spatial, win)
        n = math.prod(win)
        index = geometry.relative_position_index(win, device)
        ids = _partition(geometry.shift_region_ids(padded, win, sh, device)[None, ..., None], win)[0, :, :, 0]
        num_win = ids.shape[0]

        def fn():
            qkv = lin(x)
            if any(sh):
                qkv = torch.roll(qkv, [-s for s in sh], (1, 2))
            qkv = F.pad(qkv, (0, 0, 0, padded[1] - spatial[1], 0, padded[0] - spatial[0]))
            w = _partition(qkv, win)  # B, nW, N, 3C
            Bn = w.shape[0] * w.shape[1]
            q, k, v = w.reshape(Bn, n, 3, heads, C // heads).permute(2, 0, 3, 1, 4).unbind(0)

            def score_mod(score, b, h, q_idx, kv_idx):
                rel = table[index[q_idx, kv_idx], h]
                same = ids[b % num_win, q_idx] == ids[b % num_win, kv_idx]
                return torch.where(same, score + rel, -float("inf"))
            out = compiled(q, k, v, score_mod=score_mod)
            out = out.permute(0, 2, 1, 3).reshape(x.shape[0], num_win, n, C)
            out = _reverse(out, win, padded)[:, : spatial[0], : spatial[1]]
            return torch.roll(out, list(sh), (1, 2)) if any(sh) else out
        return with_backward(fn, x)
    return Candidate("flex (compiled)", "peer", build=build)


# ---------------------------------------------------------------------------------------------------- patch
PATCH = {
    "vit": [("ViT-B/16@224", (3, 224, 224), (16, 16), 768, 1), ("ViT-L/14@336", (3, 336, 336), (14, 14), 1024, 1),
            ("Swin patch4", (3, 224, 224), (4, 4), 96, 0)],
    "video": [("video 16x224 tubelet 2x16x16", (3, 16, 224, 224), (2, 16, 16), 768, 0)],
}


def patch_workloads(kind: str, device, batch: Optional[int]) -> List[Workload]:
    kinds = ["vit", "video"] if kind == "all" else [kind]
    out = []
    for k in kinds:
        for name, chw, patch, e, prefix in PATCH.get(k, []):
            b = batch or ((256 if len(chw) == 3 else 16) if _gpu(device) else (8 if len(chw) == 3 else 1))
            out.append(Workload(name, f"B={b} x={'x'.join(map(str, chw))} patch={'x'.join(map(str, patch))} E={e}",
                                dict(B=b, chw=chw, patch=patch, E=e, P=prefix)))
    return out


def patch_cost(p, mode, dtype) -> Tuple[float, float]:
    num = math.prod(s // q for s, q in zip(p["chw"][1:], p["patch"]))
    k = p["chw"][0] * math.prod(p["patch"])
    flops = 2.0 * p["B"] * num * k * p["E"] * (2.0 if mode == "fwd+bwd" else 1.0)  # + dW (images need no dX)
    elem = torch.tensor([], dtype=dtype).element_size()
    io = (p["B"] * math.prod(p["chw"]) + p["E"] * k + p["B"] * (num + p["P"]) * p["E"]) * elem
    return flops, io * (2 if mode == "fwd+bwd" else 1)


def patch_candidates(p, dtype, mode, device, backends) -> List[Candidate]:
    from vitkernels import patch_embed
    from vitkernels.ops.patch_embed.checks import check_patch_embed_inputs

    B, chw, patch, E, P = p["B"], p["chw"], p["patch"], p["E"], p["P"]
    num = math.prod(s // q for s, q in zip(chw[1:], patch))
    grad = mode == "fwd+bwd"

    def params():
        x = torch.randn(B, *chw, device=device, dtype=dtype)
        w = (torch.randn(E, chw[0], *patch, device=device, dtype=dtype) * 0.02).requires_grad_(grad)
        b = torch.zeros(E, device=device, dtype=dtype, requires_grad=grad)
        pos = (torch.randn(1, P + num, E, device=device, dtype=dtype) * 0.02).requires_grad_(grad)
        cls = torch.zeros(1, P, E, device=device, dtype=dtype, requires_grad=grad) if P else None
        return x, w, b, pos, cls

    def runner(fn):
        def build():
            x, w, b, pos, cls = params()
            g = torch.randn(B, P + num, E, device=device, dtype=dtype)

            def run():
                out = fn(x, w, b, pos, cls)
                if grad:
                    out.backward(g)
            return run
        return build

    probe_x = torch.empty(1, *chw, device=device, dtype=dtype)
    probe = check_patch_embed_inputs(probe_x, torch.empty(E, chw[0], *patch, device=device, dtype=dtype))
    cands = []
    for name, skip in _vitkernels_backends("patch_embed", probe, backends, device):
        cands.append(Candidate(f"vitkernels:{name}", "vitkernels", skip=skip,
                               build=runner(lambda x, w, b, pos, cls, _n=name: patch_embed(
                                   x, w, b, pos_embed=pos, prefix_tokens=cls, backend=_n))))

    def eager(x, w, b, pos, cls):
        conv = F.conv2d if x.dim() == 4 else F.conv3d
        t = conv(x, w, b, stride=patch).flatten(2).transpose(1, 2)
        if cls is not None:
            t = torch.cat([cls.expand(x.shape[0], -1, -1), t], dim=1)
        return t + pos
    cands.append(Candidate("eager conv+cat+pos", "peer", build=runner(eager)))
    compiled = torch.compile(eager)
    cands.append(Candidate("eager (compiled)", "peer", build=runner(lambda *a: compiled(*a)), skip=_compile_skip()))
    return cands


# ---------------------------------------------------------------------------------------------------- model
MODELS = {"vit": ["vit_base_patch16_224"], "swin": ["swin_tiny_patch4_window7_224"],
          "all": ["vit_base_patch16_224", "swin_tiny_patch4_window7_224"]}


def model_workloads(kind: str, device, batch: Optional[int]) -> List[Workload]:
    names = MODELS.get(kind, MODELS["all"])
    b = batch or (64 if _gpu(device) else 2)
    return [Workload(n, f"B={b} 3x224x224", dict(B=b, name=n)) for n in names]


@contextlib.contextmanager
def _forced_backend(name: Optional[str]):
    """Every vitkernels op called inside runs on backend ``name`` (VITKERNELS_BACKEND), None: dispatch picks."""
    if name is None:
        yield
        return
    saved = os.environ.get(dispatch.ENV_VAR)
    os.environ[dispatch.ENV_VAR] = name
    try:
        yield
    finally:
        if saved is None:
            del os.environ[dispatch.ENV_VAR]
        else:
            os.environ[dispatch.ENV_VAR] = saved


def model_candidates(p, dtype, mode, device, backends) -> List[Candidate]:
    """vitkernels.models eager and compiled (dispatch picks, or each of ``backends`` forced on every op)
    against timm eager (SDPA) and timm compiled: one train step (fwd+bwd) or inference call per timing."""
    import timm

    from vitkernels import models

    grad = mode == "fwd+bwd"

    def runner(make, compiled=False, backend=None):
        def build():
            torch.manual_seed(0)
            model = make().to(device=device, dtype=dtype)
            model.train(grad)
            fn = torch.compile(model) if compiled else model
            x = torch.randn(p["B"], 3, 224, 224, device=device, dtype=dtype)

            def run():
                with _forced_backend(backend):
                    if grad:
                        fn(x).float().mean().backward()
                    else:
                        with torch.no_grad():
                            fn(x)
            return run
        return build

    ours = lambda: models.create_model(p["name"])  # noqa: E731
    cands = []
    for backend in backends or [None]:
        label = "vitkernels.models" + (f" [{backend}]" if backend else "")
        why = None
        if backend is not None:
            ok, reason = dispatch.backend_environment(backend)
            why = None if ok else reason
            if backend == "triton" and not _gpu(device):
                why = "the Triton interpreter is a correctness tool, not timed"
        cands.append(Candidate(label, "vitkernels", build=runner(ours, backend=backend), skip=why))
        cands.append(Candidate(f"{label} + torch.compile", "vitkernels", build=runner(ours, True, backend),
                               skip=why or _compile_skip()))
    cands += [
        Candidate("timm (SDPA)", "peer", build=runner(lambda: timm.create_model(p["name"], pretrained=False))),
        Candidate("timm + torch.compile", "peer", skip=_compile_skip(),
                  build=runner(lambda: timm.create_model(p["name"], pretrained=False), True)),
    ]
    return cands


def model_cost(p, mode, dtype) -> Tuple[float, float]:
    return 0.0, 0.0  # reported as images/s instead


OPS: Dict[str, Tuple[Callable, Callable, Callable]] = {
    "attention": (attention_workloads, attention_candidates, attention_cost),
    "window": (window_workloads, window_candidates, window_cost),
    "patch": (patch_workloads, patch_candidates, patch_cost),
    "model": (model_workloads, model_candidates, model_cost),
}
WORKLOAD_KINDS = {"attention": ("vit", "long", "sam", "eva", "all"), "window": ("swin", "video", "swinv2", "all"),
                  "patch": ("vit", "video", "all"), "model": ("vit", "swin", "all")}
DEFAULT_WORKLOAD = {"attention": "vit", "window": "swin", "patch": "vit", "model": "all"}

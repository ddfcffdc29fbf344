"""The window-attention kernels' loads and registers as the compiler emits them for sm_90, with the run-time
specializations of a real launch (tests/triton_aot.py): the cases are recorded from the launchers themselves
(window_attention forward and backward on CPU tensors with every launch captured, not run), so the kernel,
its constexprs (HEADS_PER_PROGRAM, STRIDE_ALIGN, ...), the integers equal to 1 and those divisible by 16
are exactly what a GPU launch of that shape would compile; the config is the heuristic's first pick on an
H100. Compiled in subprocesses without the interpreter (~10-60 s per kernel on a small machine)."""
import os

import pytest
import torch

import vitkernels
from vitkernels import dispatch
from vitkernels.ops import tuning

triton = pytest.importorskip("triton")
if torch.cuda.is_available():
    pytest.skip("a GPU is present: the gpu-marked tests compile and run the kernels for real", allow_module_level=True)
if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("records the launches by driving the launchers under the interpreter", allow_module_level=True)

from tests.ops.test_triton_compile import H100, run_ptx_suite, run_usage_suite as usage  # noqa: E402

WIN = "vitkernels.ops.window_attention.triton"


# What a launch without a config (the blocked backward's untuned rowsum kernel) compiles with: Triton's defaults
DEFAULT_WARPS, DEFAULT_STAGES = 4, 3


def _case(kernel, dtype, args, constexprs, num_warps, num_stages):
    """A specialized_ptx_stats / register_usage keyword dict of a launch of ``kernel`` with ``args``."""
    ints = {name: value for name, value in zip(kernel.arg_names, args)
            if isinstance(value, int) and not isinstance(value, bool)}
    return dict(module=WIN, name=kernel.fn.__name__, dtype=dtype, constexprs=constexprs,
                ones=[n for n, v in ints.items() if v == 1], div16=[n for n, v in ints.items() if v % 16 == 0],
                num_warps=num_warps, num_stages=num_stages)


def recorded_launches(shape, heads, head_dim, window, shift, dtype="bf16", fill_programs=None):
    """{kernel name: specialized_ptx_stats / register_usage keyword dict} of every launch of a forward +
    backward (qkv, table and qkv_bias gradients) of ``shape``: the tuned ones at the heuristic's first pick, the
    blocked backward's rowsum at Triton's default warps and stages. ``fill_programs``: the launcher's
    FILL_PROGRAMS, to pack heads as a full batch would on a small map. The launchers run on float16 tensors
    (the interpreter refuses bfloat16), ``dtype`` is what the cases compile: the same flags and configs."""
    from vitkernels.ops.window_attention import triton as window_triton

    C = heads * head_dim
    table_rows = 1
    for w in ((window,) * (len(shape) - 1) if isinstance(window, int) else window):
        table_rows *= 2 * w - 1
    qkv = torch.zeros(*shape, 3 * C, dtype=torch.float16, requires_grad=True)
    table = torch.zeros(table_rows, heads, dtype=torch.float16, requires_grad=True)
    bias = torch.zeros(3 * C, dtype=torch.float16, requires_grad=True)
    cases = {}

    def record(spec, kernel, grid, args, constexprs, key, device):
        config = spec.candidates(dict(key, dtype=dtype), H100)[0]
        cases[kernel.fn.__name__] = _case(kernel, dtype, args, dict(constexprs, **config.meta), config.num_warps,
                                          config.num_stages)
        return spec.interpreter

    class _Record:
        """An untuned launcher (the blocked backward's rowsum kernel): recorded, not run."""

        def __init__(self, kernel, tensor):
            self.kernel = kernel

        def __getitem__(self, grid):
            def run(*args, **constexprs):
                cases[self.kernel.fn.__name__] = _case(self.kernel, dtype, args, constexprs, DEFAULT_WARPS,
                                                       DEFAULT_STAGES)
            return run

    mp = pytest.MonkeyPatch()
    mp.setattr(tuning, "launch", record)
    mp.setattr(tuning, "launcher", _Record)
    if fill_programs is not None:
        mp.setattr(window_triton, "FILL_PROGRAMS", fill_programs)
    dispatch.clear_call_memos()  # a memoised signature would bring its forward plan (FILL_PROGRAMS) along
    try:
        out = vitkernels.window_attention(qkv, num_heads=heads, window_size=window, shift_size=shift,
                                          rel_pos_bias=table, qkv_bias=bias, backend="triton")
        torch.autograd.grad(out, (qkv, table, bias), torch.zeros_like(out))
    finally:
        mp.undo()
        dispatch.clear_call_memos()
    return cases


def fused_cases():
    """The fused forward and backward on Swin-T's stage 1 (56 x 56, 3 heads, window 7, shifted) at D = 32,
    40 (3C = 360: strides multiples of 8, not 16: STRIDE_ALIGN = 8) and 64; the forward packs the 3 heads
    (as at batch 64; 12 images alone would not). Batch 12: two windows per backward group, as at batch 64."""
    cases, ids = [], []
    for d in (32, 40, 64):
        launches = recorded_launches((12, 56, 56), 3, d, 7, 3, fill_programs=1)
        assert launches["_window_attn_fwd_fused_kernel"]["constexprs"]["HEADS_PER_PROGRAM"] == 3
        assert set(launches) == {"_window_attn_fwd_fused_kernel", "_window_attn_bwd_fused_kernel"}, launches
        for name, case in sorted(launches.items()):
            assert case["constexprs"]["STRIDE_ALIGN"] == (8 if d == 40 else 1), case
            cases.append(case)
            ids.append(f"{name.strip('_')}-D{d}")
    return cases, ids


BLOCKED_KERNELS = {"_window_attn_fwd_kernel", "_window_bwd_delta_kernel", "_window_attn_bwd_kernel",
                   "_window_attn_bwd_dq_kernel", "_window_attn_bwd_dtable_kernel"}
BLOCKED_MAPS = (("w12", (1, 26, 26), 12, 6), ("w8x7x7", (1, 8, 15, 15), (8, 7, 7), (4, 3, 3)))


def blocked_cases():
    """The blocked kernels (windows over 64 tokens) and the backward's rowsum: 12 x 12 (Swin-B 384) and Video
    Swin's 8 x 7 x 7 = 392, shifted, padded, at D = 32 (2 heads: every stride a multiple of 16, STRIDE_ALIGN
    1) and D = 40 (3 heads: 3C = 360, strides multiples of 8 only, STRIDE_ALIGN 8); at 12 x 12 the forward,
    dK/dV and dQ kernels also without a table."""
    cases, ids = [], []
    for d, heads in ((32, 2), (40, 3)):
        for tag, shape, window, shift in BLOCKED_MAPS:
            launches = recorded_launches(shape, heads, d, window, shift)
            assert set(launches) == BLOCKED_KERNELS, launches
            for name, case in sorted(launches.items()):
                assert case["constexprs"]["STRIDE_ALIGN"] == (8 if d == 40 else 1), case
                cases.append(case)
                ids.append(f"{name.strip('_')}-{tag}-D{d}")
                if tag == "w12" and "HAS_TABLE" in case["constexprs"]:
                    cases.append(dict(case, constexprs=dict(case["constexprs"], HAS_TABLE=False)))
                    ids.append(f"{name.strip('_')}-{tag}-D{d}-notable")
    return cases, ids


def table_gathers(case):
    """16-bit loads a blocked kernel makes by design: the table bias gathered per (query, key) pair, one
    element per pair of its (BLOCK_M x BLOCK_N) tile spread over the threads (the dtable kernel always
    gathers it: it recomputes P); the rowsum reads no table."""
    consts = case["constexprs"]
    if not consts.get("HAS_TABLE", True) or "BLOCK_M" not in consts:
        return 0
    return consts["BLOCK_M"] * consts["BLOCK_N"] // (32 * case["num_warps"])


@pytest.fixture(scope="module")
def fused():
    cases, ids = fused_cases()
    return ids, run_ptx_suite(cases)[1]


@pytest.fixture(scope="module")
def blocked():
    cases, ids = blocked_cases()
    return cases, ids, run_ptx_suite(cases)[1]


def _wide(ids, results):
    narrow = [(i, r) for i, r in zip(ids, results) if r["scalar16"] > 0 or r["cp_async"] + r["vector"] == 0]
    assert not narrow, narrow


def test_fused_window_loads_are_wide_at_d32_d40_d64(fused):
    """No scalar 16-bit global load, some cp.async / vector loads, in the fused forward (heads packed) and
    backward at D = 32, 40 and 64 (before STRIDE_ALIGN, D = 40 compiled to 67 / 195 scalar ld.global.b16)."""
    ids, results = fused
    assert len(ids) == 6
    _wide(ids, results)


def test_blocked_window_loads_are_wide(blocked):
    """q / k / v / O / dO loads of the blocked kernels and the rowsum are cp.async / vector loads at D = 32 and
    at D = 40 (STRIDE_ALIGN 8); the only scalar 16-bit loads are the per-pair table gathers (32 at the first
    picks' 64 x 64 tiles, 4 warps; none without a table). Before STRIDE_ALIGN, D = 40 compiled to 131 (forward)
    / 163 (backward) scalar ld.global.b16 and no cp.async but dK/dV's 4, the rowsum to 64 scalar loads."""
    cases, ids, results = blocked
    assert len(ids) == 26, ids
    narrow = [(i, r) for c, i, r in zip(cases, ids, results)
              if r["scalar16"] > table_gathers(c) or r["cp_async"] + r["vector"] == 0]
    assert not narrow, narrow


def test_packed_forward_registers_do_not_grow_with_heads():
    """ptxas -v on sm_90, fp16, the forward's first pick at Swin-T stage 1 (3 heads per program) against the
    same launch at one head per program: the head loop reuses its registers (104 and 104 with triton 3.8)."""
    case = recorded_launches((12, 56, 56), 3, 32, 7, 3, dtype="fp16",
                             fill_programs=1)["_window_attn_fwd_fused_kernel"]
    assert case["constexprs"]["HEADS_PER_PROGRAM"] == 3
    single = dict(case, constexprs=dict(case["constexprs"], HEADS_PER_PROGRAM=1))
    packed, one = usage([case, single])
    assert packed["spill_stores"] == 0 and one["spill_stores"] == 0, (packed, one)
    assert packed["registers"] <= one["registers"] + 8, (packed, one)


@pytest.fixture(scope="module")
def backward_usage():
    """The fused backward's first pick (qkv, table and qkv_bias gradients) at Swin-T stage 1, D = 32, 40, 64,
    as recorded, and with padding's d(qkv_bias) sums (GRAD_PAD, a map not divisible by the window)."""
    cases, ids = [], []
    for d in (32, 40, 64):
        case = recorded_launches((12, 56, 56), 3, d, 7, 3, dtype="fp16")["_window_attn_bwd_fused_kernel"]
        assert not case["constexprs"]["GRAD_PAD"]
        cases += [case, dict(case, constexprs=dict(case["constexprs"], GRAD_PAD=True))]
        ids += [f"D{d}", f"D{d}-grad-pad"]
    return ids, usage(cases)


def test_fused_backward_first_pick_does_not_spill(backward_usage):
    """ptxas -v on sm_90, fp16. The fused backward stores dV, dK, dQ as soon as each is formed, so no fp32
    (N, D) tile is carried through the next dots: at D = 32, (4 warps, 2 stages) went from 255 registers with
    4-8 bytes of spills to 254-255 without; at D = 40 / 64 (64-wide tiles) 4 warps still spill (40-290
    bytes), so the heuristic puts (8 warps, 1 stage) first: 242 registers, no spill; with padding's
    d(qkv_bias) sums too, at most a few words (0-52 bytes with triton 3.8)."""
    ids, results = backward_usage
    for tag, usage_ in zip(ids, results):
        allowed = 64 if tag.endswith("grad-pad") and tag != "D32-grad-pad" else 0
        assert usage_["spill_stores"] <= allowed, (tag, usage_)


def test_blocked_first_picks_at_d40_spill_little():
    """ptxas -v on sm_90, fp16: the blocked kernels' first picks (64 x 64 tiles, 4 warps, 2 stages) at 12 x 12,
    3 heads of 40 (STRIDE_ALIGN 8). Loading q / k / v / dO a 16-bit element at a time, they spilled 336-1136
    bytes (forward 1136, dK/dV 1068, dQ 604, d(table) 336); with 16-byte loads 0-40 with triton 3.8, as at
    D = 32 (16-152 bytes; STRIDE_ALIGN 1 there: the same code as before it existed)."""
    launches = recorded_launches((1, 26, 26), 3, 40, 12, 6, dtype="fp16")
    names = sorted(BLOCKED_KERNELS - {"_window_bwd_delta_kernel"})
    results = usage([launches[name] for name in names])
    for name, usage_ in zip(names, results):
        assert launches[name]["constexprs"]["STRIDE_ALIGN"] == 8
        assert usage_["spill_stores"] <= 64, (name, usage_)

"""Launch-config selection (vitkernels/ops/tuning.py and each op's triton_configs.py): the candidates the
heuristics pick per shape and GPU, the tune keys, the lookup order (forced, interpreter, memory, repo
table, results cache, tuning), the modes, the tables, and the device guard of every launcher. Runs on
CPU: the tuning path is driven with a stand-in GPU and timer; the GPU-marked cases at the end time and
check the real candidates."""
import contextlib
import json
import os

import pytest
import torch

import vitkernels
from vitkernels.ops import tuning
from vitkernels.ops.attention import triton_configs as attn
from vitkernels.ops.patch_embed import triton_configs as patch
from vitkernels.ops.window_attention import triton_configs as window

H100 = tuning.GPU("NVIDIA H100 80GB HBM3", "nvidia-h100-80gb-hbm3", (9, 0), 132, 227 * 1024)
RTX4090 = tuning.GPU("NVIDIA GeForce RTX 4090", "nvidia-geforce-rtx-4090", (8, 9), 128, 99 * 1024)
T4 = tuning.GPU("Tesla T4", "tesla-t4", (7, 5), 40, 64 * 1024)
ALL_SPECS = attn.KERNELS + window.KERNELS + patch.KERNELS


def c(bm, bn, warps, stages):
    return tuning.Config.of(warps, stages, BLOCK_M=bm, BLOCK_N=bn)


def attn_key(dtype=torch.bfloat16, n=197, d=64, bias=(0, 1, 1, 1), dropout=False, n_k=None):
    return attn.tune_key(dtype, n, n if n_k is None else n_k, d, bias, dropout)


def sample_keys(spec):
    if spec in attn.KERNELS:
        return [attn_key(dt, n, d) for dt in (torch.float16, torch.bfloat16, torch.float32)
                for n in (1, 49, 197, 577, 4096, 65536) for d in (32, 40, 64, 80, 96, 128, 256)]
    if spec in window.KERNELS:
        return [window.tune_key(dt, n, d, 2, True, True, True, True) for dt in (torch.bfloat16, torch.float32)
                for n in (9, 49, 64, 144, 392) for d in (32, 64, 128)]
    return [patch.tune_key(dt, m, e, k) for dt in (torch.bfloat16, torch.float32)
            for m, e, k in ((196 * 128, 768, 768), (576 * 8, 1024, 588), (3136 * 32, 96, 48), (8, 64, 48))]


# ---- heuristics ---------------------------------------------------------------------------------------


def test_vit_attention_candidates_on_an_h100():
    key = attn_key()  # ViT-B: N=197 -> bucket 256, D=64, bf16
    assert attn.ATTN_FWD.candidates(key, H100) == [c(128, 64, 4, 3), c(128, 128, 8, 3), c(64, 64, 4, 3),
                                                   c(128, 32, 4, 4)]
    assert attn.ATTN_BWD_DKDV.candidates(key, H100) == [c(64, 128, 8, 2), c(32, 128, 4, 2), c(64, 64, 4, 2),
                                                        c(32, 64, 4, 1)]
    assert attn.ATTN_BWD_DQ.candidates(key, H100)[0] == c(128, 64, 8, 2)


def test_tiles_shrink_to_short_sequences():
    # N=49 (a 7x7 window as plain attention): one 64-row tile; N=1: 16 x 16, at most 4 warps
    assert {cfg.meta["BLOCK_M"] for cfg in attn.ATTN_FWD.candidates(attn_key(n=49), H100)} == {64}
    tiny = attn.ATTN_FWD.candidates(attn_key(n=1), H100)
    assert tiny == [c(16, 16, 4, 3), c(16, 16, 4, 4)]  # duplicates collapse after shrinking
    # a long query side with few keys shrinks only the key tile
    assert all(cfg.meta["BLOCK_N"] <= 16 for cfg in attn.ATTN_FWD.candidates(attn_key(n=4096, n_k=9), H100))


def test_head_dim_and_dtype_move_the_candidates():
    d64 = attn.ATTN_FWD.candidates(attn_key(d=64), H100)
    d128 = attn.ATTN_FWD.candidates(attn_key(d=128), H100)
    fp32 = attn.ATTN_FWD.candidates(attn_key(torch.float32, d=128), H100)
    assert d64 != d128 != fp32
    assert fp32[0] == c(64, 32, 4, 2)  # IEEE fp32 dots: half the tile


@pytest.mark.parametrize("spec", ALL_SPECS, ids=lambda s: s.name)
@pytest.mark.parametrize("gpu", [H100, RTX4090, T4], ids=lambda g: g.slug)
def test_candidates_are_few_fit_the_gpu_and_belong_to_the_full_space(spec, gpu):
    for key in sample_keys(spec):
        picks = spec.candidates(key, gpu)
        assert 1 <= len(picks) <= tuning.MAX_CANDIDATES, (key, picks)
        assert len(set(picks)) == len(picks)
        assert all(spec.fits(p, key, gpu) for p in picks) or len(picks) == 1, (key, picks)
        full = spec.candidates(key, gpu, mode="full")
        assert set(picks) <= set(full) or len(picks) == 1, (key, set(picks) - set(full))
        if gpu.capability < (8, 0):
            assert all(p.num_stages <= 2 for p in picks)  # no cp.async before Ampere


def test_full_mode_searches_the_whole_space():
    key = attn_key(n=4096)
    full = attn.ATTN_FWD.candidates(key, H100, mode="full")
    assert len(full) > tuning.MAX_CANDIDATES
    assert len(full) == sum(attn.ATTN_FWD.fits(cfg, key, H100) for cfg in attn.ATTN_FWD.space)


def test_nothing_fits_falls_back_to_the_smallest_config():
    tiny_gpu = tuning.GPU("tiny", "tiny", (8, 0), 1, 8 * 1024)
    picks = attn.ATTN_FWD.candidates(attn_key(torch.float32, n=4096, d=256), tiny_gpu)
    assert len(picks) == 1
    smallest = min(attn.ATTN_FWD.shared_memory(cfg, attn_key(torch.float32, n=4096, d=256))
                   for cfg in attn.ATTN_FWD.space)
    assert attn.ATTN_FWD.shared_memory(picks[0], attn_key(torch.float32, n=4096, d=256)) == smallest


# ---- tune keys ----------------------------------------------------------------------------------------


def test_attention_key_holds_every_flag_that_changes_the_kernel():
    base = attn_key()
    variants = [attn_key(bias=None), attn_key(bias=(1, 1, 1, 1)), attn_key(bias=(0, 0, 0, 1)),
                attn_key(dropout=True), attn_key(torch.float16), attn_key(torch.float32), attn_key(d=80),
                attn_key(n=577), attn_key(n_k=1024)]
    strings = {tuning.key_string(k) for k in [base] + variants}
    assert len(strings) == len(variants) + 1
    assert attn_key(n=200) == base  # same bucket, same config
    assert tuning.key_string(base) == "N_Q=256,N_K=256,D=64,dtype=bf16,bias=0111,dropout=0"


def test_window_and_patch_keys_hold_their_flags():
    args = (torch.bfloat16, 49, 32, 2, True, True, True, False)
    base = window.tune_key(*args)
    for i in range(3, 8):
        changed = list(args)
        changed[i] = (3 if i == 3 else not changed[i])
        assert window.tune_key(*changed) != base, i
    assert window.tune_key(*args, grad_pad=1) != base
    p = patch.tune_key(torch.bfloat16, 196 * 64, 768, 768, HAS_BIAS=True, HAS_POS=True)
    assert p != patch.tune_key(torch.bfloat16, 196 * 64, 768, 768, HAS_BIAS=False, HAS_POS=True)
    assert p == patch.tune_key(torch.bfloat16, 196 * 64 + 5, 768, 768, HAS_BIAS=True, HAS_POS=True)  # M bucketed


def test_bucket():
    assert [tuning.bucket(n) for n in (1, 16, 17, 49, 197, 577, 4096, 4097, 10 ** 6)] == \
        [16, 16, 32, 64, 256, 1024, 4096, 8192, 16384]


def test_config_json_round_trip():
    cfg = tuning.Config.of(8, 3, BLOCK_M=128, BLOCK_N=64, BLOCK_K=32)
    assert tuning.Config.from_json(json.loads(json.dumps(cfg.to_json()))) == cfg
    assert cfg.launch_kwargs() == {"BLOCK_K": 32, "BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3}


# ---- selection ----------------------------------------------------------------------------------------


class FakeTimer:
    """Stands in for triton's do_bench: a time per config; counts what was timed."""

    def __init__(self, times):
        self.times, self.timed = times, []

    def __call__(self, fn, warmup=None, rep=None, return_mode=None):
        fn()
        cfg = self.current
        self.timed.append(cfg)
        t = self.times.get(cfg, 1.0)
        if isinstance(t, Exception):
            raise t
        return t


@pytest.fixture
def gpu_tuning(monkeypatch, tmp_path):
    """Selection as on a GPU: not interpreting, a fake H100, a fake timer, a fresh cache dir and table."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setenv(tuning.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.delenv(tuning.MODE_ENV, raising=False)
    monkeypatch.setattr(tuning, "gpu_of", lambda device: H100)
    table = tmp_path / "table.json"
    table.write_text(json.dumps({"format": 1, "gpus": {}}))
    monkeypatch.setattr(tuning, "TABLE_PATH", str(table))
    monkeypatch.setattr(tuning, "load_table", lambda path=None: tuning._table(str(table)))
    timer = FakeTimer({})
    import triton.testing

    monkeypatch.setattr(triton.testing, "do_bench", timer)
    tuning.clear_memory()
    yield timer
    tuning.clear_memory()


def select(timer, key, spec=attn.ATTN_FWD):
    def run(cfg):
        timer.current = cfg
    return tuning.select(spec, key, torch.device("cuda", 0), run)


def test_tuning_times_the_candidates_once_and_remembers_across_processes(gpu_tuning):
    key = attn_key()
    picks = attn.ATTN_FWD.candidates(key, H100)
    gpu_tuning.times = {picks[0]: 0.5, picks[1]: 0.2, picks[2]: 0.3, picks[3]: 0.4}
    assert select(gpu_tuning, key) == picks[1]
    assert gpu_tuning.timed == picks  # every candidate timed once
    assert select(gpu_tuning, key) == picks[1] and len(gpu_tuning.timed) == 4  # memory
    stored = json.load(open(tuning.cache_path()))["entries"]
    (name, entry), = stored.items()
    assert name.startswith("nvidia-h100-80gb-hbm3|triton-") and name.endswith("|flash_attn_fwd|v1|" + tuning.key_string(key))
    assert entry["config"] == picks[1].to_json() and entry["ms"] == 0.2
    tuning.clear_memory()  # a new process: the results cache answers, nothing is timed
    assert select(gpu_tuning, key) == picks[1] and len(gpu_tuning.timed) == 4
    assert tuning.cached_entries()["nvidia-h100-80gb-hbm3"]["flash_attn_fwd"][tuning.key_string(key)]["BLOCK_N"] == 128


def test_a_candidate_that_cannot_compile_drops_out(gpu_tuning):
    key = attn_key()
    picks = attn.ATTN_FWD.candidates(key, H100)
    gpu_tuning.times = {picks[0]: RuntimeError("out of resource: shared memory"), picks[1]: 0.3}
    assert select(gpu_tuning, key) == picks[1]
    gpu_tuning.times = {p: RuntimeError("out of resource") for p in picks}
    with pytest.raises(RuntimeError, match="none of the 4 candidate configs could run"):
        select(gpu_tuning, attn_key(d=32))


def test_a_device_fault_while_tuning_is_raised(gpu_tuning):
    key = attn_key()
    gpu_tuning.times = {attn.ATTN_FWD.candidates(key, H100)[0]: RuntimeError("CUDA error: an illegal memory access")}
    with pytest.raises(RuntimeError, match="illegal memory access"):
        select(gpu_tuning, key)


def test_the_repo_table_answers_before_tuning(gpu_tuning):
    key = attn_key()
    chosen = attn.ATTN_FWD.candidates(key, H100)[2]
    tuning.merge_into_table({H100.slug: {"flash_attn_fwd": {tuning.key_string(key): {**chosen.to_json(), "ms": 1}}}},
                            {H100.slug: {"name": H100.name}}, tuning.TABLE_PATH)
    assert select(gpu_tuning, key) == chosen
    assert gpu_tuning.timed == []
    # a table entry that does not fit this GPU's shared memory is ignored
    huge = c(128, 128, 8, 4)
    tuning.clear_memory()
    tuning.merge_into_table({H100.slug: {"flash_attn_fwd": {tuning.key_string(attn_key(torch.float32, d=256)):
                                                             huge.to_json()}}}, {}, tuning.TABLE_PATH)
    assert select(gpu_tuning, attn_key(torch.float32, d=256)) != huge
    # ... and so is one outside the kernel's space (a hand edit), or tuned for another version of the kernel
    for n, entry in ((577, c(48, 64, 4, 3).to_json()), (2000, {**chosen.to_json(), "v": 99})):
        tuning.clear_memory()
        k = attn_key(n=n)
        tuning.merge_into_table({H100.slug: {"flash_attn_fwd": {tuning.key_string(k): entry}}}, {}, tuning.TABLE_PATH)
        before = len(gpu_tuning.timed)
        select(gpu_tuning, k)
        assert len(gpu_tuning.timed) == before + 4  # tuned anew


def test_a_new_key_during_cuda_graph_capture_warns_and_is_not_remembered(gpu_tuning, monkeypatch):
    monkeypatch.setattr(tuning, "_capturing", lambda: True)
    key = attn_key(d=96)
    with pytest.warns(RuntimeWarning, match="while a CUDA graph is being captured"):
        assert select(gpu_tuning, key) == attn.ATTN_FWD.candidates(key, H100)[0]
    assert gpu_tuning.timed == [] and not tuning._MEMORY


def test_modes(gpu_tuning, monkeypatch):
    key = attn_key()
    monkeypatch.setenv(tuning.MODE_ENV, "off")
    assert select(gpu_tuning, key) == attn.ATTN_FWD.candidates(key, H100)[0] and gpu_tuning.timed == []
    monkeypatch.setenv(tuning.MODE_ENV, "full")
    select(gpu_tuning, key)
    assert len(gpu_tuning.timed) == len(attn.ATTN_FWD.candidates(key, H100, mode="full"))
    # a full-mode result serves heuristic mode too; a heuristic result never serves full mode
    tuning.clear_memory()
    monkeypatch.setenv(tuning.MODE_ENV, "heuristic")
    before = len(gpu_tuning.timed)
    select(gpu_tuning, key)
    assert len(gpu_tuning.timed) == before
    monkeypatch.setenv(tuning.MODE_ENV, "fastest")
    with pytest.raises(ValueError, match="VITKERNELS_AUTOTUNE='fastest' is not a tuning mode; valid: heuristic, "
                                         "full, off"):
        select(gpu_tuning, attn_key(d=80))


def test_forced_and_interpreter_configs(gpu_tuning, monkeypatch):
    forced = c(32, 32, 2, 1)
    with tuning.forced_configs({"flash_attn_fwd": forced}):
        assert select(gpu_tuning, attn_key()) == forced
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert select(gpu_tuning, attn_key()) == attn.INTERPRETER_CONFIG
    assert gpu_tuning.timed == []


def test_merge_into_table_keeps_other_gpus(tmp_path):
    path = tmp_path / "t.json"
    tuning.merge_into_table({"a100": {"k": {"x": {"num_warps": 4}}}}, {"a100": {"name": "A100"}}, str(path))
    tuning.merge_into_table({"h100": {"k": {"y": {"num_warps": 8}}}}, {"h100": {"name": "H100"}}, str(path))
    data = json.loads(path.read_text())
    assert set(data["gpus"]) == {"a100", "h100"} and data["gpus"]["a100"]["kernels"]["k"]["x"]["num_warps"] == 4


def parse_key(text):
    return {k: int(v) if v.isdigit() else v for k, v in (part.split("=", 1) for part in text.split(","))}


def test_repo_table_is_valid():
    """Every config in the committed table is one its kernel could choose for its key, at the kernel's
    current version (a stale or hand-edited entry fails here; at run time it would be ignored)."""
    specs = {s.name: s for s in ALL_SPECS}
    for slug, gpu in tuning.load_table(tuning.TABLE_PATH).items():
        for name, keys in gpu.get("kernels", {}).items():
            spec = specs[name]
            for key, entry in keys.items():
                assert entry.get("v", 1) == spec.version, (slug, name, key)
                assert spec.allowed(tuning.Config.from_json(entry), parse_key(key), H100), (slug, name, key, entry)


# ---- every launcher runs on its inputs' device --------------------------------------------------------


def test_on_device_makes_the_tensors_gpu_current():
    guard = tuning.on_device(torch.empty(0, device="meta"))
    assert isinstance(guard, contextlib.nullcontext)

    class FakeCuda:
        device = torch.device("cuda", 1)
    guard = tuning.on_device(FakeCuda())
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="drives the launchers under the interpreter")
def test_every_launch_happens_inside_the_inputs_device_guard(monkeypatch):
    pytest.importorskip("triton")
    entered = []
    depth = [0]

    @contextlib.contextmanager
    def recording_guard(t):
        entered.append(t.device)
        depth[0] += 1
        try:
            yield
        finally:
            depth[0] -= 1
    original_launch = tuning.launch

    def checked_launch(spec, *args, **kwargs):
        assert depth[0] > 0, f"{spec.name} launched outside tuning.on_device"
        return original_launch(spec, *args, **kwargs)
    monkeypatch.setattr(tuning, "on_device", recording_guard)
    monkeypatch.setattr(tuning, "launch", checked_launch)

    q, k, v = (torch.randn(1, 2, 20, 16, requires_grad=True) for _ in range(3))
    bias = torch.randn(1, 2, 20, 20, requires_grad=True)
    vitkernels.flash_attention(q, k, v, bias=bias, dropout_p=0.2, backend="triton").sum().backward()
    qkv = torch.randn(1, 9, 9, 3 * 32, requires_grad=True)
    table = torch.randn(169, 2, requires_grad=True)
    qkv_bias = torch.randn(96, requires_grad=True)
    vitkernels.window_attention(qkv, num_heads=2, window_size=7, shift_size=3, rel_pos_bias=table, qkv_bias=qkv_bias,
                                backend="triton").sum().backward()
    x, w = torch.randn(2, 3, 16, 16, requires_grad=True), torch.randn(8, 3, 8, 8, requires_grad=True)
    vitkernels.patch_embed(x, w, backend="triton").sum().backward()
    from vitkernels.ops.attention.triton import draw_dropout_seed, dropout_mask_triton

    dropout_mask_triton(draw_dropout_seed("cpu"), 1, 1, 4, 4, 0.5)
    assert len(entered) == 7 and all(d.type == "cpu" for d in entered)  # 3 ops x (fwd, bwd) + the mask


# ---- launch geometry: at least one wave of programs on a 132-SM GPU -------------------------------------

H100_GPU = tuning.GPU("NVIDIA H100 (test)", "test-h100", (9, 0), 132, 227 * 1024)
SWIN_T_STAGES = {"stage1": ((56, 56), 3), "stage2": ((28, 28), 6), "stage3": ((14, 14), 12), "stage4": ((7, 7), 24)}


def launched_grids(monkeypatch, run):
    """Run ``run`` with every tuned launch recorded instead of executed: for each kernel, the grid of every
    candidate the heuristic offers an H100 for that launch's key."""
    grids = {}

    def record(spec, kernel, grid, args, constexprs, key, device):
        for config in spec.candidates(key, H100_GPU):
            grids.setdefault(spec.name, []).append((str(config), grid(config.meta)))
        return spec.interpreter
    monkeypatch.setattr(tuning, "launch", record)
    run()
    return grids


def programs(grid):
    total = 1
    for n in grid:
        total *= n
    return total


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="drives the launchers under the interpreter")
@pytest.mark.parametrize("stage", list(SWIN_T_STAGES))
def test_window_kernels_fill_a_gpu_on_swin_t_at_batch_64(monkeypatch, stage):
    pytest.importorskip("triton")
    spatial, heads = SWIN_T_STAGES[stage]
    C = heads * 32
    shift = 3 if spatial[0] > 7 else 0
    qkv = torch.empty(64, *spatial, 3 * C, dtype=torch.float16, requires_grad=True)
    table = torch.zeros(169, heads, dtype=torch.float16, requires_grad=True)
    bias = torch.zeros(3 * C, dtype=torch.float16, requires_grad=True)

    def run():
        out = vitkernels.window_attention(qkv, num_heads=heads, window_size=7, shift_size=shift, rel_pos_bias=table,
                                          qkv_bias=bias, backend="triton")
        torch.autograd.grad(out, (qkv, table, bias), torch.zeros_like(out))
    grids = launched_grids(monkeypatch, run)
    assert set(grids) == {"window_attn_fwd_fused", "window_attn_bwd_fused"}, grids
    for name, launches in grids.items():
        for config, grid in launches:
            assert programs(grid) >= 132, (name, config, grid)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="drives the launchers under the interpreter")
@pytest.mark.parametrize("with_bias", [False, True], ids=["no-bias", "bias"])
def test_attention_kernels_fill_a_gpu_on_vit_b_at_batch_64(monkeypatch, with_bias):
    pytest.importorskip("triton")
    q, k, v = (torch.empty(64, 12, 197, 64, dtype=torch.float16, requires_grad=True) for _ in range(3))
    bias = torch.zeros(1, 12, 197, 197, dtype=torch.float16, requires_grad=True) if with_bias else None

    def run():
        out = vitkernels.flash_attention(q, k, v, bias=bias, backend="triton")
        leaves = (q, k, v) + ((bias,) if with_bias else ())
        torch.autograd.grad(out, leaves, torch.zeros_like(out))
    grids = launched_grids(monkeypatch, run)
    expected = {"flash_attn_fwd", "flash_attn_bwd_dkdv", "flash_attn_bwd_dq"} | ({"flash_attn_bwd_dbias"} if with_bias else set())
    assert set(grids) == expected, grids
    for name, launches in grids.items():  # dBias of the batch-shared bias: batch groups fill the GPU
        for config, grid in launches:
            assert programs(grid) >= 132, (name, config, grid)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="drives the launchers under the interpreter")
@pytest.mark.parametrize("x_shape,patch,E", [((64, 3, 224, 224), 16, 768), ((64, 3, 224, 224), 14, 1024)],
                         ids=["vitB16", "vitL14"])
def test_patch_embed_kernels_fill_a_gpu_on_vit_at_batch_64(monkeypatch, x_shape, patch, E):
    pytest.importorskip("triton")
    x = torch.empty(x_shape, dtype=torch.float16, requires_grad=True)
    w = torch.zeros(E, 3, patch, patch, dtype=torch.float16, requires_grad=True)

    def run():
        out = vitkernels.patch_embed(x, w, backend="triton")
        torch.autograd.grad(out, (x, w), torch.zeros_like(out))
    grids = launched_grids(monkeypatch, run)
    assert set(grids) == {"patch_embed_fwd", "patch_embed_bwd_dw", "patch_embed_bwd_dx"}, grids
    for name, launches in grids.items():
        for config, grid in launches:
            assert programs(grid) >= 132, (name, config, grid)


# ---- on a GPU: the real candidates ---------------------------------------------------------------------


def each_candidate(specs, key):
    """Forced-config maps that together launch every candidate of every spec at least once."""
    gpu = tuning.gpu_of(torch.device("cuda"))
    per_kernel = {spec.name: spec.candidates(key, gpu) for spec in specs}
    for i in range(max(len(v) for v in per_kernel.values())):
        yield {name: picks[min(i, len(picks) - 1)] for name, picks in per_kernel.items()}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,n,d", [(torch.bfloat16, 197, 64), (torch.float16, 197, 64), (torch.bfloat16, 577, 80),
                                       (torch.float16, 49, 128), (torch.float32, 197, 64)],
                         ids=["bf16-N197-D64", "fp16-N197-D64", "bf16-N577-D80", "fp16-N49-D128", "fp32-N197-D64"])
def test_gpu_every_attention_candidate_is_correct(dtype, n, d):
    """Tuning may pick any candidate: each one, forced in turn for every attention kernel, must pass the 2x
    criterion (forward and every gradient, learnable bias included). The gpu-check test step runs with
    VITKERNELS_AUTOTUNE=off (first candidate) for speed: this is where the others are checked."""
    from tests.ops.test_attention_triton import check_against_reference
    from tests.utils import qkv_views

    B, H = 2, 4
    q, k, v, _ = qkv_views(B, H, n, d, dtype=dtype, device="cuda")
    bias = torch.randn(1, H, n, n, dtype=dtype, device="cuda")
    dout = torch.randn(B, H, n, d, dtype=dtype, device="cuda")
    for forced in each_candidate(attn.KERNELS, attn.tune_key(dtype, n, n, d, (0, 1, 1, 1), False)):
        with tuning.forced_configs(forced):
            check_against_reference(q, k, v, bias, dout=dout)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("shape,heads,win,shift", [((4, 56, 56), 3, 7, 3), ((2, 26, 26), 4, 12, 6)],
                         ids=["swinT-s1", "w12-padded"])
def test_gpu_every_window_candidate_is_correct(dtype, shape, heads, win, shift):
    from tests.ops.test_window_attention_triton import run_case

    padded = any(s % win for s in shape[1:])
    key = window.tune_key(dtype, win * win, 32, 2, True, True, True, padded)
    for forced in each_candidate(window.KERNELS, key):
        with tuning.forced_configs(forced):
            run_case(shape, heads, 32, win, shift, dtype=dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["nchw-p16", "channels_last-p14"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_gpu_every_patch_embed_candidate_is_correct(dtype, layout):
    """Every heuristic candidate of the three GEMMs, ViT-B/16 on NCHW images and ViT-L/14-like on
    channels-last ones (the (dt, dh, dw, c) k-order, K = 588 padded to 592)."""
    from tests.utils import assert_close_2x

    channels_last = layout.startswith("channels_last")
    B, E, P, p = 8, 768, 1, (14 if channels_last else 16)
    n = (224 // p) ** 2
    x = torch.randn(B, 3, 224, 224, device="cuda")
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w = torch.randn(E, 3, p, p, device="cuda") * 0.02
    b, pos, cls = torch.randn(E, device="cuda"), torch.randn(1, P + n, E, device="cuda"), torch.randn(1, P, E, device="cuda")
    g = torch.randn(B, P + n, E, device="cuda")

    def run(cast, backend):
        ts = [t.to(cast).requires_grad_() for t in (x, w, b, pos, cls)]
        out = vitkernels.patch_embed(ts[0], ts[1], ts[2], pos_embed=ts[3], prefix_tokens=ts[4], backend=backend)
        out.backward(g.to(cast))
        return [out] + [t.grad for t in ts]
    ref, pt = run(torch.float64, "reference"), run(dtype, "reference")
    extra = dict(channels_last=True) if channels_last else {}
    key = patch.tune_key(dtype, B * n, E, 3 * p * p, video=False, prefix=True, **extra, HAS_BIAS=True, HAS_POS=True,
                         POS_HAS_PREFIX=True)
    for forced in each_candidate(patch.KERNELS, key):
        with tuning.forced_configs(forced):
            got = run(dtype, "triton")
        for i, (a, p_, r) in enumerate(zip(got, pt, ref)):
            assert_close_2x(a, p_, r, factor=2.0 if i == 0 else 3.0, floor=1e-3 if dtype != torch.float32 else 1e-5,
                            name=f"output {i} with {forced}")


@pytest.mark.gpu
def test_gpu_tuned_configs_persist_in_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(tuning.CACHE_ENV, str(tmp_path))
    monkeypatch.delenv(tuning.MODE_ENV, raising=False)
    monkeypatch.setattr(tuning, "load_table", lambda path=None: {})  # force tuning even if the table knows it
    tuning.clear_memory()
    q = torch.randn(2, 3, 333, 64, device="cuda", dtype=torch.bfloat16)
    vitkernels.flash_attention(q, q, q, backend="triton")
    torch.cuda.synchronize()
    entries = tuning.cached_entries(tuning.gpu_of(q.device).slug)
    assert "flash_attn_fwd" in next(iter(entries.values()))
    tuning.clear_memory()

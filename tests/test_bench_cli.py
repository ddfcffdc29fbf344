"""``python -m vitkernels.bench`` runs as a tool: tables, JSON rows with skip reasons, plots; every peer
attempted at its best; rows printed and saved as they land; clear CLI errors; honest timing records."""
import io
import json
import os
import time

import pytest
import torch

from vitkernels.bench import core, workloads
from vitkernels.bench.__main__ import main

FAST = ["--reps", "1", "--warmup", "0", "--min-time", "0", "--device", "cpu", "--no-compile"]


@pytest.mark.parametrize("op,extra", [("attention", ["--bias", "--mode", "fwd+bwd"]), ("window", []), ("patch", []),
                                      ("model", ["--workload", "vit"])])
def test_bench_writes_rows_for_every_candidate(op, extra, tmp_path, capsys):
    if op in ("model", "window"):
        pytest.importorskip("timm")  # the model and Swin peers are timm's
    out_json, out_md, out_png = tmp_path / "r.json", tmp_path / "r.md", tmp_path / "r.png"
    argv = [op, "--limit", "1", "--batch", "1", "--json", str(out_json), "--markdown", str(out_md),
            "--plot", str(out_png)] + FAST + extra
    assert main(argv) == 0
    printed = capsys.readouterr().out
    data = json.loads(out_json.read_text())
    rows = data["rows"]
    assert data["meta"]["torch"] and data["meta"]["device"].startswith("cpu") and data["meta"]["complete"] is True
    assert any(r["kind"] == "vitkernels" and r["status"] == "ok" and r["median_ms"] > 0 for r in rows)
    assert any(r["kind"] == "peer" and r["status"] == "ok" for r in rows)
    for r in rows:  # every row either ran or says why not; a candidate that raised shows what it raised
        assert r["status"] == "ok" or (r["status"].startswith(("skipped: ", "error: ")) and len(r["status"]) > 12), r
    assert "| candidate |" in out_md.read_text()
    assert rows[0]["candidate"] in printed
    pytest.importorskip("matplotlib")
    assert out_png.stat().st_size > 1000


# ---- CLI errors --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("argv,message", [
    (["attention", "--backends", "foo"], "--backends: attention has the vitkernels backends reference"),
    (["patch", "--backends", "cpu", "nope"], "got 'nope'"),
    (["model", "--backends", "foo"], "--backends: model has the vitkernels backends reference, triton, cuda, cpu"),
    (["attention", "--limit", "0"], "--limit must be >= 1; got 0"),
    (["attention", "--batch", "0"], "--batch must be >= 1; got 0"),
    (["window", "--reps", "0"], "--reps must be >= 1; got 0"),
    (["window", "--warmup", "-1"], "--warmup must be >= 0; got -1"),
    (["patch", "--min-time", "-1"], "--min-time must be >= 0 seconds; got -1.0"),
    (["attention", "--workload", "video"],
     "--workload: attention has the workload sets vit, long, sam, eva, all; got 'video'"),
    (["attention", "--workload", "sam", "--bias"], "--bias: the sam workloads carry their own decomposed rel-pos"),
    (["attention", "--workload", "eva", "--bias"], "--bias: the eva workloads time EVA-02's rotary attention"),
    (["window", "--workload", "sam"], "--workload: window has the workload sets swin, video, swinv2, all; got 'sam'"),
    (["model", "--workload", "long"], "--workload: model has the workload sets vit, swin, all; got 'long'"),
    (["window", "--bias"], "--bias: only the attention op takes a bias"),
    (["attention", "--device", "tpu9"], "--device: 'tpu9' is not a device"),
    (["attention", "--device", "meta"], "the benchmark runs on cpu or cuda, not meta"),
])
def test_cli_errors_name_the_argument(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert "Traceback" not in err


def test_device_cuda_without_a_gpu_is_a_clear_error(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as exit_info:
        main(["attention", "--device", "cuda"])
    assert exit_info.value.code == 2
    assert "--device cuda: torch sees no CUDA GPU" in capsys.readouterr().err


def test_help_shows_defaults_without_markup(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "``" not in out and ":func:" not in out
    for default in ("default: bf16 on a GPU, fp32 on CPU", "default: fwd", "default: 10 GPU, 3 CPU",
                    "default: 50 GPU, 10 CPU", "default: 0.2 GPU, 1.0 CPU", "default: on", "(default vit)"):
        assert default in " ".join(out.split()), default


# ---- peers at their best -----------------------------------------------------------------------------------


def _attention_rows(mode, bias=True):
    p = dict(B=1, H=2, N=49, D=32)
    cands = workloads.attention_candidates(p, torch.float32, mode, torch.device("cpu"), ["reference"], bias)
    flops, io_bytes = workloads.attention_cost(p, mode, torch.float32, bias)
    return {r.candidate: r for r in core.measure("attention", "t", "B=1", cands, "fp32", mode, flops, io_bytes,
                                                   torch.device("cpu"), 0, 1)}


def test_sdpa_flash_with_a_float_mask_is_timed_on_cpu():
    """SDPA's CPU flash kernel takes a float attn_mask in inference: it must be timed, not skipped."""
    rows = _attention_rows("fwd")
    assert rows["sdpa:flash"].status == "ok" and rows["sdpa:flash"].median_ms > 0
    assert rows["sdpa:math"].status == "ok"
    ours = rows["vitkernels:reference"]
    fastest = min((r for r in rows.values() if r.kind == "peer" and r.median_ms), key=lambda r: r.median_ms)
    assert ours.best_peer == fastest.candidate
    assert ours.speedup_vs_best_peer == pytest.approx(fastest.median_ms / ours.median_ms)


def test_every_sdpa_backend_is_attempted_and_a_refusal_shows_torchs_error():
    rows = _attention_rows("fwd+bwd")  # a learnable bias: the CPU flash kernel refuses (no mask gradient)
    for label in ("flash", "efficient", "cudnn"):
        status = rows[f"sdpa:{label}"].status
        assert status.startswith("error: RuntimeError: "), status  # attempted: torch's own words, no pre-judgement
    assert rows["sdpa:math"].status == "ok"


def test_speedup_is_against_the_fastest_peer_that_ran():
    def sleeper(seconds):
        return lambda: (lambda: time.sleep(seconds))

    def broken():
        raise RuntimeError("cannot run this")
    cands = [core.Candidate("ours", "vitkernels", build=sleeper(0.002)),
             core.Candidate("slow peer", "peer", build=sleeper(0.008)),
             core.Candidate("fast peer", "peer", build=sleeper(0.004)),
             core.Candidate("broken peer", "peer", build=broken),
             core.Candidate("absent peer", "peer", skip="not installed")]
    landed = []
    rows = core.measure("x", "w", "s", cands, "fp32", "fwd", 0.0, 0.0, torch.device("cpu"), 0, 3,
                        on_row=lambda r: landed.append((r.candidate, r.speedup_vs_best_peer)))
    by = {r.candidate: r for r in rows}
    assert [name for name, _ in landed][-1] == "ours"  # peers first: our row lands with its final speedup
    assert landed[-1][1] == pytest.approx(by["fast peer"].median_ms / by["ours"].median_ms)
    assert 1.4 < by["ours"].speedup_vs_best_peer < 2.6 and by["ours"].best_peer == "fast peer"
    assert by["broken peer"].status == "error: RuntimeError: cannot run this"
    assert by["absent peer"].status == "skipped: not installed"
    assert by["slow peer"].speedup_vs_best_peer < 1.0 and by["fast peer"].speedup_vs_best_peer == 1.0


# ---- timing ------------------------------------------------------------------------------------------------


def test_timing_runs_until_min_reps_and_min_time():
    calls = []
    fn = lambda: (calls.append(1), time.sleep(0.001))  # noqa: E731
    t = core.time_callable(fn, torch.device("cpu"), warmup=2, reps=3, min_time=0.05)
    assert 3 < t.reps <= 50 and len(calls) == t.reps + 2  # >= 1 ms a call: 0.05 s takes more than 3, at most 50
    assert t.q1_ms <= t.median_ms <= t.q3_ms and t.iqr_ms == pytest.approx(t.q3_ms - t.q1_ms)
    t = core.time_callable(lambda: None, torch.device("cpu"), warmup=0, reps=5, min_time=100.0, max_reps=40)
    assert t.reps == 40  # capped
    t = core.time_callable(lambda: time.sleep(0.002), torch.device("cpu"), warmup=0, reps=7, min_time=0.0)
    assert t.reps == 7


def test_a_noisy_candidate_is_flagged():
    state = {"i": 0}

    def build():
        def run():
            state["i"] += 1
            time.sleep(0.001 if state["i"] % 2 else 0.006)
        return run
    (row,) = core.measure("x", "w", "s", [core.Candidate("jittery", "vitkernels", build=build)], "fp32", "fwd",
                          0.0, 0.0, torch.device("cpu"), 0, 12)
    assert row.note.startswith("noisy: IQR") and row.reps == 12


def test_cpu_peak_memory_is_measured():
    def fn():
        a = torch.ones(2 ** 21)  # 8 MiB
        b = a * 2  # 8 MiB more, while a is alive
        return b.sum()
    peak = core.peak_memory_mb(fn, torch.device("cpu"))
    if peak is None:
        pytest.skip("this torch's profiler does not expose allocation events")
    assert 15.9 < peak < 17.0, peak


def test_progress_prints_lines_on_a_non_tty():
    stream = io.StringIO()
    progress = core.Progress(2, stream=stream)
    progress.workload("ViT-S")
    progress.candidate("sdpa:flash")
    progress.step()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 3 and "\r" not in stream.getvalue()
    assert lines[1].startswith("[0/2 workloads,") and "ViT-S: timing sdpa:flash" in lines[1]
    assert lines[2].startswith("[1/2 workloads,")


def test_metadata_records_threads_cpu_and_load():
    meta = core.metadata(torch.device("cpu"), ["attention"], {"compiled_peers": False})
    host = meta["host"]
    assert host["torch_threads"] == torch.get_num_threads() and host["cpu_model"]
    assert host["usable_cores"] >= 1 and "loadavg_start" in host and meta["compiled_peers"] is False


# ---- results as they land ----------------------------------------------------------------------------------


def test_json_is_written_after_every_row_and_kept_on_interrupt(tmp_path, monkeypatch, capsys):
    """Two fake workloads; a stop (Ctrl-C) during the second keeps the first's rows in the JSON."""
    out = tmp_path / "r.json"
    seen = []  # rows in the JSON each time a candidate starts

    def rows_on_disk():
        return len(json.loads(out.read_text())["rows"]) if out.exists() else 0

    def fake_workloads(kind, device, batch):
        return [workloads.Workload(f"w{i}", f"B=1 N={n}", dict(B=1)) for i, n in enumerate((10, 20))]

    def fake_candidates(p, dtype, mode, device, backends):
        def build():
            seen.append(rows_on_disk())
            if len(seen) == 4:
                raise KeyboardInterrupt
            return lambda: time.sleep(0.001)
        return [core.Candidate("peer", "peer", build=build), core.Candidate("ours", "vitkernels", build=build)]

    monkeypatch.setitem(workloads.OPS, "patch", (fake_workloads, fake_candidates, lambda p, m, d: (1e6, 1e3)))
    assert main(["patch", "--json", str(out)] + FAST) == 130
    assert seen == [0, 1, 2, 3]
    data = json.loads(out.read_text())
    assert data["meta"]["complete"] is False and "stopped after 3 rows" in data["meta"]["interrupted"]
    assert [r["candidate"] for r in data["rows"]] == ["peer", "ours", "peer"]
    assert data["rows"][0]["speedup_vs_best_peer"] == 1.0  # the peer's speedup, fixed once its workload ended
    printed = capsys.readouterr()
    assert "fastest peer: peer" in printed.out and "interrupted" in printed.err


# ---- plots -------------------------------------------------------------------------------------------------


def _row(workload, shape, cand, kind, ms, speedup, peak=5.0):
    return core.Row("attention", workload, shape, cand, kind, "bf16", "fwd+bwd", median_ms=ms, iqr_ms=0.2 * ms,
                    q1_ms=0.9 * ms, q3_ms=1.1 * ms, peak_mb=peak, speedup_vs_best_peer=speedup, reps=10)


def _overlaps(fig, labels):
    renderer = fig.canvas.get_renderer()
    boxes = [t.get_window_extent(renderer) for t in labels if t.get_text()]
    return any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])


def test_plot_is_labelled_and_readable():
    pytest.importorskip("matplotlib")
    from matplotlib.container import ErrorbarContainer

    names = ["ViT-S/16@224", "ViT-B/16@224", "ViT-L/16@224", "ViT-B/16@384", "ViT-L/16@384", "ViT-H/14@224",
             "ViT-B/16@512"]
    rows = []
    for name in names:
        rows += [_row(name, "B=64 H=12 N=197 D=64", "sdpa:flash", "peer", 1.0, 1.0, 3.0),
                 _row(name, "B=64 H=12 N=197 D=64", "vitkernels:triton", "vitkernels", 0.8, 1.25, 2.0)]
    fig = core.figure(rows, {"device": "cuda: NVIDIA H200"})
    speed, memory = fig.axes[:2]
    for ax in (speed, memory):
        assert ax.get_ylabel() and ax.get_xlabel() == "workload"
        for part in ("bf16", "fwd+bwd", "cuda: NVIDIA H200"):
            assert part in ax.get_title()
        assert [t.get_text() for t in ax.get_xticklabels()] == names
        assert not _overlaps(fig, ax.get_xticklabels()), "x labels overlap"
    assert "speedup" in speed.get_ylabel() and "MB" in memory.get_ylabel()
    errorbars = [c for c in speed.containers if isinstance(getattr(c, "errorbar", None), ErrorbarContainer)
                 or isinstance(c, ErrorbarContainer)]
    assert errorbars, "the IQR is not drawn"
    legend = [t.get_text() for t in speed.get_legend().get_texts()]
    assert legend == ["sdpa:flash", "vitkernels:triton"]


def test_plot_of_a_sequence_sweep_is_against_n_and_cpu_has_a_memory_panel():
    pytest.importorskip("matplotlib")
    rows = []
    for n in (1024, 4096, 16384):
        rows += [_row(f"long {n}", f"B=1 H=8 N={n} D=64", "sdpa:flash", "peer", 1.0, 1.0),
                 _row(f"long {n}", f"B=1 H=8 N={n} D=64", "vitkernels:cpu", "vitkernels", 2.0, 0.5)]
    fig = core.figure(rows, {"device": "cpu: AMD EPYC"})
    speed, memory = fig.axes[:2]
    assert speed.get_xlabel() == "tokens N" and speed.get_xscale() == "log"
    assert "CPU" in memory.get_ylabel() and "cpu: AMD EPYC" in memory.get_title()
    series = {c.get_label(): list(c.lines[0].get_xdata()) for c in speed.containers}  # one errorbar per candidate
    assert series == {"sdpa:flash": [1024, 4096, 16384], "vitkernels:cpu": [1024, 4096, 16384]}


def test_plot_without_any_peer_shows_times():
    pytest.importorskip("matplotlib")
    rows = [_row("w", "B=1", "vitkernels:cpu", "vitkernels", 2.0, None)]
    fig = core.figure(rows, {"device": "cpu: x"})
    assert "median ms" in fig.axes[0].get_ylabel()


def test_forced_backend_is_scoped(monkeypatch):
    from vitkernels import dispatch

    monkeypatch.setenv(dispatch.ENV_VAR, "reference")
    with workloads._forced_backend("cpu"):
        assert os.environ[dispatch.ENV_VAR] == "cpu"
    assert os.environ[dispatch.ENV_VAR] == "reference"


def test_cpu_default_says_what_it_leaves_out(monkeypatch, capsys):
    timed = []
    monkeypatch.setattr(core, "measure", lambda op, name, *a, **k: timed.append(name) or [])
    assert main(["attention", "--device", "cpu", "--no-compile"]) == 0
    out = capsys.readouterr().out
    assert "left out SAM ViT-H global (N=4096)" in out and "--workload vit" in out
    assert "SAM ViT-H global" not in timed and "ViT-B/16@512" in timed
    assert main(["attention", "--device", "cpu", "--no-compile", "--workload", "vit"]) == 0
    assert "SAM ViT-H global" in timed  # named: timed too


# ---- SAM global attention with a decomposed rel-pos bias ---------------------------------------------------

SAM_TINY = [("SAM tiny rel-pos", 2, (4, 6), 16)]  # a 4x6 grid (N=24): rows and columns cannot be confused
SAM_PEERS = ["timm bias + sdpa:math", "timm bias + sdpa:flash", "timm bias + sdpa:efficient",
             "timm bias + sdpa:cudnn", "timm eager math", "timm bias + sdpa (compiled)"]


def test_sam_workloads_sizes():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")  # a device object: no GPU needed
    (w,) = workloads.attention_workloads("sam", cpu, None)  # CPU default: B=1 only
    assert w.params == dict(B=1, H=12, N=4096, D=64, grid=(64, 64))
    assert w.shape == "B=1 H=12 N=4096 D=64 rel_pos=64x64" and "B=1" in w.name
    assert [w.params["B"] for w in workloads.attention_workloads("sam", cuda, None)] == [1, 2, 4, 8]
    assert [w.params["B"] for w in workloads.attention_workloads("sam", cpu, 8)] == [8]
    every = workloads.attention_workloads("all", cpu, None)
    others = workloads.attention_workloads("vit", cpu, None) + workloads.attention_workloads("long", cpu, None)
    assert [w.name for w in every] == [w.name for w in others] + ["SAM ViT-B global rel-pos B=1"] + [
        w.name for w in workloads.attention_workloads("eva", cpu, None)]
    flops, io_bytes = workloads.attention_cost(w.params, "fwd", torch.float32, False)
    assert flops > 4.0 * 12 * 4096 ** 2 * 64 and io_bytes > 0


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
def test_sam_bench_rows(mode, tmp_path, monkeypatch, capsys):
    pytest.importorskip("timm")
    monkeypatch.setattr(workloads, "SAM_REL_POS", SAM_TINY)
    out = tmp_path / "r.json"
    assert main(["attention", "--workload", "sam", "--mode", mode, "--json", str(out)] + FAST) == 0
    rows = {r["candidate"]: r for r in json.loads(out.read_text())["rows"]}
    assert {r["workload"] for r in rows.values()} == {"SAM tiny rel-pos B=1"}
    assert {r["shape"] for r in rows.values()} == {"B=1 H=2 N=24 D=16 rel_pos=4x6"}
    assert set(SAM_PEERS) <= set(rows) and {"vitkernels:reference", "vitkernels:triton"} <= set(rows)
    for name in ("vitkernels:reference", "timm bias + sdpa:math", "timm eager math"):
        r = rows[name]
        assert r["status"] == "ok" and r["median_ms"] > 0 and r["tflops"] > 0, r
        if core.peak_memory_mb(lambda: None, torch.device("cpu")) is not None:
            assert r["peak_mb"] is not None and r["peak_mb"] > 0, r
    assert rows["vitkernels:reference"]["best_peer"] in SAM_PEERS
    assert rows["timm bias + sdpa (compiled)"]["status"] == "skipped: compiled peer off (--no-compile)"
    assert rows["vitkernels:triton"]["status"].startswith("skipped: ")  # not timed on CPU, with the reason
    for r in rows.values():  # every row ran or says why not
        assert r["status"] == "ok" or (r["status"].startswith(("skipped: ", "error: ")) and len(r["status"]) > 12), r
    if mode == "fwd+bwd":  # CPU flash takes the float mask only without its gradient: torch's refusal shown
        flash = rows["timm bias + sdpa:flash"]["status"]
        assert flash.startswith("error: RuntimeError"), flash


def test_sam_dense_candidates_are_refused_with_the_reason_on_cpu(monkeypatch):
    p = dict(B=1, H=2, N=24, D=16, grid=(4, 6))
    monkeypatch.setattr(workloads, "_available_gb", lambda: 1e-9)
    cands = {c.name: c for c in workloads.attention_candidates(p, torch.float32, "fwd+bwd", torch.device("cpu"),
                                                               None, False)}
    if workloads._timm_missing() is None:
        for name in SAM_PEERS[:-1]:
            assert cands[name].skip.startswith("would materialise ~") and "GB available" in cands[name].skip, name
    assert cands["vitkernels:reference"].skip.startswith("would materialise ~")
    assert "would materialise" not in (cands["vitkernels:cpu"].skip or "")  # never forms the N x N bias
    assert cands["vitkernels:triton"].skip  # a reason, whatever it is on this machine
    monkeypatch.setattr(workloads, "_available_gb", lambda: 1e9)
    cands = workloads.attention_candidates(p, torch.float32, "fwd+bwd", torch.device("cpu"), None, False)
    assert not any("would materialise" in (c.skip or "") for c in cands)


def test_sam_real_shape_is_refused_only_where_it_does_not_fit(monkeypatch):
    """B=8 at N=4096 fp32: a 6 GiB bias; with 16 GB available the fused SDPA peer runs, the math ones are refused."""
    (w,) = workloads.attention_workloads("sam", torch.device("cpu"), 8)
    monkeypatch.setattr(workloads, "_available_gb", lambda: 20.0)
    cands = {c.name: c for c in workloads.attention_candidates(w.params, torch.float32, "fwd", torch.device("cpu"),
                                                               None, False)}
    assert "would materialise ~" in cands["vitkernels:reference"].skip
    if workloads._timm_missing() is None:
        assert cands["timm bias + sdpa:flash"].skip is None
        assert "would materialise ~24.0 GB" in cands["timm bias + sdpa:math"].skip
    (w,) = workloads.attention_workloads("sam", torch.device("cpu"), None)  # B=1: nothing refused
    cands = workloads.attention_candidates(w.params, torch.float32, "fwd+bwd", torch.device("cpu"), None, False)
    assert not any("would materialise" in (c.skip or "") for c in cands)


def _sam_run(call, p):
    """(out, d qkv, d table_h, d table_w) of one candidate's call on the bench's seeded inputs."""
    base, table_h, table_w = workloads._rel_pos_inputs(p, torch.float32, torch.device("cpu"), True)
    q, k, v = base.permute(2, 0, 3, 1, 4).unbind(0)
    out = call(q, k, v, table_h, table_w, tuple(p["grid"]))
    out.backward(torch.ones_like(out))
    return out.detach(), base.grad, table_h.grad, table_w.grad


def _matches(a, b):
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_sam_vitkernels_matches_the_timm_peer(backend):
    """The candidates compute the same thing: vitkernels' rel_pos terms and timm's dense bias (SDPA and its
    eager math) agree on the output and on the gradients of qkv and both tables."""
    pytest.importorskip("timm")
    p = dict(B=2, H=2, N=24, D=16, grid=(4, 6))
    timm_sdpa = _sam_run(workloads.sam_timm_sdpa, p)
    _matches(_sam_run(workloads.sam_timm_eager, p), timm_sdpa)
    probe = workloads.attention_candidates(p, torch.float32, "fwd", torch.device("cpu"), [backend], False)[0]
    if probe.skip:
        pytest.skip(f"{backend}: {probe.skip}")
    ours = _sam_run(lambda *a: workloads.sam_vitkernels(*a, backend=backend), p)
    _matches(ours, timm_sdpa)
    assert all(g.abs().sum() > 0 for g in ours[1:])  # the gradients reach qkv and both tables


@pytest.mark.slow
def test_sam_compiled_peer_matches():
    pytest.importorskip("timm")
    p = dict(B=1, H=2, N=24, D=16, grid=(4, 6))
    compiled = torch.compile(workloads.sam_timm_sdpa, dynamic=False)
    _matches(_sam_run(compiled, p), _sam_run(workloads.sam_timm_eager, p))


# ---- EVA-02 rope (attention --workload eva) and Swin V2 (window --workload swinv2) ---------------------------


def test_eva_and_swinv2_workload_sets():
    cpu = torch.device("cpu")
    names = [w.name for w in workloads.attention_workloads("eva", cpu, None)]
    assert names == ["EVA-02-B/14@224 rope", "EVA-02-L/14@448 rope"]
    w = workloads.attention_workloads("eva", cpu, None)[0]
    assert w.params == dict(B=2, H=12, N=257, D=64, rope_grid=(16, 16))
    assert w.shape == "B=2 H=12 N=257 D=64 rope=16x16+cls"
    assert "EVA-02-B/14@224 rope" in [w.name for w in workloads.attention_workloads("all", cpu, None)]
    v2 = workloads.window_workloads("swinv2", cpu, None)
    assert [w.name for w in v2] == ["SwinV2-T/w8 s1", "SwinV2-T/w8 s3"]
    assert v2[0].params == dict(B=1, spatial=(64, 64), C=96, heads=3, window=8, shift=4, cosine=True)


@pytest.mark.parametrize("op,workload,peers", [
    ("attention", "eva", ["timm rope + sdpa:math", "timm rope + eager math"]),
    ("window", "swinv2", ["timm eager"]),
])
def test_eva_and_swinv2_bench_rows(op, workload, peers, tmp_path, monkeypatch):
    pytest.importorskip("timm")
    monkeypatch.setattr(workloads, "EVA_ROPE", [("EVA tiny rope", 2, (3, 4), 16)])
    monkeypatch.setitem(workloads.WINDOW, "swinv2", [("SwinV2 tiny", (9, 10), 32, 2, 4, 2)])
    out = tmp_path / "r.json"
    assert main([op, "--workload", workload, "--mode", "fwd+bwd", "--json", str(out)] + FAST) == 0
    rows = {r["candidate"]: r for r in json.loads(out.read_text())["rows"]}
    for name in ["vitkernels:reference"] + peers:
        assert rows[name]["status"] == "ok" and rows[name]["median_ms"] > 0, rows[name]
    assert rows["vitkernels:triton"]["status"].startswith("skipped: ")
    compiled = [r for n, r in rows.items() if "compiled" in n]
    assert compiled and all(r["status"] == "skipped: compiled peer off (--no-compile)" for r in compiled)


def _eva_run(call, p):
    torch.manual_seed(0)
    base = torch.randn(p["B"], p["N"], 3, p["H"], p["D"], requires_grad=True)
    q, k, v = base.permute(2, 0, 3, 1, 4).unbind(0)
    out = call(q, k, v, workloads._rope_table(p, torch.device("cpu")))
    out.backward(torch.ones_like(out))
    return out.detach(), base.grad


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_eva_vitkernels_matches_the_timm_peer(backend):
    """The candidates compute the same thing: vitkernels' fused rotation and timm's rotate-then-SDPA agree on the
    output and the qkv gradient."""
    pytest.importorskip("timm")
    p = dict(B=2, H=2, N=13, D=16, rope_grid=(3, 4))
    timm_sdpa = _eva_run(workloads.eva_timm_sdpa, p)
    _matches(_eva_run(workloads.eva_timm_eager, p), timm_sdpa)
    probe = workloads.attention_candidates(p, torch.float32, "fwd", torch.device("cpu"), [backend], False)[0]
    if probe.skip:
        pytest.skip(f"{backend}: {probe.skip}")
    _matches(_eva_run(lambda *a: workloads.eva_vitkernels(*a, backend=backend), p), timm_sdpa)

"""``python -m vitkernels.bench`` runs as a tool: tables, JSON rows with skip reasons, plots."""
import json

import pytest

from vitkernels.bench.__main__ import main


@pytest.mark.parametrize("op,extra", [("attention", ["--bias", "--mode", "fwd+bwd"]), ("window", []), ("patch", []),
                                      ("model", ["--workload", "vit"])])
def test_bench_writes_rows_for_every_candidate(op, extra, tmp_path, capsys):
    if op in ("model", "window"):
        pytest.importorskip("timm")  # the model and Swin peers are timm's
    out_json, out_md, out_png = tmp_path / "r.json", tmp_path / "r.md", tmp_path / "r.png"
    argv = [op, "--limit", "1", "--batch", "1", "--reps", "1", "--warmup", "0", "--device", "cpu", "--no-compile",
            "--json", str(out_json), "--markdown", str(out_md), "--plot", str(out_png)] + extra
    assert main(argv) == 0
    printed = capsys.readouterr().out
    data = json.loads(out_json.read_text())
    rows = data["rows"]
    assert data["meta"]["torch"] and data["meta"]["device"].startswith("cpu")
    assert any(r["kind"] == "vitkernels" and r["status"] == "ok" and r["median_ms"] > 0 for r in rows)
    assert any(r["kind"] == "peer" and r["status"] == "ok" for r in rows)
    for r in rows:  # every row either ran or says why not; a peer may also report its own error
        allowed = ("skipped: ", "error: ") if r["kind"] == "peer" else ("skipped: ",)
        assert r["status"] == "ok" or (r["status"].startswith(allowed) and len(r["status"]) > 12), r
    assert "| candidate |" in out_md.read_text()
    assert rows[0]["candidate"] in printed
    pytest.importorskip("matplotlib")
    assert out_png.stat().st_size > 1000

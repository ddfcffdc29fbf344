"""What dispatch chose, made visible: ``vitkernels.explain`` (each backend's verdict, without running the
op) and ``VITKERNELS_LOG=dispatch`` (one line per distinct call, naming the backend that ran)."""
import logging
import os
import subprocess
import sys

import pytest
import torch

import vitkernels
from vitkernels import dispatch


def _attention_args():
    # float64: the cpu backend has a kernel but refuses it (the reference runs fp64), so every backend
    # but the reference has a reason to show
    q = torch.randn(2, 3, 49, 32, dtype=torch.float64)
    return (q, q, q), dict(bias=torch.randn(1, 3, 49, 49, dtype=torch.float64))


def test_explain_names_the_backend_dispatch_picks_and_every_refusal():
    args, kwargs = _attention_args()
    explanation = vitkernels.explain(vitkernels.flash_attention, *args, **kwargs)
    assert explanation.op == "flash_attention" and explanation.order == ("cpu", "reference")
    assert explanation.chosen == "reference" and explanation.error is None
    assert explanation.backends["reference"].can_run
    assert explanation.backends["cpu"].has_kernel and not explanation.backends["cpu"].can_run
    assert any("float64" in r or "vitkernels._C" in r for r in explanation.backends["cpu"].reasons)
    assert not explanation.backends["cuda"].has_kernel
    text = str(explanation)
    assert "-> " not in text.splitlines()[0] and "reference" in text.splitlines()[1]
    assert "no kernel" in text and "(1, 3, 49, 49)" in text


def test_explain_takes_the_op_by_name_and_reports_a_forced_backend_that_refuses():
    qkv = torch.randn(1, 9, 9, 96, dtype=torch.float64)
    explanation = vitkernels.explain("window_attention", qkv, num_heads=2, window_size=7, backend="triton")
    assert explanation.source == "backend='triton'"
    assert explanation.chosen is None and "triton" in explanation.error
    assert not explanation.backends["triton"].can_run
    assert any("float64" in r for r in explanation.backends["triton"].reasons)


def test_explain_checks_rel_pos_as_the_call_does():
    q = torch.randn(1, 2, 20, 16)
    rel = vitkernels.RelPos(torch.randn(1, 2, 20, 4), torch.randn(1, 2, 20, 5))
    explanation = vitkernels.explain(vitkernels.flash_attention, q, q, q, rel_pos=rel, backend="reference")
    assert explanation.chosen == "reference" and "rel_pos key grid 4x5" in str(explanation)
    bad = vitkernels.RelPos(torch.randn(1, 2, 20, 3), torch.randn(1, 2, 20, 3))
    with pytest.raises(ValueError, match=r"3 \(rel_h\) x 3 \(rel_w\) = 9 keys must equal Nk - prefix = 20"):
        vitkernels.explain(vitkernels.flash_attention, q, q, q, rel_pos=bad)


def test_explain_checks_rope_and_cosine_as_the_call_does():
    q = torch.randn(1, 2, 21, 16)
    tables = (torch.randn(20, 16), torch.randn(20, 16))
    explanation = vitkernels.explain(vitkernels.flash_attention, q, q, q, rope=vitkernels.Rope(*tables, prefix=1))
    assert "rope (interleaved, after 1 prefix tokens)" in str(explanation)
    with pytest.raises(ValueError, match=r"rope.cos must be \(Nq - prefix, D\) = \(21, 16\)"):
        vitkernels.explain(vitkernels.flash_attention, q, q, q, rope=tables)
    qkv = torch.randn(1, 8, 8, 96)
    explanation = vitkernels.explain("window_attention", qkv, num_heads=2, window_size=4, cosine=True,
                                     logit_scale=torch.zeros(2, 1, 1))
    assert "cosine attention" in str(explanation)
    with pytest.raises(ValueError, match="cosine=True needs logit_scale"):
        vitkernels.explain("window_attention", qkv, num_heads=2, window_size=4, cosine=True)


def test_explain_follows_the_environment_variable(monkeypatch):
    monkeypatch.setenv(dispatch.ENV_VAR, "reference")
    x, w = torch.randn(2, 3, 32, 32), torch.randn(8, 3, 16, 16)
    explanation = vitkernels.explain("patch_embed", x, w)
    assert explanation.chosen == "reference" and explanation.source == f"{dispatch.ENV_VAR}='reference'"


def test_explain_of_bad_inputs_raises_the_ops_own_error_and_unknown_ops_are_named():
    q = torch.randn(2, 3, 49, 32)
    with pytest.raises(TypeError, match="k must have dtype|dtype"):
        vitkernels.explain(vitkernels.flash_attention, q, q.double(), q)
    with pytest.raises(ValueError, match="explain: op must be one of flash_attention"):
        vitkernels.explain("conv2d", q)
    with pytest.raises(TypeError):
        vitkernels.explain("flash_attention", q, q, q, no_such_argument=1)


def test_dispatch_log_prints_each_distinct_call_once_with_the_backend_that_ran(monkeypatch, caplog):
    monkeypatch.setenv(dispatch.LOG_ENV_VAR, "dispatch")
    dispatch.forget_logged_choices()
    args, kwargs = _attention_args()
    with caplog.at_level(logging.INFO, logger="vitkernels.dispatch"):
        for _ in range(3):
            vitkernels.flash_attention(*args, **kwargs)
        vitkernels.flash_attention(*(t[:, :, :17] for t in args))
        vitkernels.flash_attention(*args, backend="reference", **kwargs)
    lines = [r.getMessage() for r in caplog.records if r.name == "vitkernels.dispatch"]
    assert len(lines) == 3, lines
    assert lines[0].startswith("flash_attention: q (2, 3, 49, 32)") and "-> reference (dispatch; passed over: cpu" in lines[0]
    assert "q (2, 3, 17, 32)" in lines[1]
    assert "-> reference (backend='reference')" in lines[2]
    monkeypatch.delenv(dispatch.LOG_ENV_VAR)
    dispatch.forget_logged_choices()


def test_dispatch_log_alone_prints_to_stderr():
    code = ("import torch, vitkernels\n"
            "x, w = torch.randn(2, 3, 32, 32), torch.randn(8, 3, 16, 16)\n"
            "for _ in range(2):\n    vitkernels.patch_embed(x, w)\n")
    env = {**os.environ, dispatch.LOG_ENV_VAR: "dispatch"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = [line for line in done.stderr.splitlines() if line.startswith("[vitkernels] patch_embed")]
    assert len(lines) == 1 and "x (2, 3, 32, 32)" in lines[0], done.stderr[-2000:]

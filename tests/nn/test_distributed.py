"""Patched models under DDP and FSDP: two CPU processes (torchrun, gloo), each with half of a batch, give
the gradients of one process with the whole batch. torch.distributed does the work; vitkernels' fused
modules only have to behave as the originals do under the wrappers' hooks, sharded parameters and buckets."""
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

pytest.importorskip("timm")
pytest.importorskip("torchvision")

from tests.nn.distributed_models import MODELS, build, loss_fn  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="needs torch.distributed with the gloo backend")


def _single_process_grads(name):
    model, x, y = build(name)
    loss_fn(model(x), y).backward()
    return {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("wrapper", ["ddp", "fsdp"])
def test_two_gloo_processes_give_the_single_process_gradients(wrapper, tmp_path):
    out = tmp_path / "grads.pt"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         os.path.join(ROOT, "tests", "nn", "distributed_worker.py"), "--wrapper", wrapper, "--out", str(out)],
        env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    # DDP warns when a gradient's strides do not match its bucket (a copy every step): none may
    assert "Grad strides do not match bucket view strides" not in done.stderr
    distributed = torch.load(out)
    assert set(distributed) == set(MODELS)
    for name in MODELS:
        expected, got = _single_process_grads(name), distributed[name]["grads"]
        fused = distributed[name]["fused_calls"]
        assert fused["window_attention" if "swin" in name else "flash_attention"] > 0, (name, fused)
        assert got.keys() == expected.keys()
        for key, grad in expected.items():
            torch.testing.assert_close(got[key], grad, rtol=1e-4, atol=1e-6,
                                       msg=lambda m: f"{name} {key}: {m}")

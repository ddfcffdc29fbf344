"""Gradient checkpointing on vitkernels models and on patched timm / torchvision models: the fused ops are
recomputed in the backward pass (dropout masks inside the fused attention included) and give the gradients
of the run without checkpointing; and a train step's peak memory drops."""
import os
import subprocess
import sys

import pytest
import torch

timm = pytest.importorskip("timm")
torchvision = pytest.importorskip("torchvision")

import vitkernels  # noqa: E402
from vitkernels import models  # noqa: E402


def _video_vit():
    return models.create_model("video_vit_tiny_patch16_tubelet2_224", img_size=32, num_frames=4, patch_size=8,
                               depth=2, num_classes=5, attn_drop_rate=0.2, drop_path_rate=0.2), (2, 3, 4, 32, 32)


def _timm_vit():
    return vitkernels.patch_timm(timm.create_model("vit_tiny_patch16_224", img_size=64, depth=2, num_classes=5,
                                                   attn_drop_rate=0.2, drop_path_rate=0.2)), (2, 3, 64, 64)


def _timm_swin():
    return models.create_model("swin_tiny_patch4_window7_224", num_classes=5, drop_path_rate=0.2), (1, 3, 224, 224)


def _torchvision_vit():
    return vitkernels.patch_torchvision(torchvision.models.VisionTransformer(
        image_size=64, patch_size=16, num_layers=2, num_heads=4, hidden_dim=128, mlp_dim=256, num_classes=5,
        attention_dropout=0.2, dropout=0.1)), (2, 3, 64, 64)


def _torchvision_swin():
    return vitkernels.patch_torchvision(torchvision.models.swin_t(num_classes=5)), (1, 3, 112, 112)


def _video_swin():
    return models.create_model("swin3d_t", num_classes=5), (1, 3, 4, 56, 56)


BUILDERS = {"video_vit": _video_vit, "timm_vit": _timm_vit, "timm_swin": _timm_swin,
            "torchvision_vit": _torchvision_vit, "torchvision_swin": _torchvision_swin, "swin3d": _video_swin}

# deeper, with more tokens: activations dominate a train step's memory, as in the high-resolution / video
# training checkpointing is for
MEMORY_BUILDERS = {
    "video_vit": lambda: (models.create_model("video_vit_tiny_patch16_tubelet2_224", img_size=64, num_frames=8,
                                              patch_size=8, depth=6, num_classes=5), (8, 3, 8, 64, 64)),
    "torchvision_vit": lambda: (vitkernels.patch_torchvision(torchvision.models.VisionTransformer(
        image_size=128, patch_size=8, num_layers=6, num_heads=3, hidden_dim=192, mlp_dim=768, num_classes=5)),
        (8, 3, 128, 128)),
}


def _grads(model, x, checkpointing, op_calls):
    model.set_grad_checkpointing(checkpointing)
    model.zero_grad(set_to_none=True)
    before = dict(op_calls)
    torch.manual_seed(123)  # the same dropout / drop-path draws in both runs
    out = model(x)
    out.logsumexp(-1).sum().backward()
    calls = {k: op_calls[k] - before[k] for k in op_calls}
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, calls


@pytest.mark.parametrize("name", list(BUILDERS))
def test_checkpointing_gives_the_gradients_of_the_plain_run(name, op_calls):
    torch.manual_seed(0)
    model, shape = BUILDERS[name]()
    model.train()
    x = torch.randn(*shape)
    out, plain, calls_plain = _grads(model, x, False, op_calls)
    out_ckpt, ckpt, calls_ckpt = _grads(model, x, True, op_calls)
    fused = {k: v for k, v in calls_plain.items() if v}
    assert fused, "no fused op ran"
    # every fused op inside a block runs again in the backward pass (the recomputation)
    assert any(calls_ckpt[k] > v for k, v in fused.items()), (calls_plain, calls_ckpt)
    assert torch.equal(out, out_ckpt)
    assert plain.keys() == ckpt.keys() and len(plain) == len(list(model.parameters()))
    for key in plain:  # same kernels on the same inputs: bitwise the same gradients
        assert torch.equal(plain[key], ckpt[key]), key


def test_dropout_inside_the_fused_attention_is_replayed_not_redrawn(op_calls):
    """With dropout on, two plain runs with different seeds differ, so the equality above is not trivial."""
    torch.manual_seed(0)
    model, shape = _timm_vit()
    model.train()
    x = torch.randn(*shape)
    torch.manual_seed(1)
    a = model(x)
    torch.manual_seed(2)
    b = model(x)
    assert not torch.equal(a, b) and op_calls["flash_attention"] == 4


def test_unpatched_torchvision_has_no_checkpointing_patched_has():
    model = torchvision.models.swin_t()
    assert not hasattr(model, "set_grad_checkpointing")
    vitkernels.patch_torchvision(model)
    model.set_grad_checkpointing(True)
    assert all(block.grad_checkpointing for stage in model.features[1::2] for block in stage)
    vitkernels.unpatch_torchvision(model)
    assert not hasattr(model, "set_grad_checkpointing") and not hasattr(model.features[1][0], "grad_checkpointing")


PEAK_SCRIPT = r"""
import sys, torch
sys.path.insert(0, {root!r})
from tests.nn.test_grad_checkpointing import MEMORY_BUILDERS
def rss(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
torch.manual_seed(0)
model, shape = MEMORY_BUILDERS[sys.argv[1]]()
model.train().set_grad_checkpointing(sys.argv[2] == "1")
x = torch.randn(*shape)
model(x[:1]).sum().backward()  # first call: kernels loaded, gradients allocated
base = rss("VmRSS")
open("/proc/self/clear_refs", "w").write("5")  # resets VmHWM (the peak) to the current RSS
model(x).logsumexp(-1).sum().backward()
print((rss("VmHWM") - base) / 2 ** 20)
"""


def _peak_mib(name, checkpointing):
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    # every allocation above 64 KiB is its own mapping, returned on free: RSS follows the live tensors
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-c", PEAK_SCRIPT.format(root=root), name, str(int(checkpointing))],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return float(done.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the peak RSS from /proc/self (Linux)")
@pytest.mark.parametrize("name", ["video_vit", "torchvision_vit"])
def test_checkpointing_lowers_the_peak_memory_of_a_train_step(name):
    plain, ckpt = _peak_mib(name, False), _peak_mib(name, True)
    print(f"{name}: train step peak {plain:.1f} MiB plain, {ckpt:.1f} MiB with checkpointing")
    assert ckpt < 0.5 * plain, (plain, ckpt)

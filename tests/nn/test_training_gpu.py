"""Training paths on a CUDA device with the compiled Triton kernels: gradient checkpointing replays the
fused dropout (the seed drawn on the device) bitwise, and patched torchvision Swin / Video Swin under bf16
autocast stay within 2x of the unpatched model's own bf16 error (both against fp64)."""
import copy

import pytest
import torch

pytestmark = pytest.mark.gpu

torchvision = pytest.importorskip("torchvision")
pytest.importorskip("timm")

import vitkernels  # noqa: E402
from vitkernels import models  # noqa: E402


def _grads(model, x, checkpointing):
    model.set_grad_checkpointing(checkpointing)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(7)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(x)
    out.float().logsumexp(-1).sum().backward()
    return out.detach(), [p.grad.clone() for p in model.parameters()]


def test_checkpointing_replays_the_fused_dropout_on_the_gpu():
    torch.manual_seed(0)
    model = models.create_model("video_vit_small_patch16_tubelet2_224", img_size=112, num_frames=8, depth=4,
                                num_classes=10, attn_drop_rate=0.1, drop_path_rate=0.1).cuda().train()
    x = torch.randn(4, 3, 8, 112, 112, device="cuda")
    out, plain = _grads(model, x, False)
    out_ckpt, ckpt = _grads(model, x, True)
    assert torch.equal(out, out_ckpt)
    assert all(torch.equal(a, b) for a, b in zip(plain, ckpt))
    torch.manual_seed(8)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        assert not torch.equal(model(x), out)  # dropout is on: another seed, another output


@pytest.mark.parametrize("name,shape", [("swin_t", (2, 3, 224, 224)), ("swin3d_t", (2, 3, 16, 112, 112)),
                                        ("vit_b_16", (2, 3, 224, 224))])
def test_patched_torchvision_in_bf16_is_within_2x_of_unpatched(name, shape):
    torch.manual_seed(0)
    reference = torchvision.models.get_model(name, weights=None).eval()
    with torch.no_grad():
        for p in reference.parameters():
            if p.abs().sum() == 0:
                p.normal_(std=0.02)
    x = torch.randn(*shape)
    with torch.no_grad():
        exact = reference.double()(x.double()).float().cuda()
        reference = reference.float().cuda()
        patched = vitkernels.patch_torchvision(copy.deepcopy(reference))
        with torch.autocast("cuda", dtype=torch.bfloat16):
            theirs = reference(x.cuda()).float()
            ours = patched(x.cuda()).float()
    err_theirs = (theirs - exact).abs().max().item()
    err_ours = (ours - exact).abs().max().item()
    assert err_ours <= 2 * err_theirs + 1e-3 * exact.abs().max().item(), (err_ours, err_theirs)

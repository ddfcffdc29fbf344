"""The video ViT (joint space-time attention over tubelets) against the same computation written with
torch's own modules (Conv3d, cat, add, timm's unpatched blocks), its clip-size handling, and the model
registry's video entries."""
import copy

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("timm")

import vitkernels  # noqa: E402
from vitkernels import models  # noqa: E402
from vitkernels.models import video_vit  # noqa: E402

TINY = "video_vit_tiny_patch16_tubelet2_224"


def _eager_reference(model, x):
    """The model's forward with torch's conv and timm's own attention: what the fused model must give."""
    blocks = vitkernels.unpatch_timm(copy.deepcopy(model.blocks))
    proj = model.patch_embed.proj
    tokens = F.conv3d(x, proj.weight, proj.bias, stride=proj.stride).flatten(2).transpose(1, 2)
    tokens = torch.cat([model.cls_token.expand(x.shape[0], -1, -1), tokens], dim=1) + model.pos_embed
    out = model.norm(blocks(tokens))
    return model.head(model.fc_norm(out[:, 1:].mean(1)) if model.global_pool == "avg" else out[:, 0]), blocks


@pytest.mark.parametrize("global_pool", ["avg", "token"])
def test_video_vit_forward_and_every_gradient_match_eager_torch(global_pool, op_calls):
    torch.manual_seed(0)
    model = models.create_model(TINY, img_size=32, num_frames=4, patch_size=8, depth=2, num_classes=5,
                                global_pool=global_pool).double().eval()
    x = torch.randn(2, 3, 4, 32, 32, dtype=torch.float64)
    got = model(x)
    assert op_calls["patch_embed"] == 1 and op_calls["flash_attention"] == 2
    expected, blocks = _eager_reference(model, x)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    grad = torch.randn_like(got)
    named = dict(model.named_parameters())
    fused = torch.autograd.grad(got, list(named.values()), grad)
    # the eager blocks are a copy: their parameters stand in for the model's blocks.* ones
    copies = {f"blocks.{n}": p for n, p in blocks.named_parameters()}
    eager = torch.autograd.grad(expected, [copies.get(n, p) for n, p in named.items()], grad)
    for name, g_fused, g_eager in zip(named, fused, eager):
        torch.testing.assert_close(g_fused, g_eager, rtol=1e-9, atol=1e-12, msg=lambda m: f"{name}: {m}")


def test_video_vit_default_clip_is_1568_tokens_of_joint_attention(op_calls):
    model = models.create_model(TINY, depth=1, num_classes=3).eval()
    assert model.patch_embed.grid_size == (8, 14, 14) and model.pos_embed.shape == (1, 1 + 1568, 192)
    with torch.no_grad():
        assert model(torch.randn(1, 3, 16, 224, 224)).shape == (1, 3)
    assert op_calls["flash_attention"] == 1


def test_video_vit_refuses_another_clip_size_and_names_the_way_out():
    model = models.create_model(TINY, img_size=32, num_frames=4, patch_size=8, depth=1)
    with pytest.raises(ValueError, match=r"x must be \(B, C, T, H, W\) = \(B, 3, 4, 32, 32\).*load_state_dict"):
        model(torch.randn(1, 3, 8, 32, 32))
    with pytest.raises(ValueError, match="multiple of the tubelet"):
        models.create_model(TINY, img_size=30, num_frames=4, patch_size=8, depth=1)


@pytest.mark.parametrize("target", [dict(img_size=48, num_frames=4), dict(img_size=32, num_frames=8)],
                         ids=["new-resolution", "more-frames"])
def test_load_state_dict_resamples_video_positions(target):
    torch.manual_seed(0)
    source = models.create_model(TINY, img_size=32, num_frames=4, patch_size=8, depth=1)
    model = models.create_model(TINY, patch_size=8, depth=1, **target)
    models.load_state_dict(model, source.state_dict())
    torch.testing.assert_close(model.pos_embed[:, :1], source.pos_embed[:, :1])  # cls position kept
    grid = model.patch_embed.grid_size
    expected = video_vit.resample_pos_embed(source.pos_embed.detach(), (2, 4, 4), grid)
    torch.testing.assert_close(model.pos_embed.detach(), expected)
    assert model.pos_embed.shape[1] == 1 + grid[0] * grid[1] * grid[2]


def test_resample_is_identity_on_the_same_grid_and_exact_on_constant_positions():
    pos = torch.randn(1, 1 + 2 * 3 * 3, 8)
    assert video_vit.resample_pos_embed(pos, (2, 3, 3), (2, 3, 3)) is pos
    constant = torch.cat([torch.zeros(1, 1, 8), torch.ones(1, 18, 8) * 0.5], dim=1)
    out = video_vit.resample_pos_embed(constant, (2, 3, 3), (4, 5, 5))
    torch.testing.assert_close(out[:, 1:], torch.full((1, 100, 8), 0.5))


def test_registry_lists_the_video_models_and_refuses_pretrained():
    assert {"swin3d_t", "swin3d_s", "swin3d_b", TINY} <= set(models.list_models())
    assert models.is_video("swin3d_b") and not models.is_video("vit_tiny_patch16_224")
    with pytest.raises(ValueError, match="not downloaded"):
        models.create_model("swin3d_t", weights="KINETICS400_V1")


def test_video_vit_under_autocast_keeps_an_fp32_residual_stream_as_timms_vit(op_calls):
    torch.manual_seed(0)
    model = models.create_model(TINY, img_size=32, num_frames=4, patch_size=8, depth=2, num_classes=5).eval()
    x = torch.randn(2, 3, 4, 32, 32)
    seen = []
    model.blocks[0].register_forward_pre_hook(lambda m, args: seen.append(args[0].dtype))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x).float()
    assert seen == [torch.float32] and op_calls["patch_embed"] == 1
    with torch.no_grad():
        expected, _ = _eager_reference(copy.deepcopy(model).double(), x.double())
    torch.testing.assert_close(out, expected.float(), rtol=0.05, atol=0.05)


def test_load_state_dict_takes_the_clip_grid_and_refuses_to_guess_between_two():
    source = models.create_model(TINY, img_size=32, num_frames=4, patch_size=8, depth=1)  # grid 2x4x4
    target = models.create_model(TINY, img_size=64, num_frames=4, patch_size=8, depth=1)  # grid 2x8x8
    models.load_state_dict(target, source.state_dict(), clip_grid=(2, 4, 4))
    expected = video_vit.resample_pos_embed(source.pos_embed.detach(), (2, 4, 4), (2, 8, 8))
    torch.testing.assert_close(target.pos_embed.detach(), expected)
    ambiguous = models.create_model(TINY, img_size=32, num_frames=4, patch_size=8, depth=1)  # 2x4x4 = 32
    state = target.state_dict()  # 128 = 2 x 8 x 8 (same frames) = 8 x 4 x 4 (same frame size): two fits
    with pytest.raises(ValueError, match="clip_grid"):
        models.load_state_dict(ambiguous, state)
    with pytest.raises(ValueError, match="clip_grid"):
        models.load_state_dict(ambiguous, state, clip_grid=(2, 4, 4))  # 32 positions, not 128

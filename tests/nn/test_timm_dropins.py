"""timm drop-ins: vitkernels.models against timm (pretrained=False, random init, CPU), patch_timm on built
timm models, and the fused ops actually being the ones that run."""
import copy

import pytest
import torch

timm = pytest.importorskip("timm")

import vitkernels.nn as vnn  # noqa: E402
from vitkernels import models  # noqa: E402
from vitkernels.nn import timm_layers  # noqa: E402

FAMILIES = ["vit_tiny_patch16_224", "deit_tiny_patch16_224", "deit_tiny_distilled_patch16_224",
            "swin_tiny_patch4_window7_224"]


@pytest.mark.parametrize("name", FAMILIES)
def test_create_model_loads_timm_state_dict_strictly_and_matches_its_logits(name, op_calls):
    torch.manual_seed(0)
    reference = timm.create_model(name, pretrained=False).eval()
    model = models.create_model(name).eval()
    assert list(model.state_dict()) == list(reference.state_dict())
    model.load_state_dict(reference.state_dict(), strict=True)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        expected = reference(x)
        logits = model(x)
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
    assert op_calls["patch_embed"] == 1
    if name.startswith("swin"):
        assert op_calls["window_attention"] == len([m for m in model.modules()
                                                    if isinstance(m, timm_layers.FusedSwinBlockMixin)])
    else:
        assert op_calls["flash_attention"] == len(model.blocks)


@pytest.mark.parametrize("name", models.IMAGE)
def test_every_supported_model_has_timms_state_dict_keys(name):
    ours = models.create_model(name, device="meta")
    theirs = timm.create_model(name, pretrained=False, device="meta")
    assert [(k, tuple(v.shape)) for k, v in ours.state_dict().items()] == \
        [(k, tuple(v.shape)) for k, v in theirs.state_dict().items()]


def test_loading_at_another_image_size_resamples_positions():
    source = timm.create_model("vit_tiny_patch16_224", pretrained=False)
    model = models.create_model("vit_tiny_patch16_384")
    models.load_state_dict(model, source.state_dict())
    assert model.pos_embed.shape == (1, 1 + 24 * 24, 192)
    with torch.no_grad():
        assert model(torch.randn(1, 3, 384, 384)).shape == (1, 1000)


def test_patch_timm_keeps_outputs_parameters_and_gradients():
    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, depth=2).train()
    model.set_distilled_training(False)
    x = torch.randn(2, 3, 224, 224)
    expected = model.eval()(x)
    expected.sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    params = [id(p) for p in model.parameters()]
    model.zero_grad()
    vnn.patch_timm(model)
    assert [id(p) for p in model.parameters()] == params
    out = model(x)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    out.sum().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], rtol=1e-3, atol=1e-4, msg=lambda m, n=n: f"{n}: {m}")


def test_unsupported_name_lists_the_supported_ones():
    with pytest.raises(ValueError, match="unknown model 'vit_huge_patch14_224'; supported: vit_tiny_patch16_224"):
        models.create_model("vit_huge_patch14_224")


def test_fused_modules_are_timms_classes_with_timms_constructor():
    attn = vnn.Attention(64, num_heads=4, qkv_bias=True)
    assert isinstance(attn, timm.layers.Attention)
    assert list(attn.state_dict()) == list(timm.layers.Attention(64, num_heads=4, qkv_bias=True).state_dict())
    x = torch.randn(2, 10, 64)
    plain = timm.layers.Attention(64, num_heads=4, qkv_bias=True)
    plain.load_state_dict(attn.state_dict())
    torch.testing.assert_close(attn(x), plain(x), rtol=1e-5, atol=1e-5)
    pe = vnn.PatchEmbed(img_size=32, patch_size=8, in_chans=3, embed_dim=16)
    ref = timm.layers.PatchEmbed(img_size=32, patch_size=8, in_chans=3, embed_dim=16)
    ref.load_state_dict(pe.state_dict())
    img = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(pe(img), ref(img), rtol=1e-5, atol=1e-5)
    block = vnn.SwinTransformerBlock(64, (14, 14), num_heads=2, window_size=7, shift_size=3)
    assert isinstance(block, timm.models.swin_transformer.SwinTransformerBlock)


@pytest.mark.parametrize("with_mask", [False, True], ids=["plain", "shift-mask"])
def test_window_attention_module_on_partitioned_windows(with_mask, op_calls):
    from timm.models.swin_transformer import WindowAttention

    torch.manual_seed(0)
    ref = WindowAttention(64, num_heads=2, window_size=7).double().eval()
    with torch.no_grad():
        ref.relative_position_bias_table.normal_()
    ours = vnn.WindowAttention(64, num_heads=2, window_size=7).double().eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    num_win, B = 4, 3
    x = torch.randn(B * num_win, 49, 64, dtype=torch.float64, requires_grad=True)
    mask = None
    if with_mask:
        ids = torch.randint(0, 3, (num_win, 49))
        mask = torch.zeros(num_win, 49, 49, dtype=torch.float64).masked_fill(ids[:, :, None] != ids[:, None, :], -100.0)
    out = ours(x, mask=mask)
    assert op_calls["flash_attention"] == 1  # the fused path ran
    expected = ref(x, mask=mask)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, [x, ours.relative_position_bias_table], g)
    want = torch.autograd.grad(expected, [x, ref.relative_position_bias_table], g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_vit_under_autocast_keeps_timms_fp32_residual_stream(op_calls):
    torch.manual_seed(0)
    reference = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, img_size=64, depth=2).eval()
    model = vnn.patch_timm(copy.deepcopy(reference))
    x = torch.randn(2, 3, 64, 64)
    outs = {}
    for name, m in (("timm", reference), ("patched", model)):
        seen = []
        handle = m.blocks[0].register_forward_pre_hook(lambda mod, args: seen.append(args[0].dtype))
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            outs[name] = m(x).float()
        handle.remove()
        assert seen == [torch.float32], name
    with torch.no_grad():
        exact = copy.deepcopy(reference).double()(x.double()).float()
    assert op_calls["patch_embed"] == 1
    assert (outs["patched"] - exact).abs().max() <= 2 * (outs["timm"] - exact).abs().max() + 1e-6

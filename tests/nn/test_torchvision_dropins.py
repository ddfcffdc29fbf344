"""torchvision drop-ins: patch_torchvision on built torchvision models (random init, CPU) against the same
models unpatched in the same test; the fused ops being the ones that run; torchvision's code wherever
the fused path would differ."""
import copy
import pickle

import pytest
import torch

torchvision = pytest.importorskip("torchvision")

import vitkernels  # noqa: E402
from vitkernels.nn import torchvision_layers  # noqa: E402
from vitkernels.nn.multihead_attention import MultiheadAttention  # noqa: E402


def _randomize(model):
    """torchvision zero-initialises heads and class tokens: give every parameter values, so no gradient is
    trivially zero."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.abs().sum() == 0:
                p.normal_(std=0.02)
    return model


def _pair(build, dtype=torch.float64):
    torch.manual_seed(0)
    reference = _randomize(build()).to(dtype).eval()
    model = vitkernels.patch_torchvision(copy.deepcopy(reference))
    return reference, model


def _assert_same_outputs_and_grads(reference, model, x, rtol, atol):
    xr, xm = x.clone().requires_grad_(), x.clone().requires_grad_()
    expected, got = reference(xr), model(xm)
    torch.testing.assert_close(got, expected, rtol=rtol, atol=atol)
    grad_out = torch.randn_like(expected)
    expected.backward(grad_out)
    got.backward(grad_out)
    torch.testing.assert_close(xm.grad, xr.grad, rtol=rtol, atol=atol)
    for (name, p_ref), p in zip(reference.named_parameters(), model.parameters()):
        assert p.grad is not None, name
        torch.testing.assert_close(p.grad, p_ref.grad, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


def _small_vit():
    return torchvision.models.VisionTransformer(image_size=64, patch_size=16, num_layers=2, num_heads=4,
                                                hidden_dim=128, mlp_dim=256, num_classes=10)


def test_vit_b_16_at_224_matches_unpatched_in_fp32(op_calls):
    reference, model = _pair(torchvision.models.vit_b_16, torch.float32)
    assert list(model.state_dict()) == list(reference.state_dict())
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=1e-4, atol=1e-4)
    assert op_calls["patch_embed"] == 1 and op_calls["flash_attention"] == 12
    assert type(model.encoder.layers[0].self_attention) is MultiheadAttention


def test_vit_outputs_and_every_gradient_match_unpatched(op_calls):
    reference, model = _pair(_small_vit)
    _assert_same_outputs_and_grads(reference, model, torch.randn(3, 3, 64, 64, dtype=torch.float64), 1e-9, 1e-10)
    assert op_calls["patch_embed"] == 1 and op_calls["flash_attention"] == 2


def test_vit_takes_torchvisions_code_for_what_the_fused_path_does_not_do(op_calls):
    reference, model = _pair(_small_vit)
    with pytest.raises(Exception, match="Wrong image height"):  # torchvision's own assert, message included
        model(torch.randn(1, 3, 32, 64, dtype=torch.float64))
    seen = []
    model.conv_proj.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=1e-9, atol=1e-10)
    assert seen == [(1, 128, 4, 4)] and op_calls["patch_embed"] == 0


@pytest.mark.parametrize("size", [(112, 112), (256, 256), (72, 100)],
                         ids=["divisible", "pad-then-shift", "mixed"])
def test_swin_t_outputs_and_every_gradient_match_unpatched(size, op_calls):
    reference, model = _pair(torchvision.models.swin_t)
    x = torch.randn(1, 3, *size, dtype=torch.float64)
    _assert_same_outputs_and_grads(reference, model, x, 1e-9, 1e-10)
    # maps no smaller than the 7x7 window are fused (112: 28, 14, 7 | 3; 256: 64, 32, 16, 8; 72x100: 18x25, 9x12)
    assert op_calls["window_attention"] == {(112, 112): 10, (256, 256): 12, (72, 100): 4}[size]


def test_swin_t_at_224_matches_unpatched_in_fp32(op_calls):
    reference, model = _pair(torchvision.models.swin_t, torch.float32)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=1e-4, atol=1e-4)
    assert op_calls["window_attention"] == 12


def test_attention_dropout_in_training_keeps_torchvisions_code(op_calls):
    # (Swin V2, fused with window_attention(cosine=True): tests/nn/test_rope_cosine_dropins.py)
    reference, model = _pair(lambda: torchvision.models.swin_t(attention_dropout=0.1))
    model.train()
    model(torch.randn(1, 3, 112, 112, dtype=torch.float64))
    assert op_calls["window_attention"] == 0
    model.eval()
    with torch.no_grad():
        model(torch.randn(1, 3, 112, 112, dtype=torch.float64))
    assert op_calls["window_attention"] == 10


@pytest.mark.parametrize("clip", [(8, 64, 64), (6, 40, 56), (4, 28, 28)], ids=["window", "padded", "clipped"])
def test_swin3d_t_outputs_and_every_gradient_match_unpatched(clip, op_calls):
    reference, model = _pair(torchvision.models.video.swin3d_t)
    x = torch.randn(1, 3, *clip, dtype=torch.float64)
    _assert_same_outputs_and_grads(reference, model, x, 1e-9, 1e-10)
    assert op_calls["window_attention"] == 12 and op_calls["patch_embed"] == 1


def test_swin3d_patch_embed_pads_with_torchvisions_code(op_calls):
    reference, model = _pair(torchvision.models.video.swin3d_t)
    x = torch.randn(1, 3, 5, 30, 34, dtype=torch.float64)  # not a multiple of the 2x4x4 tubelet
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=1e-9, atol=1e-10)
    assert op_calls["patch_embed"] == 0 and op_calls["window_attention"] == 12


def test_models_create_swin3d_loads_torchvisions_state_dict_and_gives_its_logits(op_calls):
    torch.manual_seed(0)
    peer = _randomize(torchvision.models.video.swin3d_t(num_classes=10)).eval()
    model = vitkernels.models.create_model("swin3d_t", num_classes=10).eval()
    model.load_state_dict(peer.state_dict(), strict=True)
    x = torch.randn(2, 3, 8, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), peer(x), rtol=1e-4, atol=1e-4)
    assert op_calls["window_attention"] == 12
    model.train()
    model(x).logsumexp(-1).sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_unpatch_pickle_deepcopy_and_torchscript():
    reference, model = _pair(_small_vit)
    params = dict(model.named_parameters())
    clone = pickle.loads(pickle.dumps(model))
    assert type(clone) is type(model) and isinstance(clone, torchvision_layers.FusedVisionTransformerMixin)
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(clone(x), reference(x), rtol=1e-9, atol=1e-10)
    with pytest.raises(TypeError, match="unpatch_torchvision"):
        torch.jit.script(model)
    vitkernels.unpatch_torchvision(model)
    assert type(model) is torchvision.models.VisionTransformer
    assert all(type(m).__module__.startswith(("torch", "torchvision")) for m in model.modules())
    assert type(model.encoder.layers[0].self_attention) is torch.nn.MultiheadAttention
    assert all(p is params[n] for n, p in model.named_parameters())


def test_feature_extraction_traces_torchvisions_graph():
    from torchvision.models.feature_extraction import create_feature_extractor

    reference, model = _pair(torchvision.models.video.swin3d_t)
    extractor = create_feature_extractor(model, return_nodes=["features.1", "norm"])
    x = torch.randn(1, 3, 4, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        got = extractor(x)
        expected = create_feature_extractor(reference, return_nodes=["features.1", "norm"])(x)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("name", ["swin3d_t", "swin3d_s", "swin3d_b"])
def test_every_video_swin_has_torchvisions_state_dict(name):
    with torch.device("meta"):
        ours = vitkernels.models.create_model(name)
        theirs = getattr(torchvision.models.video, name)()
    assert [(k, tuple(v.shape)) for k, v in ours.state_dict().items()] == \
        [(k, tuple(v.shape)) for k, v in theirs.state_dict().items()]
    fused = [m for m in ours.modules() if isinstance(m, torchvision_layers.FusedShiftedWindowAttentionMixin)]
    assert len(fused) == sum(1 for m in theirs.modules() if type(m).__name__ == "ShiftedWindowAttention3d") > 0


def _block_input_dtypes(model, blocks, x):
    seen = []
    handles = [b.register_forward_pre_hook(lambda m, args: seen.append(args[0].dtype)) for b in blocks]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    for h in handles:
        h.remove()
    return out.float(), seen


def test_vit_under_autocast_keeps_torchvisions_fp32_residual_stream(op_calls):
    reference, model = _pair(_small_vit, torch.float32)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        exact = reference.double()(x.double()).float()
    reference.float()
    theirs, their_dtypes = _block_input_dtypes(reference, [reference.encoder.layers[0], reference.encoder.ln], x)
    ours, our_dtypes = _block_input_dtypes(model, [model.encoder.layers[0], model.encoder.ln], x)
    assert our_dtypes == their_dtypes == [torch.float32, torch.float32]
    assert op_calls["patch_embed"] == 1
    assert (ours - exact).abs().max() <= 2 * (theirs - exact).abs().max() + 1e-6


@pytest.mark.parametrize("kind", ["subclass", "state_dict"])
def test_swin_with_another_relative_position_index_runs_torchvisions_code(kind, op_calls):
    from torchvision.models.swin_transformer import ShiftedWindowAttention, SwinTransformerBlock

    def flipped(index):
        return index.flip(0).contiguous()

    if kind == "subclass":
        class Symmetric(ShiftedWindowAttention):
            def define_relative_position_index(self):
                super().define_relative_position_index()
                self.relative_position_index = flipped(self.relative_position_index)

        build = lambda: SwinTransformerBlock(32, 2, [7, 7], [3, 3], attn_layer=Symmetric)  # noqa: E731
        reference, model = _pair(build)
    else:
        reference, model = _pair(lambda: SwinTransformerBlock(32, 2, [7, 7], [3, 3]))
        state = reference.state_dict()
        state["attn.relative_position_index"] = flipped(state["attn.relative_position_index"])
        reference.load_state_dict(state)
        model.load_state_dict(state)
    x = torch.randn(1, 14, 14, 32, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=1e-9, atol=1e-10)
    assert op_calls["window_attention"] == 0
    if kind == "state_dict":  # the standard index loaded back: fused again
        state["attn.relative_position_index"] = flipped(state["attn.relative_position_index"])
        model.load_state_dict(state)
        reference.load_state_dict(state)
        with torch.no_grad():
            torch.testing.assert_close(model(x), reference(x), rtol=1e-9, atol=1e-10)
        assert op_calls["window_attention"] == 1

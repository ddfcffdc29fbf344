"""Drop-ins with a decomposed relative-position bias: timm's SAM / ViTDet ``Attention`` (``samvit_*``) under
patch_timm and torchvision's MViT ``MultiscaleAttention`` (``mvit_v2_s``, ``mvit_v1_b``) under
patch_torchvision, against the same models unpatched in the same test (outputs and every parameter
gradient, the rel_pos tables included); ``flash_attention`` being the op that runs; the original code
wherever the fused path would differ."""
import copy
import pickle
from unittest import mock

import pytest
import torch

timm = pytest.importorskip("timm")
torchvision = pytest.importorskip("torchvision")

import vitkernels  # noqa: E402
from torchvision.models.video import mvit as tv_mvit  # noqa: E402
from vitkernels.nn import timm_layers, torchvision_layers  # noqa: E402
from vitkernels.ops.attention.rel_pos import rel_pos_table  # noqa: E402


def _randomize(model, table_std=0.5):
    """Values for every zero-initialised parameter (timm's rel_pos tables, torchvision's heads), and tables
    large enough that the relative positions matter: no gradient is trivially zero."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "rel_pos" in name:
                p.normal_(std=table_std)
            elif p.abs().sum() == 0:
                p.normal_(std=0.02)
    return model


def _assert_same_outputs_and_grads(reference, model, x, rtol, atol, grad_rtol=None, grad_atol=None):
    xr, xm = x.clone().requires_grad_(), x.clone().requires_grad_()
    expected, got = reference(xr), model(xm)
    torch.testing.assert_close(got, expected, rtol=rtol, atol=atol)
    grad_out = torch.randn_like(expected)
    expected.backward(grad_out)
    got.backward(grad_out)
    rtol, atol = grad_rtol or rtol, grad_atol or atol
    torch.testing.assert_close(xm.grad, xr.grad, rtol=rtol, atol=atol)
    named = list(reference.named_parameters())
    assert any("rel_pos" in name for name, _ in named)
    for (name, p_ref), p in zip(named, model.parameters()):
        assert p.grad is not None, name
        torch.testing.assert_close(p.grad, p_ref.grad, rtol=rtol, atol=atol, msg=lambda m, name=name: f"{name}: {m}")


# ---------------------------------------------------------------------------------------------- timm SAM

def _samvit(dtype=torch.float64, table_std=0.5, **kwargs):
    """A small samvit: 6x6 patches at 96 px, 4x4 windows (padded to 8x8: 4 windows) and global blocks."""
    args = dict(img_size=96, embed_dim=64, depth=4, num_heads=2, global_attn_indexes=(1, 3), window_size=4,
                neck_chans=32, num_classes=10)
    torch.manual_seed(0)
    model = timm.create_model("samvit_base_patch16", pretrained=False, **dict(args, **kwargs))
    return _randomize(model, table_std).to(dtype)


def _timm_pair(build):
    reference = build().eval()
    return reference, vitkernels.patch_timm(copy.deepcopy(reference))


def _sam_attentions(model):
    return [m for m in model.modules() if isinstance(m, timm.models.vision_transformer_sam.Attention)]


@pytest.mark.parametrize("size, qk_norm", [(96, False), (128, True)], ids=["built-size", "resized-tables-qk-norm"])
def test_samvit_outputs_and_every_gradient_match_unpatched(size, qk_norm, op_calls):
    # 128 px: an 8x8 map on tables built for 6x6 (global blocks resize them, as timm does), 2x2 windows
    reference, model = _timm_pair(lambda: _samvit(qk_norm=qk_norm))
    assert all(isinstance(m, timm_layers.FusedSamAttentionMixin) for m in _sam_attentions(model))
    x = torch.randn(2, 3, size, size, dtype=torch.float64)
    _assert_same_outputs_and_grads(reference, model, x, 1e-9, 1e-10)
    assert op_calls["flash_attention"] == 4 and op_calls["patch_embed"] == 1


def test_samvit_base_fp32_windows_with_padding_and_global_blocks(op_calls):
    # samvit_base_patch16's blocks at 256 px: a 16x16 map, 14x14 windows padded to 28x28 (4 windows), and a
    # global block on 16x16
    reference, model = _timm_pair(lambda: _samvit(torch.float32, table_std=0.1, img_size=256, embed_dim=768,
                                                  depth=2, num_heads=12, global_attn_indexes=(1,), window_size=14,
                                                  neck_chans=256))
    x = torch.randn(1, 3, 256, 256)
    _assert_same_outputs_and_grads(reference, model, x, 1e-4, 1e-5, grad_rtol=1e-3, grad_atol=1e-4)
    assert op_calls["flash_attention"] == 2


def test_samvit_base_patch16_architecture_in_fp32(op_calls):
    # at 128 px: an 8x8 map, 14x14 windows (one, padded) and global blocks on 8x8
    torch.manual_seed(0)
    reference = _randomize(timm.create_model("samvit_base_patch16", pretrained=False, img_size=128),
                           table_std=0.1).eval()
    model = vitkernels.patch_timm(copy.deepcopy(reference))
    assert [(k, tuple(v.shape)) for k, v in model.state_dict().items()] == \
        [(k, tuple(v.shape)) for k, v in reference.state_dict().items()]
    x = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=1e-4, atol=1e-4)
    assert op_calls["flash_attention"] == 12 and op_calls["patch_embed"] == 1


def test_samvit_without_rel_pos_is_plain_attention_and_rope_keeps_timms_code(op_calls):
    reference, model = _timm_pair(lambda: _samvit(use_rel_pos=False))
    x = torch.randn(2, 3, 96, 96, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=1e-9, atol=1e-10)
    assert op_calls["flash_attention"] == 4
    op_calls["flash_attention"] = 0
    reference, model = _timm_pair(lambda: _samvit(use_rel_pos=False, use_rope=True))
    assert all(m.rope is not None for m in _sam_attentions(model))
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=1e-9, atol=1e-10)
    assert op_calls["flash_attention"] == 0  # rotary embeddings: timm's code


def test_samvit_takes_timms_code_for_what_the_fused_path_does_not_do(op_calls):
    reference, model = _timm_pair(_samvit)
    x = torch.randn(1, 3, 96, 96, dtype=torch.float64)
    for m in _sam_attentions(model)[:2]:  # timm's switch (attention-map extraction): its explicit softmax
        m.fused_attn = False
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=1e-9, atol=1e-10)
    assert op_calls["flash_attention"] == 2
    for m in (reference, model):  # fp32 tables on fp64 queries: timm's einsum error, not a silent cast
        _sam_attentions(m)[3].rel_pos_h.data = _sam_attentions(m)[3].rel_pos_h.data.float()
        with torch.no_grad(), pytest.raises(RuntimeError, match="expected scalar type"):
            m(x)
    assert op_calls["flash_attention"] == 3  # block 2 ran before block 3 raised
    for m in (reference, model):
        _sam_attentions(m)[3].rel_pos_h.data = _sam_attentions(m)[3].rel_pos_h.data.double()
    with torch.no_grad():
        traced = torch.jit.trace(model, x, check_trace=False)  # the trace records timm's code
        assert op_calls["flash_attention"] == 3
        torch.testing.assert_close(traced(x), reference(x), rtol=1e-9, atol=1e-10)


def test_wrapped_qkv_projections_run_the_originals_code(op_calls):
    # an adapter / quantized wrapper around qkv (here a Sequential): the originals call it as it is
    reference, model = _timm_pair(_samvit)
    for m in (reference, model):
        for attn in _sam_attentions(m):
            attn.qkv = torch.nn.Sequential(attn.qkv)
    x = torch.randn(1, 3, 96, 96, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=1e-9, atol=1e-10)
    reference, model = _tv_pair(_mvit)
    for m in (reference, model):
        for block in m.blocks:
            block.attn.qkv = torch.nn.Sequential(block.attn.qkv)
    clip = torch.randn(1, 3, 4, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(model(clip), reference(clip), rtol=1e-9, atol=1e-10)
    assert op_calls["flash_attention"] == 0


def test_samvit_attention_dropout_in_training_runs_in_the_fused_op(op_calls):
    from timm.models.vision_transformer_sam import Attention

    torch.manual_seed(0)
    reference = Attention(64, num_heads=2, use_rel_pos=True, input_size=(5, 5), attn_drop=1.0).double().train()
    _randomize(reference)
    model = vitkernels.patch_timm(copy.deepcopy(reference))
    x = torch.randn(2, 5, 5, 64, dtype=torch.float64)
    out = model(x)  # every probability dropped: the projection of zeros, as timm gives it
    assert op_calls["flash_attention"] == 1
    torch.testing.assert_close(out, reference(x), rtol=0, atol=1e-12)
    torch.testing.assert_close(out, model.proj.bias.expand_as(out), rtol=0, atol=1e-12)
    reference.eval(), model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=1e-9, atol=1e-10)
    assert op_calls["flash_attention"] == 2


def test_samvit_unpatch_pickle_and_torchscript():
    reference, model = _timm_pair(_samvit)
    params = dict(model.named_parameters())
    assert list(model.state_dict()) == list(reference.state_dict())
    clone = pickle.loads(pickle.dumps(model))
    assert type(clone.blocks[0].attn) is type(model.blocks[0].attn)
    x = torch.randn(1, 3, 96, 96, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(clone(x), reference(x), rtol=1e-9, atol=1e-10)
    with pytest.raises(TypeError, match="unpatch_timm"):
        torch.jit.script(model.blocks[0].attn)
    vitkernels.unpatch_timm(model)
    assert type(model.blocks[0].attn) is timm.models.vision_transformer_sam.Attention
    assert all(not isinstance(m, timm_layers._TimmDropIn) for m in model.modules())
    assert all(p is params[n] for n, p in model.named_parameters())


def _autocast_run(model, modules, x):
    """bf16 autocast: the model's output (fp32) and the dtypes going into / out of ``modules``."""
    seen = []
    handles = [m.register_forward_hook(lambda mod, args, out: seen.append(
        (args[0].dtype, (out[0] if isinstance(out, tuple) else out).dtype))) for m in modules]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    for h in handles:
        h.remove()
    return out.float(), seen


def test_samvit_under_autocast_keeps_timms_dtypes(op_calls):
    reference, model = _timm_pair(lambda: _samvit(torch.float32, table_std=0.1))
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        exact = copy.deepcopy(reference).double()(x.double()).float()
    theirs, their_dtypes = _autocast_run(reference, [reference.blocks[0], reference.blocks[1].attn], x)
    ours, our_dtypes = _autocast_run(model, [model.blocks[0], model.blocks[1].attn], x)
    assert our_dtypes == their_dtypes
    assert op_calls["flash_attention"] == 4
    assert (ours - exact).abs().max() <= 2 * (theirs - exact).abs().max() + 1e-6


# ------------------------------------------------------------------------------------- torchvision MViT

def _mvit(rel_pos=True, residual_pool=True, residual_with_cls_embed=False, stride_kv=(1, 4, 4), spatial=32):
    """A small MViT on 4x32x32 clips (a 2x8x8 grid): q pooling in blocks 0 (stride 1) and 1 (stride 2), kv
    pooling everywhere, so Nq != Nk; head dims 16, 32, 16."""
    cfg = [tv_mvit.MSBlockConfig(2, 32, 32, [3, 3, 3], [3, 3, 3], [1, 1, 1], list(stride_kv)),
           tv_mvit.MSBlockConfig(2, 32, 64, [3, 3, 3], [3, 3, 3], [1, 2, 2], [1, 2, 2]),
           tv_mvit.MSBlockConfig(4, 64, 64, [], [3, 3, 3], [], [1, 2, 2])]
    torch.manual_seed(0)
    return _randomize(tv_mvit.MViT((spatial, spatial), 4, cfg, residual_pool=residual_pool,
                                   residual_with_cls_embed=residual_with_cls_embed, rel_pos_embed=rel_pos,
                                   proj_after_attn=rel_pos, num_classes=10, dropout=0.0))


def _tv_pair(build, dtype=torch.float64):
    reference = build().to(dtype).eval()
    return reference, vitkernels.patch_torchvision(copy.deepcopy(reference))


@pytest.mark.parametrize("kind", ["v2", "v2-residual-with-cls", "v1"])
def test_mvit_outputs_and_every_gradient_match_unpatched(kind, op_calls):
    build = {"v2": _mvit, "v2-residual-with-cls": lambda: _mvit(residual_with_cls_embed=True),
             "v1": lambda: _mvit(rel_pos=False, residual_pool=False, residual_with_cls_embed=True)}[kind]
    reference, model = _tv_pair(build)
    assert all(isinstance(b.attn, torchvision_layers.FusedMultiscaleAttentionMixin) for b in model.blocks)
    x = torch.randn(2, 3, 4, 32, 32, dtype=torch.float64)
    if kind == "v1":  # no rel_pos tables: the helper's check does not apply
        xr, xm = x.clone().requires_grad_(), x.clone().requires_grad_()
        expected, got = reference(xr), model(xm)
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-10)
        got.sum().backward()
        expected.sum().backward()
        for (name, p_ref), p in zip(reference.named_parameters(), model.parameters()):
            torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-9, atol=1e-10, msg=lambda m, n=name: f"{n}: {m}")
    else:
        _assert_same_outputs_and_grads(reference, model, x, 1e-9, 1e-10)
    assert op_calls["flash_attention"] == 3


def _mvit_v2_s_at(spatial, temporal):
    """torchvision's mvit_v2_s (its block settings, residual pooling, rel_pos) built for another clip size:
    the builder passes spatial_size=(224, 224), temporal_size=16 itself."""
    real = tv_mvit._mvit

    def sized(**kwargs):
        return real(**dict(kwargs, spatial_size=(spatial, spatial), temporal_size=temporal))
    with mock.patch.object(tv_mvit, "_mvit", sized):
        return torchvision.models.video.mvit_v2_s()


def test_mvit_v2_s_architecture_on_a_small_clip_in_fp32(op_calls):
    reference, model = _tv_pair(lambda: _randomize(_mvit_v2_s_at(64, 4), table_std=0.1), torch.float32)
    assert [(k, tuple(v.shape)) for k, v in model.state_dict().items()] == \
        [(k, tuple(v.shape)) for k, v in reference.state_dict().items()]
    x = torch.randn(1, 3, 4, 64, 64)
    _assert_same_outputs_and_grads(reference, model, x, 1e-4, 1e-5, grad_rtol=1e-3, grad_atol=1e-4)
    assert op_calls["flash_attention"] == 16


def test_mvit_v2_s_at_its_clip_size_in_fp32(op_calls):
    # mvit_v2_s() takes 16 x 224 x 224 clips only (its builder fixes the sizes): 8 x 56 x 56 queries in stage 1
    torch.manual_seed(0)
    reference = torchvision.models.video.mvit_v2_s().eval()
    model = vitkernels.patch_torchvision(copy.deepcopy(reference))
    x = torch.randn(1, 3, 16, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=1e-4, atol=1e-4)
    assert op_calls["flash_attention"] == 16


def test_mvit_grids_that_do_not_divide_take_torchvisions_table_rows(op_calls):
    # a 16x16 grid against keys pooled by 3 (6x6): torchvision's _add_rel_pos and timm's get_rel_pos round the
    # stretched coordinates apart; the drop-in takes torchvision's rows (index_rule="torchvision")
    table = torch.randn(31, 4)
    timm_rows = rel_pos_table(16, 6, table, "timm")
    torchvision_rows = rel_pos_table(16, 6, table, "torchvision")
    assert not torch.equal(timm_rows, torchvision_rows) and torch.equal(
        rel_pos_table(16, 8, table, "timm"), rel_pos_table(16, 8, table, "torchvision"))
    x = torch.randn(1, 3, 4, 64, 64, dtype=torch.float64)
    reference, model = _tv_pair(lambda: _mvit(stride_kv=(1, 3, 3), spatial=64))
    _assert_same_outputs_and_grads(reference, model, x, 1e-9, 1e-10)
    assert op_calls["flash_attention"] == 3


def test_mvit_token_count_other_than_its_grid_gives_torchvisions_error(op_calls):
    reference, model = _tv_pair(_mvit)
    x = torch.randn(1, 1 + 2 * 8 * 8, 32, dtype=torch.float64)
    with torch.no_grad():
        for attn in (reference.blocks[0].attn, model.blocks[0].attn):
            with pytest.raises(RuntimeError, match="shape"):
                attn(x, (2, 8, 7))
        out, thw = model.blocks[0].attn(x, (2, 8, 8))
        expected, expected_thw = reference.blocks[0].attn(x, (2, 8, 8))
    torch.testing.assert_close(out, expected, rtol=1e-9, atol=1e-10)
    assert thw == expected_thw and op_calls["flash_attention"] == 1


def test_mvit_feature_extraction_traces_torchvisions_graph(op_calls):
    from torchvision.models.feature_extraction import create_feature_extractor

    reference, model = _tv_pair(_mvit)
    extractor = create_feature_extractor(model, return_nodes=["blocks.1", "norm"])
    x = torch.randn(1, 3, 4, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        got = extractor(x)
        expected = create_feature_extractor(reference, return_nodes=["blocks.1", "norm"])(x)
    assert op_calls["flash_attention"] == 0
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-9, atol=1e-10)


def test_mvit_unpatch_pickle_and_torchscript():
    reference, model = _tv_pair(_mvit)
    params = dict(model.named_parameters())
    assert list(model.state_dict()) == list(reference.state_dict())
    clone = pickle.loads(pickle.dumps(model))
    assert isinstance(clone.blocks[0].attn, torchvision_layers.FusedMultiscaleAttentionMixin)
    x = torch.randn(1, 3, 4, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(clone(x), reference(x), rtol=1e-9, atol=1e-10)
    with pytest.raises(TypeError, match="unpatch_torchvision"):
        torch.jit.script(model.blocks[0].attn)
    vitkernels.unpatch_torchvision(model)
    assert type(model.blocks[0].attn) is tv_mvit.MultiscaleAttention
    assert all(not isinstance(m, torchvision_layers._TorchvisionDropIn) for m in model.modules())
    assert all(p is params[n] for n, p in model.named_parameters())


def test_mvit_under_autocast_keeps_torchvisions_dtypes(op_calls):
    reference, model = _tv_pair(lambda: _randomize(_mvit(), table_std=0.1), torch.float32)
    x = torch.randn(2, 3, 4, 32, 32)
    with torch.no_grad():
        exact = copy.deepcopy(reference).double()(x.double()).float()
    modules = lambda m: [m.blocks[0], m.blocks[1], m.blocks[1].attn, m.norm]  # noqa: E731
    theirs, their_dtypes = _autocast_run(reference, modules(reference), x)
    ours, our_dtypes = _autocast_run(model, modules(model), x)
    assert our_dtypes == their_dtypes
    assert op_calls["flash_attention"] == 3
    assert (ours - exact).abs().max() <= 2 * (theirs - exact).abs().max() + 1e-6


# ------------------------------------------------------------------------------------------ torch.compile


@pytest.mark.parametrize("compiler", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
@pytest.mark.parametrize("kind", ["samvit", "mvit"])
def test_compiled_drop_ins_fullgraph_match_eager(kind, compiler, op_calls):
    """torch.compile(fullgraph=True) of the patched models (a graph break raises): decomposed_rel_pos, the
    table resizing and the MViT pooling grids trace, and the fused op runs (no replay of the unpatched math).
    aot_eager traces exactly what inductor gets, without its code generation (about 50 s a model here)."""
    torch._dynamo.reset()
    if kind == "samvit":
        model, x = vitkernels.patch_timm(_samvit(torch.float32)).eval(), torch.randn(2, 3, 96, 96)
    else:
        model, x = vitkernels.patch_torchvision(_mvit().float()).eval(), torch.randn(2, 3, 4, 32, 32)
    out = model(x)
    out.square().mean().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    eager_calls = op_calls["flash_attention"]
    assert eager_calls > 0
    out_c = torch.compile(model, fullgraph=True, backend=compiler)(x)
    out_c.square().mean().backward()
    assert op_calls["flash_attention"] == 2 * eager_calls  # traced through the fused drop-in once more
    torch.testing.assert_close(out_c, out, rtol=1e-4, atol=1e-5)
    for (name, p), g in zip(model.named_parameters(), grads):
        torch.testing.assert_close(p.grad, g, rtol=1e-3, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")

"""Every workflow users run on timm / torch models, plain against patched in the same test: a patched model
either gives what the unpatched one gives or raises an error that names the feature and the way out.

Families: ViT, DeiT-distilled, Swin (small configs of timm's models: the same code paths, CPU-sized), and
``nn.MultiheadAttention`` inside ``nn.TransformerEncoder``. torch.compile of the same families is in
tests/test_compile.py.
"""
import copy
import io
import pickle

import pytest
import torch
from torch import nn

timm = pytest.importorskip("timm")

from vitkernels.nn import replace_mha, restore_mha, timm_layers  # noqa: E402
from vitkernels.nn import patch_timm, unpatch_timm  # noqa: E402
from tests.utils import onnx_run  # noqa: E402

FAMILIES = {
    "vit": ("vit_tiny_patch16_224", dict(depth=2, img_size=64), 64),
    "deit_distilled": ("deit_tiny_distilled_patch16_224", dict(depth=2, img_size=64), 64),
    # 112: stage maps 28, 14, 7 and 3 (the last clipped to its map, unshifted); head_dim 32 everywhere
    "swin": ("swin_tiny_patch4_window7_224", dict(img_size=112, embed_dim=32, depths=(2, 2, 2, 2),
                                                  num_heads=(1, 2, 4, 8), drop_path_rate=0.0), 112),
}
TOL = dict(rtol=1e-4, atol=1e-5)


def build(family, **overrides):
    name, kwargs, size = FAMILIES[family]
    torch.manual_seed(0)
    plain = timm.create_model(name, pretrained=False, **{**kwargs, **overrides}).eval()
    if family == "deit_distilled":
        plain.set_distilled_training(False)
    patched = patch_timm(copy.deepcopy(plain))
    return plain, patched, size


def images(size, batch=2, seed=1):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def fused_calls(calls):
    return sum(calls.values())


def assert_same_grads(patched, plain, rel=1e-4):
    """Every parameter's gradient equal up to fp32 rounding, relative to that gradient's largest entry."""
    theirs = dict(plain.named_parameters())
    for name, p in patched.named_parameters():
        expected = theirs[name].grad
        assert (p.grad is None) == (expected is None), name
        if expected is not None:
            err = (p.grad - expected).abs().max().item()
            assert err <= rel * expected.abs().max().item() + 1e-7, f"{name}: max error {err:.3e}"


def cotangent(out):
    return torch.randn(out.shape, generator=torch.Generator().manual_seed(3))


# ---------------------------------------------------------------------------------------------- timm models

@pytest.mark.parametrize("family", FAMILIES)
def test_train_step_gives_timms_outputs_and_every_gradient(family, op_calls):
    plain, patched, size = build(family)
    plain.train(), patched.train()
    x = images(size)
    expected, out = plain(x), patched(x)
    torch.testing.assert_close(out, expected, **TOL)
    assert fused_calls(op_calls) > 0
    expected.backward(cotangent(expected))
    out.backward(cotangent(out))
    assert_same_grads(patched, plain)


@pytest.mark.parametrize("family", FAMILIES)
def test_submodules_called_alone_and_hooks_see_timms_tensors(family):
    plain, patched, size = build(family)
    x = images(size)
    with torch.no_grad():
        # patch_embed called on its own gives tokens (never the raw image)
        torch.testing.assert_close(patched.patch_embed(x), plain.patch_embed(x), **TOL)
        seen = {}
        for tag, model in (("plain", plain), ("patched", patched)):
            handle = model.patch_embed.register_forward_hook(lambda m, i, o, tag=tag: seen.__setitem__(tag, o))
            out = model(x)
            handle.remove()
            seen[tag + "_out"] = out
        torch.testing.assert_close(seen["patched"], seen["plain"], **TOL)
        torch.testing.assert_close(seen["patched_out"], seen["plain_out"], **TOL)
        # a hook on a module the fused path would skip (the projection inside patch_embed) still fires
        fired = []
        handle = patched.patch_embed.proj.register_forward_hook(lambda m, i, o: fired.append(o.shape))
        torch.testing.assert_close(patched(x), plain(x), **TOL)
        handle.remove()
        assert fired == [plain.patch_embed.proj(x).shape]
        _, theirs = plain.forward_intermediates(x)
        _, ours = patched.forward_intermediates(x)
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a, b, **TOL)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_swapped_module_called_on_its_own_gives_timms_output(family):
    """Record each module's inputs and output in the plain model's forward, then call the swapped module of
    the patched model with them: module semantics, not only the model's output (a Swin block's
    WindowAttention is not called by the fused block, yet alone it still gives timm's output)."""
    plain, patched, size = build(family)
    records = {}

    def record(name):
        def hook(module, args, kwargs, out):
            records.setdefault(name, (args, kwargs, out))  # the first call (returns None: output unchanged)
        return hook
    handles = [m.register_forward_hook(record(name), with_kwargs=True) for name, m in plain.named_modules()]
    with torch.no_grad():
        plain(images(size))
    for h in handles:
        h.remove()
    checked = set()
    with torch.no_grad():
        for name, module in patched.named_modules():
            if isinstance(module, timm_layers._TimmDropIn) and name in records:
                args, kwargs, expected = records[name]
                torch.testing.assert_close(module(*args, **kwargs), expected, **TOL, msg=lambda m: f"{name}: {m}")
                checked.add(type(module).__name__)
    wanted = {"vit": {"VisionTransformer", "PatchEmbed", "Attention"},
              "deit_distilled": {"VisionTransformerDistilled", "PatchEmbed", "Attention"},
              "swin": {"PatchEmbed", "SwinTransformerBlock", "WindowAttention"}}[family]
    assert checked == wanted


@pytest.mark.parametrize("mask", ["float", "bool", "causal", "broadcast"])
def test_timm_attention_with_masks_gives_timms_output(mask):
    from timm.layers import Attention

    torch.manual_seed(0)
    plain = Attention(64, num_heads=4).eval()
    patched = patch_timm(nn.Sequential(copy.deepcopy(plain)))[0]
    x = torch.randn(2, 10, 64)
    kwargs = {"float": dict(attn_mask=torch.randn(2, 4, 10, 10)),
              "bool": dict(attn_mask=torch.rand(2, 1, 10, 10) > 0.3),
              "causal": dict(is_causal=True),
              "broadcast": dict(attn_mask=torch.randn(10, 10))}[mask]
    with torch.no_grad():
        torch.testing.assert_close(patched(x, **kwargs), plain(x, **kwargs), **TOL)


def _python_ops(graph) -> list:
    return [n for n in graph.nodes() if n.kind() == "prim::PythonOp"]


@pytest.mark.parametrize("family", FAMILIES)
def test_jit_trace_records_the_computation_and_saves(family):
    plain, patched, size = build(family)
    with torch.no_grad():
        traced = torch.jit.trace(patched, (images(size, seed=1),), check_trace=False)
        assert not _python_ops(traced.inlined_graph), "a Python op in the trace: torch.jit.save would reject it"
        buffer = io.BytesIO()
        torch.jit.save(traced, buffer)
        buffer.seek(0)
        loaded = torch.jit.load(buffer)
        other = images(size, seed=2)  # not the traced input: a constant result would show here
        torch.testing.assert_close(loaded(other), plain(other), **TOL)


@pytest.mark.parametrize("family", FAMILIES)
def test_jit_script_names_the_way_out_and_the_way_out_scripts(family):
    plain, patched, size = build(family)
    with pytest.raises(TypeError, match=r"torch\.jit\.script.*TorchScript.*unpatch_timm\(copy\.deepcopy\(model\)\)"):
        torch.jit.script(patched)
    assert any(isinstance(m, timm_layers._TimmDropIn) for m in patched.modules()), "the failed script changed the model"
    scripted = torch.jit.script(unpatch_timm(copy.deepcopy(patched)))
    x = images(size)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), plain(x), **TOL)


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript_exporter", "dynamo_exporter"])
@pytest.mark.parametrize("family", FAMILIES)
def test_onnx_export_takes_the_image_and_gives_timms_logits(family, dynamo):
    plain, patched, size = build(family)
    other = images(size, seed=2)
    logits = onnx_run(patched, images(size, seed=1), other, dynamo=dynamo)
    with torch.no_grad():
        torch.testing.assert_close(logits, plain(other), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_torch_export_keeps_the_fused_ops_and_timms_results(family):
    plain, patched, size = build(family)
    program = torch.export.export(patched, (images(size, seed=1),))
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert any(t.startswith("vitkernels.") for t in targets), sorted(targets)
    other = images(size, seed=2)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(other), plain(other), **TOL)


@pytest.mark.parametrize("family", FAMILIES)
def test_fx_feature_extraction_sees_timms_graph(family):
    from timm.models._features_fx import create_feature_extractor, get_graph_node_names

    plain, patched, size = build(family)
    nodes = get_graph_node_names(plain)
    assert get_graph_node_names(patched) == nodes
    returns = [nodes[1][len(nodes[1]) // 2], nodes[1][-1]]
    x = images(size)
    with torch.no_grad():
        ours = create_feature_extractor(patched, returns)(x)
        theirs = create_feature_extractor(plain, returns)(x)
    for name in returns:
        torch.testing.assert_close(ours[name], theirs[name], **TOL)


@pytest.mark.parametrize("method", ["fx", "hook"])
@pytest.mark.parametrize("family", FAMILIES)
def test_attention_maps_with_fused_attn_off(family, method, op_calls):
    """timm's attention-map recipe: switch timm's fused attention off on the modules, extract by FX node or
    by hook. (Swin's fused_attn already defaults to off in timm.)"""
    from timm.utils import AttentionExtract

    plain, patched, size = build(family)
    for model in (plain, patched):
        for m in model.modules():
            if hasattr(m, "fused_attn"):
                m.fused_attn = False
    names = ["*attn.softmax"] if method == "fx" else ["*attn_drop"]
    x = images(size)
    with torch.no_grad():
        theirs = AttentionExtract(plain, names=names, method=method)(x)
        before = op_calls["flash_attention"] + op_calls["window_attention"]
        ours = AttentionExtract(patched, names=names, method=method)(x)
    assert op_calls["flash_attention"] + op_calls["window_attention"] == before, "attention ran fused"
    assert list(ours) == list(theirs) and len(theirs) > 0
    for name in theirs:
        torch.testing.assert_close(ours[name], theirs[name], **TOL)


@pytest.mark.parametrize("family", FAMILIES)
def test_pickle_torch_save_and_deepcopy_keep_the_fused_model(family):
    plain, patched, size = build(family)
    buffer = io.BytesIO()
    torch.save(patched, buffer)
    buffer.seek(0)
    copies = [torch.load(buffer, weights_only=False), pickle.loads(pickle.dumps(patched)), copy.deepcopy(patched)]
    x = images(size)
    with torch.no_grad():
        expected = plain(x)
        for clone in copies:
            assert [type(m) for m in clone.modules()] == [type(m) for m in patched.modules()]
            torch.testing.assert_close(clone(x), expected, **TOL)


@pytest.mark.parametrize("family", FAMILIES)
def test_unpatch_timm_restores_timms_classes(family):
    plain, patched, _ = build(family)
    assert [type(m) for m in patched.modules()] != [type(m) for m in plain.modules()]
    unpatch_timm(patched)
    assert [type(m) for m in patched.modules()] == [type(m) for m in plain.modules()]
    assert list(patched.state_dict()) == list(plain.state_dict())


def test_timms_global_fused_attention_switch_turns_swin_fusion_off(monkeypatch, op_calls):
    from timm.layers import config

    plain, patched, size = build("swin")
    x = images(size)
    monkeypatch.setattr(config, "_USE_FUSED_ATTN", 0)  # what TIMM_FUSED_ATTN=0 / set_fused_attn(False) set
    with torch.no_grad():
        torch.testing.assert_close(patched(x), plain(x), **TOL)
    assert op_calls["window_attention"] == 0 and op_calls["flash_attention"] == 0
    monkeypatch.setattr(config, "_USE_FUSED_ATTN", 1)
    with torch.no_grad():
        torch.testing.assert_close(patched(x), plain(x), **TOL)
    assert op_calls["window_attention"] > 0


@pytest.mark.parametrize("size", [64, 48, 80])
def test_dynamic_img_size_vit_runs_at_any_size(size):
    plain, patched, _ = build("vit", dynamic_img_size=True)
    x = images(size)
    with torch.no_grad():
        torch.testing.assert_close(patched(x), plain(x), **TOL)


def test_image_size_errors_are_timms():
    plain, patched, _ = build("vit")
    messages = []
    for model in (plain, patched):
        with pytest.raises(AssertionError) as info:
            model(images(80))
        messages.append(str(info.value))
    assert messages[0] == messages[1] and "80" in messages[0]


def test_a_subclass_that_overrides_the_fused_method_keeps_its_own_code():
    from timm.layers import Attention

    class Doubled(Attention):
        def forward(self, x, attn_mask=None, is_causal=False):
            return 2 * super().forward(x, attn_mask=attn_mask, is_causal=is_causal)

    model = nn.Sequential(Doubled(32, num_heads=2), Attention(32, num_heads=2))
    patch_timm(model)
    assert type(model[0]) is Doubled and isinstance(model[1], timm_layers.FusedAttentionMixin)


# --------------------------------------------------------------------------- nn.MultiheadAttention drop-in

def encoder(batch_first=True, **kwargs):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(64, 4, 128, dropout=0.0, batch_first=batch_first)
    plain = nn.TransformerEncoder(layer, 2, **kwargs)
    return plain, replace_mha(copy.deepcopy(plain))


def tokens(batch_first=True, seed=1):
    x = torch.randn(3, 10, 64, generator=torch.Generator().manual_seed(seed))
    return x if batch_first else x.transpose(0, 1)


@pytest.mark.parametrize("masks", ["none", "padding", "causal"])
@pytest.mark.parametrize("batch_first", [True, False])
def test_transformer_encoder_train_step(batch_first, masks):
    plain, patched = encoder(batch_first)
    plain.train(), patched.train()
    x = tokens(batch_first)
    kwargs = {}
    if masks == "padding":
        kpm = torch.zeros(3, 10, dtype=torch.bool)
        kpm[1, 6:] = True
        kwargs = dict(src_key_padding_mask=kpm)
    elif masks == "causal":
        kwargs = dict(mask=nn.Transformer.generate_square_subsequent_mask(10), is_causal=True)
    expected, out = plain(x, **kwargs), patched(x, **kwargs)
    torch.testing.assert_close(out, expected, **TOL)
    expected.backward(cotangent(expected))
    out.backward(cotangent(out))
    assert_same_grads(patched, plain)


def test_transformer_encoder_eval_with_nested_tensors():
    plain, patched = encoder(enable_nested_tensor=True)
    plain.eval(), patched.eval()
    x = tokens()
    kpm = torch.zeros(3, 10, dtype=torch.bool)
    kpm[0, 4:] = True
    with torch.no_grad():
        torch.testing.assert_close(patched(x, src_key_padding_mask=kpm), plain(x, src_key_padding_mask=kpm), **TOL)
    mha = nn.MultiheadAttention(64, 4, batch_first=True).eval()
    fused = replace_mha(nn.Sequential(copy.deepcopy(mha)))[0]
    nested = torch.nested.nested_tensor([torch.randn(5, 64), torch.randn(3, 64)])
    with torch.no_grad():
        theirs = mha(nested, nested, nested, need_weights=False)[0]
        ours = fused(nested, nested, nested, need_weights=False)[0]
    for a, b in zip(ours.unbind(), theirs.unbind()):
        torch.testing.assert_close(a, b, **TOL)


def _mha_pair(dtype=torch.float32):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(64, 4, batch_first=True).to(dtype)
    return mha, replace_mha(nn.Sequential(copy.deepcopy(mha)))[0]


def _outcome(module, *args, **kwargs):
    try:
        return module(*args, **kwargs)[0]
    except Exception as exc:  # noqa: BLE001 - the exact exception is what is compared
        return f"{type(exc).__name__}: {exc}"


BAD_CALLS = {
    "is_causal without a mask": dict(is_causal=True),
    "2-D attn_mask of a wrong shape": dict(attn_mask=torch.zeros(9, 10)),
    "3-D attn_mask of a wrong shape": dict(attn_mask=torch.zeros(5, 10, 10)),
    "key_padding_mask of a wrong shape": dict(key_padding_mask=torch.zeros(3, 9, dtype=torch.bool)),
    "integer key_padding_mask": dict(key_padding_mask=torch.zeros(3, 10, dtype=torch.int64)),
}


@pytest.mark.parametrize("case", BAD_CALLS)
def test_mha_rejects_what_torch_rejects_with_torchs_error(case):
    mha, fused = _mha_pair()
    x = tokens()
    theirs = _outcome(mha, x, x, x, need_weights=False, **BAD_CALLS[case])
    ours = _outcome(fused, x, x, x, need_weights=False, **BAD_CALLS[case])
    assert isinstance(theirs, str), "torch accepted it: not a bad call"
    assert ours == theirs


def test_mha_half_mask_with_double_query_behaves_as_torch():
    mha, fused = _mha_pair(torch.float64)
    x = tokens().double()
    mask = torch.zeros(10, 10, dtype=torch.float16)
    assert _outcome(fused, x, x, x, need_weights=False, attn_mask=mask) == \
        _outcome(mha, x, x, x, need_weights=False, attn_mask=mask)


@pytest.mark.parametrize("lengths", [(0, 0), (10, 0), (0, 10)], ids=["L0_S0", "S0", "L0"])
def test_mha_empty_sequences_give_torchs_result(lengths):
    mha, fused = _mha_pair()
    L, S = lengths
    q = torch.randn(3, L, 64, requires_grad=True)
    kv = torch.randn(3, S, 64, requires_grad=True)
    theirs = mha(q, kv, kv, need_weights=False)[0]
    ours = fused(q, kv, kv, need_weights=False)[0]
    torch.testing.assert_close(ours, theirs, **TOL)
    grads_theirs = torch.autograd.grad(theirs.sum(), (q, kv, mha.in_proj_weight), allow_unused=True)
    grads_ours = torch.autograd.grad(ours.sum(), (q, kv, fused.in_proj_weight), allow_unused=True)
    for a, b in zip(grads_ours, grads_theirs):
        if b is None:
            assert a is None or not a.any()
        else:
            torch.testing.assert_close(a, b, **TOL)


def test_mha_jit_trace_script_pickle_and_export():
    plain, patched = encoder()
    plain.train(), patched.train()  # eval would take torch's fast path (no MultiheadAttention.forward call)
    x, other = tokens(seed=1), tokens(seed=2)
    with torch.no_grad():
        traced = torch.jit.trace(patched, (x,))
        assert not _python_ops(traced.inlined_graph)
        torch.testing.assert_close(traced(other), plain(other), **TOL)
        with pytest.raises(TypeError, match=r"restore_mha\(copy\.deepcopy\(model\)\)"):
            torch.jit.script(patched)
        scripted = torch.jit.script(restore_mha(copy.deepcopy(patched)))
        torch.testing.assert_close(scripted(other), plain(other), **TOL)
        clone = pickle.loads(pickle.dumps(patched))
        assert type(clone.layers[0].self_attn) is type(patched.layers[0].self_attn)
        torch.testing.assert_close(clone(other), plain(other), **TOL)
        program = torch.export.export(patched, (x,))
        torch.testing.assert_close(program.module()(other), plain(other), **TOL)


def test_mha_onnx_export_takes_its_inputs():
    class SelfAttention(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(64, 4, batch_first=True)

        def forward(self, x):
            return self.attn(x, x, x, need_weights=False)[0]

    torch.manual_seed(0)
    plain = SelfAttention().eval()
    patched = replace_mha(copy.deepcopy(plain))
    other = tokens(seed=2)
    out = onnx_run(patched, tokens(seed=1), other)
    with torch.no_grad():
        torch.testing.assert_close(out, plain(other), rtol=1e-4, atol=1e-5)

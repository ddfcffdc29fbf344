"""Drop-ins with rotary embeddings and Swin V2's cosine attention: timm's ``EvaAttention`` / ``AttentionRope``
(``eva02_*``, DINOv3-style and mixed RoPE) and Swin V2 (``swinv2_*``: ``SwinTransformerV2Block`` and its
``WindowAttention``) under patch_timm, torchvision's ``ShiftedWindowAttentionV2`` (``swin_v2_t/s/b``) under
patch_torchvision; against the same models unpatched in the same test (outputs and every parameter gradient:
logit scales, cpb_mlp weights, learnable rope frequencies, q / v biases included), the fused op being the one
that runs, the original code wherever the fused path would differ.

Swin V2's shift mask is -100 in timm and torchvision, exactly -inf in ``window_attention``: with cosine logits
(at most exp(logit_scale) <= 100 in magnitude, plus a table below 16) the masked weights are below
N e^-(84 - 2 s) of a row for a head scale s; the models here keep s near its initial 10 (e^-64), far below the
fp64 tolerances."""
import copy
import math
import pickle

import pytest
import torch

timm = pytest.importorskip("timm")
torchvision = pytest.importorskip("torchvision")

import vitkernels  # noqa: E402
from timm.models import eva as timm_eva  # noqa: E402
from timm.models import swin_transformer_v2 as timm_swinv2  # noqa: E402
from torchvision.models import swin_transformer as tv_swin  # noqa: E402
from vitkernels.nn import timm_layers, torchvision_layers  # noqa: E402

F64 = dict(rtol=1e-9, atol=1e-10)


def _randomize(model, scale_std=0.3):
    """Values for every zero-initialised parameter (q / v biases, heads, class tokens) and per-head logit
    scales apart from their common initial value: no gradient is trivially zero or symmetric."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("logit_scale"):
                p.add_(torch.randn_like(p) * scale_std)
            elif p.abs().sum() == 0:
                p.normal_(std=0.02)
    return model


def _pair(build, dtype=torch.float64, patch=vitkernels.patch_timm):
    torch.manual_seed(0)
    reference = _randomize(build()).to(dtype).eval()
    return reference, patch(copy.deepcopy(reference))


def _assert_same_outputs_and_grads(reference, model, x, rtol=1e-9, atol=1e-10, grad_rtol=None, grad_atol=None,
                                   seed=None):
    xr, xm = x.clone().requires_grad_(), x.clone().requires_grad_()
    if seed is not None:
        torch.manual_seed(seed)
    expected = reference(xr)
    if seed is not None:
        torch.manual_seed(seed)
    got = model(xm)
    torch.testing.assert_close(got, expected, rtol=rtol, atol=atol)
    grad_out = torch.randn_like(expected)
    expected.backward(grad_out)
    got.backward(grad_out)
    rtol, atol = grad_rtol or rtol, grad_atol or atol
    torch.testing.assert_close(xm.grad, xr.grad, rtol=rtol, atol=atol)
    named = list(reference.named_parameters())
    for (name, p_ref), p in zip(named, model.parameters()):
        assert (p.grad is None) == (p_ref.grad is None), name
        if p_ref.grad is not None:
            torch.testing.assert_close(p.grad, p_ref.grad, rtol=rtol, atol=atol,
                                       msg=lambda m, name=name: f"{name}: {m}")
    return named


def _autocast_close(reference, model, x, fused_op, op_calls):
    """bf16 autocast on CPU: the patched model runs (the fused op included) and is no further from the fp64
    result than twice timm's / torchvision's own autocast error."""
    with torch.no_grad():
        exact = copy.deepcopy(reference).double()(x.double()).float()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            theirs = reference(x).float()
            calls = op_calls[fused_op]
            ours = model(x).float()
    assert op_calls[fused_op] > calls
    assert torch.isfinite(ours).all()
    assert (ours - exact).abs().max() <= 2 * (theirs - exact).abs().max() + 1e-6


# ------------------------------------------------------------------------------------------- timm EVA / RoPE

def _eva(dtype=torch.float64, **kwargs):
    """eva02_tiny's architecture (3 heads of 64, SwiGLU, 'cat' rope with a class token) at 56 px, 2 blocks."""
    args = dict(img_size=56, depth=2, num_classes=10)
    return lambda: timm.create_model("eva02_tiny_patch14_224", pretrained=False, **dict(args, **kwargs))


def _rope_attentions(model):
    return [m for m in model.modules() if isinstance(m, (timm_eva.EvaAttention, timm.layers.AttentionRope))]


EVA_FORMS = {
    "cat": dict(),  # EVA-02: (N, 2D) shared by every block and head, one class token
    "mixed": dict(rope_type="mixed"),  # per-block (heads, N, 2D), learnable frequencies
    "dinov3-half-regs": dict(rope_type="dinov3", rope_rotate_half=True, num_reg_tokens=2),  # prefix 3
    "rope-attn-gqa-qknorm": dict(attn_type="rope", qkv_fused=False, num_heads=4, embed_dim=128, num_kv_heads=2,
                                 qk_norm=True),
    "separate-qkv-scale-norm": dict(qkv_fused=False, scale_attn_inner=True),
    "no-prefix-rope-attn": dict(attn_type="rope", class_token=False, global_pool="avg"),
    "no-rope": dict(use_rot_pos_emb=False),  # rope=None: plain attention
}


@pytest.mark.parametrize("form", list(EVA_FORMS))
def test_eva_rope_forms_outputs_and_every_gradient_match_unpatched(form, op_calls):
    reference, model = _pair(_eva(**EVA_FORMS[form]))
    attns = _rope_attentions(model)
    assert attns and all(isinstance(m, timm_layers._FusedRopeAttention) for m in attns)
    x = torch.randn(2, 3, 56, 56, dtype=torch.float64)
    named = _assert_same_outputs_and_grads(reference, model, x)
    assert op_calls["flash_attention"] == 2
    if form == "mixed":  # the learnable frequencies got their gradient through the fused op's rope tables
        assert any(n == "rope.freqs" and p.grad is not None and p.grad.abs().sum() > 0 for n, p in named)


def test_eva_train_time_rope_forms_patch_dropout_and_coordinate_jitter(op_calls):
    # patch dropout: per-sample (B, 1, N', 2D) tables ('cat') and (B, heads, N', 2D) ('mixed'); coordinate
    # jitter: a fresh table each call. Both models draw the same random numbers (same seed).
    for kwargs in (dict(patch_drop_rate=0.4, rope_jitter_coords=1.5, rope_shift_coords=0.5),
                   dict(patch_drop_rate=0.4, rope_type="mixed")):
        reference, model = _pair(_eva(**kwargs))
        reference.train(), model.train()
        x = torch.randn(3, 3, 56, 56, dtype=torch.float64)
        _assert_same_outputs_and_grads(reference, model, x, seed=7)
    assert op_calls["flash_attention"] == 4


def test_eva_attention_module_every_rope_shape_mask_and_table_gradient(op_calls):
    # the rope shapes timm's models pass (and Rope's broadcast rules take), rotate_half both ways, prefixes,
    # an additive float mask and a rope tensor that requires a gradient (learnable tables); timm's separate bias
    # add, q / k norms and output gate
    torch.manual_seed(0)
    B, N, H, D = 2, 10, 2, 32
    for rotate_half in (False, True):
        for npt in (0, 1, 3):
            reference = timm_eva.EvaAttention(H * D, num_heads=H, num_prefix_tokens=npt, qkv_bias_separate=True,
                                              qk_norm=True, norm_layer=torch.nn.LayerNorm, gated=True,
                                              rotate_half=rotate_half).double()
            _randomize(reference)
            model = vitkernels.patch_timm(copy.deepcopy(reference))
            for shape in [(N - npt, 2 * D), (H, N - npt, 2 * D), (B, 1, N - npt, 2 * D), (B, H, N - npt, 2 * D),
                          (1, N - npt, 2 * D)]:
                rope = torch.randn(*shape, dtype=torch.float64)
                mask = torch.randn(B, 1, N, N, dtype=torch.float64)
                x = torch.randn(B, N, H * D, dtype=torch.float64)
                grads = []
                for m in (reference, model):
                    r, xx = rope.clone().requires_grad_(), x.clone().requires_grad_()
                    out = m(xx, rope=r, attn_mask=mask)
                    out.backward(torch.ones_like(out))
                    grads.append((out, xx.grad, r.grad))
                for got, want in zip(grads[1], grads[0]):
                    torch.testing.assert_close(got, want, **F64)
    assert op_calls["flash_attention"] == 2 * 3 * 5


def test_eva02_tiny_patch14_224_matches_timm_in_fp32(op_calls):
    torch.manual_seed(0)
    reference = timm.create_model("eva02_tiny_patch14_224", pretrained=False).eval()
    model = vitkernels.patch_timm(copy.deepcopy(reference))
    assert [(k, tuple(v.shape)) for k, v in model.state_dict().items()] == \
        [(k, tuple(v.shape)) for k, v in reference.state_dict().items()]
    assert sum(isinstance(m, timm_layers.FusedEvaAttentionMixin) for m in model.modules()) == 12
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=5e-5, atol=5e-5)
    assert op_calls["flash_attention"] == 12


def test_eva02_tiny_gradients_in_fp32(op_calls):
    reference, model = _pair(lambda: timm.create_model("eva02_tiny_patch14_224", pretrained=False, img_size=112,
                                                       depth=3, num_classes=10), torch.float32)
    x = torch.randn(2, 3, 112, 112)
    _assert_same_outputs_and_grads(reference, model, x, 1e-4, 1e-5, grad_rtol=1e-3, grad_atol=1e-5)
    assert op_calls["flash_attention"] == 3


def test_eva_takes_timms_code_for_what_the_fused_path_does_not_do(op_calls):
    reference, model = _pair(_eva())
    x = torch.randn(2, 3, 56, 56, dtype=torch.float64)
    ref_attn, attn = reference.blocks[0].attn, model.blocks[0].attn
    tokens = torch.randn(2, 17, 192, dtype=torch.float64)
    rope = reference.rope.get_embed().double()
    cases = [
        dict(rope=rope, is_causal=True),  # causal
        dict(rope=rope, attn_mask=torch.rand(2, 1, 17, 17) > 0.2),  # bool mask: SDPA's own semantics
        dict(rope=rope[:1]),  # a table broadcast over the tokens (timm broadcasts it; Rope takes one per token)
        dict(rope=(rope[:, :64], rope[:, 64:])),  # not a tensor: timm's own error
        dict(rope=rope.unsqueeze(0).expand(4, -1, -1)),  # 4 != 3 heads: timm's broadcasting error
    ]
    for kwargs in cases:
        try:
            want = ref_attn(tokens, **kwargs)
        except Exception as exc:  # noqa: BLE001 - the same error, whatever it is
            with pytest.raises(type(exc)):
                attn(tokens, **kwargs)
        else:
            torch.testing.assert_close(attn(tokens, **kwargs), want, **F64)
    assert op_calls["flash_attention"] == 0
    # float64 tables on float32 queries: timm rotates in float64
    ref32, attn32 = copy.deepcopy(ref_attn).float(), copy.deepcopy(attn).float()
    torch.testing.assert_close(attn32(tokens.float(), rope=rope), ref32(tokens.float(), rope=rope), rtol=0, atol=0)
    assert op_calls["flash_attention"] == 0
    # float32 tables on float64 queries: an exact upcast, fused
    torch.testing.assert_close(attn(tokens, rope=rope.float()), ref_attn(tokens, rope=rope.float()), **F64)
    assert op_calls["flash_attention"] == 1
    # timm's switch (attention-map extraction) and a wrapped qkv projection
    model.blocks[0].attn.fused_attn = False
    for m in (reference, model):
        m.blocks[1].attn.qkv = torch.nn.Sequential(m.blocks[1].attn.qkv)
        m.blocks[1].attn.q_bias = None  # timm calls the wrapped projection itself only without q / v biases
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), **F64)
    assert op_calls["flash_attention"] == 1
    with torch.no_grad():  # the trace records timm's code
        traced = torch.jit.trace(model, x, check_trace=False)
        torch.testing.assert_close(traced(x), reference(x), **F64)
    assert op_calls["flash_attention"] == 1


def test_eva_attention_dropout_in_training_runs_in_the_fused_op(op_calls):
    torch.manual_seed(0)
    reference = timm_eva.EvaAttention(64, num_heads=2, attn_drop=1.0, norm_layer=torch.nn.LayerNorm).double()
    _randomize(reference).train()
    model = vitkernels.patch_timm(copy.deepcopy(reference)).train()
    x = torch.randn(2, 9, 64, dtype=torch.float64)
    rope = torch.randn(8, 64, dtype=torch.float64)
    out = model(x, rope=rope)  # every probability dropped: the projection of the normed zeros, as timm gives it
    assert op_calls["flash_attention"] == 1
    torch.testing.assert_close(out, reference(x, rope=rope), rtol=0, atol=1e-12)


def test_eva_unpatch_pickle_and_torchscript():
    reference, model = _pair(_eva(rope_type="mixed"))
    params = dict(model.named_parameters())
    assert list(model.state_dict()) == list(reference.state_dict())
    clone = pickle.loads(pickle.dumps(model))
    assert type(clone.blocks[0].attn) is type(model.blocks[0].attn)
    assert isinstance(clone.blocks[0].attn, timm_layers.FusedEvaAttentionMixin)
    x = torch.randn(1, 3, 56, 56, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(clone(x), reference(x), **F64)
    with pytest.raises(TypeError, match="unpatch_timm"):
        torch.jit.script(model.blocks[0].attn)
    vitkernels.unpatch_timm(model)
    assert type(model.blocks[0].attn) is timm_eva.EvaAttention
    assert all(not isinstance(m, timm_layers._TimmDropIn) for m in model.modules())
    assert all(p is params[n] for n, p in model.named_parameters())
    attn = timm_layers.fused_class(timm.layers.AttentionRope)(64, num_heads=2)
    assert isinstance(attn, timm.layers.AttentionRope) and isinstance(attn, timm_layers.FusedAttentionRopeMixin)


def test_eva_under_autocast(op_calls):
    for kwargs in (dict(), dict(rope_type="mixed", qk_norm=True)):
        reference, model = _pair(_eva(**kwargs), torch.float32)
        _autocast_close(reference, model, torch.randn(2, 3, 56, 56), "flash_attention", op_calls)


# ---------------------------------------------------------------------------------------------- timm Swin V2

def _swinv2(img_size=64, window_size=8, **kwargs):
    """swinv2_tiny's block settings on two stages, 32 channels per head."""
    args = dict(img_size=img_size, window_size=window_size, embed_dim=64, depths=(2, 2), num_heads=(2, 4),
                num_classes=10)
    return lambda: timm.create_model("swinv2_tiny_window8_256", pretrained=False, **dict(args, **kwargs))


def _v2_blocks(model):
    return [m for m in model.modules() if isinstance(m, timm_swinv2.SwinTransformerV2Block)]


SWINV2_CASES = {
    "shift-and-whole-map": dict(),  # 16x16 map, window 8 shift 4; 8x8 map: the whole map, no shift
    "padded": dict(img_size=80),  # 20x20 and 10x10 maps, window 8: rolled, then padded (timm's order)
    "window-3-padded": dict(img_size=72, window_size=3),  # 18x18, 9x9; shift 1
    "pretrained-window": dict(pretrained_window_sizes=(4, 4)),  # coordinates scaled for another window
    "no-qkv-bias": dict(qkv_bias=False),
}


@pytest.mark.parametrize("case", list(SWINV2_CASES))
def test_swinv2_outputs_and_every_gradient_match_unpatched(case, op_calls):
    kwargs = dict(SWINV2_CASES[case])
    size = kwargs.get("img_size", 64)
    reference, model = _pair(_swinv2(**kwargs))
    assert all(isinstance(b, timm_layers.FusedSwinV2BlockMixin) for b in _v2_blocks(model))
    x = torch.randn(2, 3, size, size, dtype=torch.float64)
    named = _assert_same_outputs_and_grads(reference, model, x)
    assert op_calls["window_attention"] == 4 and op_calls["flash_attention"] == 0
    grads = {n: p.grad for n, p in named}
    for key in ("logit_scale", "cpb_mlp.0.weight", "cpb_mlp.2.weight") + (("q_bias", "v_bias") if case != "no-qkv-bias"
                                                                          else ()):
        assert grads[f"layers.0.blocks.1.attn.{key}"].abs().sum() > 0, key


def test_swinv2_qkv_bias_separate_matches_unpatched(op_calls):
    reference, model = _pair(_swinv2(img_size=80))
    for m in (reference, model):
        for block in _v2_blocks(m):
            block.attn.qkv_bias_separate = True
    _assert_same_outputs_and_grads(reference, model, torch.randn(1, 3, 80, 80, dtype=torch.float64))
    assert op_calls["window_attention"] == 4


def test_swinv2_tiny_window8_256_matches_timm_in_fp32(op_calls):
    torch.manual_seed(0)
    reference = timm.create_model("swinv2_tiny_window8_256", pretrained=False).eval()
    model = vitkernels.patch_timm(copy.deepcopy(reference))
    assert [(k, tuple(v.shape)) for k, v in model.state_dict().items()] == \
        [(k, tuple(v.shape)) for k, v in reference.state_dict().items()]
    x = torch.randn(2, 3, 256, 256)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=5e-5, atol=5e-5)
    assert op_calls["window_attention"] == 12 and op_calls["flash_attention"] == 0


def test_swinv2_gradients_in_fp32(op_calls):
    reference, model = _pair(lambda: timm.create_model("swinv2_tiny_window8_256", pretrained=False, img_size=128,
                                                       depths=(2, 2, 2), num_heads=(3, 6, 12), num_classes=10),
                             torch.float32)
    _assert_same_outputs_and_grads(reference, model, torch.randn(2, 3, 128, 128), 1e-4, 1e-5,
                                   grad_rtol=1e-3, grad_atol=1e-5)
    assert op_calls["window_attention"] == 6


@pytest.mark.parametrize("kind", ["always-partition", "dynamic-mask", "another-index"])
def test_swinv2_block_falls_back_and_its_window_attention_runs_fused(kind, op_calls):
    # the block runs timm's _attn; timm then calls the (patched) WindowAttention on partitioned windows
    # 16x16 and 8x8 maps, window 8: under always_partition the 8x8 stage keeps its shift of 4
    kwargs = {"always-partition": dict(always_partition=True), "dynamic-mask": dict(strict_img_size=False),
              "another-index": dict()}[kind]
    reference, model = _pair(_swinv2(**kwargs))
    if kind == "another-index":
        for m in (reference, model):
            for block in _v2_blocks(m):
                block.attn.relative_position_index = block.attn.relative_position_index.flip(0).contiguous()
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    _assert_same_outputs_and_grads(reference, model, x)
    assert op_calls["window_attention"] == 0 and op_calls["flash_attention"] == 4


def test_swinv2_takes_timms_code_for_what_the_fused_path_does_not_do(op_calls, monkeypatch):
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    # attention dropout in training
    reference, model = _pair(_swinv2(attn_drop_rate=0.1))
    model.train()
    model(x)
    assert op_calls["window_attention"] == 0 and op_calls["flash_attention"] == 0
    # a hook on the attention's softmax (attention-map extraction), then on the attention module itself
    reference, model = _pair(_swinv2())
    seen = []
    handle = model.layers[0].blocks[1].attn.softmax.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), **F64)
    assert seen == [(4, 2, 64, 64)] and op_calls["window_attention"] == 3
    handle.remove()
    handle = model.layers[0].blocks[0].attn.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), **F64)
    assert seen[-1] == (4, 64, 64) and op_calls["window_attention"] == 6 and op_calls["flash_attention"] == 1
    handle.remove()
    # timm's fused attention switched off globally (TIMM_FUSED_ATTN=0 / set_fused_attn(False))
    monkeypatch.setattr(timm.layers.config, "_USE_FUSED_ATTN", 0)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), **F64)
    assert op_calls["window_attention"] == 6 and op_calls["flash_attention"] == 1
    monkeypatch.undo()
    # a map smaller than the window (timm pads it up to the window) and a shifted map of another size
    block_ref, block = reference.layers[0].blocks[0], model.layers[0].blocks[0]
    small = torch.randn(1, 5, 9, 64, dtype=torch.float64)
    torch.testing.assert_close(block(small), block_ref(small), **F64)
    shifted_ref, shifted = reference.layers[0].blocks[1], model.layers[0].blocks[1]
    with pytest.raises(Exception):
        shifted_ref(torch.randn(1, 24, 24, 64, dtype=torch.float64))
    with pytest.raises(Exception):
        shifted(torch.randn(1, 24, 24, 64, dtype=torch.float64))
    assert op_calls["window_attention"] == 6


def test_swinv2_set_input_size_checks_the_new_index_and_stays_fused(op_calls):
    reference, model = _pair(_swinv2())
    for m in (reference, model):
        m.set_input_size(img_size=(96, 96), window_size=6)
    x = torch.randn(1, 3, 96, 96, dtype=torch.float64)
    _assert_same_outputs_and_grads(reference, model, x)
    assert op_calls["window_attention"] == 4


@pytest.mark.parametrize("with_mask", [False, True], ids=["plain", "shift-mask"])
def test_swinv2_window_attention_module_on_partitioned_windows(with_mask, op_calls):
    torch.manual_seed(0)
    ref = _randomize(timm_swinv2.WindowAttention(64, window_size=(4, 4), num_heads=2)).double().eval()
    ours = vitkernels.patch_timm(copy.deepcopy(ref))
    num_win, B = 4, 3
    x = torch.randn(B * num_win, 16, 64, dtype=torch.float64)
    mask = None
    if with_mask:
        ids = torch.randint(0, 3, (num_win, 16))
        mask = torch.zeros(num_win, 16, 16, dtype=torch.float64).masked_fill(ids[:, :, None] != ids[:, None, :], -100.0)
    xr, xm = x.clone().requires_grad_(), x.clone().requires_grad_()
    expected, out = ref(xr, mask=mask), ours(xm, mask=mask)
    assert op_calls["flash_attention"] == 1
    torch.testing.assert_close(out, expected, **F64)
    g = torch.randn_like(out)
    expected.backward(g)
    out.backward(g)
    torch.testing.assert_close(xm.grad, xr.grad, **F64)
    for (name, p_ref), p in zip(ref.named_parameters(), ours.parameters()):
        torch.testing.assert_close(p.grad, p_ref.grad, **F64, msg=lambda m, name=name: f"{name}: {m}")


def test_swinv2_unpatch_pickle_and_torchscript():
    reference, model = _pair(_swinv2())
    params = dict(model.named_parameters())
    assert list(model.state_dict()) == list(reference.state_dict())
    clone = pickle.loads(pickle.dumps(model))
    block = clone.layers[0].blocks[1]
    assert isinstance(block, timm_layers.FusedSwinV2BlockMixin) and type(block) is type(model.layers[0].blocks[1])
    assert block.attn.relative_position_index is block._checked_index and block._standard_index
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(clone(x), reference(x), **F64)
    with pytest.raises(TypeError, match="unpatch_timm"):
        torch.jit.script(model.layers[0].blocks[0])
    vitkernels.unpatch_timm(model)
    assert type(model.layers[0].blocks[0]) is timm_swinv2.SwinTransformerV2Block
    assert type(model.layers[0].blocks[0].attn) is timm_swinv2.WindowAttention
    assert all(not isinstance(m, timm_layers._TimmDropIn) for m in model.modules())
    assert "_checked_index" not in vars(model.layers[0].blocks[0])
    assert all(p is params[n] for n, p in model.named_parameters())


def test_swinv2_under_autocast(op_calls):
    reference, model = _pair(_swinv2(img_size=80), torch.float32)
    _autocast_close(reference, model, torch.randn(2, 3, 80, 80), "window_attention", op_calls)
    # the WindowAttention drop-in on partitioned windows (the block under always_partition runs timm's _attn)
    reference, model = _pair(_swinv2(always_partition=True), torch.float32)
    _autocast_close(reference, model, torch.randn(2, 3, 64, 64), "flash_attention", op_calls)


# -------------------------------------------------------------------------------------- torchvision Swin V2

def _tv_swin_v2(embed_dim=32, window=4):
    """torchvision's Swin V2 (its V2 block and patch merging) on two stages, head dims 16."""
    return lambda: tv_swin.SwinTransformer(patch_size=[4, 4], embed_dim=embed_dim, depths=[2, 2], num_heads=[2, 4],
                                           window_size=[window, window], stochastic_depth_prob=0.0, num_classes=10,
                                           block=tv_swin.SwinTransformerBlockV2,
                                           downsample_layer=tv_swin.PatchMergingV2)


def _tv_pair(build, dtype=torch.float64):
    return _pair(build, dtype, patch=vitkernels.patch_torchvision)


def _tv_v2_attentions(model):
    return [m for m in model.modules() if isinstance(m, tv_swin.ShiftedWindowAttentionV2)]


@pytest.mark.parametrize("size", [(32, 32), (40, 56), (36, 24)], ids=["divisible", "pad-then-shift", "mixed"])
def test_torchvision_swin_v2_outputs_and_every_gradient_match_unpatched(size, op_calls):
    # 8x8 / 4x4 maps (window 4: the whole map, no shift); 10x14 / 5x7 and 9x6 / 5x3 (padded, then shifted)
    reference, model = _tv_pair(_tv_swin_v2())
    assert all(isinstance(m, torchvision_layers.FusedShiftedWindowAttentionV2Mixin) for m in _tv_v2_attentions(model))
    x = torch.randn(2, 3, *size, dtype=torch.float64)
    named = _assert_same_outputs_and_grads(reference, model, x)
    calls = {(32, 32): 4, (40, 56): 4, (36, 24): 2}[size]  # 5x3 is smaller than the window: torchvision pads it
    assert op_calls["window_attention"] == calls
    grads = {n: p.grad for n, p in named}
    bias = grads["features.1.1.attn.qkv.bias"]
    assert bias[32:64].abs().sum() == 0 and bias[:32].abs().sum() > 0 and bias[64:].abs().sum() > 0  # no k grad
    for key in ("logit_scale", "cpb_mlp.0.weight", "cpb_mlp.2.weight"):
        assert grads[f"features.1.1.attn.{key}"].abs().sum() > 0, key


def test_torchvision_swin_v2_t_matches_unpatched(op_calls):
    reference, model = _tv_pair(torchvision.models.swin_v2_t, torch.float32)
    assert [(k, tuple(v.shape)) for k, v in model.state_dict().items()] == \
        [(k, tuple(v.shape)) for k, v in reference.state_dict().items()]
    x = torch.randn(2, 3, 64, 64)  # 16x16 and 8x8 maps fused; 4x4 and 2x2 are smaller than the 8x8 window
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=5e-5, atol=5e-5)
    assert op_calls["window_attention"] == 4


def test_torchvision_swin_v2_takes_torchvisions_code_for_what_the_fused_path_does_not_do(op_calls):
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    reference, model = _tv_pair(lambda: tv_swin.SwinTransformer(
        patch_size=[4, 4], embed_dim=32, depths=[2], num_heads=[2], window_size=[4, 4], attention_dropout=0.1,
        block=tv_swin.SwinTransformerBlockV2, downsample_layer=tv_swin.PatchMergingV2, num_classes=10))
    model.train()
    model(x)
    assert op_calls["window_attention"] == 0
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), **F64)
    assert op_calls["window_attention"] == 2
    # another relative_position_index in a state_dict (torchvision saves it): its code; the standard one: fused
    state = reference.state_dict()
    key = "features.1.0.attn.relative_position_index"
    state[key] = state[key].flip(0).contiguous()
    reference.load_state_dict(state)
    model.load_state_dict(state)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), **F64)
    assert op_calls["window_attention"] == 3
    state[key] = state[key].flip(0).contiguous()
    model.load_state_dict(state)
    reference.load_state_dict(state)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), **F64)
    assert op_calls["window_attention"] == 5
    # a logit scale of another dtype than the map's (fp32 on fp64): torchvision's code
    for m in (reference, model):
        m.features[1][0].attn.logit_scale.data = m.features[1][0].attn.logit_scale.data.float()
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), **F64)
    assert op_calls["window_attention"] == 6


def test_torchvision_swin_v2_unpatch_pickle_and_torchscript():
    reference, model = _tv_pair(_tv_swin_v2())
    params = dict(model.named_parameters())
    clone = pickle.loads(pickle.dumps(model))
    assert isinstance(clone.features[1][0].attn, torchvision_layers.FusedShiftedWindowAttentionV2Mixin)
    x = torch.randn(1, 3, 40, 56, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(clone(x), reference(x), **F64)
    with pytest.raises(TypeError, match="unpatch_torchvision"):
        torch.jit.script(model.features[1][0].attn)
    vitkernels.unpatch_torchvision(model)
    assert type(model.features[1][0].attn) is tv_swin.ShiftedWindowAttentionV2
    assert all(not isinstance(m, torchvision_layers._TorchvisionDropIn) for m in model.modules())
    assert all(p is params[n] for n, p in model.named_parameters())


def test_torchvision_swin_v2_under_autocast(op_calls):
    reference, model = _tv_pair(_tv_swin_v2(), torch.float32)
    _autocast_close(reference, model, torch.randn(2, 3, 40, 56), "window_attention", op_calls)


def test_logit_scale_clamp_matches_at_and_past_log_100(op_calls):
    # heads at and past the clamp: the same logits and a zero logit_scale gradient there, as torch.clamp's
    reference, model = _tv_pair(_tv_swin_v2())
    for m in (reference, model):
        with torch.no_grad():
            m.features[1][0].attn.logit_scale[:, 0, 0] = torch.tensor([math.log(100.0) + 0.5, 1.0])
    _assert_same_outputs_and_grads(reference, model, torch.randn(1, 3, 32, 32, dtype=torch.float64))
    assert model.features[1][0].attn.logit_scale.grad[0].item() == 0


def _backend_spy(monkeypatch):
    """The backends dispatch picks, per op (call memos cleared, so every distinct call selects)."""
    from vitkernels import dispatch

    picked = {}
    select = dispatch.select

    def recording(op, inputs, backend=None):
        impl = select(op, inputs, backend)
        picked.setdefault(op, set()).add(impl.name)
        return impl
    dispatch.clear_call_memos()
    monkeypatch.setattr(dispatch, "select", recording)
    return picked


@pytest.mark.ext
def test_fp32_models_run_the_cpu_kernels(monkeypatch):
    """On CPU in fp32, dispatch takes the C++ kernels for the rope and cosine calls (not the reference)."""
    if not vitkernels.dispatch.backend_environment("cpu")[0]:
        pytest.skip(vitkernels.dispatch.backend_environment("cpu")[1])
    ran = _backend_spy(monkeypatch)
    torch.manual_seed(0)
    eva = vitkernels.patch_timm(timm.create_model("eva02_tiny_patch14_224", pretrained=False, img_size=56, depth=2))
    swin = vitkernels.patch_timm(timm.create_model("swinv2_tiny_window8_256", pretrained=False, img_size=64,
                                                   depths=(1, 1, 1, 1)))
    tv = vitkernels.patch_torchvision(torchvision.models.swin_v2_t())
    eva(torch.randn(1, 3, 56, 56)).sum().backward()
    swin(torch.randn(1, 3, 64, 64)).sum().backward()
    tv(torch.randn(1, 3, 64, 64)).sum().backward()
    assert ran == {"patch_embed": {"cpu"}, "flash_attention": {"cpu"}, "window_attention": {"cpu"}}, ran


def test_logit_scale_at_exactly_float32_log_100_in_fp32(op_calls):
    """float32(log 100) is past the double bound torch.clamp's gradient uses: 0 there, fused as unpatched."""
    reference, model = _tv_pair(_tv_swin_v2(), torch.float32)
    for m in (reference, model):
        with torch.no_grad():
            m.features[1][0].attn.logit_scale[:, 0, 0] = torch.tensor([math.log(100.0), 1.0])
    _assert_same_outputs_and_grads(reference, model, torch.randn(1, 3, 32, 32), 1e-4, 1e-5, grad_rtol=1e-3,
                                   grad_atol=1e-5)
    assert model.features[1][0].attn.logit_scale.grad[0].item() == 0
    assert reference.features[1][0].attn.logit_scale.grad[0].item() == 0

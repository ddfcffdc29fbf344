"""vitkernels.nn.MultiheadAttention against torch.nn.MultiheadAttention with the same state_dict, and
replace_mha on the seed-style ViT (blocks calling nn.MultiheadAttention(x, x, x) with need_weights left True)."""
import pytest
import torch
from torch import nn

from vitkernels.nn import MultiheadAttention, replace_mha

F64 = torch.float64


def pair(**kwargs):
    torch.manual_seed(0)
    ref = nn.MultiheadAttention(**kwargs).to(F64).eval()
    if ref.in_proj_bias is not None:
        with torch.no_grad():
            ref.in_proj_bias.normal_()
            ref.out_proj.bias.normal_()
    ours = MultiheadAttention(**kwargs).to(F64).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    assert list(ours.state_dict()) == list(ref.state_dict())
    return ref, ours


def inputs(B, L, S, E, kdim=None, vdim=None, batch_first=True):
    def t(n, e):
        x = torch.randn(B, n, e, dtype=F64)
        return x if batch_first else x.transpose(0, 1).contiguous()
    return t(L, E), t(S, kdim or E), t(S, vdim or E)


def check(ref, ours, q, k, v, **kw):
    out_ref, w_ref = ref(q, k, v, **kw)
    out, w = ours(q, k, v, **kw)
    torch.testing.assert_close(out, out_ref, rtol=1e-10, atol=1e-10)
    if w_ref is None:
        assert w is None
    else:
        torch.testing.assert_close(w, w_ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "seq_first"])
@pytest.mark.parametrize("need_weights", [True, False], ids=["weights", "fused"])
def test_self_attention_matches_torch(batch_first, need_weights):
    ref, ours = pair(embed_dim=64, num_heads=4, batch_first=batch_first)
    x = inputs(2, 17, 17, 64, batch_first=batch_first)[0]
    check(ref, ours, x, x, x, need_weights=need_weights)


def test_fused_path_gradients_match_torch():
    ref, ours = pair(embed_dim=64, num_heads=4, batch_first=True)
    x = torch.randn(2, 17, 64, dtype=F64, requires_grad=True)
    g = torch.randn(2, 17, 64, dtype=F64)
    ours(x, x, x, need_weights=False)[0].backward(g)
    grads = [x.grad.clone()] + [p.grad.clone() for p in ours.parameters()]
    x.grad = None
    ref(x, x, x, need_weights=False)[0].backward(g)
    for a, b in zip(grads, [x.grad] + [p.grad for p in ref.parameters()]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("mask_kind", ["bool", "float"])
def test_key_padding_mask(mask_kind):
    ref, ours = pair(embed_dim=64, num_heads=4, batch_first=True)
    q, k, v = inputs(3, 9, 13, 64)
    kpm = torch.zeros(3, 13, dtype=torch.bool)
    kpm[0, 10:] = True
    kpm[2, :4] = True
    if mask_kind == "float":
        kpm = torch.zeros(3, 13, dtype=F64).masked_fill(kpm, float("-inf"))
    check(ref, ours, q, k, v, key_padding_mask=kpm, need_weights=False)
    check(ref, ours, q, k, v, key_padding_mask=kpm, need_weights=True)


@pytest.mark.parametrize("mask_kind", ["bool2d", "float2d", "bool3d", "float3d"])
def test_attn_mask(mask_kind):
    ref, ours = pair(embed_dim=64, num_heads=4, batch_first=True)
    q, k, v = inputs(2, 9, 11, 64)
    shape = (9, 11) if mask_kind.endswith("2d") else (2 * 4, 9, 11)
    mask = torch.rand(shape) < 0.3
    mask[..., 0] = False  # every query keeps one key
    if mask_kind.startswith("float"):
        mask = torch.randn(shape, dtype=F64).masked_fill(mask, float("-inf"))
    check(ref, ours, q, k, v, attn_mask=mask, need_weights=False)


def test_kdim_vdim_add_bias_kv_add_zero_attn():
    ref, ours = pair(embed_dim=64, num_heads=4, kdim=24, vdim=40, add_bias_kv=True, add_zero_attn=True,
                     batch_first=True)
    with torch.no_grad():
        ref.bias_k.normal_()
        ref.bias_v.normal_()
    ours.load_state_dict(ref.state_dict())
    q, k, v = inputs(2, 7, 9, 64, kdim=24, vdim=40)
    kpm = torch.zeros(2, 9, dtype=torch.bool)
    kpm[1, 5:] = True
    check(ref, ours, q, k, v, key_padding_mask=kpm, attn_mask=torch.rand(7, 9) < 0.2, need_weights=False)


def test_unbatched_and_no_bias():
    ref, ours = pair(embed_dim=32, num_heads=2, bias=False)
    x = torch.randn(5, 32, dtype=F64)
    check(ref, ours, x, x, x, need_weights=False)


def test_unsupported_head_dim_falls_back_to_torch():
    ref, ours = pair(embed_dim=12, num_heads=3, batch_first=True)  # head dim 4
    x = torch.randn(2, 5, 12, dtype=F64)
    check(ref, ours, x, x, x, need_weights=False)


class SeedBlock(nn.Module):
    """The seed chapter's pre-norm block: self.attn(normed, normed, normed)[0], need_weights left True."""

    def __init__(self, dim, heads):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, dropout=0.1, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x):
        normed = self.norm1(x)
        x = x + self.attn(normed, normed, normed)[0]
        return x + self.mlp(self.norm2(x))


class SeedViT(nn.Module):
    def __init__(self, dim=64, heads=4, depth=2):
        super().__init__()
        self.blocks = nn.Sequential(*[SeedBlock(dim, heads) for _ in range(depth)])

    def forward(self, x):
        return self.blocks(x)


@pytest.mark.parametrize("weights", ["always", "hooks"])
def test_replace_mha_on_the_seed_vit_keeps_outputs_and_hooked_weights(weights):
    torch.manual_seed(0)
    model = SeedViT().to(F64).eval()
    x = torch.randn(2, 17, 64, dtype=F64)
    expected = model(x)
    captured_ref = []
    handle = model.blocks[-1].attn.register_forward_hook(lambda m, i, o: captured_ref.append(o[1]))
    model(x)
    handle.remove()
    params_before = [id(p) for p in model.parameters()]

    replace_mha(model, weights=weights)
    assert all(type(b.attn) is MultiheadAttention for b in model.blocks)
    assert [id(p) for p in model.parameters()] == params_before  # the same parameters: optimizers keep them
    torch.testing.assert_close(model(x), expected, rtol=1e-10, atol=1e-10)
    # the attention-map helper pattern: weights read through a forward hook on the last block
    captured = []
    model.blocks[-1].attn.register_forward_hook(lambda m, i, o: captured.append(o[1]))
    model(x)
    torch.testing.assert_close(captured[0], captured_ref[0], rtol=1e-10, atol=1e-10)
    if weights == "hooks":  # an un-hooked module fuses even with need_weights=True, and says so with None
        assert model.blocks[0].attn(x, x, x)[1] is None


def test_replace_mha_rejects_unknown_mode():
    with pytest.raises(ValueError, match="weights must be one of"):
        replace_mha(SeedViT(), weights="sometimes")

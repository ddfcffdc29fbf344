"""One test per error of API.md: every bad input raises ValueError/TypeError naming the argument,
the expected and the actual value."""
import pytest
import torch

from vitkernels import flash_attention, patch_embed, window_attention

f32, f64 = torch.float32, torch.float64


def qkv4(B=1, H=2, N=5, D=16, dtype=f32):
    return [torch.randn(B, H, N, D, dtype=dtype) for _ in range(3)]


def attn(**over):
    q, k, v = qkv4()
    args = dict(q=q, k=k, v=v)
    args.update(over)
    return lambda: flash_attention(args.pop("q"), args.pop("k"), args.pop("v"), **args)


def _relpos(rows, kh, kw, rel_t=None, prefix=0):
    from vitkernels import RelPos

    return RelPos(torch.randn(1, 2, rows, kh), torch.randn(1, 2, rows, kw), rel_t, prefix)


def _rope(rows, prefix=0, rotate_half=False):
    from vitkernels import Rope

    return Rope(torch.randn(rows, 16), torch.randn(rows, 16), prefix, rotate_half)


def _drp(**over):
    from vitkernels import decomposed_rel_pos

    args = dict(q=torch.randn(1, 2, 12, 16), q_grid=(3, 4), k_grid=(3, 4), rel_pos_h=torch.randn(5, 16),
                rel_pos_w=torch.randn(7, 16))
    args.update(over)
    return lambda: decomposed_rel_pos(**args)


def win(qkv=None, **over):
    qkv = torch.randn(1, 8, 8, 3 * 32) if qkv is None else qkv
    kw = dict(num_heads=2, window_size=4, shift_size=2)
    kw.update(over)
    return lambda: window_attention(qkv, **kw)


def pe(x=None, weight=None, **kw):
    x = torch.randn(2, 3, 32, 32) if x is None else x
    weight = torch.randn(8, 3, 16, 16) if weight is None else weight
    return lambda: patch_embed(x, weight, **kw)


CASES = [
    # flash_attention
    ("q not a tensor", attn(q=[1.0]), TypeError, ["q must be a torch.Tensor", "list"]),
    ("q rank", attn(q=torch.randn(2, 5, 16)), ValueError, ["q must have 4 dims", "(B, H, N, D)", "(2, 5, 16)"]),
    ("q int dtype", attn(q=torch.ones(1, 2, 5, 16, dtype=torch.int32)), TypeError, ["q must have dtype in", "int32"]),
    ("k dtype differs", attn(k=torch.randn(1, 2, 5, 16, dtype=f64)), TypeError, ["k must have the dtype of q", "float32", "float64"]),
    ("v device differs", attn(v=torch.randn(1, 2, 5, 16, device="meta")), ValueError, ["v must be on the device of q", "meta"]),
    ("B/H mismatch", attn(k=torch.randn(1, 3, 5, 16)), ValueError, ["share (B, H)", "(1, 3, 5, 16)"]),
    ("k/v Nk mismatch", attn(v=torch.randn(1, 2, 6, 16)), ValueError, ["same number of keys", "(1, 2, 6, 16)"]),
    ("k head dim mismatch", attn(k=torch.randn(1, 2, 5, 24)), ValueError, ["head dim D of k and v must equal q's (16)", "(1, 2, 5, 24)"]),
    ("head dim unsupported", attn(**dict(zip("qkv", qkv4(D=12)))), ValueError, ["head dim D=12", "multiples of 8 from 16 to 256"]),
    ("head dim too big", attn(**dict(zip("qkv", qkv4(D=264)))), ValueError, ["head dim D=264", "16 to 256"]),
    ("q last stride", attn(q=torch.randn(1, 2, 16, 5).transpose(-1, -2)), ValueError, ["q must have unit stride in its last", "(160, 80, 1, 5)"]),
    ("bias not a tensor", attn(bias=3.0), TypeError, ["bias must be a torch.Tensor", "float"]),
    ("bias bool", attn(bias=torch.ones(1, 1, 5, 5, dtype=torch.bool)), TypeError, ["bias must be an additive float tensor", "bool"]),
    ("bias dtype", attn(bias=torch.zeros(1, 2, 5, 5, dtype=f64)), TypeError, ["bias must have the dtype of q", "float64"]),
    ("bias shape", attn(bias=torch.zeros(1, 2, 5, 4)), ValueError, ["bias must be broadcastable to (B, H, Nq, Nk) = (1, 2, 5, 5)", "(1, 2, 5, 4)"]),
    ("bias rank", attn(bias=torch.zeros(1, 1, 2, 5, 5)), ValueError, ["bias must be broadcastable", "(1, 1, 2, 5, 5)"]),
    ("scale type", attn(scale="x"), TypeError, ["scale must be a float or None", "str"]),
    ("scale nan", attn(scale=float("nan")), ValueError, ["scale must be finite", "nan"]),
    ("dropout type", attn(dropout_p=None), TypeError, ["dropout_p must be a float", "NoneType"]),
    ("dropout range", attn(dropout_p=1.5), ValueError, ["dropout_p must be in [0, 1]", "1.5"]),
    # flash_attention(rel_pos=...): q is (1, 2, 5, 16), k (1, 2, 5, 16)
    ("rel_pos kind", attn(rel_pos=[torch.randn(1, 2, 5, 5)]), TypeError,
     ["rel_pos must be", "RelPos(rel_h, rel_w", "a list of 1"]),
    ("rel_pos term not a tensor", attn(rel_pos=(torch.randn(1, 2, 5, 5), 1.0)), TypeError,
     ["rel_pos.rel_w must be a torch.Tensor", "float"]),
    ("rel_pos term dtype", attn(rel_pos=(torch.randn(1, 2, 5, 5), torch.randn(1, 2, 5, 1, dtype=f64))), TypeError,
     ["rel_pos.rel_w must have the dtype of q", "float64"]),
    ("rel_pos term shape", attn(rel_pos=(torch.randn(1, 2, 4, 5), torch.randn(1, 2, 5, 1))), ValueError,
     ["rel_pos.rel_h must be (B, H, Nq - prefix, K)", "(1, 2, 5, K)", "(1, 2, 4, 5)"]),
    ("rel_pos grid", attn(rel_pos=(torch.randn(1, 2, 5, 2), torch.randn(1, 2, 5, 2))), ValueError,
     ["rel_pos key grid 2 (rel_h) x 2 (rel_w) = 4 keys", "Nk - prefix = 5 - 0 = 5"]),
    ("rel_pos prefix type", attn(rel_pos=_relpos(4, 1, 4, prefix=1.0)), TypeError, ["rel_pos.prefix must be an int", "float"]),
    ("rel_pos prefix range", attn(rel_pos=_relpos(1, 1, 1, prefix=6)), ValueError,
     ["rel_pos.prefix must be in [0, min(Nq, Nk)] = [0, 5]", "6"]),
    ("rel_pos 3-D grid", attn(rel_pos=_relpos(4, 1, 4, rel_t=torch.randn(1, 2, 4, 3), prefix=1)), ValueError,
     ["rel_pos key grid 3 (rel_t) x 1 (rel_h) x 4 (rel_w) = 12 keys", "Nk - prefix = 5 - 1 = 4"]),
    # decomposed_rel_pos(q, q_grid, k_grid, rel_pos_h, rel_pos_w, ...): q (1, 2, 12, 16) on a 3 x 4 grid
    ("decomposed q rank", _drp(q=torch.randn(2, 12, 16)), ValueError,
     ["decomposed_rel_pos: q must have 4 dims", "(B, H, Nq, D)"]),
    ("decomposed grid", _drp(k_grid=(0, 4)), ValueError, ["k_grid must be (h, w) positive ints", "(0, 4)"]),
    ("decomposed 3-D grid", _drp(rel_pos_t=torch.randn(3, 16)), ValueError,
     ["q_grid must be (t, h, w) positive ints (rel_pos_t is given)", "(3, 4)"]),
    ("decomposed rows", _drp(q_grid=(3, 5)), ValueError, ["q has 12 rows; q_grid (3, 5) after 0 prefix tokens needs 15"]),
    ("decomposed table width", _drp(rel_pos_w=torch.randn(7, 17)), ValueError,
     ["rel_pos_w must be a (L, D) table with L >= 1 and D = 16", "(7, 17)"]),
    ("decomposed table rank", _drp(rel_pos_h=torch.randn(5)), ValueError, ["rel_pos_h must be a (L, D) table", "(5,)"]),
    ("decomposed table empty", _drp(rel_pos_h=torch.randn(0, 16)), ValueError, ["rel_pos_h must be a (L, D)", "(0, 16)"]),
    ("decomposed table dtype", _drp(rel_pos_h=torch.randn(5, 16, dtype=f64)), TypeError,
     ["rel_pos_h must have q's dtype float32 (outside autocast)", "float64"]),
    ("decomposed table not a tensor", _drp(rel_pos_w=[1.0]), TypeError, ["rel_pos_w must be a torch.Tensor", "list"]),
    ("decomposed prefix", _drp(prefix=-1), ValueError, ["prefix must be an int >= 0", "-1"]),
    ("decomposed index rule", _drp(index_rule="mvit"), ValueError, ["index_rule must be one of ('timm', 'torchvision')",
                                                                    "'mvit'"]),
    # flash_attention(rope=...): q, k are (1, 2, 5, 16)
    ("rope kind", attn(rope=torch.randn(5, 16)), TypeError, ["rope must be", "Rope(cos, sin", "Tensor"]),
    ("rope tuple length", attn(rope=(torch.randn(5, 16),)), TypeError, ["rope must be", "a tuple of 1"]),
    ("rope table not a tensor", attn(rope=(torch.randn(5, 16), 1.0)), TypeError, ["rope.sin must be a torch.Tensor", "float"]),
    ("rope table dtype", attn(rope=(torch.randn(5, 16, dtype=f64), torch.randn(5, 16, dtype=f64))), TypeError,
     ["rope.cos must have dtype float32", "float64"]),
    ("rope fp16 table for fp32 q", attn(rope=(torch.randn(5, 16, dtype=torch.float16),) * 2), TypeError,
     ["rope.cos must have dtype float32", "float16"]),
    ("rope table rows", attn(rope=(torch.randn(4, 16), torch.randn(4, 16))), ValueError,
     ["rope.cos must be (Nq - prefix, D) = (5, 16)", "broadcastable to (B, H) = (1, 2)", "(4, 16)"]),
    ("rope table width", attn(rope=(torch.randn(5, 8), torch.randn(5, 8))), ValueError, ["rope.cos must be", "(5, 8)"]),
    ("rope table lead dims", attn(rope=(torch.randn(1, 3, 5, 16), torch.randn(1, 3, 5, 16))), ValueError,
     ["rope.cos must be", "(B, H) = (1, 2)", "(1, 3, 5, 16)"]),
    ("rope tables differ", attn(rope=(torch.randn(5, 16), torch.randn(1, 1, 5, 16))), ValueError,
     ["rope.cos and rope.sin must have the same shape and dtype", "(5, 16)", "(1, 1, 5, 16)"]),
    ("rope prefix type", attn(rope=_rope(4, prefix=1.0)), TypeError, ["rope.prefix must be an int", "float"]),
    ("rope prefix range", attn(rope=_rope(0, prefix=6)), ValueError, ["rope.prefix must be in [0, Nq] = [0, 5]", "6"]),
    ("rope rotate_half type", attn(rope=_rope(5, rotate_half=1)), TypeError, ["rope.rotate_half must be a bool", "int"]),
    ("rope cross-attention", attn(k=torch.randn(1, 2, 7, 16), v=torch.randn(1, 2, 7, 16), rope=_rope(5)), ValueError,
     ["rope rotates q and k by the same per-token angles and needs Nq == Nk", "Nq=5, Nk=7"]),
    ("rope device", attn(rope=(torch.randn(5, 16, device="meta"),) * 2), ValueError,
     ["rope.cos must be on the device of q", "meta"]),
    # window_attention
    ("qkv not a tensor", win(qkv="x"), TypeError, ["qkv must be a torch.Tensor", "str"]),
    ("qkv rank", win(qkv=torch.randn(8, 8, 96)), ValueError, ["qkv must have 4 or 5 dims", "(8, 8, 96)"]),
    ("qkv dtype", win(qkv=torch.ones(1, 8, 8, 96, dtype=torch.int64)), TypeError, ["qkv must have dtype in", "int64"]),
    ("qkv empty map", win(qkv=torch.randn(1, 0, 8, 96)), ValueError, ["at least 1 in every spatial dim", "(1, 0, 8, 96)"]),
    ("num_heads type", win(num_heads=2.0), TypeError, ["num_heads must be an int", "float"]),
    ("num_heads zero", win(num_heads=0), ValueError, ["num_heads must be >= 1", "got 0"]),
    ("channels vs heads", win(num_heads=5), ValueError, ["multiple of 15 for num_heads=5", "got 96"]),
    ("window tuple length", win(window_size=(4, 4, 4)), ValueError, ["window_size must be an int or a tuple of 2 ints", "(4, 4, 4)"]),
    ("window type", win(window_size="7"), TypeError, ["window_size must be an int or a tuple of 2 ints", "str"]),
    ("window zero", win(window_size=0, shift_size=0), ValueError, ["window_size must be >= 1 in every dim", "(0, 0)"]),
    ("shift negative", win(shift_size=-1), ValueError, ["shift_size must be >= 0 in every dim", "(-1, -1)"]),
    ("shift >= window", win(window_size=7, shift_size=7), ValueError, ["shift_size (7, 7) must be smaller than window_size (7, 7) in every dim"]),
    ("3-D shift >= window", win(qkv=torch.randn(1, 4, 8, 8, 96), window_size=(2, 4, 4), shift_size=(2, 1, 1)), ValueError,
     ["shift_size (2, 1, 1) must be smaller than window_size (2, 4, 4)"]),
    ("table shape", win(rel_pos_bias=torch.randn(50, 2)), ValueError,
     ["rel_pos_bias must have shape (49, 2)", "((2*4-1)*(2*4-1), num_heads) for window (4, 4)", "got (50, 2)"]),
    ("table heads", win(rel_pos_bias=torch.randn(49, 3)), ValueError, ["rel_pos_bias must have shape (49, 2)", "got (49, 3)"]),
    ("table clipped window", win(qkv=torch.randn(1, 5, 5, 96), window_size=7, shift_size=3, rel_pos_bias=torch.randn(169, 2)),
     ValueError, ["rel_pos_bias must have shape (81, 2)", "window (5, 5)", "got (169, 2)"]),
    ("table dtype", win(rel_pos_bias=torch.randn(49, 2, dtype=f64)), TypeError, ["rel_pos_bias must have the dtype of qkv", "float64"]),
    ("qkv_bias shape", win(qkv_bias=torch.randn(32)), ValueError, ["qkv_bias must have shape (96,)", "got (32,)"]),
    ("qkv_bias device", win(qkv_bias=torch.randn(96, device="meta")), ValueError, ["qkv_bias must be on the device of qkv", "meta"]),
    # window_attention(cosine=True, logit_scale=...): 2 heads
    ("cosine type", win(cosine=1, logit_scale=torch.zeros(2)), TypeError, ["cosine must be a bool", "int"]),
    ("cosine without logit_scale", win(cosine=True), ValueError, ["cosine=True needs logit_scale", "(num_heads, 1, 1)"]),
    ("logit_scale without cosine", win(logit_scale=torch.zeros(2)), ValueError,
     ["logit_scale is only used with cosine=True", "pass cosine=True"]),
    ("cosine with scale", win(cosine=True, logit_scale=torch.zeros(2), scale=0.1), ValueError,
     ["scale must be None with cosine=True", "exp(min(logit_scale, log(100)))", "scale=0.1"]),
    ("logit_scale not a tensor", win(cosine=True, logit_scale=2.3), TypeError, ["logit_scale must be a torch.Tensor", "float"]),
    ("logit_scale shape", win(cosine=True, logit_scale=torch.zeros(3, 1, 1)), ValueError,
     ["logit_scale must have shape (num_heads,) or (num_heads, 1, ..., 1)", "num_heads=2", "(3, 1, 1)"]),
    ("logit_scale wide", win(cosine=True, logit_scale=torch.zeros(2, 2)), ValueError, ["logit_scale must have shape", "(2, 2)"]),
    ("logit_scale dtype", win(cosine=True, logit_scale=torch.zeros(2, dtype=f64)), TypeError,
     ["logit_scale must have dtype float32", "float64"]),
    ("logit_scale device", win(cosine=True, logit_scale=torch.zeros(2, device="meta")), ValueError,
     ["logit_scale must be on the device of qkv", "meta"]),
    # patch_embed
    ("x not a tensor", pe(x=1), TypeError, ["x must be a torch.Tensor", "int"]),
    ("x rank", pe(x=torch.randn(3, 32, 32)), ValueError, ["x must have 4 or 5 dims", "(3, 32, 32)"]),
    ("weight rank", pe(weight=torch.randn(8, 3, 16)), ValueError, ["weight must have 4 dims (E, C, ph, pw)", "(8, 3, 16)"]),
    ("weight channels", pe(weight=torch.randn(8, 4, 16, 16)), ValueError, ["input channels", "x's channels 3", "(8, 4, 16, 16)"]),
    ("weight dtype", pe(weight=torch.randn(8, 3, 16, 16, dtype=f64)), TypeError, ["weight must have the dtype of x", "float64"]),
    ("not a multiple of the patch", pe(x=torch.randn(2, 3, 30, 32)), ValueError, ["H=30 is not a multiple of the patch size 16"]),
    ("video not a multiple", pe(x=torch.randn(1, 3, 3, 32, 32), weight=torch.randn(8, 3, 2, 16, 16)), ValueError,
     ["T=3 is not a multiple of the patch size 2"]),
    ("bias shape", pe(bias=torch.randn(7)), ValueError, ["bias must have shape (8,)", "got (7,)"]),
    ("prefix shape", pe(prefix_tokens=torch.randn(1, 8)), ValueError, ["prefix_tokens must have shape (1, P, E=8)", "(1, 8)"]),
    ("pos shape", pe(pos_embed=torch.randn(1, 5, 8), prefix_tokens=torch.randn(1, 2, 8)), ValueError,
     ["pos_embed must have shape (1, P + Np, E) = (1, 6, 8) or (1, Np, E) = (1, 4, 8)", "got (1, 5, 8)"]),
    ("pos dtype", pe(pos_embed=torch.randn(1, 4, 8, dtype=f64)), TypeError, ["pos_embed must have the dtype of x", "float64"]),
]


@pytest.mark.parametrize("name,call,exc,fragments", CASES, ids=[c[0] for c in CASES])
def test_error_names_argument_expected_and_actual(name, call, exc, fragments):
    with pytest.raises(exc) as info:
        call()
    message = str(info.value)
    assert message.split(":")[0] in ("flash_attention", "window_attention", "patch_embed", "decomposed_rel_pos"), message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"

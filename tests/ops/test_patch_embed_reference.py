"""``patch_embed(..., backend="reference")`` against the definition it abbreviates: a strided
Conv2d/Conv3d (kernel == stride == patch) + flatten(2).transpose(1, 2) + cat(prefix tokens) + pos_embed,
in float64, forward and the gradients of x, weight, bias, pos_embed and prefix_tokens; plus gradcheck.

The case table and input builders here are shared with test_patch_embed_cpu.py.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import pytest
import torch
import torch.nn.functional as F

from tests.utils import max_err
from vitkernels import patch_embed
from vitkernels.ops.patch_embed.reference import patch_embed_reference, patchify, unpatchify

F64 = torch.float64
TOL64 = 1e-12


@dataclass(frozen=True)
class Case:
    x_shape: Tuple[int, ...]  # B, C, [T,] H, W
    patch: Tuple[int, ...]
    E: int
    P: int  # prefix tokens (0: none)
    pos: Optional[str]  # "full" (1, P + Np, E), "patches" (1, Np, E) or None
    bias: bool
    layout: str  # "contig", "channels_last" or "slice"

    @property
    def id(self) -> str:
        return (f"x{'x'.join(map(str, self.x_shape))}-p{'x'.join(map(str, self.patch))}-E{self.E}-P{self.P}"
                f"-pos_{self.pos}-{'bias' if self.bias else 'nobias'}-{self.layout}")

    @property
    def num_patches(self) -> int:
        n = 1
        for s, p in zip(self.x_shape[2:], self.patch):
            n *= s // p
        return n


CASES = [
    # 2-D
    Case((2, 3, 32, 32), (16, 16), 24, 1, "full", True, "contig"),
    Case((2, 3, 28, 28), (14, 14), 16, 2, "patches", True, "channels_last"),
    Case((2, 3, 16, 24), (4, 4), 8, 0, "full", True, "slice"),  # non-square map
    Case((2, 3, 16, 24), (4, 8), 12, 1, None, False, "contig"),  # non-square patch
    Case((1, 3, 32, 32), (8, 8), 16, 0, None, True, "channels_last"),
    Case((2, 4, 16, 16), (8, 8), 10, 2, "full", False, "slice"),
    Case((3, 3, 16, 16), (16, 16), 32, 1, "patches", True, "slice"),  # a single patch per image
    # 3-D tubelets
    Case((2, 3, 4, 8, 8), (2, 4, 4), 16, 1, "full", True, "contig"),
    Case((2, 3, 4, 8, 8), (2, 4, 4), 12, 0, "patches", False, "channels_last"),
    Case((1, 2, 4, 8, 12), (2, 4, 4), 8, 2, "patches", True, "slice"),
    Case((2, 3, 2, 8, 8), (1, 4, 4), 8, 0, None, True, "contig"),
]
CASE_IDS = [c.id for c in CASES]


def make_x(case: Case, dtype=F64):
    """(leaf, x): x has the case's layout; the leaf is what gets the gradient (x itself unless sliced)."""
    shape = case.x_shape
    if case.layout == "contig":
        x = torch.randn(shape, dtype=dtype).requires_grad_(True)
        return x, x
    if case.layout == "channels_last":
        fmt = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
        x = torch.randn(shape, dtype=dtype).to(memory_format=fmt).requires_grad_(True)
        assert not x.is_contiguous() and x.is_contiguous(memory_format=fmt)
        return x, x
    if case.layout == "slice":
        # A window of a bigger tensor, every other channel: no dim is dense.
        big_shape = (shape[0], 2 * shape[1]) + tuple(s + 3 for s in shape[2:])
        big = torch.randn(big_shape, dtype=dtype).requires_grad_(True)
        index = (slice(None), slice(None, None, 2)) + tuple(slice(1, 1 + s) for s in shape[2:])
        x = big[index]
        assert tuple(x.shape) == tuple(shape) and not x.is_contiguous()
        return big, x
    raise AssertionError(case.layout)


def make_params(case: Case, dtype=F64):
    """weight, bias, pos_embed, prefix_tokens (None where the case has none), all requiring grad."""
    C = case.x_shape[1]
    E, P, Np = case.E, case.P, case.num_patches
    fan_in = C
    for p in case.patch:
        fan_in *= p
    weight = (torch.randn(E, C, *case.patch, dtype=dtype) / fan_in ** 0.5).requires_grad_(True)
    bias = torch.randn(E, dtype=dtype).requires_grad_(True) if case.bias else None
    pos = None
    if case.pos == "full":
        pos = torch.randn(1, P + Np, E, dtype=dtype).requires_grad_(True)
    elif case.pos == "patches":
        pos = torch.randn(1, Np, E, dtype=dtype).requires_grad_(True)
    prefix = torch.randn(1, P, E, dtype=dtype).requires_grad_(True) if P else None
    return weight, bias, pos, prefix


def conv_oracle(x, weight, bias=None, pos_embed=None, prefix_tokens=None):
    """The definition: timm's PatchEmbed (strided conv, flatten, transpose), cat(prefix), + pos."""
    conv = F.conv2d if x.dim() == 4 else F.conv3d
    tokens = conv(x, weight, bias, stride=tuple(weight.shape[2:])).flatten(2).transpose(1, 2)  # B, Np, E
    num_patches = tokens.shape[1]
    P = 0 if prefix_tokens is None else prefix_tokens.shape[1]
    if prefix_tokens is not None:
        tokens = torch.cat([prefix_tokens.expand(x.shape[0], -1, -1), tokens], dim=1)
    if pos_embed is not None:
        if pos_embed.shape[1] == P + num_patches:
            tokens = tokens + pos_embed
        else:
            assert pos_embed.shape[1] == num_patches
            tokens = torch.cat([tokens[:, :P], tokens[:, P:] + pos_embed], dim=1)
    return tokens


def run_with_grads(fn, leaves, g):
    """out = fn(); backprop (out * g).sum(); the grads of ``leaves`` (None where a leaf got none)."""
    for t in leaves:
        t.grad = None
    out = fn()
    (out * g).sum().backward()
    grads = [None if t.grad is None else t.grad.clone() for t in leaves]
    for t in leaves:
        t.grad = None
    return out.detach(), grads


# ------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_reference_matches_conv(case):
    leaf, x = make_x(case)
    weight, bias, pos, prefix = make_params(case)
    leaves = [t for t in (leaf, weight, bias, pos, prefix) if t is not None]
    B, E, P, Np = case.x_shape[0], case.E, case.P, case.num_patches
    g = torch.randn(B, P + Np, E, dtype=F64)

    out, grads = run_with_grads(
        lambda: patch_embed(x, weight, bias, pos_embed=pos, prefix_tokens=prefix, backend="reference"), leaves, g)
    out_c, grads_c = run_with_grads(lambda: conv_oracle(x, weight, bias, pos, prefix), leaves, g)

    assert out.shape == (B, P + Np, E) and out.dtype == F64
    assert out.abs().max() > 0.1
    with torch.no_grad():
        assert torch.equal(out, patch_embed_reference(x, weight, bias, pos, prefix))
    assert max_err(out, out_c) < TOL64, f"forward: {max_err(out, out_c):.3e}"
    for t, a, b in zip(leaves, grads, grads_c):
        assert a is not None and a.shape == t.shape
        assert a.abs().max() > 0
        assert max_err(a, b) < TOL64, f"grad of {tuple(t.shape)}: {max_err(a, b):.3e}"
    if case.layout == "slice":  # only the sliced-out window of the big tensor gets a gradient
        big_grad = grads[0]
        assert big_grad[:, 1::2].abs().max() == 0
        assert big_grad[(slice(None), slice(None)) + (slice(0, 1),) * (big_grad.dim() - 2)].abs().max() == 0


@pytest.mark.parametrize("case", [CASES[0], CASES[7]], ids=[CASES[0].id, CASES[7].id])
def test_prefix_tokens_and_pos_embed_placement(case):
    # Prefix rows are exactly prefix (+ its pos when pos covers the prefix); patch rows get pos[P + i].
    _, x = make_x(case)
    weight, bias, pos, prefix = make_params(case)
    with torch.no_grad():
        body = conv_oracle(x, weight, bias)
        P = case.P
        full = torch.randn(1, P + case.num_patches, case.E, dtype=F64)
        patches_only = torch.randn(1, case.num_patches, case.E, dtype=F64)
        out_full = patch_embed(x, weight, bias, pos_embed=full, prefix_tokens=prefix, backend="reference")
        out_np = patch_embed(x, weight, bias, pos_embed=patches_only, prefix_tokens=prefix, backend="reference")
        for b in range(x.shape[0]):
            assert max_err(out_full[b, :P], prefix[0] + full[0, :P]) < TOL64
            assert torch.equal(out_np[b, :P], prefix[0])
        assert max_err(out_full[:, P:], body + full[:, P:]) < TOL64
        assert max_err(out_np[:, P:], body + patches_only) < TOL64


def test_empty_prefix_tensor_is_no_prefix():
    case = CASES[0]
    _, x = make_x(case)
    weight, bias, _, _ = make_params(case)
    pos = torch.randn(1, case.num_patches, case.E, dtype=F64)
    empty = torch.zeros(1, 0, case.E, dtype=F64)
    with torch.no_grad():
        a = patch_embed(x, weight, bias, pos_embed=pos, prefix_tokens=empty, backend="reference")
        b = patch_embed(x, weight, bias, pos_embed=pos, backend="reference")
    assert a.shape == b.shape and max_err(a, b) < TOL64


@pytest.mark.parametrize("patch", [(2, 3), (2, 2, 3)], ids=["2d", "3d"])
def test_patchify_unpatchify_roundtrip_and_conv_order(patch):
    shape = (2, 3, 4, 6) if len(patch) == 2 else (2, 3, 4, 4, 6)
    x = torch.randn(shape, dtype=F64)
    patches = patchify(x, patch)
    K = 3
    for p in patch:
        K *= p
    assert patches.shape[2] == K
    assert torch.equal(unpatchify(patches, x.shape, patch), x)
    # A weight that picks feature j reproduces column j of the patches through the conv.
    eye = torch.eye(K, dtype=F64).reshape(K, 3, *patch)
    conv = F.conv2d if len(patch) == 2 else F.conv3d
    assert torch.equal(conv(x, eye, stride=patch).flatten(2).transpose(1, 2), patches)


@pytest.mark.parametrize("dims", [2, 3])
def test_gradcheck_reference(dims):
    if dims == 2:
        x = torch.randn(2, 2, 4, 6, dtype=F64, requires_grad=True)
        weight = torch.randn(3, 2, 2, 3, dtype=F64, requires_grad=True)
        num_patches = 2 * 2
    else:
        x = torch.randn(1, 2, 2, 4, 4, dtype=F64, requires_grad=True)
        weight = torch.randn(3, 2, 1, 2, 2, dtype=F64, requires_grad=True)
        num_patches = 2 * 2 * 2
    bias = torch.randn(3, dtype=F64, requires_grad=True)
    prefix = torch.randn(1, 1, 3, dtype=F64, requires_grad=True)
    pos_full = torch.randn(1, 1 + num_patches, 3, dtype=F64, requires_grad=True)
    pos_np = torch.randn(1, num_patches, 3, dtype=F64, requires_grad=True)
    for pos in (pos_full, pos_np):
        assert torch.autograd.gradcheck(
            lambda x_, w_, b_, pos_, pre_: patch_embed(x_, w_, b_, pos_embed=pos_, prefix_tokens=pre_,
                                                       backend="reference"),
            (x, weight, bias, pos, prefix))
    assert torch.autograd.gradcheck(lambda x_, w_: patch_embed(x_, w_, backend="reference"), (x, weight))

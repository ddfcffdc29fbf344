"""Input checks of ``patch_embed``, shared by every backend (backends add their own limits in
``can_run``)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from vitkernels.ops import _checks as C
from vitkernels.ops._tracing import data_free

OP = "patch_embed"


@dataclass
class PatchEmbedInputs:
    x: torch.Tensor  # B, C, H, W  or  B, C, T, H, W
    weight: torch.Tensor  # E, C, ph, pw  or  E, C, pt, ph, pw
    bias: Optional[torch.Tensor]  # E
    pos_embed: Optional[torch.Tensor]  # 1, P + Np, E  or  1, Np, E
    prefix_tokens: Optional[torch.Tensor]  # 1, P, E

    @property
    def device(self) -> torch.device:
        return self.x.device

    @property
    def dtype(self) -> torch.dtype:
        return self.x.dtype

    @property
    def patch(self) -> Tuple[int, ...]:
        return tuple(self.weight.shape[2:])

    @property
    def grid(self) -> Tuple[int, ...]:
        return tuple(s // p for s, p in zip(self.x.shape[2:], self.patch))

    @property
    def num_patches(self) -> int:
        return math.prod(self.grid)

    @property
    def num_prefix(self) -> int:
        return 0 if self.prefix_tokens is None else self.prefix_tokens.shape[1]

    @property
    def data_free(self) -> bool:
        """Meta tensors or a zero-size dim: nothing to compute (dispatch gives it to the reference)."""
        return data_free(self.x, self.weight, self.bias, self.pos_embed, self.prefix_tokens)

    def describe(self) -> str:
        return (f"x {tuple(self.x.shape)} {C.dtype_name(self.dtype)} on {self.device}, "
                f"weight {tuple(self.weight.shape)}, prefix {self.num_prefix}, "
                f"pos_embed {None if self.pos_embed is None else tuple(self.pos_embed.shape)}")


def check_patch_embed_inputs(x, weight, bias=None, pos_embed=None, prefix_tokens=None) -> PatchEmbedInputs:
    """Validate the arguments of ``patch_embed``; raise ValueError/TypeError naming the argument."""
    C.require_tensor(OP, "x", x)
    C.require_rank(OP, "x", x, (4, 5), "((B, C, H, W) image or (B, C, T, H, W) video)")
    C.require_float_dtype(OP, "x", x)
    C.require_tensor(OP, "weight", weight)
    layout = "(E, C, ph, pw)" if x.dim() == 4 else "(E, C, pt, ph, pw)"
    if weight.dim() != x.dim():
        raise ValueError(f"{OP}: weight must have {x.dim()} dims {layout} for a {x.dim()}-D x, "
                         f"got shape {tuple(weight.shape)}")
    C.require_same_dtype(OP, "weight", weight, "x", x)
    C.require_same_device(OP, "weight", weight, "x", x)
    E, c_in = weight.shape[0], weight.shape[1]
    if E < 1 or any(p < 1 for p in weight.shape[2:]):
        raise ValueError(f"{OP}: weight must have E >= 1 and patch sizes >= 1, got shape {tuple(weight.shape)}")
    if c_in != x.shape[1]:
        raise ValueError(f"{OP}: weight's input channels (dim 1) must equal x's channels {x.shape[1]}, "
                         f"got weight {tuple(weight.shape)}")
    patch = tuple(weight.shape[2:])
    names = ("H", "W") if x.dim() == 4 else ("T", "H", "W")
    for name, s, p in zip(names, x.shape[2:], patch):
        if s % p != 0:
            raise ValueError(f"{OP}: x's {name}={s} is not a multiple of the patch size {p} "
                             f"(patch {patch} from weight.shape, x {tuple(x.shape)})")
    num_patches = math.prod([s // p for s, p in zip(x.shape[2:], patch)])
    if bias is not None:
        C.require_tensor(OP, "bias", bias)
        C.require_same_dtype(OP, "bias", bias, "x", x)
        C.require_same_device(OP, "bias", bias, "x", x)
        C.require_shape(OP, "bias", bias, (E,), "(E,)")
    num_prefix = 0
    if prefix_tokens is not None:
        C.require_tensor(OP, "prefix_tokens", prefix_tokens)
        C.require_same_dtype(OP, "prefix_tokens", prefix_tokens, "x", x)
        C.require_same_device(OP, "prefix_tokens", prefix_tokens, "x", x)
        if prefix_tokens.dim() != 3 or prefix_tokens.shape[0] != 1 or prefix_tokens.shape[2] != E:
            raise ValueError(f"{OP}: prefix_tokens must have shape (1, P, E={E}), got {tuple(prefix_tokens.shape)}")
        num_prefix = prefix_tokens.shape[1]
    if pos_embed is not None:
        C.require_tensor(OP, "pos_embed", pos_embed)
        C.require_same_dtype(OP, "pos_embed", pos_embed, "x", x)
        C.require_same_device(OP, "pos_embed", pos_embed, "x", x)
        allowed = {(1, num_prefix + num_patches, E), (1, num_patches, E)}
        if tuple(pos_embed.shape) not in allowed:
            raise ValueError(f"{OP}: pos_embed must have shape (1, P + Np, E) = {(1, num_prefix + num_patches, E)} "
                             f"or (1, Np, E) = {(1, num_patches, E)} (P={num_prefix} prefix tokens, "
                             f"Np={num_patches} patches), got {tuple(pos_embed.shape)}")
    return PatchEmbedInputs(x, weight, bias, pos_embed, prefix_tokens)

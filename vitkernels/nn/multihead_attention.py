"""``MultiheadAttention``: a drop-in for ``torch.nn.MultiheadAttention`` whose attention runs on
``vitkernels.flash_attention``; ``replace_mha(model)`` swaps every ``nn.MultiheadAttention`` in place.

Same constructor, parameters, state_dict keys, forward signature and defaults as torch's (it subclasses
it). Paths:
- ``need_weights=False``: fused. q/k/v projections, masks turned into one additive bias (bool True =
  "not allowed" -> -inf, float added), ``add_bias_kv`` / ``add_zero_attn`` keys, dropout, then
  ``flash_attention`` (no L x S matrix on the fused backends) and ``out_proj``.
- ``need_weights=True``: torch's own computation (the weights are an L x S matrix anyway), so the
  returned weights are exactly torch's.
- ``weights_mode = "hooks"`` (set by ``replace_mha(model, weights="hooks")``): ``need_weights=True`` takes
  the fused path and returns ``None`` weights unless a forward hook is registered on the module: code that
  discards ``attn(x, x, x)[0]``'s weights gets the fused speed, and hook-based attention-map helpers still
  receive the exact weights.
- Torch's own computation (the same result, or torch's own error) also runs for what the fused path does
  not take: ``is_causal`` (a hint about ``attn_mask``; torch needs the mask), nested tensors, masks of a
  shape or dtype torch rejects or converts (float masks of another dtype than the query, key_padding_mask
  and attn_mask of different dtypes), inputs whose shapes torch rejects, head dims the kernels do not take
  (not a multiple of 8 in 16..256), and under FX symbolic tracing, ``torch.jit.trace`` and ONNX export.
- ``torch.jit.script`` raises an error naming ``vitkernels.nn.restore_mha``.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vitkernels.nn import _dropin
from vitkernels.ops.attention import flash_attention
from vitkernels.ops.attention.checks import head_dim_supported

WEIGHTS_MODES = ("always", "hooks")


def _additive(mask: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    """A torch-MHA mask as an additive bias: bool True (not allowed) -> -inf, float masks as they are."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
    return mask.to(dtype)  # a float mask of the query's dtype (others take torch's path)


class MultiheadAttention(nn.MultiheadAttention):
    __doc__ = __doc__

    weights_mode: str = "always"

    def _has_hooks(self) -> bool:
        from torch.nn.modules import module as module_mod

        return bool(self._forward_hooks or self._forward_pre_hooks or module_mod._global_forward_hooks)

    def __prepare_scriptable__(self):
        raise _dropin.script_error(self, "torch.nn.MultiheadAttention", "vitkernels.nn.restore_mha")

    def _fusable(self, query, key, value, key_padding_mask, attn_mask, need_weights, is_causal) -> bool:
        """Whether the fused path gives what torch's forward gives for these arguments (else torch's code runs,
        with its own conversions and error messages)."""
        tensors = (query, key, value, key_padding_mask, attn_mask)
        if _dropin.plain_path_reason(*tensors, need_weights, is_causal) is not None:  # first: may be proxies
            return False
        if not head_dim_supported(self.head_dim):
            return False
        if not all(t is None or (isinstance(t, Tensor) and not t.is_nested) for t in tensors):
            return False
        if not all(isinstance(t, Tensor) for t in (query, key, value)):
            return False
        batched = query.dim() == 3
        if query.dim() not in (2, 3) or key.dim() != query.dim() or value.dim() != query.dim():
            return False
        if (query.shape[-1] != self.embed_dim or key.shape[-1] != self.kdim or value.shape[-1] != self.vdim
                or key.shape[:-1] != value.shape[:-1]):
            return False
        weight = self.in_proj_weight if self._qkv_same_embed_dim else self.q_proj_weight
        if not _dropin.autocast_on(query.device.type) and not (query.dtype == key.dtype == value.dtype == weight.dtype):
            return False
        b_dim = 0 if self.batch_first else 1
        B = query.shape[b_dim] if batched else None
        if batched and key.shape[b_dim] != B:
            return False
        L = query.shape[1 - b_dim] if batched else query.shape[0]
        S = key.shape[1 - b_dim] if batched else key.shape[0]
        masks = [m for m in (key_padding_mask, attn_mask) if m is not None]
        if len({m.dtype for m in masks}) > 1:  # torch converts (with a deprecation warning)
            return False
        for mask in masks:
            if (mask.dtype != torch.bool and mask.dtype != query.dtype) or mask.device != query.device:
                return False
        if key_padding_mask is not None and tuple(key_padding_mask.shape) != ((B, S) if batched else (S,)):
            return False
        if attn_mask is not None:
            heads = self.num_heads * (B if batched else 1)
            if tuple(attn_mask.shape) not in ((L, S), (heads, L, S)):
                return False
        return True

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Optional[Tensor] = None,
                need_weights: bool = True, attn_mask: Optional[Tensor] = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> Tuple[Tensor, Optional[Tensor]]:
        fusable = self._fusable(query, key, value, key_padding_mask, attn_mask, need_weights, is_causal)
        if not fusable or is_causal or (need_weights and (self.weights_mode == "always" or self._has_hooks())):
            return super().forward(query, key, value, key_padding_mask=key_padding_mask, need_weights=need_weights,
                                   attn_mask=attn_mask, average_attn_weights=average_attn_weights,
                                   is_causal=is_causal)
        return self._fused_forward(query, key, value, key_padding_mask, attn_mask), None

    def _project(self, query: Tensor, key: Tensor, value: Tensor):
        """(B, L, E) inputs -> q, k, v as (B, L|S, E) (a self-attention projection is one GEMM)."""
        E = self.embed_dim
        w, b = self.in_proj_weight, self.in_proj_bias
        bq, bk, bv = (None, None, None) if b is None else b.split(E)
        if self._qkv_same_embed_dim:
            if query is key and key is value:
                return F.linear(query, w, b).split(E, dim=-1)
            wq, wk, wv = w.split(E)
        else:
            wq, wk, wv = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        return F.linear(query, wq, bq), F.linear(key, wk, bk), F.linear(value, wv, bv)

    def _fused_forward(self, query, key, value, key_padding_mask, attn_mask) -> Tensor:
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        if not self.batch_first or unbatched:  # (L, B, E) -> (B, L, E): views
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        B, L, E = query.shape
        H, D = self.num_heads, self.head_dim
        q, k, v = self._project(query, key, value)
        dtype = q.dtype
        kpm = _additive(key_padding_mask, dtype)
        mask = _additive(attn_mask, dtype)
        if self.bias_k is not None:  # one learned key/value appended to every sequence
            k = torch.cat([k, self.bias_k.view(1, 1, E).expand(B, 1, E)], dim=1)
            v = torch.cat([v, self.bias_v.view(1, 1, E).expand(B, 1, E)], dim=1)
            kpm = None if kpm is None else F.pad(kpm, (0, 1))
            mask = None if mask is None else F.pad(mask, (0, 1))
        if self.add_zero_attn:  # one all-zero key/value appended after the projections
            k = torch.cat([k, k.new_zeros(B, 1, E)], dim=1)
            v = torch.cat([v, v.new_zeros(B, 1, E)], dim=1)
            kpm = None if kpm is None else F.pad(kpm, (0, 1))
            mask = None if mask is None else F.pad(mask, (0, 1))
        S = k.shape[1]
        bias = None
        if mask is not None:
            bias = mask.reshape(B, H, L, S) if mask.dim() == 3 else mask.view(1, 1, L, S)
        if kpm is not None:
            kpm = kpm.view(B, 1, 1, S)
            bias = kpm if bias is None else bias + kpm
        # (B, N, H, D) -> (B, H, N, D): strided views, the kernels read them as they are
        q = q.view(B, L, H, D).transpose(1, 2)
        k = k.reshape(B, S, H, D).transpose(1, 2)
        v = v.reshape(B, S, H, D).transpose(1, 2)
        out = flash_attention(q, k, v, bias=bias, dropout_p=self.dropout if self.training else 0.0)
        out = F.linear(out.transpose(1, 2).reshape(B, L, E), self.out_proj.weight, self.out_proj.bias)
        if not self.batch_first or unbatched:
            out = out.transpose(0, 1)
        return out.squeeze(1) if unbatched else out


def restore_mha(model: nn.Module) -> nn.Module:
    """Switch every ``vitkernels.nn.MultiheadAttention`` in ``model`` (``model`` itself included) back to
    ``torch.nn.MultiheadAttention`` in place (same parameters); returns the model."""
    for module in model.modules():
        if type(module) is MultiheadAttention:
            module.__class__ = nn.MultiheadAttention
            module.__dict__.pop("weights_mode", None)
    return model


def replace_mha(model: nn.Module, weights: str = "always") -> nn.Module:
    """Swap every ``torch.nn.MultiheadAttention`` in ``model`` for ``vitkernels.nn.MultiheadAttention`` in
    place, keeping its parameters (the same objects: optimizers keep working). ``weights="hooks"``
    makes ``need_weights=True`` calls fused too, computing weights only for modules with forward hooks
    (see the module docstring). Returns the model."""
    if weights not in WEIGHTS_MODES:
        raise ValueError(f"replace_mha: weights must be one of {WEIGHTS_MODES}, got {weights!r}")
    if type(model) is nn.MultiheadAttention:
        raise ValueError("replace_mha: pass the model that contains the nn.MultiheadAttention, not the module itself")
    for module in model.modules():
        if isinstance(module, nn.MultiheadAttention):
            if type(module) is nn.MultiheadAttention:
                module.__class__ = MultiheadAttention  # same fields and parameters; only forward changes
            if isinstance(module, MultiheadAttention):
                module.weights_mode = weights
    return model

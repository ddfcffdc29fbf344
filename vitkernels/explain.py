"""``vitkernels.explain(op, *args, **kwargs)``: what dispatch would do with a call, and why, without running it.

    >>> print(vitkernels.explain(vitkernels.flash_attention, q, k, v, bias=bias))
    flash_attention: q (2, 3, 197, 64) float32 on cpu, ...
      dispatch order for cpu: cpu, reference  ->  reference
      reference  runs      pure PyTorch: any device, fp16/bf16/fp32/fp64
      triton     refuses   triton 3.6.0 is importable but no CUDA device is visible (...)
      cuda       no kernel
      cpu        no kernel
"""
from __future__ import annotations

import dataclasses
import inspect
from typing import Callable, Dict, List, Optional, Tuple, Union

from vitkernels import dispatch
from vitkernels.ops import flash_attention, patch_embed, window_attention
from vitkernels.ops.attention.checks import check_attention_inputs
from vitkernels.ops.patch_embed.checks import check_patch_embed_inputs
from vitkernels.ops.window_attention.checks import check_window_inputs

# op name -> (the public function, its input check called with the bound arguments)
_OPS: Dict[str, Tuple[Callable, Callable]] = {
    "flash_attention": (flash_attention, lambda a: check_attention_inputs(a["q"], a["k"], a["v"], a["bias"],
                                                                           a["scale"], a["dropout_p"],
                                                                           a["rel_pos"], a["rope"])),
    "window_attention": (window_attention, lambda a: check_window_inputs(
        a["qkv"], a["num_heads"], a["window_size"], a["shift_size"], a["rel_pos_bias"], a["qkv_bias"], a["scale"],
        a["cosine"], a["logit_scale"])),
    "patch_embed": (patch_embed, lambda a: check_patch_embed_inputs(a["x"], a["weight"], a["bias"], a["pos_embed"],
                                                                     a["prefix_tokens"])),
}


@dataclasses.dataclass(frozen=True)
class BackendVerdict:
    name: str
    has_kernel: bool  # the backend implements this op
    can_run: bool  # ... and accepts these inputs on this machine
    reasons: Tuple[str, ...]  # why not (empty when it can run); what it is, when it can


@dataclasses.dataclass(frozen=True)
class Explanation:
    """What ``op`` would run for these inputs: ``chosen`` (None: the call would raise, ``error`` says why),
    how (``source``: dispatch's order, the backend argument or VITKERNELS_BACKEND) and every backend's verdict."""

    op: str
    inputs: str
    order: Tuple[str, ...]
    source: str
    chosen: Optional[str]
    error: Optional[str]
    backends: Dict[str, BackendVerdict]

    def __str__(self) -> str:
        lines = [f"{self.op}: {self.inputs}"]
        outcome = self.chosen if self.chosen is not None else f"error: {self.error}"
        lines.append(f"  {self.source}  ->  {outcome}")
        for verdict in self.backends.values():
            state = "no kernel" if not verdict.has_kernel else ("runs" if verdict.can_run else "refuses")
            why = "; ".join(verdict.reasons)
            lines.append(f"  {verdict.name:<10} {state:<10} {why}".rstrip())
        return "\n".join(lines)


def explain(op: Union[str, Callable], *args, **kwargs) -> Explanation:
    """Each backend's verdict on ``op(*args, **kwargs)`` and the one that call would run, without running
    it. ``op``: ``vitkernels.flash_attention`` / ``window_attention`` / ``patch_embed`` or its name; the
    arguments are those of the op (``backend=`` included). Bad inputs raise the op's own error."""
    name = op if isinstance(op, str) else getattr(op, "__name__", repr(op))
    if name not in _OPS:
        raise ValueError(f"explain: op must be one of {', '.join(_OPS)} (the function or its name), got {op!r}")
    function, check = _OPS[name]
    bound = inspect.signature(function).bind(*args, **kwargs)
    bound.apply_defaults()
    inputs = check(bound.arguments)
    backend = bound.arguments.get("backend")
    impls = dispatch.implementations(name)
    verdicts: Dict[str, BackendVerdict] = {}
    for backend_name in dispatch.BACKEND_NAMES:
        impl = impls.get(backend_name)
        if impl is None:
            have = ", ".join(impls)
            verdicts[backend_name] = BackendVerdict(backend_name, False, False, (f"implemented for {name}: {have}",))
            continue
        reasons: List[str] = impl.not_supported_reasons(inputs)
        about = () if reasons else (dispatch.backend_environment(backend_name)[1].split(";")[0],)
        verdicts[backend_name] = BackendVerdict(backend_name, True, not reasons, tuple(reasons) or about)
    order = dispatch.priority(inputs.device)
    source = f"backend={backend!r}"
    try:
        requested = dispatch.requested_backend(backend)
        if inputs.data_free:
            source = dispatch.DATA_FREE
        elif requested is None:
            source = f"dispatch order for {inputs.device.type}: {', '.join(order)}"
        elif backend is None:
            source = f"{dispatch.ENV_VAR}={requested!r}"
        chosen, error = dispatch.select(name, inputs, backend).name, None
    except (dispatch.BackendUnavailableError, ValueError) as exc:
        chosen, error = None, str(exc)
    return Explanation(name, inputs.describe(), tuple(order), source, chosen, error, verdicts)


__all__ = ["explain", "Explanation", "BackendVerdict"]

"""Model building for ``python -m vitkernels.train``: a name from vitkernels.models, timm or torchvision,
built without pretrained weights, patched with vitkernels' fused modules (or not), and the facts the loop
needs about it (image or video input, its native image size / clip length)."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

from torch import nn

SOURCES = ("vitkernels", "timm", "torchvision")


class UsageError(ValueError):
    """A request the CLI cannot carry out; the message says why and what to do instead."""


@dataclass
class BuiltModel:
    model: nn.Module
    name: str
    source: str
    video: bool
    patched: bool
    kwargs: Dict[str, Any]
    notes: List[str] = field(default_factory=list)


def parse_model_kwargs(items: Optional[Sequence[str]]) -> Dict[str, Any]:
    """``key=value`` strings -> a dict; each value parsed as JSON (``6``, ``0.1``, ``true``, ``[2,4,4]``,
    ``"x"``), else kept as the string."""
    out: Dict[str, Any] = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--model-kwargs: expected key=value, got {item!r}")
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


def _vitkernels_names() -> List[str]:
    from vitkernels import models

    return list(models.list_models())


def _timm_has(name: str) -> bool:
    try:
        import timm
    except ImportError:
        return False
    is_model = getattr(timm, "is_model", None)
    return bool(is_model(name)) if is_model is not None else name in timm.list_models()


def _torchvision_names() -> List[str]:
    try:
        import torchvision
    except ImportError:
        return []
    return list(torchvision.models.list_models())


def _torchvision_video_names() -> List[str]:
    import torchvision

    return list(torchvision.models.list_models(module=torchvision.models.video))


def resolve_source(name: str, source: str = "auto") -> str:
    """Which library builds ``name``: vitkernels.models first, then timm, then torchvision."""
    if source != "auto":
        if source not in SOURCES:
            raise UsageError(f"--source: expected one of auto, {', '.join(SOURCES)}; got {source!r}")
        return source
    if name in _vitkernels_names():
        return "vitkernels"
    if _timm_has(name):
        return "timm"
    if name in _torchvision_names():
        return "torchvision"
    raise UsageError(f"--model: {name!r} is neither a vitkernels model (vitkernels.models.list_models()), a timm "
                     "model (timm.list_models()) nor a torchvision model (torchvision.models.list_models())")


def _first_conv(model: nn.Module) -> Optional[nn.Module]:
    for module in model.modules():
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            return module
    return None


def takes_video(model: nn.Module, name: str, source: str) -> bool:
    """True when the model takes (B, C, T, H, W): a vitkernels video model (``vitkernels.models.is_video``), a
    torchvision.models.video name, or a model whose first convolution (its stem or patch embedding) is 3-D."""
    if source == "vitkernels":
        from vitkernels import models

        if models.is_video(name):
            return True
    if source == "torchvision" and name in _torchvision_video_names():
        return True
    return isinstance(_first_conv(model), nn.Conv3d)


def native_img_size(model: nn.Module, default: int = 224) -> int:
    """The image size a model was built for: timm's ``patch_embed.img_size``, the video ViT's
    ``patch_embed.clip_size``, torchvision ViT's ``image_size``, the pretrained config's ``input_size``, else
    ``default``."""
    patch_embed = getattr(model, "patch_embed", None)
    size = getattr(patch_embed, "img_size", None) or getattr(patch_embed, "clip_size", None)
    if size is None:
        size = getattr(model, "image_size", None)
    if size is None:
        cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
        input_size = cfg.get("input_size") if isinstance(cfg, dict) else None
        size = input_size[-1] if input_size else None
    if isinstance(size, (tuple, list)):
        size = size[-1]
    return int(size) if size else default


def native_num_frames(model: nn.Module, name: str, default: int = 8) -> int:
    """The clip length a video model was built for, where it records one (``num_frames``, the video ViT's
    ``patch_embed.clip_size``), else ``default``."""
    patch_embed = getattr(model, "patch_embed", None)
    clip_size = getattr(patch_embed, "clip_size", None)
    if isinstance(clip_size, (tuple, list)) and len(clip_size) == 3:
        return int(clip_size[0])
    for owner in (model, patch_embed):
        frames = getattr(owner, "num_frames", None)
        if isinstance(frames, int) and frames > 0:
            return frames
    if name.startswith("mvit_"):            # torchvision MViT's fixed temporal_size
        return 16
    return default


def _torchvision_size_kwargs(name: str, img_size: Optional[int], num_frames: Optional[int]) -> Dict[str, Any]:
    """torchvision spells the input size per family: ViT ``image_size``, MViT ``spatial_size`` and
    ``temporal_size``; the CNNs and Swin take any size and no argument."""
    kw: Dict[str, Any] = {}
    if name.startswith("vit_") and img_size is not None:
        kw["image_size"] = img_size
    if name.startswith("mvit_") and (img_size not in (None, 224) or num_frames not in (None, 16)):
        # torchvision's mvit_* builders pass spatial_size=(224, 224) and temporal_size=16 themselves
        raise UsageError(f"--model {name}: torchvision's builder fixes the clip size to 16 frames of 224x224 "
                         f"(got --img-size {img_size}, --num-frames {num_frames}); build "
                         "torchvision.models.video.MViT yourself for another size, or use swin3d_* / video_vit_*")
    return kw


def _module_types(model: nn.Module) -> List[type]:
    return [type(m) for m in model.modules()]


def _patch(model: nn.Module, library: str, notes: List[str]) -> bool:
    """``vitkernels.patch_<library>(model)``; whether it switched any module (a model it has no drop-in for
    trains with the library's own modules, and a note says so)."""
    import vitkernels

    try:
        patch = getattr(vitkernels, f"patch_{library}")
    except AttributeError:
        notes.append(f"vitkernels.patch_{library} is not in this vitkernels version: the {library} model trains "
                     "with its own modules")
        return False
    before = _module_types(model)
    patch(model)
    if _module_types(model) == before:
        notes.append(f"vitkernels.patch_{library} has no fused module for this model's layers: it trains with "
                     f"{library}'s own modules")
        return False
    return True


def unpatch(model: nn.Module) -> None:
    """Back to the original timm / torchvision modules (whatever vitkernels patched in)."""
    import vitkernels

    for name in ("unpatch_timm", "unpatch_torchvision"):
        try:
            undo = getattr(vitkernels, name)
        except AttributeError:      # not in this version: nothing of that kind can have been patched
            continue
        try:
            undo(model)
        except ImportError:         # its library is not installed: nothing of it is in the model
            pass


def build_model(name: str, source: str = "auto", *, num_classes: int, img_size: Optional[int] = None,
                num_frames: Optional[int] = None, model_kwargs: Optional[Dict[str, Any]] = None,
                patch: bool = True) -> BuiltModel:
    """Build ``name`` with ``num_classes`` outputs (and ``img_size`` / ``num_frames`` when given), patched with
    vitkernels' fused modules unless ``patch`` is False."""
    source = resolve_source(name, source)
    kwargs: Dict[str, Any] = {"num_classes": num_classes}
    notes: List[str] = []
    if source in ("vitkernels", "timm"):
        if img_size is not None:
            kwargs["img_size"] = img_size
        if num_frames is not None:
            kwargs["num_frames"] = num_frames
    else:
        kwargs.update(_torchvision_size_kwargs(name, img_size, num_frames))
    kwargs.update(model_kwargs or {})
    try:
        if source == "vitkernels":
            from vitkernels import models

            model = models.create_model(name, **kwargs)
            patched = True
            if not patch:
                unpatch(model)
                patched = False
        elif source == "timm":
            import timm

            if not _timm_has(name):
                raise UsageError(f"--model: timm has no model {name!r} (timm.list_models())")
            try:
                model = timm.create_model(name, pretrained=False, **kwargs)
            except TypeError as exc:
                # img_size / num_frames reach the model's constructor; a CNN takes any size and no such argument
                sized = [k for k in ("img_size", "num_frames") if k in kwargs and k in str(exc)
                         and k not in (model_kwargs or {})]
                if not sized:
                    raise
                for k in sized:
                    kwargs.pop(k)
                notes.append(f"{name} takes no {' / '.join(sized)} argument (it runs at any size): built without it")
                model = timm.create_model(name, pretrained=False, **kwargs)
            patched = _patch(model, "timm", notes) if patch else False
        else:
            import torchvision

            if name not in torchvision.models.list_models():
                raise UsageError(f"--model: torchvision has no model {name!r} (torchvision.models.list_models())")
            model = torchvision.models.get_model(name, weights=None, **kwargs)
            patched = _patch(model, "torchvision", notes) if patch else False
    except UsageError:
        raise
    except (TypeError, ValueError, AssertionError) as exc:  # a keyword not taken, a size it cannot build
        raise UsageError(f"--model {name} ({source}): building it with {kwargs} failed: {exc}") from exc
    except ImportError as exc:
        raise ImportError(f"--model {name} needs {source}: {exc}; install the training extras: "
                          "pip install vitkernels[train]") from exc
    video = takes_video(model, name, source)
    return BuiltModel(model, name, source, video, patched, kwargs, notes)


def _patch_gives_checkpointing(built: BuiltModel) -> bool:
    """Whether vitkernels' patching would give this unpatched model ``set_grad_checkpointing`` (tried on the
    model itself: it is only asked on the way to an error)."""
    import vitkernels

    try:
        patch = vitkernels.patch_timm if built.source == "timm" else vitkernels.patch_torchvision
        patch(built.model)
    except (AttributeError, ImportError, TypeError):
        return False
    return callable(getattr(built.model, "set_grad_checkpointing", None))


def enable_grad_checkpointing(built: BuiltModel) -> None:
    """``model.set_grad_checkpointing(True)``, or a UsageError that names the model and the way to get it."""
    setter = getattr(built.model, "set_grad_checkpointing", None)
    if setter is None:
        import vitkernels

        if not built.patched and _patch_gives_checkpointing(built):
            how = "vitkernels' patched version of it has one: drop --no-patch"
        elif built.source in ("torchvision", "vitkernels") and not hasattr(vitkernels, "patch_torchvision"):
            how = ("torchvision models get one from vitkernels.patch_torchvision, which this vitkernels version "
                   "does not have")
        elif built.source == "torchvision":
            how = ("vitkernels.patch_torchvision adds one to the torchvision models it fuses, and this is not one "
                   "of them; train one of those, a timm model or a vitkernels.models one, or drop "
                   "--grad-checkpointing")
        else:
            how = "train a model that has one (most timm models, vitkernels.models), or drop --grad-checkpointing"
        raise UsageError(f"--grad-checkpointing: {built.source} model {built.name!r} "
                         f"({type(built.model).__name__}) has no set_grad_checkpointing(); {how}")
    try:
        setter(True)
    except (AssertionError, NotImplementedError, RuntimeError) as exc:
        raise UsageError(f"--grad-checkpointing: {built.source} model {built.name!r} does not support it: "
                         f"{exc or type(exc).__name__}") from exc

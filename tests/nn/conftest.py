"""Fixtures shared by the drop-in tests."""
import pytest


@pytest.fixture
def op_calls(monkeypatch):
    """Counts the calls the drop-ins (timm, torchvision, MultiheadAttention) and the video ViT make to each
    fused op (tells the fused path from the original code)."""
    modules = [pytest.importorskip(name) for name in (
        "vitkernels.nn.timm_layers", "vitkernels.nn.torchvision_layers", "vitkernels.nn.multihead_attention",
        "vitkernels.models.video_vit")]
    calls = {"flash_attention": 0, "window_attention": 0, "patch_embed": 0}
    for module in modules:
        for name in calls:
            real = getattr(module, name, None)
            if real is None:
                continue

            def spy(*args, _real=real, _name=name, **kwargs):
                calls[_name] += 1
                return _real(*args, **kwargs)
            monkeypatch.setattr(module, name, spy)
    return calls

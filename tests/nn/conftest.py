"""Fixtures shared by the drop-in tests."""
import pytest


@pytest.fixture
def op_calls(monkeypatch):
    """Counts the calls the timm drop-ins make to each fused op (tells the fused path from timm's code)."""
    timm_layers = pytest.importorskip("vitkernels.nn.timm_layers")
    calls = {"flash_attention": 0, "window_attention": 0, "patch_embed": 0}
    for name in calls:
        real = getattr(timm_layers, name)

        def spy(*args, _real=real, _name=name, **kwargs):
            calls[_name] += 1
            return _real(*args, **kwargs)
        monkeypatch.setattr(timm_layers, name, spy)
    return calls

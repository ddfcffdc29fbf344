"""The models of the DDP / FSDP test, built the same way in the test process (one process, the whole
batch) and in every torchrun rank (a slice of the batch)."""
import torch
import torch.nn.functional as F

import vitkernels
from vitkernels import models

GLOBAL_BATCH = 4


def _timm_vit():
    import timm

    return vitkernels.patch_timm(timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2,
                                                   num_classes=5)), (3, 32, 32)


def _torchvision_swin():
    import torchvision

    return vitkernels.patch_torchvision(torchvision.models.SwinTransformer(
        patch_size=[4, 4], embed_dim=32, depths=[2, 2], num_heads=[2, 4], window_size=[7, 7],
        stochastic_depth_prob=0.0, num_classes=5)), (3, 56, 56)


def _video_vit():
    return models.create_model("video_vit_tiny_patch16_tubelet2_224", img_size=32, num_frames=4, patch_size=8,
                               depth=2, num_classes=5), (3, 4, 32, 32)


# name -> builder, and the submodules FSDP shards one by one (the transformer blocks)
MODELS = {
    "timm_vit": dict(build=_timm_vit, blocks=lambda m: list(m.blocks)),
    "torchvision_swin": dict(build=_torchvision_swin,
                             blocks=lambda m: [b for stage in m.features[1::2] for b in stage]),
    "video_vit": dict(build=_video_vit, blocks=lambda m: list(m.blocks)),
}


def build(name):
    """The model (train mode, no dropout), a global batch and its labels, all from fixed seeds."""
    torch.manual_seed(0)
    model, shape = MODELS[name]["build"]()
    model.train()
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(GLOBAL_BATCH, *shape, generator=generator)
    y = torch.randint(0, 5, (GLOBAL_BATCH,), generator=generator)
    return model, x, y


def loss_fn(logits, labels):
    return F.cross_entropy(logits, labels)

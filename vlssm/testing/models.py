"""Helpers of the model tests (tests/models): small models with random weights, random batches, and
the names of a model's trainable parameters."""
from __future__ import annotations

import torch


def create(name: str, classnames, backbone: str, image_size: int, seed: int = 0, **cfg):
    """``vlssm.models.create_model`` with random weights; open_clip's zero-initialised ResNet bn3
    weights (each residual branch starts as zero, hiding its gradients and making different images
    look alike) drawn around 1 instead."""
    from vlssm import models

    torch.manual_seed(seed)
    model = models.create_model(name, classnames, backbone=backbone, image_size=image_size, **cfg)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("bn3.weight"):
                p.normal_(1.0, 0.1)
    return model


def batch(B: int, C: int, S: int, seed: int = 1, dtype=torch.float32):
    """(images (B, 3, S, S), multi-hot targets (B, C)) with at least one positive and one negative."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(B, 3, S, S, generator=g, dtype=dtype)
    targets = (torch.rand(B, C, generator=g) < 0.4).to(dtype)
    targets[0, 0], targets[0, 1] = 1, 0
    return images, targets


def trainable(model) -> set:
    """Names of the parameters with requires_grad."""
    return {n for n, p in model.named_parameters() if p.requires_grad}

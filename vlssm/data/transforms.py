"""Image transforms as CLIP expects them: resize to ``image_size``, CLIP's mean / std.

Evaluation:

- multi-label: ``Resize((S, S))`` bicubic, no crop (an object at the image's edge still
  counts as present, so nothing is cut away; the aspect ratio is not kept);
- single-label: CLIP's own preprocessing, ``Resize(S)`` bicubic (shorter side) +
  ``CenterCrop(S)``.

Training (``augment``):

- ``"default"``: ``RandomResizedCrop(S, scale=(0.5, 1))`` bicubic + ``RandomHorizontalFlip`` +
  torchvision's ``RandAugment(num_ops=2, magnitude=9)``. The multi-label recipes these
  papers follow (ASL / Query2Label) train with RandAugment plus cutout; we take
  torchvision's RandAugment with its standard setting (2 ops at magnitude 9) and no
  cutout. The crop keeps at least half the image area, so most objects (labels) survive it.
- ``"flip"``: the evaluation resize + ``RandomHorizontalFlip``;
- ``"none"``: the evaluation transform.

Every transform ends with ``ToTensor`` and ``Normalize(CLIP_MEAN, CLIP_STD)``: the output
is a float32 tensor (3, S, S).
"""
from __future__ import annotations

from typing import Callable

__all__ = ["CLIP_MEAN", "CLIP_STD", "AUGMENTS", "build_transform"]

#: OpenAI CLIP's per-channel normalisation (RGB, of images scaled to [0, 1])
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

AUGMENTS = ("default", "flip", "none")


class ToRGB:
    """PIL image -> RGB PIL image (a picklable callable, for DataLoader workers)."""

    def __call__(self, image):
        return image if image.mode == "RGB" else image.convert("RGB")

    def __repr__(self) -> str:
        return "ToRGB()"


def build_transform(image_size: int, train: bool, augment: str = "default", multi_label: bool = True) -> Callable:
    """PIL image -> float32 tensor (3, S, S), normalised by CLIP's mean / std.

    Args:
        image_size: S, a positive int.
        train: the training transform (with ``augment``) or the evaluation one.
        augment: ``"default"`` | ``"flip"`` | ``"none"`` (see the module doc); read when ``train``.
        multi_label: evaluation resize without crop (True) or CLIP's resize + center crop (False).

    Raises:
        TypeError / ValueError naming the argument.
    """
    from torchvision import transforms as T

    if isinstance(image_size, bool) or not isinstance(image_size, int):
        raise TypeError(f"image_size must be an int, got {type(image_size).__name__}")
    if image_size <= 0:
        raise ValueError(f"image_size must be positive, got {image_size}")
    for name, v in (("train", train), ("multi_label", multi_label)):
        if not isinstance(v, bool):
            raise TypeError(f"{name} must be a bool, got {type(v).__name__}")
    if augment not in AUGMENTS:
        raise ValueError(f"augment must be one of {AUGMENTS}, got {augment!r}")

    bicubic = T.InterpolationMode.BICUBIC
    S = image_size
    if multi_label:
        resize = [T.Resize((S, S), interpolation=bicubic)]
    else:
        resize = [T.Resize(S, interpolation=bicubic), T.CenterCrop(S)]
    if not train or augment == "none":
        geometry = resize
    elif augment == "flip":
        geometry = resize + [T.RandomHorizontalFlip()]
    else:
        geometry = [T.RandomResizedCrop(S, scale=(0.5, 1.0), interpolation=bicubic), T.RandomHorizontalFlip(),
                    T.RandAugment(num_ops=2, magnitude=9)]
    return T.Compose([ToRGB(), *geometry, T.ToTensor(), T.Normalize(CLIP_MEAN, CLIP_STD)])

"""Shared fixtures of the vlssm.data tests: real image files written into tmp_path.

Images are crops of scikit-learn's bundled photo ``china.jpg`` (a real JPEG, no download),
saved with PIL as JPEG or PNG; each call gets a different crop.
"""
from __future__ import annotations

import itertools
import os

import numpy as np
import pytest


@pytest.fixture(scope="session")
def photo() -> np.ndarray:
    from sklearn.datasets import load_sample_image

    return load_sample_image("china.jpg")  # (427, 640, 3) uint8


@pytest.fixture
def write_image(photo):
    """``write_image(path, size=(w, h))``: save a crop of the photo at ``path`` (format from the suffix)."""
    from PIL import Image

    counter = itertools.count()

    def write(path, size=(40, 30)):
        k = next(counter)
        w, h = size
        y, x = (17 * k) % (photo.shape[0] - h), (29 * k) % (photo.shape[1] - w)
        os.makedirs(os.path.dirname(str(path)), exist_ok=True)
        Image.fromarray(photo[y:y + h, x:x + w]).save(str(path))
        return str(path)

    return write


@pytest.fixture
def write_garbage():
    """``write_garbage(path)``: a file with an image suffix holding bytes no decoder reads."""
    def write(path):
        os.makedirs(os.path.dirname(str(path)), exist_ok=True)
        with open(path, "wb") as f:
            f.write(b"this is not an image\x00\x01\x02" * 8)
        return str(path)

    return write

"""GPU tests: every op on CUDA tensors, every GPU backend ("cuda", "triton"), every dtype.

The whole folder skips without a CUDA device (CI has none; ``bench/gpu.sh``
runs it on a lent GPU). The input generators and assertions are the op tests'
(:mod:`vlssm.testing`).
"""
from __future__ import annotations

import os

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA device (GPU tests run through bench/gpu.sh on a GPU machine)")
    here = os.path.dirname(os.path.abspath(__file__))
    for item in items:
        if str(item.fspath).startswith(here):
            item.add_marker(skip)

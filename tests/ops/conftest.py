"""Fixtures of the op tests. Their helpers (tolerances, input generators, literal ops) are
:mod:`vlssm.testing`, imported as ``T``."""
from __future__ import annotations

import pytest

from vlssm import testing as T


@pytest.fixture(params=["cpu", "triton"])
def kernel_backend(request) -> str:
    """Each compiled kernel backend in turn: "cpu" (vlssm._C) and "triton" (vlssm.kernels,
    interpreted on CPU tensors); skips the one that is missing."""
    return T.require_backend(request.param)


@pytest.fixture(params=["reference", "cpu", "triton"])
def backend(request) -> str:
    """Every backend of the public ops in turn: the reference (checks the tests themselves), then the
    kernel backends; skips the one that is missing."""
    return T.require_backend(request.param)


@pytest.fixture
def clean_env(monkeypatch):
    """No VLSSM_BACKEND from the caller's environment."""
    monkeypatch.delenv("VLSSM_BACKEND", raising=False)
    return monkeypatch

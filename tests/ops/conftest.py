"""Fixtures of the op tests. Helpers live in _ops_testlib.py next to this file:
tests run with ``--import-mode=importlib``, so this conftest puts tests/ops on
``sys.path`` and the test files ``import _ops_testlib as T``."""
from __future__ import annotations

import os
import sys

import pytest
import torch

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

import _ops_testlib as T  # noqa: E402


@pytest.fixture
def seed(request) -> int:
    """A different, reproducible seed for every test case (from its node id)."""
    return T.seed_of(request.node.nodeid)


@pytest.fixture
def cpu_backend() -> str:
    """The compiled CPU backend; skips when vlssm._C is missing."""
    if not T.HAS_EXT:
        pytest.skip(T.EXT_SKIP_REASON)
    return "cpu"


@pytest.fixture(params=["cpu", "triton"])
def kernel_backend(request) -> str:
    """Each compiled kernel backend in turn: "cpu" (vlssm._C) and "triton" (vlssm.kernels,
    interpreted on CPU tensors); skips the one that is missing."""
    if request.param == "cpu" and not T.HAS_EXT:
        pytest.skip(T.EXT_SKIP_REASON)
    if request.param == "triton" and T.triton_reason() is not None:
        pytest.skip(T.triton_reason())
    return request.param


@pytest.fixture
def restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture
def deterministic_algorithms():
    """torch.use_deterministic_algorithms(True) for the test: an op that alerts (a nondeterministic
    kernel somewhere in its forward or backward) raises."""
    with T.deterministic_algorithms():
        yield


@pytest.fixture
def clean_env(monkeypatch):
    """No VLSSM_BACKEND from the caller's environment."""
    monkeypatch.delenv("VLSSM_BACKEND", raising=False)
    return monkeypatch

"""Fixtures of the module tests: the backends of the code under test.

Shared test code: literal_*, randomize_, forward_and_grads, ... in :mod:`vlssm.testing.modules`,
the generic parts (gen, randn, rel_err, RTOL, ...) in :mod:`vlssm.testing`.
"""
from __future__ import annotations

import pytest

from vlssm import testing as T

#: Backends of the code under test; "cpu" is skipped when the extension is missing.
BACKENDS = [
    "reference",
    pytest.param("cpu", marks=pytest.mark.skipif(not T.HAS_EXT, reason=T.EXT_SKIP_REASON)),
]


@pytest.fixture(params=BACKENDS)
def backend(request) -> str:
    """Each backend of the code under test ("reference", and "cpu" when compiled)."""
    return request.param


@pytest.fixture
def cpu_backend() -> str:
    """The compiled CPU backend; skips when the extension is missing."""
    if not T.HAS_EXT:
        pytest.skip(T.EXT_SKIP_REASON)
    return "cpu"

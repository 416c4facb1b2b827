"""Fixtures of the module tests: the backends of the code under test.

Shared test code: literal_*, randomize_, forward_and_grads, ... in :mod:`vlssm.testing.modules`,
the generic parts (gen, randn, rel_err, RTOL, ...) in :mod:`vlssm.testing`.
"""
from __future__ import annotations

import pytest

from vlssm import testing as T


@pytest.fixture(params=["reference", "cpu"])
def backend(request) -> str:
    """Each backend of the code under test ("reference", and "cpu" when compiled: skipped when the
    extension is missing). A test may name others with
    ``pytest.mark.parametrize("backend", [...], indirect=True)``."""
    return T.require_backend(request.param)

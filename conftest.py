"""Choose which vlssm the test suite imports: the installed package or this checkout.

pytest runs with ``--import-mode=importlib`` (pyproject.toml), which adds no test
folder to ``sys.path``; but ``python -m pytest`` puts the current directory first
on ``sys.path``, and from the repository root ``import vlssm`` would then find the
``vlssm/`` source folder, which in a fresh clone has no compiled ``vlssm._C``
and never has ``vlssm.kernels`` (``kernels/`` becomes ``vlssm.kernels`` only
when installed). The Quickstart (``pip install --no-build-isolation ".[test]"``
then ``pytest``) must test what it installed.

Rules, applied before any test imports vlssm:

1. vlssm installed from this checkout (``pip install .``, what the README and
   .ci/run do) or in editable mode: test the installed package.
2. vlssm not installed: test the source tree (built in place with
   ``python setup.py build_ext --inplace``), also under plain ``pytest``.
3. vlssm installed from another checkout, or from this one but the sources
   changed since (a stale install): test the source tree when it has its own
   compiled ``vlssm/_C*.so``, else the installed package.

The report header says which vlssm is under test, and why.
"""
import glob
import importlib.util
import json
import os
import sys
from urllib.parse import unquote, urlparse

_ROOT = os.path.realpath(os.path.dirname(os.path.abspath(__file__)))
_SRC = os.path.join(_ROOT, "vlssm")


def _is_root(entry: str) -> bool:
    try:
        return os.path.realpath(os.path.abspath(entry or os.curdir)) == _ROOT
    except (OSError, ValueError):
        return False


def _installed_from() -> str:
    """The local folder pip installed vlssm from (direct_url.json), or ''."""
    try:
        from importlib import metadata

        text = metadata.distribution("vlssm").read_text("direct_url.json")
        url = json.loads(text or "{}").get("url", "")
    except Exception:
        return ""
    return os.path.realpath(unquote(urlparse(url).path)) if url.startswith("file:") else ""


def _stale_files(installed_dir: str) -> list:
    """Source .py files of this checkout newer than (or missing from) the installed copy."""
    stale = []
    for src in glob.glob(os.path.join(_SRC, "**", "*.py"), recursive=True):
        dst = os.path.join(installed_dir, os.path.relpath(src, _SRC))
        try:
            if not os.path.exists(dst) or os.path.getmtime(src) > os.path.getmtime(dst):
                stale.append(os.path.relpath(src, _ROOT))
        except OSError:
            continue
    return stale


def _use_source_tree(why: str) -> str:
    if not any(_is_root(p) for p in sys.path):
        sys.path.insert(0, _ROOT)
    importlib.invalidate_caches()
    return f"source tree: {why}"


def _choose() -> str:
    if "vlssm" in sys.modules:  # imported before this conftest (by a plugin?): nothing left to choose
        return "imported before conftest.py"
    for i in reversed([i for i, p in enumerate(sys.path) if _is_root(p)]):
        del sys.path[i]
    importlib.invalidate_caches()
    spec = importlib.util.find_spec("vlssm")
    if spec is None or not spec.origin:
        return _use_source_tree("vlssm is not installed")
    installed_dir = os.path.realpath(os.path.dirname(spec.origin))
    if installed_dir == _SRC:
        return "installed (editable)"
    has_c = bool(glob.glob(os.path.join(_SRC, "_C*.so")) or glob.glob(os.path.join(_SRC, "_C*.pyd")))
    source = _installed_from()
    if source != _ROOT:
        if has_c:
            return _use_source_tree(f"the installed vlssm comes from {source or 'elsewhere'}, not this checkout")
        return f"installed (from {source or 'elsewhere'}; this checkout has no built vlssm._C)"
    stale = _stale_files(installed_dir)
    if stale:
        if has_c:
            return _use_source_tree(f"{len(stale)} file(s) changed since `pip install .`, e.g. {stale[0]}")
        return (f"installed, STALE: {len(stale)} file(s) changed since `pip install .` (e.g. {stale[0]}); "
                f"reinstall with `pip install --no-build-isolation .`")
    return "installed (from this checkout)"


_CHOICE = _choose()


def pytest_report_header(config):
    try:
        import vlssm
        from vlssm import _backend
    except Exception as e:  # the tests report the details
        return [f"vlssm: import failed ({_CHOICE}): {type(e).__name__}: {e}"]
    where = os.path.dirname(os.path.abspath(vlssm.__file__))
    ext = _backend.load_extension()
    ext_s = (f"loaded ({os.path.basename(ext.__file__)})" if ext is not None
             else f"NOT loaded: {_backend.extension_error()}")
    return [f"vlssm {getattr(vlssm, '__version__', '?')} from {where} [{_CHOICE}]; vlssm._C {ext_s}"]


# Triton kernels run on CPU tensors under the interpreter when no GPU exists;
# the variable must be set before any @triton.jit function is defined.
def _triton_interpret_without_gpu() -> None:
    if "TRITON_INTERPRET" in os.environ:
        return
    try:
        import torch
    except ImportError:
        return
    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"


_triton_interpret_without_gpu()

"""Every package of the source tree is installed (setup.py lists packages by name)."""
import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_every_source_package_is_importable_from_the_install():
    names = sorted("vlssm." + ".".join(p.parent.relative_to(REPO / "vlssm").parts)
                   for p in (REPO / "vlssm").rglob("__init__.py") if p.parent != REPO / "vlssm")
    assert "vlssm.bench" in names and "vlssm.data" in names
    missing = [n for n in names if importlib.util.find_spec(n) is None]
    assert not missing, f"packages missing from the installed vlssm (setup.py packages=): {missing}"

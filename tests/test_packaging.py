"""What ``pip install`` puts in site-packages: one top-level package, ``attndsl``, holding the
code generator and the patterns (``attndsl.codegen``, ``attndsl.patterns``), ``py.typed``, the
CLI entry point and the LICENSE; nothing of the repository's ``benchmarks/`` or ``tests/``."""
from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    if importlib.util.find_spec("setuptools") is None:
        pytest.skip("setuptools is not installed (the wheel is built without build isolation: no network)")
    src = tmp_path_factory.mktemp("src")
    # a copy: pip builds in the source tree (build/, *.egg-info), which must not touch the checkout
    for name in ("pyproject.toml", "setup.py", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, src / name)
    for name in ("attndsl", "codegen", "patterns"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path_factory.mktemp("wheel")
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                        str(out), str(src)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    (whl,) = out.glob("attndsl-*.whl")
    return whl


def test_wheel_holds_one_top_level_package(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    dist_info = [t for t in tops if t.endswith(".dist-info")]
    assert len(dist_info) == 1 and tops - set(dist_info) == {"attndsl"}
    for mod in ("codegen", "patterns"):
        repo = sorted(p.name for p in (ROOT / mod).glob("*.py"))
        packed = sorted(n.rsplit("/", 1)[1] for n in names if n.startswith(f"attndsl/{mod}/") and n.count("/") == 2)
        assert packed == repo, mod
    assert "attndsl/py.typed" in names and "attndsl/__main__.py" in names and "attndsl/bench.py" in names
    assert not any(n.startswith(("attndsl/benchmarks", "attndsl/tests")) for n in names)
    info = dist_info[0]
    assert any(n.startswith(f"{info}/") and n.endswith("/LICENSE") or n == f"{info}/LICENSE" for n in names)
    meta = zipfile.ZipFile(wheel).read(f"{info}/METADATA").decode()
    assert "License-Expression: BSD-3-Clause" in meta and "Classifier: Typing :: Typed" in meta
    entry = zipfile.ZipFile(wheel).read(f"{info}/entry_points.txt").decode()
    assert "attndsl = attndsl.cli:main" in entry

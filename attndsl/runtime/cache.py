"""On-disk source cache and in-memory kernel cache.

Triton needs kernels to live in real source files, and users want to read what was generated:
each KernelSpec renders to one module under :func:`cache_dir`, named by the spec's structural
hash. Writes are atomic (temp file + rename); each file carries a checksum of its body, and an
entry that fails the check or does not import is rebuilt.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
import tempfile
import threading
from pathlib import Path

from attndsl import codegen

_LOCK = threading.Lock()
_MODULES: dict = {}
#: Counts renders and imports, so tests can check "compiled once per configuration".
STATS = {"render": 0, "import": 0, "rebuilt": 0}
_MARK = "# attndsl-checksum: "


def cache_dir() -> Path:
    d = os.environ.get("ATTNDSL_CACHE_DIR")
    p = Path(d) if d else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "attndsl"
    p.mkdir(parents=True, exist_ok=True)
    return p


def _checksum(body: str) -> str:
    return hashlib.sha256(body.encode()).hexdigest()[:32]


_FINGERPRINT: list = []


def codegen_fingerprint() -> str:
    """Hash of the code generator's own source: editing codegen/ can never reuse stale kernels."""
    if not _FINGERPRINT:
        h = hashlib.sha256()
        for f in sorted(Path(codegen.__file__).parent.glob("*.py")):
            h.update(f.name.encode() + f.read_bytes())
        _FINGERPRINT.append(h.hexdigest()[:12])
    return _FINGERPRINT[0]


def source_path(spec) -> Path:
    return cache_dir() / f"{spec.name}_{spec.key}_v{codegen.CODEGEN_VERSION}_{codegen_fingerprint()}.py"


def _valid(path: Path) -> bool:
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError):
        return False
    first, _, body = text.partition("\n")
    return first.startswith(_MARK) and first[len(_MARK):] == _checksum(body)


def _write(path: Path, body: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(_MARK + _checksum(body) + "\n" + body)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _import(path: Path, interpret: bool, tag: str):
    name = f"attndsl_generated.{path.stem}_{tag}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    old = os.environ.get("TRITON_INTERPRET")
    # triton.jit decides between compiled and interpreted kernels when the module is executed
    os.environ["TRITON_INTERPRET"] = "1" if interpret else "0"
    try:
        spec.loader.exec_module(module)
    finally:
        if old is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = old
    sys.modules[name] = module
    STATS["import"] += 1
    return module


def load(spec, interpret: bool, render=None):
    """The generated module for ``spec`` (interpreted or compiled kernels).

    ``render`` (default ``codegen.render``) turns the spec into source; other kernel families
    (the index-selector kernels) pass their own and a spec name of their own."""
    render = render or codegen.render
    key = (spec.key, spec.name, interpret)
    m = _MODULES.get(key)
    if m is not None:
        return m
    with _LOCK:
        m = _MODULES.get(key)
        if m is not None:
            return m
        path = source_path(spec)
        tag = "interp" if interpret else "gpu"
        if not _valid(path):
            if path.exists():
                STATS["rebuilt"] += 1
            STATS["render"] += 1
            _write(path, render(spec))
        try:
            m = _import(path, interpret, tag)
        except Exception:
            # a stale or damaged entry: rebuild from the spec once, then give up loudly
            STATS["rebuilt"] += 1
            STATS["render"] += 1
            _write(path, render(spec))
            m = _import(path, interpret, tag)
        _MODULES[key] = m
        return m

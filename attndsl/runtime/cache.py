"""On-disk source cache and in-memory kernel cache.

Triton needs kernels to live in real source files, and users want to read what was generated:
each KernelSpec renders to one module under :func:`cache_dir`, named by the spec's structural
hash. A cached file is trusted for nothing: the runtime renders the spec's source anyway (well
under a millisecond), imports *that* text, and uses the file only if it holds exactly the same
text; an edited, damaged or foreign file is rewritten (with a warning on the ``attndsl.cache``
logger), never executed. Writes are atomic (temp file + rename).

The directory (``$ATTNDSL_CACHE_DIR``, else ``$XDG_CACHE_HOME/attndsl``, else
``~/.cache/attndsl``) is created with mode 0700. One owned by another user or writable by group
or others is refused, and so is one that cannot be written (read-only file system, a path that is
a file); the process then uses a private temporary directory, with one warning naming
``ATTNDSL_CACHE_DIR``.
"""
from __future__ import annotations

import atexit
import hashlib
import linecache
import logging
import os
import shutil
import stat
import sys
import tempfile
import threading
import time
import types
import warnings
from pathlib import Path

from attndsl import codegen

#: ``attndsl.cache``: hits (DEBUG), misses (INFO), rejected files and directories (WARNING);
#: ``attndsl.compile``: each pattern's kernels generated and loaded on first use (INFO). The package
#: logger has a NullHandler: nothing shows unless the application configures logging.
log = logging.getLogger("attndsl.cache")
compile_log = logging.getLogger("attndsl.compile")

_LOCK = threading.Lock()
_MODULES: dict = {}
#: Counts renders, files written, imports and rejected files, so tests can check "compiled once
#: per configuration": ``render`` (source rendered from a spec), ``write`` (a file written: it was
#: missing or ``rebuilt``), ``import`` (a module executed), ``rebuilt`` (a file on disk that
#: differed from the rendered source and was replaced).
STATS = {"render": 0, "write": 0, "import": 0, "rebuilt": 0}
#: configured path -> the directory used for it (itself, or the private fallback)
_DIRS: dict = {}
_FALLBACK: list = []


class CacheDirError(OSError):
    """The configured cache directory cannot be used safely (see :func:`check_dir`)."""


def configured_dir() -> Path:
    """The cache directory the environment asks for (it may not exist or be usable)."""
    d = os.environ.get("ATTNDSL_CACHE_DIR")
    if d:
        return Path(d)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "attndsl"


def check_dir(p: Path) -> None:
    """Create ``p`` (mode 0700) if missing, then raise :class:`CacheDirError` unless it is a
    directory owned by this user, not writable by group or others, and writable by us."""
    if p.exists() and not p.is_dir():
        raise CacheDirError(f"the kernel cache path {str(p)!r} is not a directory")
    try:
        p.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = os.stat(p)
    except OSError as e:  # a path through a file, a read-only file system or home, no permission
        raise CacheDirError(f"cannot create the kernel cache directory {str(p)!r}: {e.strerror or e}") from e
    if not stat.S_ISDIR(st.st_mode):
        raise CacheDirError(f"the kernel cache path {str(p)!r} is not a directory")
    uid = os.getuid()
    if st.st_uid != uid:
        raise CacheDirError(f"the kernel cache directory {str(p)!r} is owned by uid {st.st_uid}, not by this "
                            f"user (uid {uid}): another user could plant code in it")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise CacheDirError(f"the kernel cache directory {str(p)!r} is writable by group or others (mode "
                            f"{stat.S_IMODE(st.st_mode):o}): another user could plant code in it; "
                            f"chmod 700 it")
    if not os.access(p, os.W_OK | os.X_OK):
        raise CacheDirError(f"the kernel cache directory {str(p)!r} is not writable (read-only file system?)")


def _fallback_dir() -> Path:
    """One private temporary directory for the process (mkdtemp: mode 0700), removed at exit."""
    if not _FALLBACK:
        d = Path(tempfile.mkdtemp(prefix="attndsl-cache-"))
        atexit.register(shutil.rmtree, d, ignore_errors=True)
        _FALLBACK.append(d)
    return _FALLBACK[0]


def cache_dir() -> Path:
    """The directory generated kernels are written to: the configured one when it is safe and
    usable (checked once per process and path), otherwise a private temporary directory, with
    one warning that says why and names ``ATTNDSL_CACHE_DIR``."""
    p = configured_dir()
    got = _DIRS.get(p)
    if got is not None and got.is_dir():
        return got
    with _LOCK:
        got = _DIRS.get(p)
        if got is None or not got.is_dir():  # first use, or removed since (checked again)
            try:
                check_dir(p)
                got = p
            except CacheDirError as e:
                got = _fallback_dir()
                msg = (f"attndsl: {e}; generated kernels go to the private temporary directory {str(got)!r} for "
                       "this process (set ATTNDSL_CACHE_DIR to a private writable directory to keep them)")
                log.warning(msg)
                warnings.warn(msg, RuntimeWarning, stacklevel=3)
            _DIRS[p] = got
    return got


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


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError):
        return None


def _write(path: Path, body: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(body)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    STATS["write"] += 1


def _import(path: Path, source: str, interpret: bool, tag: str):
    """Execute ``source`` (the text this process rendered, never the file's) as a module whose
    functions report ``path`` as their file. ``linecache`` is primed with the same text, so
    ``inspect.getsource`` (which Triton's JIT parses) sees it even if the file changes later."""
    name = f"attndsl_generated.{path.stem}_{tag}"
    filename = str(path)
    code = compile(source, filename, "exec")
    # mtime None: linecache.checkcache never reloads this entry from disk
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    module = types.ModuleType(name)
    module.__file__ = filename
    old = os.environ.get("TRITON_INTERPRET")
    # triton.jit decides between compiled and interpreted kernels when the module is executed
    os.environ["TRITON_INTERPRET"] = "1" if interpret else "0"
    sys.modules[name] = module
    try:
        exec(code, module.__dict__)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    finally:
        if old is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = old
    STATS["import"] += 1
    return module


def load(spec, interpret: bool, render=None, float64: bool = False):
    """The generated module for ``spec`` (interpreted or compiled kernels).

    ``render`` (default ``codegen.render``) turns the spec into source; other kernel families
    (the index-selector kernels) pass their own and a spec name of their own. The module runs the
    rendered text; the file on disk is (re)written when it is missing or differs from it.
    ``float64``: a copy of the interpreted module whose kernels compute and accumulate in float64
    (its ``ACC_DTYPE``), for float64 inputs on the CPU."""
    render = render or codegen.render
    if float64 and not interpret:
        raise ValueError("float64 kernels run only through Triton's interpreter (CPU tensors)")
    key = (spec.key, spec.name, interpret, float64)
    m = _MODULES.get(key)
    if m is not None:
        return m
    start = time.perf_counter()
    source = render(spec)  # pure and cheap: threads racing here render the same text
    STATS["render"] += 1
    path = source_path(spec)  # outside the lock: cache_dir takes it on first use
    with _LOCK:
        m = _MODULES.get(key)
        if m is not None:
            return m
        on_disk = _read(path)
        if on_disk == source:
            log.debug("cache hit: %s", path.name)
        else:
            if on_disk is None and not path.exists():
                log.info("cache miss: %s (writing it)", path)
            else:
                STATS["rebuilt"] += 1
                log.warning("cache entry %s differs from the source this process renders for its spec (edited, "
                            "damaged or foreign); it is rewritten, not imported", path)
            _write(path, source)
        tag = "interp64" if float64 else "interp" if interpret else "gpu"
        m = _import(path, source, interpret, tag)
        if float64:
            import triton.language as tl
            m.ACC_DTYPE = tl.constexpr(tl.float64)  # read by the interpreted kernels when they run
        if compile_log.isEnabledFor(logging.INFO):
            kernels = sorted(k for k, v in vars(m).items()
                             if k.startswith(f"{spec.name}_") and hasattr(v, "__getitem__"))
            compile_log.info("pattern %s (key %s): kernels %s generated and loaded for %s in %.1f ms (source %s)",
                             spec.name, spec.key, ", ".join(kernels),
                             "the interpreter, float64" if float64 else "the interpreter" if interpret else "the GPU",
                             1e3 * (time.perf_counter() - start), path)
        _MODULES[key] = m
        return m

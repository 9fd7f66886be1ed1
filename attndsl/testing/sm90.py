"""Compile every kernel a CPU run launched for an H100 (sm_90), without a GPU.

Triton's interpreter runs kernels as Python: it does not enforce what the GPU compiler does (a
loop-carried value whose type changes in the loop, a literal out of range, an op with no
lowering), so a kernel can pass the whole CPU suite and fail at its first launch on a GPU. Triton
compiles for a target with no device present, so a CPU run can catch those too:

* :func:`record` (or :class:`Recorder`) notes each distinct ``(kernel source, signature,
  constexprs, num_warps, num_stages)`` the interpreter launches;
* :func:`compile_all` compiles them for ``sm_90`` in a subprocess (a process that interpreted
  kernels cannot compile: Triton's patched language objects leak), in parallel, and returns the
  failures. Successes are remembered by a hash of all of that (``ATTNDSL_SM90_CACHE``, default
  ``~/.cache/attndsl-sm90``), so a rerun compiles only what changed.

The test session does this for every CPU test (``tests/conftest.py``; ``ATTNDSL_SM90=0`` turns it
off). Run by hand: ``python -m attndsl.testing.sm90 records.json``.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

__all__ = ["LaunchRecord", "Recorder", "record", "compile_all", "available"]

_TORCH_TO_TRITON = {
    "float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "float64": "fp64", "int64": "i64", "int32": "i32",
    "int16": "i16", "int8": "i8", "uint8": "u8", "bool": "i1",
}


@dataclass(frozen=True)
class LaunchRecord:
    """One distinct launch: the kernel's module source, its name and how it was specialised."""

    source: str
    name: str
    signature: tuple  # (arg name, triton type or "constexpr")
    constexprs: tuple  # (arg name, value) for constexpr arguments
    num_warps: int
    num_stages: int

    @property
    def key(self) -> str:
        h = hashlib.sha256()
        for part in (self.source, self.name, repr(self.signature), repr(self.constexprs), self.num_warps,
                     self.num_stages, _toolchain()):
            h.update(repr(part).encode())
        return h.hexdigest()[:24]


def _toolchain() -> str:
    import triton
    return triton.__version__


def _arg_type(v):
    """The Triton signature type of a runtime argument, or None when it is not one we can name."""
    import torch
    if isinstance(v, torch.Tensor):
        t = _TORCH_TO_TRITON.get(str(v.dtype).replace("torch.", ""))
        return None if t is None else "*" + t
    if isinstance(v, bool):
        return "i1"
    if isinstance(v, int):
        return "i32" if -(1 << 31) <= v < (1 << 31) else "i64"
    if isinstance(v, float):
        return "fp32"
    if type(v).__name__ == "TensorDescriptor":
        t = _TORCH_TO_TRITON.get(str(v.base.dtype).replace("torch.", ""))
        return None if t is None else f"tensordesc<{t}[{', '.join(str(int(s)) for s in v.block_shape)}]>"
    return None


def _constexpr_value(v):
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    return repr(v)  # e.g. a dtype: recorded for the key, rebuilt below


def _make_record(fn, args, kwargs):
    import inspect
    names = [p for p in inspect.signature(fn).parameters]
    ann = {k: str(getattr(a, "__name__", a)) for k, a in getattr(fn, "__annotations__", {}).items()}
    bound = dict(zip(names, args))
    opts = {k: kwargs[k] for k in ("num_warps", "num_stages") if k in kwargs}
    bound.update({k: v for k, v in kwargs.items() if k in names})
    sig, consts = [], []
    for n in names:
        v = bound.get(n)
        if "constexpr" in ann.get(n, ""):
            sig.append((n, "constexpr"))
            consts.append((n, _constexpr_value(v)))
            continue
        t = _arg_type(v)
        if t is None:
            return None
        sig.append((n, t))
    try:
        source = Path(inspect.getsourcefile(fn)).read_text()
    except (OSError, TypeError):
        return None
    return LaunchRecord(source, fn.__name__, tuple(sig), tuple(consts), int(opts.get("num_warps", 4)),
                        int(opts.get("num_stages", 2)))


class Recorder:
    """Notes each distinct interpreted launch while installed (see :func:`record`)."""

    def __init__(self):
        self.records: dict[str, LaunchRecord] = {}
        self.skipped = 0  # launches whose arguments have no signature type we can name
        self._old = None

    def install(self) -> "Recorder":
        from triton.runtime.interpreter import InterpretedFunction
        self._old = old = InterpretedFunction.run
        rec = self

        def run(self, *args, grid, warmup, **kwargs):
            try:
                r = _make_record(self.fn, args, kwargs)
            except Exception:  # recording must never change what a test sees
                r = None
            if r is None:
                rec.skipped += 1
            else:
                rec.records.setdefault(r.key, r)
            return old(self, *args, grid=grid, warmup=warmup, **kwargs)

        InterpretedFunction.run = run
        return self

    def uninstall(self) -> None:
        if self._old is not None:
            from triton.runtime.interpreter import InterpretedFunction
            InterpretedFunction.run = self._old
            self._old = None


@contextlib.contextmanager
def record():
    """``with record() as rec: ...`` collects the interpreted launches in ``rec.records``."""
    rec = Recorder().install()
    try:
        yield rec
    finally:
        rec.uninstall()


def available() -> bool:
    """Whether this Triton can compile for sm_90 here (its NVIDIA backend and ptxas are present)."""
    try:
        from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
        import triton.backends.nvidia as nv
    except Exception:
        return False
    return (Path(nv.__file__).parent / "bin" / "ptxas").exists() or bool(os.environ.get("TRITON_PTXAS_PATH"))


def _cache_dir() -> Path:
    d = os.environ.get("ATTNDSL_SM90_CACHE")
    return Path(d) if d else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "attndsl-sm90"


def compile_all(records, jobs: int | None = None, timeout: float = 3000) -> tuple[list, dict]:
    """Compile ``records`` for sm_90 in a subprocess. Returns ``(failures, stats)``: failures as
    ``(record, error text)``; stats ``{"kernels", "cached", "compiled", "seconds"}``."""
    records = list(records.values() if isinstance(records, dict) else records)
    cache = _cache_dir()
    todo = [r for r in records if not (cache / r.key).exists()]
    stats = {"kernels": len(records), "cached": len(records) - len(todo), "compiled": len(todo), "seconds": 0.0}
    if not todo:
        return [], stats
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="attndsl-sm90-") as tmp:
        path = Path(tmp) / "records.json"
        path.write_text(json.dumps([asdict(r) for r in todo]))
        env = {**os.environ, "TRITON_INTERPRET": "0"}
        cmd = [sys.executable, "-m", "attndsl.testing.sm90", str(path), str(jobs or max(1, min(8, os.cpu_count() or 1)))]
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        try:
            results = json.loads((Path(tmp) / "results.json").read_text())
        except (OSError, ValueError):
            raise RuntimeError(f"the sm_90 compile subprocess failed (rc {p.returncode}):\n{p.stderr[-4000:]}") from None
    stats["seconds"] = time.perf_counter() - t0
    failures = []
    cache.mkdir(parents=True, exist_ok=True)
    for r, err in zip(todo, results):
        if err is None:
            (cache / r.key).touch()
        else:
            failures.append((r, err))
    return failures, stats


def _compile_one(item):
    """(In the subprocess.) Compile one record; None on success, else the error text."""
    import importlib.util

    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    rec, tmp = item
    src_path = Path(tmp) / f"k_{hashlib.sha256(rec['source'].encode()).hexdigest()[:16]}.py"
    if not src_path.exists():
        src_path.write_text(rec["source"])
    spec = importlib.util.spec_from_file_location(src_path.stem, src_path)
    mod = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(mod)
        fn = getattr(mod, rec["name"])
        consts = {}
        for n, v in rec["constexprs"]:
            if isinstance(v, str) and v.startswith("triton.language."):
                v = getattr(tl, v.rsplit(".", 1)[1])
            consts[n] = v
        sig = {n: t for n, t in rec["signature"]}
        triton.compile(ASTSource(fn, sig, consts), target=GPUTarget("cuda", 90, 32),
                       options=dict(num_warps=rec["num_warps"], num_stages=rec["num_stages"]))
        return None
    except Exception as e:  # the failure is the result
        return f"{type(e).__name__}: {e}"[-3000:]


def _main(argv) -> int:
    path, jobs = Path(argv[0]), int(argv[1]) if len(argv) > 1 else 1
    records = json.loads(path.read_text())
    items = [(r, str(path.parent)) for r in records]
    if jobs > 1 and len(items) > 1:
        import multiprocessing as mp
        with mp.get_context("spawn").Pool(min(jobs, len(items))) as pool:
            results = pool.map(_compile_one, items, chunksize=1)
    else:
        results = [_compile_one(it) for it in items]
    (path.parent / "results.json").write_text(json.dumps(results))
    return 0


def describe(failures) -> str:
    """A readable report of compile failures: kernel, specialisation and the compiler's error."""
    out = []
    for r, err in failures:
        consts = ", ".join(f"{n}={v}" for n, v in r.constexprs)
        first = next((line.strip() for line in r.source.splitlines() if "Generated by" in line), "")
        out.append(f"{r.name} ({first}; num_warps={r.num_warps}, num_stages={r.num_stages}; {consts}):\n  "
                   + err.replace("\n", "\n  "))
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))

"""Compile every kernel a CPU run launched for an H100 (sm_90), without a GPU.

Triton's interpreter runs kernels as Python: it does not enforce what the GPU compiler does (a
loop-carried value whose type changes in the loop, a literal out of range, an op with no
lowering), so a kernel can pass the whole CPU suite and fail at its first launch on a GPU. Triton
compiles for a target with no device present, so a CPU run can catch those too:

* :func:`record` (or :class:`Recorder`) notes each distinct launch the interpreter runs: kernel
  source and name, and the specialisation a GPU launch of the same arguments would compile
  (argument types, constexprs, ints equal to 1, divisibility by 16, num_warps, num_stages);
* :class:`Compiler` compiles them for ``sm_90`` in background processes while the caller goes on
  (a process that interpreted kernels cannot compile: Triton's patched language objects leak);
  :func:`compile_all` is the same for a finished set. Failures come back as
  ``(record, compiler error)``.

How far each launch is compiled (``full``): ``"all"`` takes every launch through Triton's whole
pipeline to a cubin (ptxas). ``"new-ops"`` takes every launch through the frontend and the TTIR
and TTGIR passes, which raise the errors a specialisation can cause (the frontend's type checks,
such as "Loop-carried variable ... int32 ... re-assigned to int64", literal ranges, the layout
passes), and goes on to LLVM IR, PTX and ptxas only when its TTGIR holds an operation (name,
attributes and element types; values, shapes and layouts aside) that no launch the same
:class:`Compiler` compiled to a cubin had. Those later stages lower and assemble operation by
operation, so a kernel made only of kinds of operation that already went through them has
little new for them to reject (the shapes and layouts of a CPU run are the interpreter's tiles,
not a GPU launch's); they are three quarters of a full compile's time (measured: 0.16 s of CPU
to TTGIR, 0.73 s to a cubin per kernel). A launch with a tensor larger than any GPU launch
uses (:data:`MAX_GPU_TILE` elements: the interpreter's own tile choices) stops at TTGIR: ptxas
takes minutes on it and no GPU runs it.

Successes are remembered by a hash of the launch and the Triton version (``ATTNDSL_SM90_CACHE``,
default ``~/.cache/attndsl-sm90``) with the stage reached, so a rerun compiles only what changed.
The test session does this for every CPU test (``tests/conftest.py``, :func:`install_session`;
``ATTNDSL_SM90=0`` turns it off).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

__all__ = ["LaunchRecord", "Recorder", "record", "Compiler", "compile_all", "available", "describe",
           "install_session", "run_compile_script", "start_compile_script", "compile_kernel", "compile_kernels",
           "operations", "STAGES"]

_PKG = Path(__file__).resolve().parents[1]  # the attndsl package
#: the stages of Triton's NVIDIA pipeline after the frontend, in order
STAGES = ("ttir", "ttgir", "llir", "ptx", "cubin")
TARGET = ("cuda", 90, 32)  # GPUTarget(backend, arch, warp size): an H100


@dataclass(frozen=True)
class LaunchRecord:
    """One distinct launch: the kernel's module source, its name and how a GPU launch of the same
    arguments would specialise it (Triton's own rule, ``native_specialize_impl``: an int equal to 1
    becomes the constexpr 1, an int divisible by 16 and a 16-byte aligned pointer get
    ``tt.divisibility=16``; both change the generated code)."""

    source: str
    name: str
    signature: tuple  # (arg name, triton type or "constexpr")
    constexprs: tuple  # (arg name, value) for constexpr arguments (annotated, or specialised: == 1, None)
    num_warps: int
    num_stages: int
    divisible: tuple = ()  # names of the arguments specialised as divisible by 16
    source_hash: str = ""  # sha256 of source (computed when not given)

    def __post_init__(self):
        if not self.source_hash:
            object.__setattr__(self, "source_hash", hashlib.sha256(self.source.encode()).hexdigest())

    @property
    def key(self) -> str:
        h = hashlib.sha256()
        for part in (self.source_hash, self.name, repr(self.signature), repr(self.constexprs), self.num_warps,
                     self.num_stages, repr(self.divisible), _toolchain()):
            h.update(repr(part).encode())
        return h.hexdigest()[:24]


def _toolchain() -> str:
    import triton
    return triton.__version__


def _constexpr_value(v):
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    return repr(v)  # e.g. a dtype: recorded for the key, rebuilt below


class _KernelInfo:
    """What a launch record needs from a kernel function, found once per function."""

    def __init__(self, fn, do_not_specialize):
        import inspect
        self.names = list(inspect.signature(fn).parameters)
        ann = {k: str(getattr(a, "__name__", a)) for k, a in getattr(fn, "__annotations__", {}).items()}
        self.constexpr = {n for n in self.names if "constexpr" in ann.get(n, "")}
        self.no_specialize = {self.names[i] if isinstance(i, int) else i for i in do_not_specialize or ()}
        self.source = None
        if fn.__qualname__ != fn.__name__:
            return  # not at module level: cannot be imported by name in the compile process
        import linecache
        path = Path(fn.__code__.co_filename)
        # the text the module ran: attndsl's kernel cache primes linecache with it (a test may edit
        # the file afterwards, as the cache's own tests do), else the file
        source = "".join(linecache.getlines(str(path)))
        if not source:
            return
        if "Generated by attndsl" not in source and _PKG not in path.resolve().parents:
            return  # a test's own kernel: its module may need the test's imports
        self.source = source
        self.source_hash = hashlib.sha256(source.encode()).hexdigest()


_INFO: dict = {}
_GPU_MIN_TILE = 16  # attndsl.runtime.checks.TILE_SIZES[0]: smaller tiles run only in the interpreter


def _make_record(fn, args, kwargs, do_not_specialize=()):
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend
    info = _INFO.get(fn)
    if info is None:
        info = _INFO[fn] = _KernelInfo(fn, do_not_specialize)
    if info.source is None:
        return None
    bound = dict(zip(info.names, args))
    bound.update({k: v for k, v in kwargs.items() if k in info.names})
    sig, consts, div = [], [], []
    for n in info.names:
        v = bound.get(n)
        if n in info.constexpr:
            if n in ("BLOCK_M", "BLOCK_N") and isinstance(v, int) and v < _GPU_MIN_TILE:
                return None  # an interpreter-only tile (runtime.checks.check_gpu_tiles): no GPU launch has it
            sig.append((n, "constexpr"))
            consts.append((n, _constexpr_value(v)))
            continue
        try:
            t, spec = native_specialize_impl(BaseBackend, v, False, n not in info.no_specialize, True)
        except Exception:
            return None  # an argument Triton cannot type
        if t == "constexpr":  # an int equal to 1, or None
            sig.append((n, "constexpr"))
            consts.append((n, _constexpr_value(spec)))
            continue
        if t == "*fp64":
            return None  # float64 calls run only in the interpreter (refused on CUDA): nothing to compile
        sig.append((n, t))
        if isinstance(spec, str) and "D" in spec:
            div.append(n)
    opts = {k: kwargs[k] for k in ("num_warps", "num_stages") if k in kwargs}
    return LaunchRecord(info.source, fn.__name__, tuple(sig), tuple(consts), int(opts.get("num_warps", 4)),
                        int(opts.get("num_stages", 2)), tuple(div), info.source_hash)


class Recorder:
    """Notes each distinct interpreted launch while installed (see :func:`record`)."""

    def __init__(self, on_record=None):
        self.records: dict[str, LaunchRecord] = {}
        self.on_record = on_record  # called with each new record (e.g. Compiler.submit)
        self.skipped = 0  # launches not recorded: an argument with no signature type, or a kernel
        #                   defined outside generated modules and the attndsl package
        self._old = None

    def install(self) -> "Recorder":
        from triton.runtime.interpreter import InterpretedFunction
        self._old = InterpretedFunction.run
        # an inner recorder takes its launches from the outer one (a test's own compile of what it
        # records is not repeated by the session's, and a kernel it expects to fail stays its own)
        base = getattr(self._old, "_sm90_base", self._old)
        rec = self

        def run(self, *args, grid, warmup, **kwargs):
            try:
                r = _make_record(self.fn, args, kwargs, getattr(self, "kwargs", {}).get("do_not_specialize"))
            except Exception:  # recording must never change what a test sees
                r = None
            if r is None:
                rec.skipped += 1
            elif r.key not in rec.records:
                rec.records[r.key] = r
                if rec.on_record is not None:
                    rec.on_record(r)
            return base(self, *args, grid=grid, warmup=warmup, **kwargs)

        run._sm90_base = base
        InterpretedFunction.run = run
        return self

    def uninstall(self) -> None:
        if self._old is not None:
            from triton.runtime.interpreter import InterpretedFunction
            InterpretedFunction.run = self._old
            self._old = None


@contextlib.contextmanager
def record():
    """``with record() as rec: ...`` collects the interpreted launches in ``rec.records`` (and only
    there: a recorder installed before, such as the test session's, does not see them)."""
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


def _reached(cache: Path, key: str) -> str | None:
    """The stage a cached success reached (None: not cached)."""
    try:
        return (cache / key).read_text().strip() or None
    except OSError:
        return None


class Compiler:
    """Compiles launch records for sm_90 in ``jobs`` background processes while the caller goes
    on: :meth:`submit` returns at once, :meth:`finish` waits and returns the failures.

    Args:
        jobs: compile processes (default: the CPU count, at most 8).
        full: ``"all"`` compiles every record to a cubin; ``"new-ops"`` every record to TTGIR and on
            to a cubin when its TTGIR has an operation no cubin of its processes had (see the module's
            docstring).
        nice: added to the compile processes' niceness, so tests running beside them keep their
            core.
        cache: where successes are remembered (default ``ATTNDSL_SM90_CACHE`` or
            ``~/.cache/attndsl-sm90``).
    """

    def __init__(self, jobs: int | None = None, full: str = "all", nice: int = 0, cache: str | Path | None = None):
        if full not in ("all", "new-ops"):
            raise ValueError(f"full must be 'all' or 'new-ops', got {full!r}")
        self.jobs = max(1, jobs or min(8, os.cpu_count() or 1))
        self.full, self.nice = full, nice
        self.cache = _cache_dir() if cache is None else Path(cache)
        self.records: dict[str, tuple[LaunchRecord, str]] = {}  # key -> (record, stage to reach)
        self.cached = 0
        self._sent: list[list[str]] = []  # keys sent to each process
        self._procs: list = []
        self._tmp = None
        self._lock = threading.Lock()
        self._errors: list[str] = []

    def submit(self, r: LaunchRecord) -> None:
        """Queue ``r`` (once per key) for its compile; returns at once."""
        with self._lock:
            if r.key in self.records:
                return
            stage = "cubin" if self.full == "all" else "new-ops"
            self.records[r.key] = (r, stage)
            if _reached(self.cache, r.key) in (("cubin",) if stage == "cubin" else ("cubin", "ttgir")):
                self.cached += 1
                return
            try:
                self._send(r, stage)
            except Exception as e:  # reported by finish(), never raised into the caller's test
                self._errors.append(f"queueing {r.name} for its compile failed: {type(e).__name__}: {e}")

    def _start(self) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="attndsl-sm90-")
        env = {**os.environ, "TRITON_INTERPRET": "0"}
        for i in range(self.jobs):
            log = open(Path(self._tmp.name) / f"log{i}.txt", "w")
            cmd = [sys.executable, "-m", "attndsl.testing.sm90", self._tmp.name, str(i), str(self.nice)]
            self._procs.append(subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=log, stderr=log, env=env,
                                                text=True, cwd=str(_PKG.parent)))
            log.close()
            self._sent.append([])

    def _send(self, r: LaunchRecord, stage: str) -> None:
        if not self._procs:
            self._start()
        src = Path(self._tmp.name) / f"k_{r.source_hash[:20]}.py"
        if not src.exists():  # sources go through files: a line on the pipe stays short
            tmp = src.with_suffix(".tmp")
            tmp.write_text(r.source)
            tmp.rename(src)
        line = {**asdict(r), "source": str(src), "stage": stage, "key": r.key}
        i = min(range(self.jobs), key=lambda j: len(self._sent[j]))  # round robin
        self._sent[i].append(r.key)
        try:
            self._procs[i].stdin.write(json.dumps(line) + "\n")
            self._procs[i].stdin.flush()
        except OSError:
            pass  # the process died: finish() reports its records

    def finish(self, timeout: float = 3000) -> tuple[list, dict]:
        """Wait for every queued compile. Returns ``(failures, stats)``: failures as ``(record,
        error text)``; stats ``{"kernels", "cached", "full", "ttgir", "seconds"}`` (``full``/``ttgir``:
        compiled now to a cubin / only to TTGIR; ``seconds``: the wait in this call)."""
        t0 = time.perf_counter()
        with self._lock:
            stats = {"kernels": len(self.records), "cached": self.cached, "full": 0, "ttgir": 0, "seconds": 0.0}
            failures = [(None, e) for e in self._errors]
            for p in self._procs:
                with contextlib.suppress(OSError):
                    p.stdin.close()
            deadline = time.monotonic() + timeout
            for p in self._procs:
                try:
                    p.wait(timeout=max(1.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
            self.cache.mkdir(parents=True, exist_ok=True)
            for i, p in enumerate(self._procs):
                results, begun = {}, None
                with contextlib.suppress(OSError):
                    for line in (Path(self._tmp.name) / f"results{i}.jsonl").read_text().splitlines():
                        msg = json.loads(line)
                        if "begin" in msg:
                            begun = msg["begin"]
                        else:
                            results[msg["key"]] = msg
                            begun = None
                log = (Path(self._tmp.name) / f"log{i}.txt").read_text()[-3000:]
                for k in self._sent[i]:
                    r, stage = self.records[k]
                    if k not in results:
                        failures.append((r, f"this launch's compile ended the process (rc {p.returncode}):\n{log}"
                                         if k == begun else "not compiled: its compile process ended first"))
                    elif results[k]["error"] is None:
                        reached = results[k]["stage"]
                        stats["full" if reached == "cubin" else "ttgir"] += 1
                        (self.cache / k).write_text(reached)
                    else:
                        failures.append((r, results[k]["error"]))
            self._procs, self._sent = [], []
            if self._tmp is not None:
                self._tmp.cleanup()
                self._tmp = None
        stats["seconds"] = time.perf_counter() - t0
        return failures, stats

    def kill(self) -> None:
        """Stop the compile processes (an interrupted session)."""
        for p in self._procs:
            with contextlib.suppress(OSError):
                p.kill()
                p.wait()
        self._procs, self._sent = [], []
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


def compile_all(records, jobs: int | None = None, timeout: float = 3000, full: str = "all") -> tuple[list, dict]:
    """Compile ``records`` (a :class:`Recorder`'s ``records``, or an iterable of them) for sm_90 in
    background processes and wait. Returns ``(failures, stats)`` as :meth:`Compiler.finish`."""
    c = Compiler(jobs=jobs, full=full)
    for r in (records.values() if isinstance(records, dict) else records):
        c.submit(r)
    return c.finish(timeout)


class _Coverage:
    """The operations compiled to a cubin so far, shared by the compile processes of one
    :class:`Compiler` through an append-only file (one JSON line per kernel)."""

    def __init__(self, path: str | Path | None = None):
        self.ops: set = set()
        self.path, self._offset = (Path(path) if path else None), 0

    def missing(self, ops: set) -> set:
        if self.path is not None and self.path.exists():
            with open(self.path, "rb") as f:
                f.seek(self._offset)
                data = f.read()
            end = data.rfind(b"\n") + 1  # a line still being written is read next time
            for line in data[:end].splitlines():
                self.ops.update(tuple(op) for op in json.loads(line))
            self._offset += end
        return ops - self.ops

    def add(self, ops: set) -> None:
        self.ops |= ops
        if self.path is not None and ops:
            with open(self.path, "ab") as f:  # one write of one line: appends do not interleave
                f.write((json.dumps(sorted(ops)) + "\n").encode())


def _compile_one(rec: dict, stage: str, covered: _Coverage | None = None) -> str:
    """(In a compile process.) Compile one record up to ``stage`` (``"new-ops"``: to TTGIR, on to
    a cubin when its TTGIR has an operation ``covered`` lacks, which then takes them). Returns
    the stage reached; raises what the compiler raises."""
    import importlib.util

    import triton.language as tl
    src_path = Path(rec["source"])
    mod = sys.modules.get(src_path.stem)
    if mod is None:
        spec = importlib.util.spec_from_file_location(src_path.stem, src_path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        sys.modules[src_path.stem] = mod
    fn = getattr(mod, rec["name"])
    consts = {}
    for n, v in rec["constexprs"]:
        if isinstance(v, str) and v.startswith("triton.language."):
            v = getattr(tl, v.rsplit(".", 1)[1])
        consts[n] = v
    sig = {n: t for n, t in rec["signature"]}
    names = list(sig)
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in rec.get("divisible", ())}
    if stage != "new-ops":
        return compile_kernel(fn, sig, consts, attrs, num_warps=rec["num_warps"], num_stages=rec["num_stages"],
                              stage=stage)
    covered = _Coverage() if covered is None else covered
    new = set()

    def go_on(ttgir) -> bool:
        text = str(ttgir)
        if _largest_tile(text) > MAX_GPU_TILE:
            return False  # an interpreter-only tile size: ptxas takes minutes on it and no GPU runs it
        new.update(covered.missing(operations(text)))
        return bool(new)

    reached = compile_kernel(fn, sig, consts, attrs, num_warps=rec["num_warps"], num_stages=rec["num_stages"],
                             go_on=go_on)
    covered.add(new)  # only after the whole compile succeeded
    return reached


#: the most elements of one tensor in a GPU launch's TTGIR (128x128 tiles); larger ones come from
#: the interpreter's tile choices (the lightning indexer's 256x512 on a CPU) and stop at TTGIR
MAX_GPU_TILE = 128 * 128


def _largest_tile(ttgir: str) -> int:
    largest = 0
    for dims in re.findall(r"tensor<((?:\d+x)+)", ttgir):
        n = 1
        for d in dims.rstrip("x").split("x"):
            n *= int(d)
        largest = max(largest, n)
    return largest


_OP = re.compile(r'^(?:[%\w#:, ]+= )?"?([a-z_]+\.[\w.]+)"?(.*)$')


def operations(ttgir: str) -> set:
    """The operations of a TTGIR module's text, each as ``(name, attributes : types)`` with SSA
    names, locations, constant values, numbers in attributes, tensor shapes, layouts and function
    signatures left out: the kinds of operation
    on the element types that LLVM lowering, PTX generation and ptxas see. (Shapes and layouts
    follow the interpreter's tile sizes in a CPU run, not the ones a GPU launch picks.)"""
    ops = set()
    for line in ttgir.splitlines():
        if line.startswith("#"):  # a layout alias
            continue
        m = _OP.match(re.sub(r"loc\([^)]*\)+", "", line).strip())
        if not m:
            continue
        name, rest = m.group(1), m.group(2)
        if name == "tt.func":  # a function's signature: its argument list, lowered the same for any
            continue
        body, _, types = rest.rpartition(" : ") if " : " in rest else (rest, "", "")
        # operands aside, what is left says how (a comparison's predicate, a dot's precision, inline PTX)
        attrs = " ".join(re.sub(r"%[\w#]+", "", body).replace(",", " ").split()) if name != "arith.constant" else ""
        attrs = re.sub(r"\b\d+\b", "N", attrs)  # ranges, axes, loop bounds: sizes, like shapes
        key = re.sub(r"dense<[^>]*>", "dense", attrs + " : " + types)
        key = re.sub(r",?\s*#[\w.]+(<\{[^{}]*\}>)?", "", key)  # layouts (aliases, short inline ones)
        key = re.sub(r"\b(?:\d+x)+", "", key)  # shapes
        ops.add((name, key))
    return ops


def compile_kernel(fn, signature: dict, constexprs: dict, attrs: dict | None = None, num_warps: int = 4,
                   num_stages: int = 2, stage: str = "cubin", go_on=None) -> str:
    """Compile the ``@triton.jit`` function ``fn`` for sm_90 up to ``stage`` (one of
    :data:`STAGES`; ``"cubin"`` runs ptxas), without Triton's on-disk cache. Returns the stage
    reached; raises what Triton raises. Call it in a process that has not interpreted kernels
    (Triton's interpreter patches leak into compiles).

    Args:
        fn: the kernel (a ``triton.JITFunction``: ``TRITON_INTERPRET`` unset when it was defined).
        signature: ``{arg name: Triton type}`` for every argument, e.g. ``"*fp16"``, ``"i32"``,
            ``"constexpr"``.
        constexprs: ``{arg name: value}`` for the constexpr arguments.
        attrs: ``{(arg index,): [["tt.divisibility", 16]]}`` for arguments specialised as
            divisible by 16 (default: none).
        num_warps, num_stages: the launch options.
        stage: where to stop.
        go_on: called with the TTGIR module; when it returns False the compile stops there.
    """
    from triton._C.libtriton import get_cache_invalidating_env_vars, ir
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.compiler.compiler import make_backend
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    src = ASTSource(fn, signature, constexprs, attrs)
    # triton.compile's pipeline (triton/compiler/compiler.py), stopped at ``stage``, with no cache
    target = GPUTarget(*TARGET)
    backend = make_backend(target)
    options = backend.parse_options(dict(num_warps=num_warps, num_stages=num_stages))
    stages: dict = {}
    backend.add_stages(stages, options, src.language)
    if tuple(stages) != STAGES:
        raise RuntimeError(f"this Triton's NVIDIA pipeline is {tuple(stages)}; attndsl.testing.sm90 expects {STAGES}")
    context = ir.context()
    ir.load_dialects(context)
    backend.load_dialects(context)
    module = src.make_ir(target, options, backend.get_codegen_implementation(options), backend.get_module_map(),
                         context)
    metadata = {"hash": src.hash(), "target": target, **options.__dict__, **get_cache_invalidating_env_vars()}
    for ext, compile_ir in stages.items():
        module = compile_ir(module, metadata)
        if ext == stage or (ext == "ttgir" and go_on is not None and not go_on(module)):
            return ext
    return "cubin"


_JOBS: list = []  # compile_kernels' work, read by its forked processes


def _compile_job(i: int) -> str | None:
    fn, sig, consts, opts = _JOBS[i][1:]
    try:
        compile_kernel(fn, sig, consts, **opts)
    except (Exception, SystemExit) as e:  # the failure is the result (an exception may not pickle)
        return f"{type(e).__name__}: {e}"[-3000:]
    return None


def compile_kernels(jobs, processes: int | None = None) -> list[str]:
    """Compile each job to a cubin for sm_90 (:func:`compile_kernel`), in ``processes`` forked
    processes (default: the CPU count), and return the labels of the jobs compiled. A job repeating
    an earlier one exactly (the same kernel by Triton's ``cache_key``, which covers its source and
    what it calls, with the same signature, constexprs and options) is not compiled again: its
    compile could only give the same result. Call it where :func:`compile_kernel` may be called
    (a process that has not interpreted kernels).

    Args:
        jobs: ``(label, fn, signature, constexprs, options)`` tuples; ``options`` are
            :func:`compile_kernel`'s keyword arguments (``num_warps``, ``num_stages``, ``attrs``).
        processes: compile processes (1: in this one).

    Returns:
        The labels, in order. Raises ``RuntimeError`` naming each job that failed and its error."""
    import multiprocessing
    global _JOBS
    jobs = list(jobs)
    firsts, seen = [], {}
    for i, (_, fn, sig, consts, opts) in enumerate(jobs):
        key = (fn.cache_key, repr(sorted(sig.items())), repr(sorted(consts.items())), repr(sorted(opts.items())))
        firsts.append(seen.setdefault(key, i))
    todo = sorted(set(firsts))
    processes = max(1, min(processes or os.cpu_count() or 1, len(todo)))
    _JOBS = jobs
    try:
        if processes == 1 or "fork" not in multiprocessing.get_all_start_methods():
            errors = dict(zip(todo, map(_compile_job, todo)))
        else:
            with multiprocessing.get_context("fork").Pool(processes) as pool:
                errors = dict(zip(todo, pool.map(_compile_job, todo, chunksize=1)))
    finally:
        _JOBS = []
    failed = [f"{jobs[i][0]}: {errors[i]}" for i in todo if errors[i] is not None]
    if failed:
        raise RuntimeError(f"{len(failed)} of {len(todo)} kernels do not compile for sm_90:\n" + "\n".join(failed))
    return [label for label, *_ in jobs]


def _serve(tmp: str, index: int, nice: int) -> int:
    """(A compile process.) Compile the records arriving on stdin, one JSON line each, in order,
    writing ``{"begin": key}`` before and ``{"key", "error"}`` after each to results<index>.jsonl."""
    import queue
    if nice:
        os.nice(nice)
    lines: queue.Queue = queue.Queue()
    covered = _Coverage(Path(tmp) / "covered.jsonl")  # operations the processes compiled to a cubin

    def read():  # drain stdin at once: the sender never waits on a full pipe
        for line in sys.stdin:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=read, daemon=True).start()
    with open(Path(tmp) / f"results{index}.jsonl", "w") as out:
        while (line := lines.get()) is not None:
            rec = json.loads(line)
            out.write(json.dumps({"begin": rec["key"]}) + "\n")
            out.flush()
            reached = None
            try:
                reached = _compile_one(rec, rec["stage"], covered)
                err = None
            except (Exception, SystemExit) as e:  # the failure is the result
                err = f"{type(e).__name__}: {e}"[-3000:]
            out.write(json.dumps({"key": rec["key"], "error": err, "stage": reached}) + "\n")
            out.flush()
    return 0


def describe(failures) -> str:
    """A readable report of compile failures: kernel, specialisation and the compiler's error."""
    out = []
    for r, err in failures:
        if r is None:
            out.append(err)
            continue
        consts = ", ".join(f"{n}={v}" for n, v in r.constexprs)
        first = next((line.strip() for line in r.source.splitlines() if "Generated by" in line), "")
        out.append(f"{r.name} ({first}; num_warps={r.num_warps}, num_stages={r.num_stages}; {consts}):\n  "
                   + err.replace("\n", "\n  "))
    return "\n".join(out)


class _Session:
    """The pytest plugin of :func:`install_session`."""

    def __init__(self, compiler: Compiler):
        self.compiler = compiler
        self.recorder = Recorder(on_record=compiler.submit).install()
        self.result = None

    def pytest_sessionfinish(self, session, exitstatus):
        self.recorder.uninstall()
        if exitstatus not in (0, 1):  # interrupted or broken: nothing worth reporting
            self.compiler.kill()
            return
        try:
            failures, stats = self.compiler.finish()
        except Exception as e:  # a broken toolchain is reported, not hidden
            failures, stats = [(None, f"{type(e).__name__}: {e}")], {}
        self.result = (failures, stats, self.recorder.skipped)
        if failures:
            session.exitstatus = 1  # pytest.ExitCode.TESTS_FAILED

    def pytest_terminal_summary(self, terminalreporter, exitstatus, config):
        if self.result is None:
            return
        failures, stats, skipped = self.result
        tr = terminalreporter
        tr.write_sep("=", "sm_90 compile of the interpreted kernels", red=bool(failures), green=not failures)
        if stats:
            tr.write_line(
                f"{stats['kernels']} distinct launches: {stats['cached']} compiled before (cached), {stats['full']} "
                f"compiled now to a cubin and {stats['ttgir']} to TTGIR (full={self.compiler.full!r}, "
                f"{self.compiler.jobs} processes beside the tests), {stats['seconds']:.1f} s waited after the tests; "
                f"{skipped} launches not recorded (a test's own kernel, float64, tiles under 16 that only the "
                f"interpreter runs, or an argument with no Triton type)")
        if failures:
            tr.write_line(f"{len(failures)} launches do not compile for sm_90:", red=True)
            tr.write_line(describe(failures))


def install_session(config, jobs: int | None = None, full: str | None = None) -> bool:
    """From a ``pytest_configure`` hook: record every kernel the session interprets, compile each
    for sm_90 beside the tests (:class:`Compiler`, niced) and fail the session when one does not
    compile. ``full`` defaults to ``ATTNDSL_SM90_FULL`` or ``"new-ops"``; ``jobs`` to
    ``ATTNDSL_SM90_JOBS`` or the CPU count. Returns False (and does nothing) when this Triton
    cannot compile for sm_90 here."""
    if not available():
        return False
    full = full or os.environ.get("ATTNDSL_SM90_FULL", "new-ops")
    jobs = jobs or int(os.environ.get("ATTNDSL_SM90_JOBS", "0")) or None
    config.pluginmanager.register(_Session(Compiler(jobs=jobs, full=full, nice=10)), "attndsl-sm90")
    return True


def _script_env(cache_dir) -> dict:
    root = _PKG.parent
    return dict(os.environ, ATTNDSL_CACHE_DIR=str(cache_dir), TRITON_INTERPRET="0",
                PYTHONPATH=f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")


#: compile scripts started ahead of their test (start_compile_script): script -> (process, its folder)
_AHEAD: dict = {}


def start_compile_script(script: str, nice: int = 10) -> bool:
    """Start :func:`run_compile_script`'s process for ``script`` now, niced by ``nice``, so that it
    runs beside the tests before its own (the test session starts those of the collected tests
    marked ``compile_ahead``); a later :func:`run_compile_script` of the same script waits for it
    and checks its result as its own. Returns False (and starts nothing) when this Triton cannot
    compile for sm_90 here or the script was started already. Unwaited processes are ended at exit."""
    if script in _AHEAD or not available():
        return False
    folder = Path(tempfile.mkdtemp(prefix="attndsl-sm90-ahead-"))
    with open(folder / "out.txt", "w") as out, open(folder / "err.txt", "w") as err:
        proc = subprocess.Popen([sys.executable, "-c", script], cwd=_PKG.parent, env=_script_env(folder / "cache"),
                                stdout=out, stderr=err, text=True,
                                preexec_fn=(lambda: os.nice(nice)) if nice and hasattr(os, "nice") else None)
    if not _AHEAD:
        import atexit
        atexit.register(_end_ahead)
    _AHEAD[script] = (proc, folder)
    return True


def _end_ahead() -> None:
    import shutil
    for proc, folder in _AHEAD.values():
        with contextlib.suppress(OSError):
            proc.kill()
            proc.wait()
        shutil.rmtree(folder, ignore_errors=True)
    _AHEAD.clear()


def run_compile_script(script: str, tmp_path, timeout: float = 900) -> str:
    """Run ``script`` (Python that compiles kernels for sm_90 and prints ``compiled ...``) in a
    fresh process with ``ATTNDSL_CACHE_DIR=tmp_path`` and this checkout on the path (a process
    that interpreted kernels cannot compile them), and return its stdout; when
    :func:`start_compile_script` started it already, wait for that process instead. Skips the
    calling test when this Triton cannot compile for sm_90; fails it when the script fails."""
    import pytest
    if not available():
        pytest.skip("this Triton cannot compile for sm_90 (no NVIDIA backend or ptxas)")
    ahead = _AHEAD.pop(script, None)
    if ahead is None:
        r = subprocess.run([sys.executable, "-c", script], cwd=_PKG.parent, env=_script_env(tmp_path),
                           capture_output=True, text=True, timeout=timeout)
        rc, stdout, stderr = r.returncode, r.stdout, r.stderr
    else:
        import shutil
        proc, folder = ahead
        try:
            rc = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
        finally:
            stdout, stderr = (folder / "out.txt").read_text(), (folder / "err.txt").read_text()
            shutil.rmtree(folder, ignore_errors=True)
    assert rc == 0 and "compiled" in stdout, (stderr + stdout)[-4000:]
    return stdout


if __name__ == "__main__":
    sys.exit(_serve(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) > 3 else 0))

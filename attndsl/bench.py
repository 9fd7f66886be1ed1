"""Time your own pattern: attndsl against FlexAttention and SDPA (``attndsl bench``).

:func:`bench` checks a pattern (ours against the float64 reference at a small size, and against
FlexAttention on the benchmark inputs), then times it forward and forward+backward, as the one-shot
:func:`attndsl.attention` call (tracing and host work included) and as a compiled pattern
(:func:`attndsl.compile`), next to ``torch.compile(flex_attention, dynamic=False)`` with its block
mask built once (its build time is reported apart) and to SDPA where SDPA can express the pattern
(no mask and no score modifier, or a causal mask).

Each result is a row (a dict), the format ``benchmarks/results/*.json`` uses too:

=============  ===============================================================================
``case``       the pattern as named on the command line (or ``name=``)
``B`` ...      ``B``, ``Hq``, ``Hkv``, ``Lq``, ``Lkv``, ``D``, ``dtype`` (``"bf16"``, ``"fp16"``, ``"fp32"``)
``pass``       ``"fwd"`` or ``"fwd+bwd"``
``api``        ``"attention"`` (one-shot call) or ``"compiled"`` (``attndsl.compile`` once, then calls)
``ours_ms``    median time of one call (ms); ``flex_ms``, ``sdpa_ms`` the same for FlexAttention
               and SDPA (``None`` where they do not apply or failed: see ``flex_error``)
``host_us``    median host time of issuing one of our calls (µs; the GPU is not waited for);
               ``flex_host_us``, ``sdpa_host_us`` the same for FlexAttention and SDPA
``peak_mib``   peak GPU memory during one of our calls (MiB, inputs included; ``None`` on CPU)
``flex_block_mask_ms``  FlexAttention's ``create_block_mask`` (built once, not in ``flex_ms``)
``table_ms``   our block-table kernel alone (compiled rows of data-dependent masks; it is part of
               every ``ours_ms`` call)
``gpu``, ``torch``, ``triton``, ``commit``, ``device``, ``date``  where and when it ran (``commit``:
               the source checkout's ``git`` revision, ``None`` for an installed package)
``Dv``, ``status``  the value head dim (``D`` here) and ``"ok"`` (a failed check raises instead)
=============  ===============================================================================

On CUDA times come from ``triton.testing.do_bench(warmup=25, rep=100, return_mode="median")``. With
``device="cpu"`` the kernels run in Triton's interpreter and FlexAttention runs eagerly: a dry run of
the procedure at tiny sizes, not a performance figure.
"""
from __future__ import annotations

import datetime
import gc
import platform
import statistics
import subprocess
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

__all__ = ["BenchConfig", "CheckFailed", "NoDevice", "ROW_KEYS", "bench", "markdown_table", "plot_rows",
           "DTYPES", "EXIT_NO_GPU"]

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
#: Keys every row has (in this order in the JSON file).
ROW_KEYS = ("case", "B", "Hq", "Hkv", "Lq", "Lkv", "D", "dtype", "pass", "api", "ours_ms", "flex_ms", "sdpa_ms",
            "host_us", "flex_host_us", "sdpa_host_us", "peak_mib", "gpu", "torch", "triton", "commit")
#: Exit code of ``attndsl bench`` on a machine without a CUDA device.
EXIT_NO_GPU = 3
FLEX_TOL = {torch.bfloat16: 2e-2, torch.float16: 5e-3, torch.float32: 1e-4}  # ||ours - flex|| / ||flex||
MIB = 2.0 ** 20


class NoDevice(RuntimeError):
    """``device="cuda"`` on a machine where ``torch.cuda.is_available()`` is False."""


class CheckFailed(AssertionError):
    """The pattern's output or gradients differ from the reference or from FlexAttention: not timed."""


@dataclass
class BenchConfig:
    """Shapes and options of one ``bench`` run (``Hkv``/``Lkv`` default to ``Hq``/``Lq``)."""
    B: int = 1
    Hq: int = 16
    Hkv: Optional[int] = None
    Lq: int = 4096
    Lkv: Optional[int] = None
    D: int = 64
    dtype: str = "bf16"
    device: str = "cuda"
    passes: Sequence[str] = ("fwd", "fwd+bwd")
    quick: bool = False

    def __post_init__(self):
        self.Hkv = self.Hq if self.Hkv is None else self.Hkv
        self.Lkv = self.Lq if self.Lkv is None else self.Lkv
        for name in ("B", "Hq", "Hkv", "Lq", "Lkv", "D"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if self.Hq % self.Hkv:
            raise ValueError(f"Hq ({self.Hq}) must be a multiple of Hkv ({self.Hkv})")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.device not in ("cuda", "cpu"):
            raise ValueError(f"device must be 'cuda' or 'cpu', got {self.device!r}")
        bad = [p for p in self.passes if p not in ("fwd", "fwd+bwd")]
        if bad or not self.passes:
            raise ValueError(f"passes must be 'fwd' and/or 'fwd+bwd', got {list(self.passes)!r}")


# --------------------------------------------------------------------------------------------
# timing

def wall_clock_ms(fn: Callable[[], Any], reps: int, grad_to_none: Optional[Sequence[torch.Tensor]] = None) -> float:
    """Median wall-clock time of ``fn()`` over ``reps`` calls after one warm-up call (ms), the
    ``.grad`` of ``grad_to_none`` reset before each: CPU timing, where no device needs syncing."""
    fn()
    ts = []
    for _ in range(reps):
        for t in grad_to_none or ():
            t.grad = None
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1e3)
    return float(statistics.median(ts))


class _Timer:
    def __init__(self, device: str, quick: bool):
        self.cuda = device == "cuda"
        self.quick = quick

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def ms(self, fn: Callable[[], Any], grad_to_none=None) -> float:
        if self.cuda:
            from triton.testing import do_bench
            warmup, rep = (10, 30) if self.quick else (25, 100)
            return float(do_bench(fn, warmup=warmup, rep=rep, grad_to_none=grad_to_none, return_mode="median"))
        return wall_clock_ms(fn, 1 if self.quick else 3, grad_to_none)  # CPU: the interpreter

    def host_us(self, fn: Callable[[], Any]) -> float:
        """Median time until one call returns to Python, with an idle GPU before each."""
        ts = []
        for _ in range(3 if self.quick or not self.cuda else 20):
            self.sync()
            t0 = time.perf_counter()
            r = fn()
            ts.append((time.perf_counter() - t0) * 1e6)
            del r
        self.sync()
        return float(statistics.median(ts))

    def peak_mib(self, fn: Callable[[], Any]) -> Optional[float]:
        if not self.cuda:
            return None
        self.sync()
        gc.collect()
        torch.cuda.reset_peak_memory_stats()
        r = fn()
        self.sync()
        del r
        return torch.cuda.max_memory_allocated() / MIB


def _rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


# --------------------------------------------------------------------------------------------
# the pattern: what SDPA and Flex can do with it

def _is_causal(spec, Lq: int, Lkv: int, device) -> bool:
    """Whether the traced mask equals ``q_idx >= kv_idx`` at these lengths (evaluated on its IR,
    in row chunks); only masks of ``q``/``kv`` alone, reading no tensor, qualify."""
    from .ir import free_vars
    from .ir.evaluate import evaluate
    if spec.mask is None or spec.buffers or not free_vars(spec.mask) <= {"q", "kv"}:
        return False
    kv = torch.arange(Lkv, device=device).view(1, -1)
    for q0 in range(0, Lq, 1024):
        q = torch.arange(q0, min(q0 + 1024, Lq), device=device).view(-1, 1)
        got = evaluate([spec.mask], {"q": q, "kv": kv}, [], device=device)[0]
        if not torch.equal(torch.broadcast_to(got, (q.shape[0], Lkv)).bool(), q >= kv):
            return False
    return True


def _flex(mask_mod, score_mod, cfg: BenchConfig, spec, timer: _Timer):
    """(call, block mask, build ms) for FlexAttention; compiled on CUDA, eager on CPU."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    from .ir import free_vars
    if timer.cuda:
        fn = torch.compile(flex_attention, dynamic=False)
    else:  # eager on the CPU (a dry run): without its warning that eager Flex is unfused
        def fn(*args, **kw):
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
                return flex_attention(*args, **kw)
    bm, build_ms = None, None
    if mask_mod is not None:
        fv = free_vars(spec.mask) if spec.mask is not None else frozenset()
        Bm = cfg.B if "b" in fv or spec.buffers else None  # a mask of b/h needs them in the block mask
        Hm = cfg.Hq if "h" in fv or spec.buffers else None

        def build():
            return create_block_mask(mask_mod, Bm, Hm, cfg.Lq, cfg.Lkv, device=cfg.device)
        bm = build()
        build_ms = timer.ms(build)
    gqa = cfg.Hq != cfg.Hkv

    def call(q, k, v):
        return fn(q, k, v, score_mod=score_mod, block_mask=bm, enable_gqa=gqa)
    return call, build_ms


def _reference_check(mask_mod, score_mod, cfg: BenchConfig, layout_len: Optional[int], grads: bool) -> None:
    """Ours against the float64 reference at a small size in float32 (raises :class:`CheckFailed`)."""
    import attndsl
    from .testing import Mismatch, assert_matches_reference, random_qkv
    cap = 512 if cfg.device == "cuda" else 128
    # float32 on a GPU: other accumulation orders than the CPU's, so the GPU suite's tolerance
    rtol = 1e-4 if cfg.device == "cuda" else None
    Lq = layout_len or min(cfg.Lq, cap)
    Lkv = layout_len or min(cfg.Lkv, cap)
    Hkv = 1
    Hq = 1 if cfg.Hq == cfg.Hkv else min(2, cfg.Hq // cfg.Hkv)
    q, k, v = random_qkv((1, Hq, Hkv, Lq, Lkv, cfg.D), torch.float32, device=cfg.device, seed=0)
    try:
        assert_matches_reference(attndsl.compile(mask_mod=mask_mod, score_mod=score_mod), q, k, v, grads=grads, seed=0,
                                 rtol=rtol)
    except Mismatch as e:
        raise CheckFailed(f"against the float64 reference (B=1 Hq={Hq} Hkv={Hkv} Lq={Lq} Lkv={Lkv} D={cfg.D}, "
                          f"float32): {e}") from None


def _environment(device: str) -> Dict[str, Any]:
    try:
        import triton
        tv = triton.__version__
    except Exception:  # noqa: BLE001 - reported, not fatal
        tv = None
    gpu = torch.cuda.get_device_name() if device == "cuda" else (platform.processor() or "cpu")
    commit = None
    root = Path(__file__).resolve().parents[1]
    if (root / ".git").exists():
        try:
            commit = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                                    text=True, timeout=5).stdout.strip() or None
        except (OSError, subprocess.SubprocessError):
            commit = None
    date = datetime.datetime.now(datetime.timezone.utc).date().isoformat()
    return {"gpu": gpu, "torch": torch.__version__, "triton": tv, "commit": commit, "device": device, "date": date}


# --------------------------------------------------------------------------------------------
# the run

def bench(mask_mod: Optional[Callable] = None, score_mod: Optional[Callable] = None, cfg: Optional[BenchConfig] = None,
          *, name: str = "pattern", log: Optional[Callable[[str], None]] = None) -> List[Dict[str, Any]]:
    """Check, then time, one pattern; returns one row per (pass, api) (see the module docstring).

    Args:
        mask_mod: ``mask_mod(b, h, q_idx, kv_idx) -> bool`` or None.
        score_mod: ``score_mod(score, b, h, q_idx, kv_idx) -> score`` or None.
        cfg: shapes, dtype, device and passes (:class:`BenchConfig`; default: its defaults). A mask
            on a :class:`~attndsl.Layout` needs ``Lq == Lkv == len(layout)``.
        name: the ``case`` of the rows.
        log: called with a line of progress now and then (default: silent).

    Returns:
        A list of dicts with at least the keys :data:`ROW_KEYS`.

    Raises:
        NoDevice: ``cfg.device == "cuda"`` and no CUDA device is present.
        CheckFailed: ours differs from the float64 reference or from FlexAttention (nothing is timed).
    """
    import attndsl
    cfg = cfg or BenchConfig()
    say = log or (lambda s: None)
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise NoDevice("no CUDA device (torch.cuda.is_available() is False): timings need a GPU "
                       "(use --device cpu for a dry run in the interpreter)")
    layout = getattr(mask_mod, "layout", None)
    layout_len = len(layout) if layout is not None else None
    if layout_len is not None and (cfg.Lq, cfg.Lkv) != (layout_len, layout_len):
        raise ValueError(f"the mask is on a layout of {layout_len} tokens: Lq and Lkv must be {layout_len}, "
                         f"got {cfg.Lq} and {cfg.Lkv}")
    dtype, dev = DTYPES[cfg.dtype], cfg.device
    timer = _Timer(dev, cfg.quick)
    bwd = "fwd+bwd" in cfg.passes
    compiled = attndsl.compile(mask_mod=mask_mod, score_mod=score_mod)
    spec = compiled.spec

    say("checking against the float64 reference")
    _reference_check(mask_mod, score_mod, cfg, layout_len, grads=bwd)

    g = torch.Generator(device=dev).manual_seed(0)
    q = torch.randn(cfg.B, cfg.Hq, cfg.Lq, cfg.D, device=dev, generator=g).to(dtype)
    k = torch.randn(cfg.B, cfg.Hkv, cfg.Lkv, cfg.D, device=dev, generator=g).to(dtype)
    v = torch.randn(cfg.B, cfg.Hkv, cfg.Lkv, cfg.D, device=dev, generator=g).to(dtype)
    qkv = [t.requires_grad_(bwd) for t in (q, k, v)]
    do = torch.randn(cfg.B, cfg.Hq, cfg.Lq, cfg.D, device=dev, generator=g).to(dtype)

    say("FlexAttention")
    flex_error = None
    plain = [t.detach() for t in qkv]  # forward-only calls: no autograd graph
    try:
        flex, flex_mask_ms = _flex(mask_mod, score_mod, cfg, spec, timer)
        flex_out = flex(*plain)
    except Exception as e:  # noqa: BLE001 - Flex is the comparison, not the subject: report and go on
        flex, flex_mask_ms, flex_out = None, None, None
        flex_error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        say(f"FlexAttention failed: {flex_error}")
    flex_bwd = flex is not None and timer.cuda  # FlexAttention has no backward on the CPU
    if flex_out is not None:
        tol = FLEX_TOL[dtype]
        pairs = [("output", compiled(*plain), flex_out)]
        if bwd and flex_bwd:
            pairs += zip(("dq", "dk", "dv"), torch.autograd.grad(compiled(*qkv), qkv, do),
                         torch.autograd.grad(flex(*qkv), qkv, do))
        for what, a, b in pairs:
            err = _rel_error(a, b)
            if not err <= tol:
                raise CheckFailed(f"{what} differs from FlexAttention's by {err:.3g} (relative L2 norm, tolerance "
                                  f"{tol:g} for {cfg.dtype}) at B={cfg.B} Hq={cfg.Hq} Hkv={cfg.Hkv} Lq={cfg.Lq} "
                                  f"Lkv={cfg.Lkv} D={cfg.D}")
        del pairs, flex_out

    import torch.nn.functional as F
    sdpa = None
    if score_mod is None and (mask_mod is None or _is_causal(spec, cfg.Lq, cfg.Lkv, dev)):
        causal = mask_mod is not None
        gqa = cfg.Hq != cfg.Hkv

        def sdpa(q, k, v):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa)

    calls = {"attention": lambda q, k, v: attndsl.attention(q, k, v, mask_mod=mask_mod, score_mod=score_mod),
             "compiled": compiled}
    env = _environment(dev)
    table_ms = None
    if spec.data_dependent:  # the block table every call builds, timed alone
        table_ms = timer.ms(lambda: compiled.build_block_tables(*plain))
    rows = []
    for p in cfg.passes:
        def step(f, p=p):
            if p == "fwd":
                return lambda: f(*plain)

            def fb():
                out = f(*qkv)
                out.backward(do)
                return out
            return fb
        grads = qkv if p == "fwd+bwd" else None
        say(f"{p}: FlexAttention and SDPA")
        flex_ms = timer.ms(step(flex), grads) if flex is not None and (p == "fwd" or flex_bwd) else None
        sdpa_ms = timer.ms(step(sdpa), grads) if sdpa is not None else None
        flex_host = timer.host_us(step(flex)) if flex_ms is not None else None
        sdpa_host = timer.host_us(step(sdpa)) if sdpa_ms is not None else None
        for api, f in calls.items():
            say(f"{p}: attndsl, {api}")
            ours_ms = timer.ms(step(f), grads)
            rows.append(dict(
                case=name, B=cfg.B, Hq=cfg.Hq, Hkv=cfg.Hkv, Lq=cfg.Lq, Lkv=cfg.Lkv, D=cfg.D, Dv=cfg.D, dtype=cfg.dtype,
                **{"pass": p}, api=api, ours_ms=_round(ours_ms), flex_ms=_round(flex_ms), sdpa_ms=_round(sdpa_ms),
                host_us=_round(timer.host_us(step(f)), 1), flex_host_us=_round(flex_host, 1),
                sdpa_host_us=_round(sdpa_host, 1), peak_mib=_round(timer.peak_mib(step(f)), 1), **env,
                flex_block_mask_ms=_round(flex_mask_ms), table_ms=_round(table_ms) if api == "compiled" else None,
                status="ok", flex_error=flex_error, quick=cfg.quick))
        for t in qkv:
            t.grad = None
    return rows


def _round(x: Optional[float], nd: int = 4) -> Optional[float]:
    return None if x is None else round(float(x), nd)


# --------------------------------------------------------------------------------------------
# reports

def _cell(x: Optional[float], fmt: str = "{:.3f}") -> str:
    return "—" if x is None else fmt.format(x)


def _speedup(anchor: Optional[float], ours: Optional[float]) -> str:
    return "—" if anchor is None or not ours else f"{anchor / ours:.2f}×"


def markdown_table(rows: Sequence[Dict[str, Any]]) -> str:
    """A markdown table of ``rows``; ``vs Flex`` / ``vs SDPA`` are speed-ups (their time over ours:
    above 1 means attndsl is faster)."""
    head = ("| case | shape | dtype | pass | api | ours ms | Flex ms | vs Flex | SDPA ms | vs SDPA | host µs "
            "| peak MiB |\n|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
    lines = [head]
    for r in rows:
        shape = f"B={r['B']} H={r['Hq']}/{r['Hkv']} L={r['Lq']}" + (f"/{r['Lkv']}" if r['Lkv'] != r['Lq'] else "") \
                + f" D={r['D']}"
        lines.append(f"| {r['case']} | {shape} | {r['dtype']} | {r['pass']} | {r['api']} | {_cell(r['ours_ms'])} | "
                     f"{_cell(r['flex_ms'])} | {_speedup(r['flex_ms'], r['ours_ms'])} | {_cell(r['sdpa_ms'])} | "
                     f"{_speedup(r['sdpa_ms'], r['ours_ms'])} | {_cell(r['host_us'], '{:.0f}')} | "
                     f"{_cell(r['peak_mib'], '{:.0f}')} |")
    if rows:
        r = rows[0]
        lines.append(f"\n{r['gpu']}, torch {r['torch']}, triton {r['triton']}"
                     + (f", commit {r['commit']}" if r.get("commit") else "")
                     + ("; CPU interpreter dry run, not a performance figure" if r.get("device") == "cpu" else ""))
    return "\n".join(lines)


def plot_rows(rows: Sequence[Dict[str, Any]], path: str) -> None:
    """A bar chart of ``rows`` (one group per case and pass; bars: attndsl one-shot, attndsl
    compiled, FlexAttention, SDPA), written to ``path`` (PNG) with matplotlib."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: Dict[tuple, Dict[str, Optional[float]]] = {}
    for r in rows:
        g = groups.setdefault((r["case"], r["pass"]), {})
        g[f"attndsl ({r['api']})"] = r["ours_ms"]
        g["FlexAttention"], g["SDPA"] = r["flex_ms"], r["sdpa_ms"]
    series = ["attndsl (attention)", "attndsl (compiled)", "FlexAttention", "SDPA"]
    series = [s for s in series if any(g.get(s) is not None for g in groups.values())]
    fig, ax = plt.subplots(figsize=(max(5.0, 1.6 * len(groups) * max(1, len(series)) / 2), 4))
    width = 0.8 / max(1, len(series))
    for i, s in enumerate(series):
        xs = [j + i * width for j in range(len(groups))]
        ax.bar(xs, [g.get(s) or 0.0 for g in groups.values()], width, label=s)
        for x, g in zip(xs, groups.values()):
            if g.get(s) is None:  # not applicable or failed: say so rather than draw a zero
                ax.text(x, 0, "n/a", ha="center", va="bottom", fontsize=7, rotation=90)
    ax.set_xticks([j + width * (len(series) - 1) / 2 for j in range(len(groups))])
    ax.set_xticklabels([f"{c}\n{p}" for c, p in groups], fontsize=8)
    ax.set_ylabel("time per call (ms, lower is better)")
    r = rows[0] if rows else {}
    ax.set_title(f"B={r.get('B')} H={r.get('Hq')}/{r.get('Hkv')} L={r.get('Lq')} D={r.get('D')} {r.get('dtype')} "
                 f"on {r.get('gpu')}" + (" (interpreter dry run)" if r.get("device") == "cpu" else ""), fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


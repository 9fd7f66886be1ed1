"""Benchmark harness: attndsl against FlexAttention (and SDPA) in one process, one run.

Follows ``shared/bench/README.md``:

* ours twice: the one-shot ``attndsl.attention(q, k, v, mask_mod=..., score_mod=...)`` as model
  code calls it (every call pays its own host work and block table; api "attention") and a
  pattern ``attndsl.compile``d once with its block table built once (api "compiled"); then
  FlexAttention (``torch.compile(flex_attention, dynamic=False)`` with ``create_block_mask``
  built once and reused) and SDPA where the pattern allows, on the same fresh random inputs,
  one after the other; model-shaped cases fix their own shapes, and the transformer-block case
  times a whole ``torch.compile``d block with each attention inside (``run_block_case``);
* host time per call (a loop of calls with no sync, ``time.perf_counter`` ÷ the count) for
  every timed callable, next to its GPU time;
* every case is checked before it is timed (ours vs Flex on the benchmark inputs, and ours vs
  the float64 ``attndsl.reference`` at a small size in fp32); a case that fails is reported
  and not timed;
* ``triton.testing.do_bench(fn, warmup=50, rep=200, return_mode="median")``; the mask
  builders (Flex ``create_block_mask``, our block-table kernel) are timed separately, and the
  timed attention calls reuse the mask built once;
* effective TFLOP/s on the attended fraction ``4*B*H*Lq*Lkv*D*density`` (x2.5 fwd+bwd);
* peak memory via ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``.

Robustness: by default the cases run in a worker subprocess supervised by this process. A
case that raises is reported and the next one runs; a worker that dies (segfault, a sticky
CUDA error such as an illegal address, a hang past ``--case-timeout-s``) is replaced by a
fresh worker that carries on with the remaining cases. A global ``--budget-s`` keeps the
whole run inside one device call; cases it cannot reach are reported as skipped. One JSON
line is printed per case as it finishes, the detailed JSON log (``$OUT/bench.json`` or ``--json``)
and the results file (``benchmarks/results.py``: ``<gpu>-<yyyy-mm-dd>.json`` in ``--results-dir``,
one row per case x pass x api) are rewritten after every case, and a markdown table ends the run.
``python -m benchmarks.table`` turns the newest results file into BENCHMARKS.md's table.

Nothing here touches the GPU at import time.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import fnmatch
import gc
import json
import math
import os
import platform
import queue
import shlex
import signal
import statistics
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

from . import cases as _cases
from . import results as _results
from .measures import (  # noqa: F401 (benchmarks.harness.X stays their public path)
    FWD_BWD_FLOP_FACTOR, HOST_LOOPS, _err, _r, _randn, attention_flops, host_calls, mask_density,
    ratio, rel_error, tflops)

# --------------------------------------------------------------------------------------
# protocol constants
# --------------------------------------------------------------------------------------
WARMUP_MS = 50
REP_MS = 200
OUT_TOL = 2e-2        # ||ours - flex|| / ||flex|| on the benchmark inputs (bf16)
GRAD_TOL = 2e-2       # same for dq, dk, dv with --bwd
REF_TOL = 1e-2        # ||ours - ref|| / ||ref|| at the small size, fp32 inputs vs float64
REF_LSE_TOL = 2e-2    # max |lse_ours - lse_ref| over finite entries at the small size
REF_HEADS = 2         # heads of the small reference check
PROTO_PREFIX = "@@attndsl-bench "
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
MIB = 2.0**20
def _dims(r: Dict[str, Any]) -> str:
    """The head dims of a result row: ``D``, or ``D/Dv`` when the value head dim differs."""
    return str(r.get("D")) if r.get("Dv") in (None, r.get("D")) else f"{r.get('D')}/{r.get('Dv')}"


def lse_error(ours: "torch.Tensor", ref: "torch.Tensor"):
    """(max |ours-ref| over entries finite in both, number of entries whose finiteness differs)."""
    ours = ours.detach().double().to(ref.device).reshape(ref.shape)
    ref = ref.detach().double()
    fo, fr = torch.isfinite(ours), torch.isfinite(ref)
    mismatch = int((fo != fr).sum().item())
    both = fo & fr
    err = (ours - ref).abs()[both].max().item() if bool(both.any()) else 0.0
    return err, mismatch


def dense_reference(q, k, v, mask_mod=None, score_mod=None, scale=None):
    """Dense float64 attention evaluating the FlexAttention functions by broadcasting.

    Used by the FlexAttention stand-in (``--ours flex``) and the tests; the real check uses
    ``attndsl.reference.attention``. Returns (out [B,H,Lq,D] float64, lse [B,H,Lq] float64);
    fully masked rows give out 0 and lse -inf.
    """
    B, H, Lq, D = q.shape
    Hkv, Lkv = k.shape[1], k.shape[2]
    qd, kd, vd = q.double(), k.double(), v.double()
    if Hkv != H:
        kd = kd.repeat_interleave(H // Hkv, dim=1)
        vd = vd.repeat_interleave(H // Hkv, dim=1)
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    s = (qd @ kd.transpose(-1, -2)) * scale
    dev = q.device
    b = torch.arange(B, device=dev).view(B, 1, 1, 1)
    h = torch.arange(H, device=dev).view(1, H, 1, 1)
    qi = torch.arange(Lq, device=dev).view(1, 1, Lq, 1)
    ki = torch.arange(Lkv, device=dev).view(1, 1, 1, Lkv)
    if score_mod is not None:
        s = torch.broadcast_to(torch.as_tensor(score_mod(s, b, h, qi, ki)), s.shape).double()
    if mask_mod is not None:
        m = torch.broadcast_to(torch.as_tensor(mask_mod(b, h, qi, ki), device=dev), s.shape)
        s = s.masked_fill(~m.bool(), -math.inf)
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse[..., None])
    p = torch.nan_to_num(p, nan=0.0)
    return p @ vd, lse


# ---- formatting ----------------------------------------------------------------------

def _num(x, digits=3) -> str:
    if x is None:
        return "—"
    if isinstance(x, float) and (math.isnan(x) or math.isinf(x)):
        return str(x)
    return f"{x:.{digits}f}"


def _sci(x) -> str:
    return "—" if x is None else f"{x:.1e}"


def _md_escape(s: str, limit: int = 90) -> str:
    s = " ".join(str(s).split()).replace("|", "\\|")
    return s if len(s) <= limit else s[: limit - 1] + "…"


def _pair(a, b, digits=0) -> str:
    if a is None and b is None:
        return "—"
    return f"{_num(a, digits)} / {_num(b, digits)}"


def _ratio_cell(x) -> str:
    return "—" if x is None else f"{x:.2f}×"


def _status_cell(r: Dict[str, Any]) -> str:
    st = r.get("status")
    if st == "ok":
        s = f"ok {_sci(r.get('check_rel_err_flex'))}"
        if r.get("ref_rel_err") is not None:
            s += f", ref {_sci(r.get('ref_rel_err'))} @L={r.get('ref_L')}"
        return s
    if st == "failed":
        return "**FAILED** " + _md_escape(r.get("check_detail") or "")
    if st == "skipped":
        return "skipped: " + _md_escape(r.get("error") or "")
    ph = r.get("phase")
    return f"**{str(st).upper()}**" + (f" ({ph})" if ph else "") + " " + _md_escape(r.get("error") or "")


def _table_cell(r):
    kind = r.get("ours_table")
    if kind == "device_table":
        return f"{_num(r.get('ours_table_ms'), 3)} (built once, reused)"
    if kind == "closed_form":
        return "closed form"
    return "—"


def _compile_cell(r):
    ours = None
    if r.get("ours_compile_s") is not None or r.get("ours_first_call_s") is not None:
        ours = (r.get("ours_compile_s") or 0.0) + (r.get("ours_first_call_s") or 0.0)
    return _pair(ours, r.get("flex_compile_s"), 1)


def header_line(meta: Dict[str, Any]) -> str:
    Ls = meta.get("L")
    return (f"GPU: {meta.get('gpu', '?')} · torch {meta.get('torch', '?')} · triton "
            f"{meta.get('triton', '?')} · CUDA {meta.get('cuda', '?')} · ours = {meta.get('ours', '?')} · "
            f"{meta.get('dtype', '?')}, B={meta.get('B')}, H={meta.get('H')}, Hkv={meta.get('Hkv')}, "
            f"L={Ls}, D={meta.get('D')}{', Dv=' + str(meta['Dv']) if meta.get('Dv') else ''} · do_bench(warmup={WARMUP_MS}, rep={REP_MS}, median)")


def markdown_report(results: Sequence[Dict[str, Any]], meta: Optional[Dict[str, Any]] = None) -> str:
    """Tables for BENCHMARKS.md: forward, then forward+backward when any case has it."""
    meta = meta or {}
    out = []
    if meta:
        out.append(header_line(meta))
        if not meta.get("protocol", True):
            out.append("")
            out.append("**Not a protocol figure** (" + _md_escape(meta.get("protocol_note", ""), 200) + ")")
        out.append("")
    out.append("| case | L | D | density | ours ms | Flex ms | SDPA ms | Flex/ours | SDPA/ours "
               "| ours TFLOP/s | Flex TFLOP/s | ours table ms | Flex create_block_mask ms "
               "| peak MiB ours / Flex | compile s ours / Flex | check |")
    out.append("|" + "---|" * 16)
    for r in results:
        out.append("| " + " | ".join([
            str(r.get("case")), str(r.get("L")), _dims(r), _num(r.get("density"), 4),
            _num(r.get("ours_ms")), _num(r.get("flex_ms")), _num(r.get("sdpa_ms")),
            _ratio_cell(r.get("flex_over_ours")), _ratio_cell(r.get("sdpa_over_ours")),
            _num(r.get("ours_tflops"), 1), _num(r.get("flex_tflops"), 1),
            _table_cell(r), _num(r.get("flex_block_mask_ms"), 3),
            _pair(r.get("ours_peak_mib"), r.get("flex_peak_mib")), _compile_cell(r),
            _status_cell(r)]) + " |")
    bwd = [r for r in results if r.get("bwd")]
    if bwd:
        out.append("")
        out.append(f"Forward+backward (`out.backward(do)`, grads set to None between calls; "
                   f"TFLOP/s with ×{FWD_BWD_FLOP_FACTOR}):")
        out.append("")
        out.append("| case | L | D | ours ms | Flex ms | SDPA ms | Flex/ours | SDPA/ours | ours TFLOP/s "
                   "| Flex TFLOP/s | peak MiB ours / Flex | grad check |")
        out.append("|" + "---|" * 12)
        for r in bwd:
            st = r.get("bwd_status") or ("not run: " + str(r.get("status")))
            if st == "ok":
                st = "ok " + "/".join(_sci(r.get(f"grad_rel_err_{n}")) for n in ("dq", "dk", "dv"))
                if r.get("flex_bwd_error"):
                    st = "ok (finite; Flex's backward failed: " + _md_escape(r["flex_bwd_error"]) + ")"
            elif r.get("bwd_error"):
                st = f"**{str(st).upper()}** " + _md_escape(r.get("bwd_error"))
            out.append("| " + " | ".join([
                str(r.get("case")), str(r.get("L")), _dims(r),
                _num(r.get("ours_fwd_bwd_ms")), _num(r.get("flex_fwd_bwd_ms")), _num(r.get("sdpa_fwd_bwd_ms")),
                _ratio_cell(r.get("flex_over_ours_fwd_bwd")), _ratio_cell(r.get("sdpa_over_ours_fwd_bwd")),
                _num(r.get("ours_fwd_bwd_tflops"), 1), _num(r.get("flex_fwd_bwd_tflops"), 1),
                _pair(r.get("ours_fwd_bwd_peak_mib"), r.get("flex_fwd_bwd_peak_mib")), st]) + " |")
    out.append("")
    out.append("ours table: time of our block-table kernel (`attn.build_block_tables`), built once and "
               "passed to every timed call; \"closed form\" = the mask was analysed in closed form and "
               "needs no table. Flex's `create_block_mask` is likewise built once, timed separately. "
               "Ratios are anchor ms ÷ ours ms (> 1: ours faster). Check: ‖ours−Flex‖/‖Flex‖ on the "
               "benchmark inputs, and vs the float64 reference at the small size (fp32 inputs).")
    return "\n".join(out)


# --------------------------------------------------------------------------------------
# configuration
# --------------------------------------------------------------------------------------

@dataclasses.dataclass
class BenchConfig:
    cases: List[str]
    Ls: List[int]
    Ds: List[int]
    #: the value head dim (None: each D), for MLA-style calls (``--D 192 --Dv 128``)
    Dv: Optional[int] = None
    B: int = 1
    H: int = 16
    Hkv: Optional[int] = None
    dtype: str = "bf16"
    bwd: bool = False
    quick: bool = False
    device: str = "cuda"
    ours: str = "attndsl"
    ref_L: Optional[int] = None
    tol: float = OUT_TOL
    grad_tol: float = GRAD_TOL
    ref_tol: float = REF_TOL
    seed: int = 0
    budget_s: float = 420.0
    case_timeout_s: float = 240.0
    isolate: bool = True
    json_path: Optional[str] = None
    md_path: Optional[str] = None
    #: where the results file ``<gpu>-<yyyy-mm-dd>.json`` goes (None: not written)
    results_dir: Optional[str] = None
    #: the commit the figures belong to (default: git HEAD of the checkout, when there is one)
    commit: Optional[str] = None
    #: the command line, as recorded in the results
    command: str = "python -m benchmarks"

    @property
    def hkv(self) -> int:
        return self.H if self.Hkv is None else self.Hkv

    def dims(self, name: str):
        """(B, Hq, Hkv) of a case: a model case's own shape, else the configured one (a case's
        ``default_hkv`` where --Hkv is not given)."""
        c = _cases.get_case(name)
        sh = c.shape or {}
        H = sh.get("H", self.H)
        Hkv = sh.get("Hkv", self.Hkv if self.Hkv is not None else (c.default_hkv or H))
        return sh.get("B", self.B), H, Hkv

    def jobs(self):
        """(case_name, L, D) in run order; a case with fixed_L runs once per D, a model-shaped case
        (fixed shape) once."""
        seen, out = set(), []
        for L in self.Ls:
            for D in self.Ds:
                for name in self.cases:
                    c = _cases.get_case(name)
                    sh = c.shape or {}
                    key = (name, sh.get("L", c.fixed_L or L), sh.get("D", D))
                    if key not in seen:
                        seen.add(key)
                        out.append(key)
        return out


def _int_list(s: str) -> List[int]:
    try:
        vals = [int(x) for x in str(s).replace(" ", "").split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}")
    if not vals or any(v <= 0 for v in vals):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {s!r}")
    return vals


def resolve_cases(spec: Optional[str], quick: bool = False) -> List[str]:
    """Comma list of names, fnmatch globs or groups (``_cases.GROUPS``: default, quick, models,
    protocol, locality, learnable, full); 'all' = every registered case."""
    if not spec:
        return list(_cases.QUICK_CASES if quick else _cases.DEFAULT_CASES)
    names: List[str] = []
    for item in (x.strip() for x in spec.split(",")):
        if not item:
            continue
        if item == "all":
            hits = _cases.case_names()
        elif item in _cases.GROUPS:
            hits = list(_cases.GROUPS[item])
        elif any(ch in item for ch in "*?["):
            hits = [n for n in _cases.case_names() if fnmatch.fnmatchcase(n, item)]
        else:
            hits = [item] if item in _cases.CASES else []
        if not hits:
            raise ValueError(f"unknown benchmark case {item!r}; known: {', '.join(_cases.case_names())}; "
                             f"groups: {', '.join(_cases.GROUPS)}")
        names += [h for h in hits if h not in names]
    return names


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--cases", default=None,
                   help="comma list of cases, globs or groups (" + ", ".join(_cases.GROUPS) + "); 'all' for "
                        f"every registered case (default: {','.join(_cases.DEFAULT_CASES)}); 'full' is the "
                        "table of BENCHMARKS.md, model-shaped cases first")
    p.add_argument("--L", type=_int_list, default=None,
                   help="sequence length(s), comma list (default 16384; 4096 with --quick)")
    p.add_argument("--D", type=_int_list, default=[128], help="head dim(s), comma list (default 128)")
    p.add_argument("--Dv", type=int, default=None,
                   help="value head dim, apart from the query/key one (default: D; MLA-style: --D 192 --Dv 128)")
    p.add_argument("--B", type=int, default=1)
    p.add_argument("--H", type=int, default=16, help="query heads (default 16)")
    p.add_argument("--Hkv", type=int, default=None, help="key/value heads for GQA (default: H)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--bwd", action="store_true", help="also time forward+backward")
    p.add_argument("--quick", action="store_true",
                   help=f"L=4096 and cases {','.join(_cases.QUICK_CASES)} unless --L/--cases are given "
                        "(timing method unchanged)")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                   help="cpu = dry run of the harness itself (eager Flex, wall-clock timer): not a protocol figure")
    p.add_argument("--ours", choices=["attndsl", "flex"], default="attndsl",
                   help="'flex' replaces ours by a FlexAttention stand-in (self-check of the harness: ratios ~1)")
    p.add_argument("--ref-L", type=int, default=None,
                   help="length of the float64 reference check (default: per case, 256 for most)")
    p.add_argument("--tol", type=float, default=OUT_TOL, help=f"ours vs Flex relative error bound ({OUT_TOL})")
    p.add_argument("--grad-tol", type=float, default=GRAD_TOL, help=f"same for dq/dk/dv ({GRAD_TOL})")
    p.add_argument("--ref-tol", type=float, default=REF_TOL, help=f"ours vs float64 reference ({REF_TOL})")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--budget-s", type=float, default=420.0,
                   help="wall-clock budget of the whole run; cases not started in time are skipped (420)")
    p.add_argument("--case-timeout-s", type=float, default=240.0,
                   help="a case running longer is killed with its worker and reported (240)")
    p.add_argument("--no-isolate", dest="isolate", action="store_false",
                   help="run the cases in this process (no worker subprocess, no restart after a crash)")
    p.add_argument("--json", dest="json_path", default=None,
                   help="write the detailed per-case log here (default: $OUT/bench.json when $OUT is set)")
    p.add_argument("--results-dir", default=None,
                   help="write the results file <gpu>-<yyyy-mm-dd>.json (rows: case x pass x api) here "
                        "(default: $OUT/benchmarks/results when $OUT is set, else the repository's "
                        "benchmarks/results for a GPU run of attndsl; dry runs write none unless asked)")
    p.add_argument("--commit", default=None,
                   help="commit the figures belong to (default: git rev-parse --short HEAD of the checkout)")
    p.add_argument("--list", action="store_true", help="list the registered cases and exit")
    # internal: worker mode
    p.add_argument("--worker-jobs", default=None, help=argparse.SUPPRESS)
    p.add_argument("--deadline", type=float, default=None, help=argparse.SUPPRESS)
    return p


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Time attndsl against FlexAttention and SDPA (shared/bench/README.md protocol).")
    return add_arguments(p)


def config_from_args(ns: argparse.Namespace) -> BenchConfig:
    Ls = ns.L or ([4096] if ns.quick else [16384])
    cfg = BenchConfig(cases=resolve_cases(ns.cases, ns.quick), Ls=list(Ls), Ds=list(ns.D), Dv=ns.Dv, B=ns.B, H=ns.H,
                      Hkv=ns.Hkv, dtype=ns.dtype, bwd=ns.bwd, quick=ns.quick, device=ns.device,
                      ours=ns.ours, ref_L=ns.ref_L, tol=ns.tol, grad_tol=ns.grad_tol, ref_tol=ns.ref_tol,
                      seed=ns.seed, budget_s=ns.budget_s, case_timeout_s=ns.case_timeout_s,
                      isolate=ns.isolate, json_path=ns.json_path, results_dir=ns.results_dir, commit=ns.commit)
    if cfg.json_path is None and os.environ.get("OUT"):
        cfg.json_path = os.path.join(os.environ["OUT"], "bench.json")
    if cfg.results_dir is None:
        if os.environ.get("OUT"):
            cfg.results_dir = os.path.join(os.environ["OUT"], "benchmarks", "results")
        elif cfg.device == "cuda" and cfg.ours == "attndsl":
            cfg.results_dir = str(_repo_root() / "benchmarks" / "results")
    if cfg.json_path:
        cfg.md_path = os.path.splitext(cfg.json_path)[0] + ".md"
    for name in cfg.cases:
        B, H, Hkv = cfg.dims(name)
        if H % Hkv:
            raise ValueError(f"H={H} is not a multiple of Hkv={Hkv} (case {name})")
    return cfg


# --------------------------------------------------------------------------------------
# timing / memory back ends
# --------------------------------------------------------------------------------------

class CudaBackend:
    name = "cuda"
    protocol = True

    def __init__(self):
        from triton.testing import do_bench
        self._do_bench = do_bench
        self.device = torch.device("cuda")

    def bench(self, fn, grad_to_none=None) -> float:
        return float(self._do_bench(fn, warmup=WARMUP_MS, rep=REP_MS, grad_to_none=grad_to_none,
                                    return_mode="median"))

    def sync(self):
        torch.cuda.synchronize()

    def peak_mib(self, fn):
        """(peak MiB, MiB above what was allocated when the call started) for one call of fn."""
        self.sync()
        gc.collect()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        res = fn()
        self.sync()
        peak = torch.cuda.max_memory_allocated()
        del res
        return peak / MIB, (peak - base) / MIB

    def host_us(self, fn, n: int, grad_to_none=None) -> float:
        """Host time per call in µs: the median over ``HOST_LOOPS`` loops of ``n`` calls with no sync
        between them (``time.perf_counter``), ÷ n; the queue is drained before each loop."""
        fn()
        per_call = []
        for _ in range(HOST_LOOPS):
            self.sync()
            t0 = time.perf_counter()
            for _ in range(n):
                for t in grad_to_none or ():
                    t.grad = None
                fn()
            per_call.append((time.perf_counter() - t0) / n * 1e6)
        self.sync()
        return float(statistics.median(per_call))

    def alive(self) -> bool:
        try:
            torch.cuda.synchronize()
            return torch.ones(4, device="cuda").sum().item() == 4.0
        except Exception:
            return False

    def cleanup(self):
        gc.collect()
        try:
            torch.cuda.empty_cache()
        except Exception:
            pass


class CpuBackend:
    """Dry-run back end: wall-clock medians, no memory figures. Not a protocol figure."""
    name = "cpu"
    protocol = False

    def __init__(self, reps: int = 3):
        self.reps = reps
        self.device = torch.device("cpu")

    def bench(self, fn, grad_to_none=None) -> float:
        fn()
        ts = []
        for _ in range(self.reps):
            for t in grad_to_none or ():
                t.grad = None
            t0 = time.perf_counter()
            fn()
            ts.append((time.perf_counter() - t0) * 1e3)
        return float(statistics.median(ts))

    def sync(self):
        pass

    def peak_mib(self, fn):
        fn()
        return None, None

    def host_us(self, fn, n: int, grad_to_none=None) -> float:
        n = min(n, self.reps)
        t0 = time.perf_counter()
        for _ in range(n):
            for t in grad_to_none or ():
                t.grad = None
            fn()
        return (time.perf_counter() - t0) / n * 1e6

    def alive(self) -> bool:
        return True

    def cleanup(self):
        gc.collect()


# --------------------------------------------------------------------------------------
# "ours": attndsl, or a FlexAttention stand-in for self-checking the harness
# --------------------------------------------------------------------------------------

class Ours:
    """What the harness needs from the implementation under test."""

    def __init__(self, name, compile_fn, reference_fn, version="?", attention_fn=None):
        self.name, self.compile, self.reference, self.version = name, compile_fn, reference_fn, version
        #: the one-shot call ``attention(q, k, v, mask_mod=..., score_mod=..., ...)``
        self.attention = attention_fn


def load_ours(kind: str, flex_fn) -> Ours:
    if kind == "attndsl":
        import attndsl  # lazily: the core may be unfinished when this module is imported
        import attndsl.reference as ref
        return Ours("attndsl", attndsl.compile, ref.attention, getattr(attndsl, "__version__", "?"),
                    attndsl.attention)
    if kind == "flex":
        def attention(q, k, v, mask_mod=None, score_mod=None, scale=None, return_lse=False):
            return _FlexStandIn(flex_fn, mask_mod, score_mod)(q, k, v, scale=scale, return_lse=return_lse)
        return Ours("flex-standin", lambda mask_mod=None, score_mod=None, **kw:
                    _FlexStandIn(flex_fn, mask_mod, score_mod), dense_reference, torch.__version__, attention)
    raise ValueError(f"unknown implementation {kind!r}")


class _FlexStandIn:
    """The CompiledAttention contract, served by FlexAttention (harness self-check only)."""

    def __init__(self, flex_fn, mask_mod, score_mod):
        self.flex, self.mask_mod, self.score_mod = flex_fn, mask_mod, score_mod

    def build_block_tables(self, q, k, v=None):
        if self.mask_mod is None:
            return None
        from torch.nn.attention.flex_attention import create_block_mask
        return create_block_mask(self.mask_mod, None, None, q.shape[-2], k.shape[-2], device=q.device)

    def __call__(self, q, k, v, scale=None, return_lse=False, block_tables=None):
        bm = block_tables if block_tables is not None else self.build_block_tables(q, k)
        kw = dict(score_mod=self.score_mod, block_mask=bm, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
        if not return_lse:
            return self.flex(q, k, v, **kw)
        try:
            from torch.nn.attention.flex_attention import AuxRequest
        except ImportError:  # older torch
            return self.flex(q, k, v, return_lse=True, **kw)
        out, aux = self.flex(q, k, v, return_aux=AuxRequest(lse=True), **kw)
        return out, aux.lse

    def explain(self):
        return "FlexAttention stand-in (harness self-check)"


# --------------------------------------------------------------------------------------
# one case
# --------------------------------------------------------------------------------------

class Context:
    """Per-process state: back end, compiled Flex, the implementation under test."""

    def __init__(self, cfg: BenchConfig):
        self.cfg = cfg
        self.backend = CudaBackend() if cfg.device == "cuda" else CpuBackend()
        self.device = self.backend.device
        self.dtype = DTYPES[cfg.dtype]
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        for attr in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit",
                     "accumulated_cache_size_limit"):
            if hasattr(torch._dynamo.config, attr):
                setattr(torch._dynamo.config, attr, max(256, getattr(torch._dynamo.config, attr) or 0))
        self.create_block_mask = create_block_mask
        if cfg.device == "cuda":
            self.flex = torch.compile(flex_attention, dynamic=False)
        else:
            self.flex = flex_attention  # eager on CPU: a dry run of the harness only
        self._ours = None
        self._ours_error = None

    def ours(self) -> Ours:
        if self._ours is None and self._ours_error is None:
            try:
                self._ours = load_ours(self.cfg.ours, self.flex)
            except Exception as e:  # reported by every case that needs it
                self._ours_error = f"{type(e).__name__}: {e}"
                self._ours_tb = traceback.format_exc(limit=8)
        if self._ours is None:
            raise RuntimeError(f"cannot load the implementation under test: {self._ours_error}")
        return self._ours


def environment_meta(cfg: BenchConfig, ctx: Optional[Context] = None) -> Dict[str, Any]:
    meta: Dict[str, Any] = dict(
        torch=torch.__version__, cuda=torch.version.cuda, python=platform.python_version(),
        dtype=cfg.dtype, B=cfg.B, H=cfg.H, Hkv=cfg.hkv, L=cfg.Ls, D=cfg.Ds, Dv=cfg.Dv, bwd=cfg.bwd,
        cases=cfg.cases, ours=("flex-standin" if cfg.ours == "flex" else cfg.ours),
        do_bench=f"warmup={WARMUP_MS}, rep={REP_MS}, return_mode=median",
        fwd_bwd_flop_factor=FWD_BWD_FLOP_FACTOR, tolerances=dict(flex=cfg.tol, grad=cfg.grad_tol, ref=cfg.ref_tol),
        started=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        protocol=cfg.device == "cuda" and cfg.ours == "attndsl")
    if not meta["protocol"]:
        meta["protocol_note"] = ("device=cpu dry run" if cfg.device != "cuda" else
                                 "ours replaced by the FlexAttention stand-in")
    try:
        import triton
        meta["triton"] = triton.__version__
    except Exception as e:
        meta["triton"] = f"unavailable ({type(e).__name__})"
    try:
        meta["gpu"] = torch.cuda.get_device_name() if cfg.device == "cuda" else platform.processor() or "cpu"
    except Exception as e:
        meta["gpu"] = f"unavailable ({type(e).__name__}: {e})"
    meta["git"] = cfg.commit or git_commit()
    meta["commit"] = meta["git"]
    meta["command"] = cfg.command
    return meta


def git_commit() -> Optional[str]:
    """``git rev-parse --short HEAD`` of this checkout (None where there is no git or no repository)."""
    try:
        out = subprocess.run(["git", "-C", str(_repo_root()), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except Exception:
        return None


def _call_ours(attn, q, k, v, tables, extra):
    kw = dict(extra)
    if tables is not None:
        kw["block_tables"] = tables
    return attn(q, k, v, **kw)


def _first(x):
    return x[0] if isinstance(x, (tuple, list)) else x


def _check_finite_nonzero(o, what) -> Optional[str]:
    bad = int((~torch.isfinite(o.float())).sum().item())
    if bad:
        return f"{what}: {bad} non-finite values"
    if not bool((o != 0).any()):
        return f"{what}: all zeros"
    return None


def reference_check(case: _cases.Case, D: int, cfg: BenchConfig, ctx: Context, ours: Ours,
                    Dv: Optional[int] = None, gqa: bool = False) -> Dict[str, Any]:
    """ours (fp32 inputs) vs the float64 reference at a small size; returns result fields."""
    Ls = cfg.ref_L or case.small_L
    H = REF_HEADS
    Hkv = 1 if gqa else H
    dev = ctx.device
    inst = case.build(L=Ls, H=H, device=dev, seed=cfg.seed + 1, dtype=torch.float32)
    gen = torch.Generator(device=dev)
    gen.manual_seed(_cases.case_seed(case.name, cfg.seed + 1))
    q = _randn((1, H, Ls, D), torch.float32, dev, gen)
    k = _randn((1, Hkv, Ls, D), torch.float32, dev, gen)
    v = _randn((1, Hkv, Ls, Dv or D), torch.float32, dev, gen)
    attn = ours.compile(mask_mod=_ours_mask(inst), score_mod=inst.score_mod, **inst.compile_kwargs)
    res = attn(q, k, v, return_lse=inst.lse, **inst.call_kwargs)
    o, lse = (res[0], res[1]) if isinstance(res, (tuple, list)) else (res, None)
    ref_o, ref_lse = ours.reference(q, k, v, mask_mod=inst.mask_mod, score_mod=inst.score_mod, scale=None,
                                    **inst.ref_kwargs)
    out = dict(ref_L=Ls, ref_rel_err=_r(rel_error(o, ref_o), 8))
    problems = []
    bad = _check_finite_nonzero(o, "ref-size output")
    if bad:
        problems.append(bad)
    if not (out["ref_rel_err"] < cfg.ref_tol):
        problems.append(f"ref rel err {out['ref_rel_err']:.3g} >= {cfg.ref_tol:g} at L={Ls}")
    if lse is not None and ref_lse is not None:
        err, mismatch = lse_error(lse, ref_lse)
        out["ref_lse_max_abs_err"] = _r(err, 8)
        if mismatch:
            problems.append(f"lse finiteness differs in {mismatch} rows")
        if not (err < REF_LSE_TOL):
            problems.append(f"lse max abs err {err:.3g} >= {REF_LSE_TOL:g}")
    out["_problems"] = problems
    return out


def _ours_mask(inst):
    """The mask ours compiles: ``inst.ours_mask_mod`` unless it is SAME (selector cases differ from Flex)."""
    m = getattr(inst, "ours_mask_mod", "same")
    return inst.mask_mod if isinstance(m, str) and m == "same" else m


def attention_kwargs(attention_fn: Callable, inst: _cases.CaseInstance):
    """Keyword arguments of the one-shot call for a case, as model code writes it: the mask and score
    mod, the per-call tensors, and those compile options the one-shot call takes (``normalizer``);
    returns (kwargs, names of compile options it does not take, e.g. tile sizes)."""
    import inspect
    try:
        params = inspect.signature(attention_fn).parameters
        takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    except (TypeError, ValueError):
        params, takes_any = {}, True
    kw = dict(mask_mod=_ours_mask(inst), score_mod=inst.score_mod, **inst.call_kwargs)
    dropped, tiles = [], {}
    for n, x in inst.compile_kwargs.items():
        if takes_any or n in params:
            kw[n] = x
        elif n in _TILE_OPTIONS and "kernel_options" in params:
            tiles[_TILE_OPTIONS[n]] = x  # FlexAttention's spelling of tile sizes
        else:
            dropped.append(n)
    if tiles:
        kw["kernel_options"] = tiles
    return kw, dropped


#: compile options of tiles, as FlexAttention's ``kernel_options`` (the one-shot call takes those)
_TILE_OPTIONS = {"block_m": "BLOCK_M", "block_n": "BLOCK_N", "num_warps": "num_warps", "num_stages": "num_stages"}


def run_case(name: str, L: int, D: int, cfg: BenchConfig, ctx: Context) -> Dict[str, Any]:
    """Check, then time one case. Never raises: errors land in the returned dict."""
    B, H, Hkv = cfg.dims(name)
    case = _cases.get_case(name)
    r: Dict[str, Any] = dict(case=name, family=case.family, L=L, B=B, H=H, Hkv=Hkv, D=D, dtype=cfg.dtype,
                             bwd=cfg.bwd, status="error", phase="setup")
    if cfg.Dv is not None and case.shape is None:
        r["Dv"] = cfg.Dv
    t_case = time.time()
    try:
        if case.runner == "block":
            from .block import run_block_case  # a whole torch.compile'd transformer block
            run_block_case(r, name, L, D, cfg, ctx)
        else:
            _run_case_inner(r, name, L, D, cfg, ctx)
    except Exception as e:
        r["status"] = "error"
        r["error"] = f"{type(e).__name__}: {e}"[:2000]
        r["traceback"] = traceback.format_exc(limit=12)[-6000:]
        if r.get("bwd_status") == "running":
            r["bwd_status"] = "error"
            r["bwd_error"] = r["error"]
            r["status"] = "ok"  # the forward part finished and stands
            r.pop("phase", None)
    finally:
        r["wall_s"] = round(time.time() - t_case, 2)
        ctx.backend.cleanup()
    if r.get("status") == "ok":
        r.pop("phase", None)
    return r


def _sdpa_callable(inst, gqa):
    """SDPA serving the case on (q, k, v), or None where it does not apply."""
    import torch.nn.functional as F
    if inst.sdpa is not None:
        causal = inst.sdpa == "causal"
        kw = dict(enable_gqa=True) if gqa else {}
        return lambda a, b_, c: F.scaled_dot_product_attention(a, b_, c, is_causal=causal, **kw)
    if inst.sdpa_fn is not None:
        return inst.sdpa_fn
    return None


def _run_case_inner(r, name, L, D, cfg, ctx):
    be, dev, dt = ctx.backend, ctx.device, ctx.dtype
    B, H, Hkv = r["B"], r["H"], r["Hkv"]
    Dv = r.get("Dv")
    case = _cases.get_case(name)
    r["description"] = case.description

    r["phase"] = "build"
    inst = case.build(L=L, H=H, B=B, device=dev, seed=cfg.seed, dtype=dt)
    if inst.notes:
        r["notes"] = inst.notes
    gen = torch.Generator(device=dev)
    gen.manual_seed(_cases.case_seed(name, cfg.seed))
    q = _randn((B, H, L, D), dt, dev, gen)
    k = _randn((B, Hkv, L, D), dt, dev, gen)
    v = _randn((B, Hkv, L, Dv or D), dt, dev, gen)
    gqa = H != Hkv
    r["density"] = _r(inst.density if getattr(inst, "density", None) is not None else
                      mask_density(inst.mask_mod, L, L, dev, B=B, H=H, uses_bh=inst.mask_uses_bh), 6)
    use_flex = getattr(inst, "flex", True)

    # ---- ours, compiled: compile, block table (built once), first call ----
    r["phase"] = "ours.load"
    ours = ctx.ours()
    r["phase"] = "ours.compile"
    t0 = time.time()
    attn = ours.compile(mask_mod=_ours_mask(inst), score_mod=inst.score_mod, **inst.compile_kwargs)
    r["ours_compile_s"] = _r(time.time() - t0, 3)
    r["phase"] = "ours.build_block_tables"
    builder = getattr(attn, "build_block_tables", None)
    tables = None
    if builder is not None:
        be.sync()
        t0 = time.time()
        tables = builder(q, k, v)
        be.sync()
        if tables is not None:
            r["ours_table_first_ms"] = _r((time.time() - t0) * 1e3, 3)
    r["ours_table"] = ("device_table" if tables is not None else
                       "closed_form" if inst.mask_mod is not None and builder is not None else "none")
    r["ours_table_reused"] = tables is not None
    r["phase"] = "ours.first_call"
    t0 = time.time()
    o = _first(_call_ours(attn, q, k, v, tables, inst.call_kwargs))
    be.sync()
    r["ours_first_call_s"] = _r(time.time() - t0, 3)

    # ---- ours, one-shot: attndsl.attention(q, k, v, mask_mod=..., ...) as model code calls it ----
    r["phase"] = "attention.first_call"
    att_kw, dropped = attention_kwargs(ours.attention, inst)
    if dropped:
        r["att_dropped_kwargs"] = dropped
    att_call = lambda a, b_, c: ours.attention(a, b_, c, **att_kw)  # noqa: E731
    o_att = None
    try:
        t0 = time.time()
        o_att = _first(att_call(q, k, v))
        be.sync()
        r["att_first_call_s"] = _r(time.time() - t0, 3)
    except Exception as e:  # the compiled rows still stand
        r["att_status"], r["att_error"] = "error", _err(e)
        att_call = None

    # ---- Flex: block mask (built once), compile ----
    r["phase"] = "flex.create_block_mask"
    bm = None
    if inst.mask_mod is not None and use_flex:
        bmB, bmH = (B, H) if inst.mask_uses_bh else (None, None)
        be.sync()
        t0 = time.time()
        bm = ctx.create_block_mask(inst.mask_mod, bmB, bmH, L, L, device=dev)
        be.sync()
        r["flex_block_mask_first_s"] = _r(time.time() - t0, 3)
        try:
            r["flex_block_sparsity"] = _r(bm.sparsity(), 2)
        except Exception:
            pass
    r["phase"] = "flex.compile"
    flex_fn = lambda: ctx.flex(q, k, v, score_mod=inst.score_mod, block_mask=bm, enable_gqa=gqa)  # noqa: E731
    o_flex = None
    if use_flex:
        t0 = time.time()
        try:
            o_flex = flex_fn()
            be.sync()
            r["flex_compile_s"] = _r(time.time() - t0, 2)
        except Exception as e:  # Flex failing to compile a pattern (InductorError, shared memory) is
            # a finding about Flex: ours is still checked (SDPA, the float64 reference) and timed
            r["flex_error"] = _err(e)
            use_flex = False
            if not ctx.backend.alive():
                raise
    if not use_flex:
        flex_fn = None
        r.setdefault("flex_skipped", "FlexAttention not run for this case (see notes / flex_error)")
    sdpa_call = _sdpa_callable(inst, gqa)
    sdpa_fn = (lambda: sdpa_call(q, k, v)) if sdpa_call is not None else None  # noqa: E731

    # ---- checks before timing: ours against Flex (or SDPA where Flex does not run) ----
    r["phase"] = "check"
    problems = []
    anchor, o_anchor = ("flex", o_flex) if use_flex else (("sdpa", sdpa_fn()) if sdpa_fn is not None else (None, None))
    r["check_anchor"] = anchor
    r["check_rel_err_flex"] = _r(rel_error(o, o_flex), 8) if use_flex else None
    if anchor == "sdpa":
        r["check_rel_err_sdpa"] = _r(rel_error(o, o_anchor), 8)
    for t, what in ((o, "ours"), (o_anchor, anchor)):
        bad = _check_finite_nonzero(t, what) if t is not None else None
        if bad:
            problems.append(bad)
    r["check_nonfinite"] = int((~torch.isfinite(o.float())).sum().item())
    if o_anchor is not None:
        if tuple(o.shape) != tuple(o_anchor.shape):
            problems.append(f"shape {tuple(o.shape)} vs {anchor} {tuple(o_anchor.shape)}")
        else:
            e = rel_error(o, o_anchor)
            if not (e < cfg.tol):
                problems.append(f"rel err vs {anchor} {e:.3g} >= {cfg.tol:g}")
    if o_att is not None:  # the one-shot call must give what the compiled one gives
        e = rel_error(o_att, o)
        r["check_rel_err_att"] = _r(e, 8)
        if not (e < cfg.tol) or tuple(o_att.shape) != tuple(o.shape):
            r["att_status"], r["att_error"] = "failed", f"attention vs compiled rel err {e:.3g} >= {cfg.tol:g}"
            att_call = None
    del o, o_flex, o_att, o_anchor
    r["phase"] = "check.reference"
    ref = reference_check(case, D, cfg, ctx, ours, Dv=Dv, gqa=gqa)
    problems += ref.pop("_problems")
    r.update(ref)
    if problems:
        r["status"] = "failed"
        r["check_detail"] = "; ".join(problems)
        r.pop("phase", None)
        return

    # ---- timing (forward) ----
    ours_fn = lambda: _call_ours(attn, q, k, v, tables, inst.call_kwargs)  # noqa: E731
    att_fn = (lambda: att_call(q, k, v)) if att_call is not None else None  # noqa: E731
    flops = attention_flops(B, H, L, L, D, r["density"], Dv=Dv)
    timed = (("ours", ours_fn), ("att", att_fn), ("flex", flex_fn), ("sdpa", sdpa_fn))
    for who, fn in timed:
        if fn is None:
            continue
        r["phase"] = f"time.{who}"
        r[f"{who}_ms"] = _r(be.bench(fn))
        r[f"{who}_host_us"] = _r(be.host_us(fn, host_calls(r[f"{who}_ms"])), 1)
    if att_fn is not None:
        r["att_status"] = "ok"
    if tables is not None:
        r["phase"] = "time.ours_table"
        r["ours_table_ms"] = _r(be.bench(lambda: builder(q, k, v)))
    if bm is not None:
        r["phase"] = "time.flex_block_mask"
        r["flex_block_mask_ms"] = _r(be.bench(lambda: ctx.create_block_mask(inst.mask_mod, bmB, bmH, L, L,
                                                                            device=dev)))
    r["phase"] = "memory"
    for who, fn in timed:
        if fn is not None:
            r[f"{who}_peak_mib"], r[f"{who}_peak_extra_mib"] = map(lambda x: _r(x, 1), be.peak_mib(fn))
    for who in ("ours", "att", "flex", "sdpa"):
        if r.get(f"{who}_ms") is not None:
            r[f"{who}_tflops"] = _r(tflops(flops, r[f"{who}_ms"]), 1)
    r["flex_over_ours"] = _r(ratio(r.get("flex_ms"), r.get("ours_ms")), 3)
    r["sdpa_over_ours"] = _r(ratio(r.get("sdpa_ms"), r.get("ours_ms")), 3)
    r["status"] = "ok"
    r.pop("phase", None)

    if not cfg.bwd:
        return
    # ---- forward + backward ----
    r["bwd_status"] = "running"
    r["phase"] = "bwd.setup"
    qg, kg, vg = (t.detach().clone().requires_grad_() for t in (q, k, v))
    grads = [qg, kg, vg, *inst.leaves]
    do = _randn((B, H, L, Dv or D), dt, dev, gen)

    def clear():
        for t in grads:
            t.grad = None

    def make_fb(f):
        def fb():
            _first(f(qg, kg, vg)).backward(do)
        return fb

    ours_fb = make_fb(lambda a, b_, c: _call_ours(attn, a, b_, c, tables, inst.call_kwargs))
    att_fb = make_fb(att_call) if att_call is not None else None
    flex_fb = make_fb(lambda a, b_, c: ctx.flex(a, b_, c, score_mod=inst.score_mod, block_mask=bm, enable_gqa=gqa)) \
        if use_flex else None
    sdpa_fb = make_fb(sdpa_call) if sdpa_call is not None else None

    def grads_of(fb, phase):
        r["phase"] = phase
        clear()
        t0 = time.time()
        fb()
        be.sync()
        got = [t.grad for t in (qg, kg, vg)]
        clear()
        return got, time.time() - t0

    g_ours, r["ours_bwd_first_s"] = grads_of(ours_fb, "bwd.ours_first_call")
    r["ours_bwd_first_s"] = _r(r["ours_bwd_first_s"], 3)
    g_anchor, g_anchor_name = None, None
    if flex_fb is not None:
        try:
            g_anchor, t = grads_of(flex_fb, "bwd.flex_compile")
            r["flex_bwd_compile_s"], g_anchor_name = _r(t, 2), "flex"
        except Exception as e:  # e.g. Flex's backward needing more shared memory than the GPU has:
            # ours is still timed (its gradients are then checked for finiteness only here)
            r["flex_bwd_error"] = _err(e)
            flex_fb = None
    if g_anchor is None and sdpa_fb is not None:
        g_anchor, _ = grads_of(sdpa_fb, "bwd.sdpa_first_call")
        g_anchor_name = "sdpa"
    r["grad_anchor"] = g_anchor_name
    r["phase"] = "bwd.check"
    bproblems = []
    for n, a, b_ in zip(("dq", "dk", "dv"), g_ours, g_anchor or [None] * 3):
        if a is None:
            bproblems.append(f"ours gave no {n}")
            continue
        bad = _check_finite_nonzero(a, f"ours {n}")
        if bad:
            bproblems.append(bad)
        if b_ is None:
            r[f"grad_rel_err_{n}"] = None
            continue
        e = rel_error(a, b_)
        r[f"grad_rel_err_{n}"] = _r(e, 8)
        if not (e < cfg.grad_tol):
            bproblems.append(f"{n} rel err vs {g_anchor_name} {e:.3g} >= {cfg.grad_tol:g}")
    if bproblems:
        r["bwd_status"] = "failed"
        r["bwd_error"] = "; ".join(bproblems)
        r.pop("phase", None)
        return
    if att_fb is not None:
        try:
            g_att, _ = grads_of(att_fb, "bwd.attention_first_call")
            e = max(rel_error(a, b_) for a, b_ in zip(g_att, g_ours))
            r["grad_rel_err_att"] = _r(e, 8)
            if not (e < cfg.grad_tol):
                r["att_bwd_status"], r["att_bwd_error"] = "failed", f"attention vs compiled grad rel err {e:.3g}"
                att_fb = None
        except Exception as e:
            r["att_bwd_status"], r["att_bwd_error"] = "error", _err(e)
            att_fb = None
    del g_ours, g_anchor
    fb_flops = attention_flops(B, H, L, L, D, r["density"], fwd_bwd=True, Dv=Dv)
    for who, fn in (("ours", ours_fb), ("att", att_fb), ("flex", flex_fb), ("sdpa", sdpa_fb)):
        if fn is None:
            continue
        r["phase"] = f"bwd.time.{who}"
        ms = be.bench(fn, grad_to_none=grads)
        r[f"{who}_fwd_bwd_ms"] = _r(ms)
        r[f"{who}_fwd_bwd_tflops"] = _r(tflops(fb_flops, ms), 1)
        r[f"{who}_fwd_bwd_host_us"] = _r(be.host_us(fn, host_calls(ms), grad_to_none=grads), 1)
        clear()
        r["phase"] = f"bwd.memory.{who}"
        peak, extra = be.peak_mib(fn)
        r[f"{who}_fwd_bwd_peak_mib"], r[f"{who}_fwd_bwd_peak_extra_mib"] = _r(peak, 1), _r(extra, 1)
        clear()
    if att_fb is not None:
        r["att_bwd_status"] = "ok"
    r["flex_over_ours_fwd_bwd"] = _r(ratio(r.get("flex_fwd_bwd_ms"), r.get("ours_fwd_bwd_ms")), 3)
    r["sdpa_over_ours_fwd_bwd"] = _r(ratio(r.get("sdpa_fwd_bwd_ms"), r.get("ours_fwd_bwd_ms")), 3)
    r["bwd_status"] = "ok"
    r.pop("phase", None)


# --------------------------------------------------------------------------------------
# running many cases: in process, as a worker, or supervising workers
# --------------------------------------------------------------------------------------

def _skipped(job, cfg, why):
    name, L, D = job
    B, H, Hkv = cfg.dims(name)
    return dict(case=name, family=_cases.get_case(name).family, L=L, B=B, H=H, Hkv=Hkv, D=D, dtype=cfg.dtype,
                bwd=cfg.bwd, status="skipped", error=why)


def run_jobs(cfg: BenchConfig, job_ids: Sequence[int], emit: Callable[..., None],
             deadline: Optional[float] = None) -> None:
    """Run jobs in this process; emit('meta'|'start'|'result'|'fatal', ...) as they go."""
    jobs = cfg.jobs()
    try:
        ctx = Context(cfg)
        meta = environment_meta(cfg, ctx)
    except Exception as e:
        emit("meta", meta=environment_meta(cfg))
        err = f"harness setup failed: {type(e).__name__}: {e}"
        for i in job_ids:
            res = _skipped(jobs[i], cfg, err)
            res["status"] = "error"
            emit("result", job=i, result=res)
        return
    emit("meta", meta=meta)
    for i in job_ids:
        if deadline is not None and time.time() > deadline - 10:
            emit("result", job=i, result=_skipped(jobs[i], cfg, "time budget exhausted"))
            continue
        emit("start", job=i, case=jobs[i][0], L=jobs[i][1], D=jobs[i][2])
        res = run_case(*jobs[i], cfg, ctx)
        emit("result", job=i, result=res)
        if res.get("status") == "error" or res.get("bwd_status") == "error":
            if not ctx.backend.alive():
                emit("fatal", job=i, error="CUDA context unusable after this case; worker exits")
                return


def _worker_main(cfg: BenchConfig, job_ids: List[int], deadline: Optional[float]) -> int:
    def emit(event, **payload):
        sys.stdout.write(PROTO_PREFIX + json.dumps(dict(event=event, **payload), default=str) + "\n")
        sys.stdout.flush()

    run_jobs(cfg, job_ids, emit, deadline)
    emit("done")
    return 0


class _Collector:
    """Collects results in job order, prints them, keeps the JSON file current."""

    def __init__(self, cfg: BenchConfig, out=None):
        self.cfg, self.jobs = cfg, cfg.jobs()
        self.meta: Optional[Dict[str, Any]] = None
        self.results: Dict[int, Dict[str, Any]] = {}
        self.out = out or sys.stdout

    def on_meta(self, meta):
        if self.meta is None:
            meta = dict(meta, command=self.cfg.command)  # a worker's own argv is not the command
            self.meta = meta
            print("# " + header_line(meta), file=self.out, flush=True)
            print(json.dumps(dict(meta=meta), default=str), file=self.out, flush=True)

    def on_result(self, i, res):
        self.results[i] = res
        line = {k: v for k, v in res.items() if k != "traceback"}
        print(json.dumps(line, default=str), file=self.out, flush=True)
        if res.get("traceback"):
            print(f"# {res.get('case')} L={res.get('L')} D={res.get('D')}: {res['traceback']}",
                  file=sys.stderr, flush=True)
        self.write()

    def ordered(self):
        return [self.results[i] for i in sorted(self.results)]

    def write(self, final=False):
        if self.cfg.results_dir and self.results:
            try:
                meta = self.meta or {}
                self.results_path = _results.write_results(
                    _results.all_rows(self.ordered(), meta, self.cfg.bwd), self.cfg.results_dir,
                    meta.get("gpu"), meta.get("started"))
            except OSError as e:
                print(f"# could not write the results file in {self.cfg.results_dir}: {e}", file=sys.stderr,
                      flush=True)
        if not self.cfg.json_path:
            return
        try:
            path = Path(self.cfg.json_path)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(path.suffix + ".tmp")
            tmp.write_text(json.dumps(dict(meta=self.meta, complete=final, results=self.ordered()),
                                      indent=1, default=str))
            os.replace(tmp, path)
            if final and self.cfg.md_path:
                Path(self.cfg.md_path).write_text(markdown_report(self.ordered(), self.meta) + "\n")
        except OSError as e:
            print(f"# could not write {self.cfg.json_path}: {e}", file=sys.stderr, flush=True)

    def finish(self):
        for i, job in enumerate(self.jobs):
            if i not in self.results:
                self.on_result(i, _skipped(job, self.cfg, "not run (time budget or worker failure)"))
        self.write(final=True)
        print("", file=self.out)
        print(markdown_report(self.ordered(), self.meta), file=self.out, flush=True)
        from .table import render_table  # the rows as BENCHMARKS.md shows them: both apis, host time
        print("", file=self.out)
        print(render_table(_results.all_rows(self.ordered(), self.meta or {}, self.cfg.bwd)), file=self.out,
              flush=True)
        if getattr(self, "results_path", None):
            print(f"# results: {self.results_path} (python -m benchmarks.table regenerates BENCHMARKS.md's table)",
                  file=self.out, flush=True)


def _repo_root() -> Path:
    """The checkout holding this ``benchmarks/`` folder."""
    return Path(__file__).resolve().parents[1]


def _kill_group(proc: subprocess.Popen):
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except Exception:
        try:
            proc.kill()
        except Exception:
            pass


def supervise(cfg: BenchConfig, argv: Sequence[str], collector: _Collector) -> None:
    """Run the jobs in worker subprocesses, replacing a worker that dies or hangs."""
    t_start = time.time()
    deadline = t_start + cfg.budget_s
    remaining = list(range(len(collector.jobs)))
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    root = str(_repo_root())
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    rounds = 0
    while remaining and time.time() < deadline - 10 and rounds <= len(collector.jobs):
        rounds += 1
        cmd = [sys.executable, "-m", "benchmarks", *argv,
               "--worker-jobs", ",".join(map(str, remaining)), "--deadline", repr(deadline)]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=None, stdin=subprocess.DEVNULL, text=True,
                                bufsize=1, env=env, cwd=root, start_new_session=True)
        lines: "queue.Queue[Optional[str]]" = queue.Queue()

        def reader(stream=proc.stdout):
            for line in stream:
                lines.put(line)
            lines.put(None)

        threading.Thread(target=reader, daemon=True).start()
        current, started, progressed, killed_for = None, None, False, None
        while True:
            try:
                line = lines.get(timeout=1.0)
            except queue.Empty:
                line = ""
            if line is None:
                break
            if line:
                if line.startswith(PROTO_PREFIX):
                    try:
                        msg = json.loads(line[len(PROTO_PREFIX):])
                    except ValueError:
                        msg = {}
                    ev = msg.get("event")
                    if ev == "meta":
                        collector.on_meta(msg["meta"])
                    elif ev == "start":
                        current, started, progressed = msg["job"], time.time(), True
                        print(f"# running {msg.get('case')} L={msg.get('L')} D={msg.get('D')}",
                              file=sys.stderr, flush=True)
                    elif ev == "result":
                        i = msg["job"]
                        collector.on_result(i, msg["result"])
                        if i in remaining:
                            remaining.remove(i)
                        current = None
                    elif ev == "fatal":
                        print(f"# worker: {msg.get('error')}", file=sys.stderr, flush=True)
                else:
                    sys.stderr.write(line)  # keep stdout for JSON lines and the table
                    sys.stderr.flush()
            now = time.time()
            limit = cfg.case_timeout_s
            if current is not None:
                limit = max(limit, _cases.get_case(collector.jobs[current][0]).timeout_s or 0.0)
            if current is not None and now - started > limit:
                killed_for = f"timed out after {limit:.0f} s (worker killed)"
            elif now > deadline + 5:
                killed_for = "time budget exhausted while running (worker killed)"
            if killed_for:
                _kill_group(proc)
                break
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            proc.wait()
        if current is not None and current in remaining:
            name, L, D = collector.jobs[current]
            res = _skipped(collector.jobs[current], cfg, "")
            res["status"] = "timeout" if killed_for else "crashed"
            res["error"] = killed_for or f"worker died during this case (exit code {proc.returncode})"
            collector.on_result(current, res)
            remaining.remove(current)
        if killed_for and "budget" in killed_for:
            break
        if remaining and not progressed:
            # the worker died before starting any case: restarting will not help
            for i in list(remaining):
                res = _skipped(collector.jobs[i], cfg, f"worker failed to start (exit code {proc.returncode})")
                res["status"] = "error"
                collector.on_result(i, res)
                remaining.remove(i)


def run(cfg: BenchConfig, argv: Sequence[str] = (), out=None) -> List[Dict[str, Any]]:
    collector = _Collector(cfg, out)
    if cfg.isolate:
        supervise(cfg, argv, collector)
    else:
        def emit(event, **p):
            if event == "meta":
                collector.on_meta(p["meta"])
            elif event == "result":
                collector.on_result(p["job"], p["result"])
            elif event == "start":
                print(f"# running {p.get('case')} L={p.get('L')} D={p.get('D')}", file=sys.stderr, flush=True)
            elif event == "fatal":
                print(f"# {p.get('error')}", file=sys.stderr, flush=True)
        run_jobs(cfg, range(len(collector.jobs)), emit, time.time() + cfg.budget_s)
    if collector.meta is None:
        collector.meta = environment_meta(cfg)
    collector.finish()
    return collector.ordered()


def list_cases(out=None) -> None:
    out = out or sys.stdout
    for name, c in _cases.CASES.items():
        extra = f" (L fixed at {c.fixed_L})" if c.fixed_L else ""
        if c.shape:
            extra = " (" + ", ".join(f"{k}={v}" for k, v in c.shape.items()) + ")"
        default = " [default]" if name in _cases.DEFAULT_CASES else ""
        print(f"{name:30s} {c.description}{extra}{default}", file=out)
    print("\ngroups (--cases GROUP):", file=out)
    for g, names in _cases.GROUPS.items():
        print(f"  {g:12s} {','.join(names)}", file=out)


def main_from_namespace(ns: argparse.Namespace, argv: Sequence[str]) -> int:
    if ns.list:
        list_cases()
        return 0
    try:
        cfg = config_from_args(ns)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    cfg.command = " ".join(["python -m benchmarks", *(shlex.quote(a) for a in argv)])
    if ns.worker_jobs is not None:
        ids = [int(x) for x in ns.worker_jobs.split(",") if x != ""]
        return _worker_main(cfg, ids, ns.deadline)
    results = run(cfg, argv)
    return 0 if results and all(r.get("status") == "ok" and r.get("bwd_status") in (None, "ok")
                                for r in results) else 1


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ns = build_parser().parse_args(argv)
    return main_from_namespace(ns, argv)

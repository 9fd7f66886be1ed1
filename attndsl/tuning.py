"""Autotuning of kernel tiles, and the tuned entries the runtime reads (``docs/tuning.md``).

:func:`autotune` times candidate tile configurations of one pattern at one call shape: the
portable forward's tiles, with ``backward=True`` the dK/dV and dQ kernels' too, and on a compute
capability 9.0 GPU where the Hopper kernels apply the Hopper forward's
:class:`~attndsl.runtime.hopper.HopperConfig` candidates and the Hopper backward's
:class:`~attndsl.runtime.hopper_bwd.HopperBwdConfig` ones. Every candidate is first checked
against the default configuration's result; one that is wrong, fails to compile or launch, or only
launched with smaller tiles (shared memory) is skipped, with the reason recorded. The fastest of
each kernel makes an entry, keyed by :func:`entry_key` (pattern, shape bucket, head dims, GQA
group, dtype, GPU) and written to
``tuning.json`` in the kernel cache directory (``$ATTNDSL_CACHE_DIR``, see
``attndsl.runtime.cache``) atomically.

A compiled pattern whose call key has an entry takes its tiles when the runner of that key is
made (``CompiledAttention.runner``: once per key, not per call). Explicit tiles of
``attndsl.compile`` (``block_m``, ``block_n``, ``num_warps``, ``num_stages``) win over entries;
``ATTNDSL_TUNING=0`` ignores them. Entries shipped with the package (``attndsl/tuned/*.json``)
are read first, the user's file over them.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from .runtime.config import DQ_MODES, Configs, TileConfig, forced_dq_mode
from .runtime.hopper import HopperConfig
from .runtime.hopper_bwd import HopperBwdConfig
from .runtime.tuned import (KERNELS, SHIPPED_DIR, Tuned, clear, device_arch, entries, entry_for, entry_key, export,
                            load, reset, user_file)
from .runtime.tuned import save as save_entries

__all__ = ["autotune", "TuningResult", "Trial", "Tuned", "entry_key", "entry_for", "entries", "export", "load",
           "clear", "reset", "user_file", "SHIPPED_DIR", "TIMER"]

log = logging.getLogger("attndsl.tuning")

#: a timer to use instead of the default (``autotune``'s ``timer`` argument wins over it):
#: ``TIMER(fn, kernel, config) -> milliseconds``
TIMER: Callable | None = None


# -- the search ---------------------------------------------------------------------------------
@dataclass
class Trial:
    """One timed (or skipped) candidate: ``kernel`` ("fwd", "dkdv", "dq", "dq_mode", "hopper", "hopper_bwd"), its
    ``config`` (for "dq_mode" a dQ mode, "kernel" or "atomic"), its time in milliseconds, or
    ``error`` why it was skipped; ``default``: the configuration the runtime would use without tuning."""

    kernel: str
    config: object
    ms: float | None = None
    error: str | None = None
    default: bool = False


@dataclass
class TuningResult:
    """What :func:`autotune` found: the entry (``tuned``, under ``key``), every trial, and the
    file the entry was written to (None with ``save=False``)."""

    key: str
    tuned: Tuned
    trials: list = field(default_factory=list)
    path: Path | None = None

    @property
    def skipped(self) -> list:
        """The trials skipped, with their reasons."""
        return [t for t in self.trials if t.error is not None]

    def best(self, kernel: str) -> Trial | None:
        """The fastest trial of ``kernel`` that passed, or None."""
        ok = [t for t in self.trials if t.kernel == kernel and t.error is None]
        return min(ok, key=lambda t: t.ms) if ok else None

    def __str__(self) -> str:
        lines = [f"attndsl tuning entry {self.key}"]
        for kernel in KERNELS:
            b = self.best(kernel)
            d = next((t for t in self.trials if t.kernel == kernel and t.default), None)
            if b is not None:
                lines.append(f"  {kernel}: {_label(b.config)} {b.ms:.4g} ms"
                             + (f" (default {_label(d.config)} {d.ms:.4g} ms)" if d is not None and d.ms else ""))
        if self.tuned.hopper_wins is not None:
            lines.append(f"  Hopper forward {'wins' if self.tuned.hopper_wins else 'loses'}")
        lines.append(f"  {len(self.skipped)} of {len(self.trials)} candidates skipped")
        return "\n".join(lines)


def _label(c) -> str:
    if isinstance(c, TileConfig):
        return f"{c.block_m}x{c.block_n} w{c.num_warps} s{c.num_stages}" + (" tma" if c.tma else "")
    if isinstance(c, HopperConfig):
        return (f"{c.block_m}x{c.block_n} s{c.stages} c{c.consumers}" + (" pipe" if c.pipeline else "")
                + (" pp" if c.pingpong else ""))
    if isinstance(c, HopperBwdConfig):
        return f"{c.block_m}x{c.block_n} s{c.stages} c{c.consumers}"
    return str(c)


def candidate_tiles(kernel: str, default: TileConfig, interpret: bool, fixed: tuple | None) -> list:
    """The tiles tried for ``kernel`` ("fwd", "dkdv", "dq") besides its ``default``: on the GPU,
    rows and columns of 64 and 128 (forward keys also 32; dK/dV queries 32 and 64), 4 or 8 warps,
    2 or 3 stages; in the interpreter 16 and 32 rows and columns. ``fixed``: the (rows, columns)
    a pattern's layout plans fix (``KernelSpec.tiles``): only warps and stages vary."""
    if interpret:
        ms, ns, ws, ss = (16, 32), (16, 32), (default.num_warps,), (default.num_stages,)
    elif kernel == "fwd":
        ms, ns, ws, ss = (64, 128), (32, 64, 128), (4, 8), (2, 3)
    elif kernel == "dkdv":
        ms, ns, ws, ss = (32, 64), (64, 128), (4, 8), (2, 3)
    else:
        ms, ns, ws, ss = (64, 128), (32, 64), (4, 8), (2, 3)
    if fixed is not None:
        ms, ns = (fixed[0],), (fixed[1],)
    got = [default]
    for m in ms:
        for n in ns:
            for w in ws:
                for s in ss:
                    c = TileConfig(m, n, w, s, tma=default.tma)
                    if c not in got:
                        got.append(c)
    return got


class _Progress:
    """One stderr line, rewritten in place: the kernel, candidate i/n and the best time so far."""

    def __init__(self, on: bool, total: int):
        self.on, self.total, self.i, self.width = on, total, 0, 0

    def step(self, kernel: str, best: Trial | None) -> None:
        self.i += 1
        if not self.on:
            return
        msg = f"attndsl.autotune [{kernel}] {self.i}/{self.total}"
        if best is not None:
            msg += f"  best {best.ms:.4g} ms ({_label(best.config)})"
        sys.stderr.write("\r" + msg.ljust(self.width))
        sys.stderr.flush()
        self.width = len(msg)

    def done(self) -> None:
        if self.on and self.width:
            sys.stderr.write("\n")
            sys.stderr.flush()


def _default_timer(rep: int, interpret: bool):
    """``triton.testing.do_bench`` on the GPU; in the interpreter the median of three runs."""
    def timer(fn, kernel, config) -> float:
        if not interpret:
            import triton.testing
            return float(triton.testing.do_bench(fn, warmup=max(1, rep // 4), rep=rep))
        times = []
        for _ in range(3):  # the interpreter: a few wall-clock runs (for completeness; slow, not tuned for)
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return sorted(times)[1]
    return timer


def _tolerance(dtype: torch.dtype) -> float:
    return {torch.float64: 1e-9, torch.float32: 1e-4}.get(dtype, 2e-2)


def _mismatch(got, want, dtype) -> str | None:
    """Why ``got`` (tensors) differs from ``want``, or None when each is within the tolerance of
    ``dtype``, relative to the largest magnitude of ``want``."""
    for i, (a, b) in enumerate(zip(got, want)):
        if (a is None) != (b is None):
            return f"output {i}: {'missing' if a is None else 'unexpected'}"
        if a is None:
            continue
        a, b = a.double(), b.double()
        if a.shape != b.shape:
            return f"output {i}: shape {tuple(a.shape)}, want {tuple(b.shape)}"
        fin = torch.isfinite(b)
        if not torch.equal(torch.isfinite(a), fin):
            return f"output {i}: non-finite values where the default's are finite (or the reverse)"
        err = float((a[fin] - b[fin]).abs().max()) if fin.any() else 0.0
        ref = max(float(b[fin].abs().max()) if fin.any() else 0.0, 1e-6)
        if not err <= _tolerance(dtype) * ref:
            return f"output {i}: max error {err:.3g} against the default's (largest {ref:.3g})"
    return None


def _forward(r, q, k, v, scale, tensors, tables, extras, key):
    """(out, lse) of the portable forward of runner ``r`` (a module function: tests replace it)."""
    return r.forward(q, k, v, scale, tensors, tables, extras, key=key)[:2]


def _backward(r, q, k, v, out, lse, dout, scale, tensors, tables, extras, key):
    """(dq, dk, dv) of the portable backward of runner ``r``."""
    return r.backward(q, k, v, out, lse, dout, None, scale, tensors, tables, extras, key=key)[:3]


def _hopper_forward(hf, q, k, v, scale, cfg, tensors):
    return hf.forward(q, k, v, scale, cfg, buffers=tensors)


def _failure(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:300]


def autotune(pattern, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, backward: bool = True,
             candidates: dict | None = None, rep: int = 50, progress: bool = True, timer: Callable | None = None,
             save: bool = True) -> TuningResult:
    """Time candidate tiles of ``pattern``'s kernels at the shape of ``q``, ``k``, ``v`` and keep
    the fastest of each as a tuned entry (on disk, and in effect for runners made from now on).

    Candidates are tried one kernel at a time, the others at their best so far: the portable
    forward, then (``backward=True``) the dK/dV and the dQ kernels, then the backward's dQ mode
    (``Configs.dq_mode``: the dQ kernel, or dQ added by the dK/dV kernel with atomic adds, timed as
    whole backwards at the best tiles; not for deterministic patterns, nor while
    ``ATTNDSL_ATOMIC_DQ`` or ``enable_atomic_dq`` forces a mode), and on a compute capability
    9.0 GPU, where the Hopper forward renders the pattern and takes the call, the Hopper forward's
    configurations (``hopper.sweep_configs``); the entry records whether the best of those beat the
    best portable forward (calls of the entry take the Hopper forward exactly then, unless
    ``ATTNDSL_HOPPER``/``hopper.enable`` says otherwise). Likewise, with ``backward=True``, the
    Hopper backward's configurations (``hopper_bwd.sweep_configs``: dQ by its TMA reduce-adds or
    by the portable dQ kernel at its best tiles; the latter only, for deterministic patterns),
    each timed as a whole backward against the best portable backward (unless
    ``ATTNDSL_HOPPER_BWD=0`` or ``enable_backward(False)``). Each candidate's result is first
    compared with the default configuration's (within 1e-4 of its largest magnitude in float32,
    2e-2 in 16-bit types, 1e-9 in float64); a candidate that differs, fails to compile or launch,
    or only launches with smaller tiles (a shared-memory overflow) is skipped, with the reason in
    the result's trials. Calls are timed without sinks or low-rank bias (sigmoid patterns with
    their default bias); the entry serves every call of its key (:func:`entry_key`: pattern,
    ``Lq``/``Lkv`` rounded up to powers of two, head dims, GQA group, dtype, GPU).

    Args:
        pattern: a :class:`attndsl.CompiledAttention` (compiled without explicit tiles, which would
            win over any entry), or a ``mask_mod`` function (the pattern ``attndsl.attention(...,
            mask_mod=pattern)`` uses).
        q: queries ``[B, Hq, Lq, D]``: a shape like the calls to tune for (float16, bfloat16 or
            float32 on the GPU; CPU tensors run in the interpreter).
        k: keys ``[B, Hkv, Lkv, D]``.
        v: values ``[B, Hkv, Lkv, Dv]``.
        backward: also tune the backward's dK/dV and dQ kernels.
        candidates: tiles to try instead of the defaults (:func:`candidate_tiles`), per kernel:
            ``{"fwd": [TileConfig, ...], "dkdv": [...], "dq": [...], "dq_mode": ["kernel", "atomic"],
            "hopper": [HopperConfig, ...], "hopper_bwd": [HopperBwdConfig, ...]}``;
            kernels not named keep the default list ("hopper" and "hopper_bwd" are ignored where
            the Hopper kernel does not take the call). The default configuration is always tried first.
        rep: milliseconds of timed repetitions per candidate (``triton.testing.do_bench``'s ``rep``).
        progress: show one stderr line with candidate i/n and the best time so far.
        timer: ``timer(fn, kernel, config) -> milliseconds`` (default :data:`TIMER`, else
            ``do_bench`` on CUDA, the median of three wall-clock runs in the interpreter).
        save: write the entry to the user's file (:func:`user_file`) and put it in effect.

    Returns:
        A :class:`TuningResult`: the entry's key, the entry (:class:`Tuned`), every trial (time or
        reason skipped), and the file written.
    """
    from .api import CompiledAttention, _compiled
    from .runtime.checks import check_captured, check_inputs
    from .runtime.launch import Runner
    from .runtime.marshal import Extras
    if isinstance(pattern, CompiledAttention):
        compiled = pattern
    elif callable(pattern):  # through the pattern cache: the entry's key is ``attndsl.attention(mask_mod=pattern)``'s
        compiled = _compiled(pattern, None, "softmax", False, None)[0]
    else:
        raise TypeError(f"pattern must be a CompiledAttention or a mask_mod function, got {type(pattern).__name__}")
    if any(compiled._tiles):
        raise ValueError(f"the pattern was compiled with explicit tiles {compiled._tiles} (block_m, block_n, "
                         "num_warps, num_stages), which win over tuned entries; tune a pattern compiled without them")
    check_inputs(q, k, v)
    if min(q.shape[0], q.shape[1], q.shape[2], k.shape[2]) == 0:
        raise ValueError(f"autotune of an empty call (query {tuple(q.shape)}, key {tuple(k.shape)}): nothing runs")
    unknown = set(candidates or ()) - set(KERNELS)
    if unknown:
        raise ValueError(f"candidates names unknown kernels {sorted(unknown)}; expected some of {list(KERNELS)}")
    check_captured(compiled.tensors, q.device)
    q, k, v = q.detach(), k.detach(), v.detach()
    spec, tensors, dv = compiled.spec, compiled.tensors, v.shape[-1]
    base = compiled.runner(q, dv)  # the untuned runner (no ``k``: no entry)
    interpret = base.interpret
    timer = timer or TIMER or _default_timer(rep, interpret)
    scale = q.shape[-1] ** -0.5
    extras = Extras(sigmoid_bias=-math.log(k.shape[2]) if spec.normalizer == "sigmoid" else 0.0)
    gen = torch.Generator(device=q.device).manual_seed(0)
    dout = torch.randn((*q.shape[:3], dv), generator=gen, device=q.device, dtype=q.dtype)

    def runner(cfgs: Configs):
        r = Runner(spec, base.mod, cfgs, interpret, q.shape[-1], head_dim_v=dv)
        r.deterministic, r.precise_delta = base.deterministic, base.precise_delta
        r.hopper = r.hopper_bwd = None  # the portable kernels (the Hopper forward is tried on its own)
        return r

    def tables(r):
        return r.new_tables(q, k, tensors) if spec.data_dependent else None

    def fixed(kernel):
        if not spec.tiles:
            return None
        return {"fwd": spec.tiles, "dkdv": spec.bwd_tiles, "dq": spec.dq_tiles}[kernel]

    # the default: what the runtime runs without an entry (the forward's tiles as the call picks them)
    ref_runner = runner(base.cfg)
    default = Configs(ref_runner.forward_tiles(q)[1], base.cfg.dkdv, base.cfg.dq)
    t = tables(ref_runner)
    want_fwd = _forward(ref_runner, q, k, v, scale, tensors, t, extras, None)
    want_bwd = _backward(ref_runner, q, k, v, *want_fwd, dout, scale, tensors, t, extras, None) if backward else None

    kernels = ["fwd"] + (["dkdv", "dq", "dq_mode"] if backward else [])
    lists = {kn: list((candidates or {}).get(kn) or candidate_tiles(kn, getattr(default, kn), interpret, fixed(kn)))
             for kn in kernels if kn != "dq_mode"}
    if backward:  # the backward's dQ mode, at the best tiles: the dQ kernel (the default) or atomic adds
        lists["dq_mode"] = list((candidates or {}).get("dq_mode") or DQ_MODES)
        bad = sorted(set(lists["dq_mode"]) - set(DQ_MODES))
        if bad:
            raise ValueError(f"candidates['dq_mode'] names unknown modes {bad}; expected some of {list(DQ_MODES)}")
    for kn in kernels:  # the default first, always
        d = getattr(default, kn)
        lists[kn] = [d] + [c for c in lists[kn] if c != d]
    hf = None
    if base.hopper is not None and base.hopper.unsupported is None and not base.precise_delta:
        from .runtime import hopper as _hop
        if _hop.call_fits(extras, q, k, v):
            hf = _hop.HopperForward(spec)
            lists["hopper"] = list((candidates or {}).get("hopper") or _hop.sweep_configs(q.shape[-1]))
    hbw = _hopper_backward(base, extras, q, k, v, dout) if backward else None
    if hbw is not None:
        from .runtime import hopper_bwd as _hb
        lists["hopper_bwd"] = list((candidates or {}).get("hopper_bwd") or _hb.sweep_configs(q.shape[-1]))
        if base.deterministic:  # atomic dQ never runs there: its candidates would time the split twice
            lists["hopper_bwd"] = [c for c in lists["hopper_bwd"] if c.dq == "kernel"] or lists["hopper_bwd"]
    bar = _Progress(progress, sum(len(x) for x in lists.values()))
    trials: list = []
    best = default

    def trial(kernel, cfg, is_default, run, check):
        tr = Trial(kernel, cfg, default=is_default)
        try:
            err = check()
            if err is None:
                tr.ms = float(timer(run, kernel, cfg))
            else:
                tr.error = err
        except Exception as e:  # noqa: BLE001 - a candidate that fails to compile or launch is skipped
            tr.error = _failure(e)
        trials.append(tr)
        ok = [x for x in trials if x.kernel == kernel and x.error is None]
        bar.step(kernel, min(ok, key=lambda x: x.ms) if ok else None)
        return tr

    try:
        for kn in kernels:
            for i, cfg in enumerate(lists[kn]):
                if kn == "dq_mode":
                    why = _dq_mode_skipped(cfg, base.deterministic)
                    if why is not None:
                        trials.append(Trial(kn, cfg, error=why, default=i == 0))
                        bar.step(kn, None)
                        continue
                elif fixed(kn) is not None and (cfg.block_m, cfg.block_n) != fixed(kn):
                    trials.append(Trial(kn, cfg, error=f"the pattern's layout plans fix the tiles at {fixed(kn)}"))
                    bar.step(kn, None)
                    continue
                cfgs = dataclasses.replace(best, **{kn: cfg})
                r = runner(cfgs)
                tb = tables(r)
                key = r.call_key(q, k, v, scale, extras, tensors)
                if kn == "fwd":
                    def run(r=r, tb=tb, key=key):
                        _forward(r, q, k, v, scale, tensors, tb, extras, key)

                    def check(r=r, tb=tb, key=key, kn=kn, cfg=cfg):
                        got = _forward(r, q, k, v, scale, tensors, tb, extras, key)
                        return _shrunk(r, kn, cfg) or _mismatch(got, want_fwd, q.dtype)
                else:
                    def run(r=r, tb=tb, key=key):
                        _backward(r, q, k, v, *want_fwd, dout, scale, tensors, tb, extras, key)

                    def check(r=r, tb=tb, key=key, kn=kn, cfg=cfg):
                        got = _backward(r, q, k, v, *want_fwd, dout, scale, tensors, tb, extras, key)
                        return _shrunk(r, kn, cfg) or _mismatch(got, want_bwd, q.dtype)
                trial(kn, cfg, i == 0, run, check)
            b = min((x for x in trials if x.kernel == kn and x.error is None), key=lambda x: x.ms, default=None)
            if b is not None:
                best = dataclasses.replace(best, **{kn: b.config})
        hop = wins = None
        if hf is not None:
            for cfg in lists["hopper"]:
                def run(cfg=cfg):
                    _hopper_forward(hf, q, k, v, scale, cfg, tensors)

                def check(cfg=cfg):
                    return _mismatch(_hopper_forward(hf, q, k, v, scale, cfg, tensors), want_fwd, q.dtype)
                trial("hopper", cfg, False, run, check)
            hb = min((x for x in trials if x.kernel == "hopper" and x.error is None), key=lambda x: x.ms, default=None)
            fb = min((x for x in trials if x.kernel == "fwd" and x.error is None), key=lambda x: x.ms, default=None)
            if hb is not None:
                hop, wins = hb.config, fb is None or hb.ms < fb.ms
        hop_bwd = bwd_wins = None
        if "hopper_bwd" in lists:
            r = runner(best)  # the portable kernels at their best, the Hopper backward in their place
            r.hopper_bwd = hbw
            tb = tables(r)
            for cfg in lists["hopper_bwd"]:
                def run(cfg=cfg, r=r, tb=tb):
                    hbw.tuned = (cfg, True)  # taken by every call it fits
                    return _backward(r, q, k, v, *want_fwd, dout, scale, tensors, tb, extras, None)

                def check(cfg=cfg):
                    return _mismatch(run(cfg), want_bwd, q.dtype)
                trial("hopper_bwd", cfg, False, run, check)
            hbw.tuned = None
            best_hb = min((x for x in trials if x.kernel == "hopper_bwd" and x.error is None), key=lambda x: x.ms,
                          default=None)
            portable = min((x for x in trials if x.kernel in ("dkdv", "dq", "dq_mode") and x.error is None),
                           key=lambda x: x.ms, default=None)
            if best_hb is not None:
                hop_bwd, bwd_wins = best_hb.config, portable is None or best_hb.ms < portable.ms
    finally:
        bar.done()
    times = []
    for kn in kernels + (["hopper"] if hop is not None else []) + (["hopper_bwd"] if hop_bwd is not None else []):
        ok = [x for x in trials if x.kernel == kn and x.error is None]
        d = next((x.ms for x in ok if x.default), None)
        if ok:
            times.append((kn, d, min(x.ms for x in ok)))
    ekey = entry_key(spec.key, q, k, dv)
    tuned = Tuned(ekey, best, hop, wins, tuple(times), device_arch(q), hop_bwd, bwd_wins)
    path = None
    if save:
        path = save_entries({ekey: tuned})
        compiled._runners = {}  # runners made before the entry: made again (their call plans follow)
    return TuningResult(ekey, tuned, trials, path)


def _hopper_backward(base, extras, q, k, v, dout):
    """A Hopper backward of ``base``'s pattern for :func:`autotune` to time (its ``tuned`` is set per
    candidate), or None where the call cannot take one: no Hopper backward for this runner (the
    interpreter, another GPU), a pattern it does not render, ``precise_delta``, the switch off
    (``ATTNDSL_HOPPER_BWD=0``, ``enable_backward(False)``), or the call's tensors."""
    from .runtime import hopper_bwd as _hb
    h = base.hopper_bwd
    if h is None or h.unsupported is not None or base.precise_delta or _hb.backward_enabled() is False:
        return None
    if not _hb.call_fits(extras, q, k, v, dout):
        return None
    return _hb.HopperBackward(base.spec)


def _dq_mode_skipped(mode: str, deterministic: bool) -> str | None:
    """Why the dQ mode ``mode`` is not timed: the environment or ``enable_atomic_dq`` forces one
    (every candidate would run it), or atomic adds for a deterministic pattern (never taken)."""
    forced = forced_dq_mode()
    if forced is not None:
        return f"ATTNDSL_ATOMIC_DQ / enable_atomic_dq forces the dQ mode {forced!r}"
    if mode == "atomic" and deterministic:
        return "deterministic patterns keep the dQ kernel"
    return None


def _shrunk(r, kernel: str, cfg: TileConfig) -> str | None:
    """Why a candidate is not what ran: the runner retried its launch with smaller tiles."""
    ran = getattr(r.cfg, kernel)
    if ran != cfg:
        return f"out of shared memory: the launch fell back to {_label(ran)}"
    return None

"""Per-call host time of the Python call path, forward and forward+backward, next to SDPA's.

Measures what issue 30 part 2 is about, the Python work around the launches: pattern lookup,
checks, runner and table lookups, autograd plumbing. Each case is timed as a short loop of calls
without syncs, so a case whose kernels are short measures the host.

    python benchmarks/host_overhead.py [--rounds 40] [--calls 50] [--cases causal] [--profile]  # CPU, launches stubbed
    python benchmarks/host_overhead.py --gpu [--json host.json]                                # CUDA, real launches, bf16
    python benchmarks/host_overhead.py --gpu --cases causal --B 8 --H 12 --L 2048 --D 64 --calls 20  # GPT-2 step
    python benchmarks/host_overhead.py --gpu --cases causal --H 32 --Hkv 8 --L 8192 --D 128 --calls 5  # Llama-3-8B
    python benchmarks/host_overhead.py --gpu --cases "no mask" --B 32 --H 12 --L 197 --D 64 --calls 20  # ViT-B/16

CPU (default): kernel launches are replaced by no-ops and the launch context by the one a GPU
launch on the current device takes (the interpreter would dominate otherwise), so it runs on any
machine; timed by this process's CPU time (other processes on a shared machine do not count).
SDPA runs for real on tiny CPU tensors (L=16, D=16: its compute is a few microseconds, so its
figure is mostly its own host path). ``--gpu``: wall time, real launches on a small, host-bound
shape (B=1, H=4, L=128, D=64 bf16 by default; ``--L``/``--B``/``--H``/``--D`` change it; SDPA
runs the same shape); a sync after each loop, outside its timing.

Method (robust to a shared, noisy machine): the cases are interleaved. Each of ``--rounds`` rounds
times one loop of ``--calls`` calls of every case and pass, SDPA's included, in a fresh random
order; a case's figure in a round is divided by SDPA's in the same round (same pass), so a burst
of load from another tenant that slows a whole round cancels, and one that hits a single loop
moves one round's ratio only. Reported per case and pass: the median over rounds of that ratio
(the ``x sdpa`` columns), its 10th-90th percentile range and minimum, and the median time per call
(microseconds). Columns: ``fwd`` (inputs do not require grad: inference), ``fwd+bwd`` (inputs
require grad; one ``torch.autograd.grad`` of the output per call). ``--json PATH`` writes the rows
(``case``, ``pass``, ``median_us``, ``sdpa_median_us``, ``ratio_median``, ``ratio_p10``,
``ratio_p90``, ``ratio_min``, ``rounds``, ``gpu``, ``torch``, ``triton``, ``commit``).
Aims (issue 30): one-shot ``attndsl.attention`` <= 2x SDPA, a compiled pattern <= 1.5x.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's attndsl, not an installed one


def stub_launches():
    """Kernel launches become no-ops, and the launch context the one a GPU launch on the current
    device takes (none), so the loop times the Python path alone. Returns a function that undoes it."""
    from attndsl.runtime import launch
    from attndsl.runtime.scope import NO_CONTEXT
    from attndsl.selectors.sparse import GatherRunner
    saved = [(cls, n, cls.__dict__[n]) for cls, names in ((launch.Runner, ("_run", "_prepared", "mode")),
                                                        (GatherRunner, ("_prepared", "mode"))) for n in names]
    launch.Runner._run = lambda self, *a, **k: None
    for runner in (launch.Runner, GatherRunner):  # the dense and the gather (token selector) kernels
        runner._prepared = lambda self, *a, **k: (lambda args: None)
        runner.mode = lambda self, t: NO_CONTEXT

    def undo():
        import attndsl
        for cls, n, f in saved:
            setattr(cls, n, f)
        attndsl.clear_cache()  # the patterns traced meanwhile memoised no-op launches: trace them afresh
    return undo


def cases(dev, dtype, B, H, L, D, Hkv=None):
    """name -> make(requires_grad) -> (call, inputs): ``call()`` returns the output."""
    import attndsl
    from attndsl.patterns import doc_ids_from_lengths, document, sliding_window
    from attndsl.selectors import random_causal_indices
    ids = doc_ids_from_lengths([L // 4, L - L // 4], device=dev)
    top = random_causal_indices(L, min(L, 32), device=dev)  # DSA-like: 32 keys per query, shared by the heads
    slopes = torch.rand(H, device=dev)

    def causal(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx

    def alibi(score, b, h, q_idx, kv_idx):
        return score + slopes[h] * (kv_idx - q_idx)

    compiled = attndsl.compile(mask_mod=causal)
    dense = attndsl.compile()
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def inputs(grad):
        return [torch.randn(B, h, L, D, device=dev, dtype=dtype, requires_grad=grad) for h in (H, Hkv or H, Hkv or H)]

    def case(fn):
        def make(grad):
            q, k, v = inputs(grad)
            return (lambda: fn(q, k, v)), (q, k, v)
        return make

    def sdpa_case(grad):
        # tiny CPU tensors: SDPA computes for real on the CPU; its figure is mostly host time
        shapes = [(B, h, L, D) for h in (H, Hkv or H, Hkv or H)] if dev != "cpu" else [(1, 1, 16, 16)] * 3
        q, k, v = (torch.randn(*s, device=dev, dtype=dtype, requires_grad=grad) for s in shapes)
        gqa = dict(enable_gqa=True) if shapes[0][1] != shapes[1][1] else {}
        return (lambda: sdpa(q, k, v, is_causal=True, **gqa)), (q, k, v)

    return {
        "sdpa causal": sdpa_case,
        "attention causal": case(lambda q, k, v: attndsl.attention(q, k, v, mask_mod=causal)),
        "compiled causal": case(lambda q, k, v: compiled(q, k, v)),
        # no mask (ViT): the one-shot call with neither function, and its compiled pattern
        "attention no mask": case(lambda q, k, v: attndsl.attention(q, k, v)),
        "compiled no mask": case(lambda q, k, v: dense(q, k, v)),
        "attention sliding_window(256) made per call": case(
            lambda q, k, v: attndsl.attention(q, k, v, mask_mod=sliding_window(256))),
        "attention causal+alibi": case(lambda q, k, v: attndsl.attention(q, k, v, mask_mod=causal, score_mod=alibi)),
        "attention document(ids) made per call": case(
            lambda q, k, v: attndsl.attention(q, k, v, mask_mod=document(ids))),
        # token selection (gather kernels); the fast mode: no pass over the indices with a host sync
        "attention causal indices=top32 (fast mode)": case(
            lambda q, k, v: attndsl.attention(q, k, v, mask_mod=causal, indices=top, check_indices=False)),
        "compiled causal indices=top32 (fast mode)": case(
            lambda q, k, v: compiled(q, k, v, indices=top, check_indices=False)),
    }


def with_backward(call, inputs):
    """A call followed by the gradient of its output with respect to the inputs."""
    out = call()
    grad_out = torch.randn_like(out)

    def step():
        return torch.autograd.grad(call(), inputs, grad_out)
    return step


def profile(name, fwd, fwd_bwd, calls):
    """Print the functions taking the most time of ``calls`` calls of each (cProfile)."""
    import cProfile
    import pstats
    for what, fn in (("fwd", fwd), ("fwd+bwd", fwd_bwd)):
        for _ in range(20):
            fn()
        prof = cProfile.Profile(time.process_time)  # CPU time: the machine may be shared
        prof.enable()
        for _ in range(calls):
            fn()
        prof.disable()
        print(f"--- {name}, {what}")
        pstats.Stats(prof).sort_stats("tottime").print_stats(30)


SDPA = "sdpa causal"
PASSES = ("fwd", "fwd+bwd")


def percentile(xs, p: float) -> float:
    """The ``p``-th percentile of ``xs`` (linear interpolation between the closest ranks)."""
    xs = sorted(xs)
    at = (len(xs) - 1) * p / 100
    lo = int(at)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (at - lo)


def interleaved(loops: dict, rounds: int, calls: int, clock=time.perf_counter, sync=lambda: None,
                warmup: int = 20, seed: int = 0) -> dict:
    """Time every loop of ``loops`` (``(case, pass) -> fn``) once per round, in a fresh random order
    each round: ``(case, pass) -> [microseconds per call, one per round]``.

    No sync inside a loop; ``sync`` after each one, outside its timing (the GPU catches up, so the
    next loop's launches do not queue behind this one's kernels: keep ``calls`` times the launches
    of a call under CUDA's launch queue, ~1000). ``warmup`` calls of each loop come first."""
    for fn in loops.values():
        for _ in range(warmup):
            fn()
    sync()
    order = list(loops)
    rng = random.Random(seed)
    times = {k: [] for k in loops}
    for _ in range(rounds):
        rng.shuffle(order)
        for k in order:
            fn = loops[k]
            t = clock()
            for _ in range(calls):
                fn()
            times[k].append((clock() - t) / calls * 1e6)
            sync()
    return times


def summarise(times: dict, baseline: str = SDPA) -> list[dict]:
    """Rows of :func:`interleaved`'s times: per (case, pass), the median time per call and the
    median, 10th/90th percentile and minimum over rounds of the ratio to ``baseline``'s time of the
    same pass *in the same round*. Cases of a pass without a baseline loop are left out."""
    rows = []
    for (case, what), ts in times.items():
        base = times.get((baseline, what))
        if base is None:
            continue
        ratios = [t / b for t, b in zip(ts, base, strict=True)]
        rows.append(dict(case=case, **{"pass": what}, median_us=statistics.median(ts),
                         sdpa_median_us=statistics.median(base), ratio_median=statistics.median(ratios),
                         ratio_p10=percentile(ratios, 10), ratio_p90=percentile(ratios, 90), ratio_min=min(ratios),
                         rounds=len(ts)))
    return rows


def table(rows: list[dict]) -> str:
    """The rows as text: one line per case, a column group per pass (median us, median ratio to
    SDPA in the same round, the ratio's 10th-90th percentile range and minimum)."""
    by = {(r["case"], r["pass"]): r for r in rows}
    names = list(dict.fromkeys(r["case"] for r in rows))
    w = max([46, *map(len, names)])
    head = f"{'case':{w}s}" + "".join(f" {p:>9s} {'x sdpa':>7s} {'p10-p90':>11s} {'min':>5s}" for p in PASSES)
    lines = [head]
    for n in names:
        line = f"{n:{w}s}"
        for p in PASSES:
            r = by.get((n, p))
            line += (f" {r['median_us']:9.1f} {r['ratio_median']:6.2f}x {r['ratio_p10']:5.2f}-{r['ratio_p90']:<5.2f}"
                     f" {r['ratio_min']:5.2f}" if r else f" {'-':>9s} {'-':>7s} {'-':>11s} {'-':>5s}")
        lines.append(line)
    return "\n".join(lines)


def run_info(gpu: bool) -> dict:
    """``gpu``, ``torch``, ``triton``, ``commit`` of this run (the JSON rows' shared fields)."""
    import triton
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, text=True,
                                capture_output=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = None
    return dict(gpu=torch.cuda.get_device_name() if gpu else "cpu (launches stubbed)", torch=torch.__version__,
                triton=triton.__version__, commit=commit)


def measure(makers: dict, rounds: int, calls: int, clock=time.perf_counter, sync=lambda: None, warmup: int = 20,
            seed: int = 0) -> list[dict]:
    """:func:`summarise` of :func:`interleaved` over ``makers`` (``name -> make(requires_grad) ->
    (call, inputs)``, as :func:`cases`; :data:`SDPA` among them): each case's forward (inputs
    without grad) and forward+backward (:func:`with_backward`)."""
    loops = {}
    for name, make in makers.items():
        loops[(name, "fwd")] = make(False)[0]
        loops[(name, "fwd+bwd")] = with_backward(*make(True))
    return summarise(interleaved(loops, rounds, calls, clock, sync, warmup, seed))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=40, help="rounds; each times one loop of every case and pass")
    p.add_argument("--calls", type=int, default=50, help="calls per timed loop")
    p.add_argument("--gpu", action="store_true", help="real launches on CUDA (no stubs), bf16")
    p.add_argument("--cases", default="", help="only the cases whose name contains this (SDPA always runs)")
    p.add_argument("--B", type=int, default=1)
    p.add_argument("--H", type=int, default=4)
    p.add_argument("--Hkv", type=int, default=None, help="key/value heads (GQA; default --H)")
    p.add_argument("--L", type=int, default=None, help="default 64 (CPU), 128 (GPU)")
    p.add_argument("--D", type=int, default=64)
    p.add_argument("--seed", type=int, default=0, help="seed of the rounds' orders")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the rows to PATH (a JSON list)")
    p.add_argument("--profile", action="store_true", help="cProfile each selected case's loop (fwd, fwd+bwd)")
    a = p.parse_args(argv)
    dev, dtype = ("cuda", torch.bfloat16) if a.gpu else ("cpu", torch.float32)
    L = a.L or (128 if a.gpu else 64)
    undo = (lambda: None) if a.gpu else stub_launches()
    try:
        _main(a, dev, dtype, L)
    finally:
        undo()  # (the tests call main in their own process)


def _main(a, dev, dtype, L):
    sync = torch.cuda.synchronize if a.gpu else (lambda: None)
    # CPU: this process's CPU time (the machine may be shared); GPU: wall time (the GPU may lag)
    clock = time.perf_counter if a.gpu else time.process_time
    makers = {n: m for n, m in cases(dev, dtype, a.B, a.H, L, a.D, a.Hkv).items()
              if n == SDPA or not a.cases or a.cases in n}
    if a.profile:
        for name, make in makers.items():
            profile(name, make(False)[0], with_backward(*make(True)), max(a.calls, 200))
        return
    print(f"host time per call, us ({'CUDA ' + torch.cuda.get_device_name() if a.gpu else 'CPU, launches stubbed'}; "
          f"B={a.B} H={a.H} Hkv={a.Hkv or a.H} L={L} D={a.D} {str(dtype).split('.')[-1]}; torch {torch.__version__}); "
          f"{a.rounds} interleaved rounds of {a.calls} calls; x sdpa: median over rounds of the ratio to SDPA's "
          "time in the same round")
    rows = measure(makers, a.rounds, a.calls, clock, sync, seed=a.seed)
    print(table(rows))
    if a.json:
        info = run_info(a.gpu)
        Path(a.json).write_text(json.dumps([{**r, **info} for r in rows], indent=1) + "\n")
        print(f"wrote {len(rows)} rows to {a.json}")


if __name__ == "__main__":
    main()

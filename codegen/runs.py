"""Constant runs: the full tiles at either end of a visit range over which every tile-uniform load
reads one entry, visited by a loop of their own.

Far from the diagonal a bucketed or clipped relative-position index saturates, so under a causal
mask nearly every tile reads the last bucket. Testing that per tile (``if uni:``) puts a branch in
the loop body, which keeps Triton from pipelining the K/V loads and costs more than the gather
it saves. Instead, before its loop each program finds the longest prefix and suffix of its full
tiles over which the interval bounds of every such index meet (``lo == hi`` over the whole range,
not only one tile), by binary search: the bounds are sound for any range, so every run the
search accepts is correct whatever the pattern. It loads the run's one entry once, then visits
the run with that scalar (no branch, no mask, no gather) and the remaining tiles with the
per-element code. The runs' table gradient is one sum per run, added once after the loop.

Applies to closed-form visit ranges without per-tile classification (block tables and box plans
keep the per-tile test).
"""
from __future__ import annotations

from attndsl.passes.lower import run_loads
from attndsl.spec import KernelSpec

from .expr import ExprEmitter, clamped_offset

loads = run_loads  # the tile-uniform loads along a kernel's inner index (whether runs apply: spec.lowering)


def _index_code(spec: KernelSpec, inner: str, prefix: str, test: bool):
    """(emitter, ok, idx): scalar code (in the emitter) for every uniform index over ``r_lo..r_hi``
    of the inner index (the other index over the program's tile): its lower bound, per load the
    index codes of its one entry (``idx``), and with ``test`` also the upper bound and ``ok``, true
    when all bounds meet."""
    other = "q" if inner == "kv" else "kv"
    env = {"b": ("b", 0), "h": ("h", 0), f"{other}_lo": (f"{other}_lo", 0), f"{other}_hi": (f"{other}_hi", 0),
           f"{inner}_lo": ("r_lo", 0), f"{inner}_hi": ("r_hi", 0)}
    em = ExprEmitter(env, 1, prefix=prefix)
    conds, idx = [], {}
    for ld, j in loads(spec, inner).items():
        ul = spec.uniform_loads[j]
        los = [em.emit(x) for x in ul.lo]
        if test:
            his = [em.emit(x) for x in ul.hi]
            conds += [f"({lo} == {hi})" for lo, hi, v in zip(los, his, ul.varying) if v]
        idx[j] = (ld, los)
    return em, " & ".join(conds), idx


def _run_range(side: str, n: str, block: str) -> tuple[str, str]:
    """First and last position of the ``n`` full tiles at the start ("pre") or end ("suf") of
    ``[f_begin, f_end)``."""
    if side == "pre":
        return f"f_begin * {block}", f"(f_begin + {n}) * {block} - 1"
    return f"(f_end - {n}) * {block}", f"f_end * {block} - 1"


def search(spec: KernelSpec, inner: str, block: str, ind: str) -> str:
    """Scalar code before the loop: ``n_pre``/``n_suf`` full tiles at the start/end of
    ``[f_begin, f_end)`` in constant runs, ``n_run`` their sum, and per uniform load j the entry
    of each run: its offset ``uo{j}_pre``/``uo{j}_suf`` and value ``uc{j}_pre``/``uc{j}_suf``."""
    code = f"{ind}# constant runs: full tiles at either end where every tile-uniform index is one entry\n"
    for side in ("pre", "suf"):
        em, ok, _ = _index_code(spec, inner, f"s{side[0]}", test=True)
        r_lo, r_hi = _run_range(side, "run_m", block)
        most = "n_full" if side == "pre" else "n_full - n_pre"
        code += (f"{ind}run_a = n_full * 0\n"
                 f"{ind}run_b = {most}\n"
                 f"{ind}while run_a < run_b:\n"
                 f"{ind}    run_m = (run_a + run_b + 1) // 2\n"
                 f"{ind}    r_lo = {r_lo}\n"
                 f"{ind}    r_hi = {r_hi}\n"
                 f"{em.take(0, ind + '    ')}"
                 f"{ind}    run_ok = {ok}\n"
                 f"{ind}    run_a = tl.where(run_ok, run_m, run_a)\n"
                 f"{ind}    run_b = tl.where(run_ok, run_b, run_m - 1)\n"
                 f"{ind}n_{side} = run_a\n")
    code += f"{ind}n_run = n_pre + n_suf\n"
    for side in ("pre", "suf"):
        em, _, idx = _index_code(spec, inner, f"e{side[0]}", test=False)
        r_lo, r_hi = _run_range(side, f"n_{side}", block)
        code += f"{ind}r_lo = {r_lo}\n{ind}r_hi = {r_hi}\n" + em.take(0, ind)
        for j, (ld, los) in idx.items():
            p = f"buf{ld.attr[0]}"
            code += (f"{ind}uo{j}_{side} = {clamped_offset(p, los)}\n"
                     f"{ind}uc{j}_{side} = tl.load({p} + uo{j}_{side}).to(tl.float32)\n")
    return code


def tile_lines(spec: KernelSpec, inner: str) -> list[str]:
    """Iteration ``it`` of the run loop: its tile and each uniform load's entry."""
    return (["tile = tl.where(it < n_pre, f_begin + it, f_end - n_run + it)"]
            + [f"uv{j} = tl.where(it < n_pre, uc{j}_pre, uc{j}_suf)" for j in loads(spec, inner).values()])


def bind(spec: KernelSpec, em: ExprEmitter, inner: str, stage: int) -> None:
    """In the run loop each uniform load is its run's scalar."""
    for ld, j in loads(spec, inner).items():
        em.names[ld] = (f"uv{j}", stage)


def grad_init(i: int, rows: str) -> str:
    return f"    gpre{i} = tl.zeros([{rows}], tl.float32)\n    gsuf{i} = tl.zeros([{rows}], tl.float32)\n"


def grad_loop(i: int, contrib: str, rows_ok: str, B: str) -> str:
    """Per run tile: the tile's gradient summed over keys (one value per query row), into its run."""
    return (f"{B}grow{i} = tl.sum(tl.where({rows_ok}, {contrib}, 0.0), 1)\n"
            f"{B}gpre{i} += tl.where(it < n_pre, grow{i}, 0.0)\n"
            f"{B}gsuf{i} += tl.where(it < n_pre, 0.0, grow{i})\n")


def grad_final(i: int, j: int) -> str:
    """After the run loop: one add per run into its entry (``gdst{i}``: the table, or the
    program's own row when deterministic)."""
    return "".join(f"    if n_{side} > 0:\n        tl.atomic_add(gdst{i} + uo{j}_{side}, tl.sum(g{side}{i}, 0))\n"
                   for side in ("pre", "suf"))

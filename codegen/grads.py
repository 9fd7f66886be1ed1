"""Gradients of learnable captured tensors in the dQ kernel: per-program and per-row sums, exact
per-element stores, per-entry and per-diagonal scatter adds, deterministic private rows, zero
fills (``GradLoad.scope``, ``passes/diagonal.py``)."""
from __future__ import annotations

from attndsl import ir
from attndsl.spec import KernelSpec

from . import runs as _runs
from .expr import ExprEmitter, clamped_offset

I1, I2 = " " * 4, " " * 8


#: a scattered gradient's tile whose entries lie within ``SCATTER_CHUNKS`` chunks of this many
#: offsets is summed per entry inside the tile (``_span_adds``); a wider tile adds per element
SCATTER_SPAN = 64
SCATTER_CHUNKS = 2
SCATTER_NONE = 1 << 62
SCATTER_NONE32 = (1 << 31) - 1
#: entries of a span summed side by side (see _span_adds)
SPAN_UNROLL = 4


def _per_entry_adds(o: str, off: str, ok: str, contrib: str, dst: str, B: str, none: int = SCATTER_NONE,
                    rank: int = 2) -> tuple[str, str]:
    """(setup, loop): the offsets ``o`` of a tile's table entries and their span (``none``: above
    any offset), then one masked reduction and one scalar atomic add per entry of the span
    (deterministic when ``dst`` is the program's own row: the adds run one after another in
    program order). ``rank``: of ``contrib``, a tile (2) or a vector of diagonal sums (1)."""
    masked = f"tl.where(({o} == e) & {ok}, {contrib}, 0.0)"
    total = f"tl.sum(tl.sum({masked}, 1), 0)" if rank == 2 else f"tl.sum({masked}, 0)"
    setup = (f"{B}{o} = {off}\n"
             f"{B}{o}_lo = tl.min(tl.where({ok}, {o}, {none}))\n"
             f"{B}{o}_hi = tl.max(tl.where({ok}, {o}, -1))\n")
    loop = (f"{B}for e in range({o}_lo, {o}_hi + 1):\n"
            f"{B}    tl.atomic_add({dst} + e, {total})\n")
    return setup, loop


def _scatter_code(i: int, contrib: str, p: str, idx: list[str], B: str, diag: tuple[str, str] | None = None) -> str:
    """Atomic adds of a tile's gradient into a table many pairs share (a relative-position table).

    Most tiles read a short run of entries (near the diagonal), so reduce per entry inside the tile
    and add once per entry; per-element atomic adds (all contending for a handful of addresses) only
    for tiles whose entries span more than ``SCATTER_CHUNKS * SCATTER_SPAN`` offsets. The span
    counts only elements with a nonzero gradient (masked pairs add nothing: a clipped distance's
    diagonal tile reads 129 entries, 65 of them unmasked). Offsets are 32-bit unless the table's
    can pass 2**31 (``GL{i}_WIDE``), and the entry loop keys on them relative to the tile's first
    entry: an int64 offset tile would hold 32 more registers per thread across the loop, and
    converting its pointers for the per-element adds cost 64 KiB of shared memory (a float32
    table then went over the H100's limit). Deterministic: always per entry, into the program's own
    row (``gdst{i}``). ``diag``: (lines, offset) of a table read along diagonals, summed per
    diagonal instead (``_diagonal_adds``, deterministic too), with no span."""
    if diag is not None:
        return _diagonal_adds(i, contrib, *diag, B)
    ok, o, key = "(q_idx < LQ) & (kv_idx < LKV)", f"goff{i}", f"gkey{i}"
    # keyed on the gradient tile: the offsets then take its layout once, not a converted compare
    # per entry
    live = f"{contrib} != 0.0"  # zero on the padding (``_grad_load_code``)
    det = _per_entry_adds(o, clamped_offset(p, idx), ok, contrib, f"gdst{i}", B + I1)
    B2 = B + I2
    return (f"{B}if DETERMINISTIC:\n{det[0]}{det[1]}"
            f"{B}else:\n"
            f"{B}    if GL{i}_WIDE:\n{B2}{o} = tl.where({live}, {clamped_offset(p, idx)}, {SCATTER_NONE})\n"
            f"{B}    else:\n{B2}{o} = tl.where({live}, {clamped_offset(p, idx, wide=False)}, {SCATTER_NONE32})\n"
            f"{B}    {o}_lo = tl.min({o})\n"
            f"{B}    {o}_hi = tl.max(tl.where({live}, {o}, -1))\n"
            f"{B}    if {o}_hi - {o}_lo < {SCATTER_CHUNKS * SCATTER_SPAN}:\n"
            f"{B2}{key} = tl.where({live}, ({o} - {o}_lo).to(tl.int32), -1)\n"
            f"{_span_adds(key, f'{o}_hi - {o}_lo', contrib, f'gdst{i} + {o}_lo', B2)}"
            f"{B}    else:\n"
            f"{B2}tl.atomic_add(gdst{i} + {o}, {contrib}, mask={live})\n")


def _diagonal_adds(i: int, contrib: str, lines: str, off: str, B: str) -> str:
    """Atomic adds of a tile's gradient into a table read along diagonals (its index is a function
    of ``dist = q - kv``, ``passes/diagonal.py``): one sum and one add per diagonal of the tile.

    Row ``r`` of the tile is rotated left by ``r`` (a gather within the row), which puts each
    diagonal in one column: column ``c`` then holds the diagonals ``q - kv = q_lo - kv_lo +
    w * BLOCK_N - c``, where ``w`` (0, 1, ...) counts how often the row's rotation wrapped round.
    One column sum per ``w`` gives every diagonal: a few passes over the tile, where a sum per
    entry (``_span_adds``) takes one per entry (32 on a T5 table's diagonal tiles). ``lines`` and
    ``off``: the table offset of each diagonal, as code over ``dist``. Deterministic: the
    diagonals' sums are added per entry, one scalar add after another into the program's own row
    (``_per_entry_adds`` over the diagonals instead of a tile's elements)."""
    rows, cols = "tl.arange(0, BLOCK_M)[:, None]", "tl.arange(0, BLOCK_N)"
    d = f"gdiag{i}"
    det = _per_entry_adds(f"doff{i}", off, f"({d} != 0.0)", d, f"gdst{i}", B + I2, rank=1)
    return (f"{B}gwrap{i} = {rows} + {cols}[None, :]\n"
            f"{B}grot{i} = tl.gather({contrib}, gwrap{i} % BLOCK_N, 1)\n"
            f"{B}gwrap{i} = gwrap{i} // BLOCK_N\n"
            # ``gw``, not ``w``: the dK/dV kernel's low-rank factor tile is ``w``
            f"{B}for gw in tl.static_range((BLOCK_M + BLOCK_N - 2) // BLOCK_N + 1):\n"
            f"{B}    {d} = tl.sum(tl.where(gwrap{i} == gw, grot{i}, 0.0), 0)\n"
            f"{B}    dist = q_lo - kv_lo + gw * BLOCK_N - {cols}\n"
            f"{lines}"
            f"{B}    if DETERMINISTIC:\n{det[0]}{det[1]}"
            f"{B}    else:\n"
            f"{B}        tl.atomic_add(gdst{i} + {off}, {d}, mask={d} != 0.0)\n")


def _diagonal_index(gl, p: str, em: ExprEmitter, B: str) -> tuple[str, str] | None:
    """(lines, offset) of the table entry of each diagonal, for a load read along diagonals."""
    if gl.diagonal is None:
        return None
    idx, lines = em.branch(2, B, lambda: [em.emit(a, 2) for a in gl.diagonal])
    return lines, clamped_offset(p, idx)


def _span_adds(key: str, last: str, contrib: str, dst: str, B: str) -> str:
    """A tile's sums per entry ``0..last`` of a span (``key``: the entry of each element, -1 for
    none), added with one vector atomic per ``SCATTER_SPAN`` entries at ``dst``: per entry only a
    sum along each query row (within a warp), kept in a [rows, span] tile; the sum over rows
    (across warps) once per chunk. A full reduction per entry would cost a barrier each.
    ``SPAN_UNROLL`` entries per iteration: one entry's compare, row sum and shuffles form a chain
    of dependent instructions, and independent chains side by side hide each other's latency
    (BENCHMARKS.md: dQ 3.89 -> 3.39 ms for a learnable T5 table at L=16384). Entries past
    ``last`` match no element and land in columns the atomic masks off."""
    sums = "".join(f"{B}        row_sum{k} = tl.sum(tl.where({key} == e + {k}, {contrib}, 0.0), 1)\n"
                   for k in range(SPAN_UNROLL))
    puts = "".join(f"{B}        per_row = tl.where(span[None, :] == e + {k} - chunk, row_sum{k}[:, None], per_row)\n"
                   for k in range(SPAN_UNROLL))
    return (f"{B}span = tl.arange(0, {SCATTER_SPAN})\n"
            f"{B}for chunk in range(0, {last} + 1, {SCATTER_SPAN}):\n"
            f"{B}    per_row = tl.zeros([BLOCK_M, {SCATTER_SPAN}], ACC_DTYPE)\n"
            f"{B}    for e in range(chunk, tl.minimum(chunk + {SCATTER_SPAN}, {last} + 1), {SPAN_UNROLL}):\n{sums}{puts}"
            f"{B}    tl.atomic_add({dst} + chunk + span, tl.sum(per_row, 0), mask=span <= {last} - chunk)\n")


def _private_row(gl, i: int, p: str, em: ExprEmitter) -> tuple[str, str]:
    """``gdst{i}``, where a shared table's gradient is added. Deterministic: the program's own row
    of partial sums, covering the slice of the table its b/h indices select (all dimensions from
    the first one indexed by q or kv); the row's offset in the table is stored for the host's
    ordered reduction (``runtime/launch.py``)."""
    args = gl.load.args
    d0 = next(d for d, a in enumerate(args) if ir.free_vars(a) & {"q", "kv"})
    prefix = [em.emit(a, 0) for a in args[:d0]]
    base = clamped_offset(p, prefix)
    row = f"{p}_stride{d0 - 1}" if d0 else f"{p}_size0 * {p}_stride0"
    pid = "(pid_bh.to(tl.int64) * tl.num_programs(0) + pid_m)"
    init = (f"    if DETERMINISTIC:\n"
            f"        gbase{i} = pid_m.to(tl.int64) * 0 + {base}\n"
            f"        gdst{i} = DBUF{gl.slot}_{i} + {pid} * ({row}) - gbase{i}\n"
            f"    else:\n"
            f"        gdst{i} = DBUF{gl.slot}_{i}\n")
    final = f"    if DETERMINISTIC:\n        tl.store(GOFF{gl.slot}_{i} + {pid}, gbase{i})\n"
    return init, final


def _reduced_write(gl, i: int, off: str, rows: str, part: str, mask: str) -> str:
    """Write ``gacc{i}`` ([rows, 1]: one sum per program or per query row) at table offsets ``off``:
    an atomic add, or (deterministic) an (offset, partial sum) pair per program or row at ``part``,
    reduced on the host in order."""
    dst, z = f"DBUF{gl.slot}_{i}", f"tl.zeros([{rows}, 1], tl.int64)"
    return (f"    if DETERMINISTIC:\n"
            f"        part{i} = {part}\n"
            f"        tl.store({dst} + part{i}, gacc{i}{mask})\n"
            f"        tl.store(GOFF{gl.slot}_{i} + part{i}, ({off}) + {z}{mask})\n"
            f"    else:\n"
            f"        tl.atomic_add({dst} + ({off}) + {z}, gacc{i}{mask})\n")


def _zero_unvisited(gl, i: int, p: str) -> str:
    """Zero the key tiles of this query-tile row that the loop did not visit, so a full-size
    gradient can start uninitialised (one pass over the untouched part instead of a memset of all)."""
    var = {"b": "b", "h": "h", "q": "q_idx", "kv": "zkv"}
    off = " + ".join(f"({var[a.attr]}).to(tl.int64) * {p}_stride{d}" for d, a in enumerate(gl.load.args))
    dst = f"DBUF{gl.slot}_{i}"
    return (f"    if GL{i}_ZERO_FILL:\n"
            f"        zeros{i} = tl.zeros([BLOCK_M, BLOCK_N], {dst}.dtype.element_ty)\n"
            f"        for zt in range(0, tl.cdiv(LKV, BLOCK_N) - n_tiles):\n"
            f"            zkv = (tl.where(zt < t_begin, zt, zt + n_tiles) * BLOCK_N + offs_n0)[None, :]\n"
            f"            tl.store({dst} + ({off}), zeros{i}, mask=(q_idx < LQ) & (zkv < LKV))\n")


def _grad_load_code(spec: KernelSpec, em: ExprEmitter, B: str, mode: str = "tested") -> tuple[str, str, str]:
    """Per learnable captured tensor: init, in-loop accumulation and final write of its gradient.

    ``mode`` as for :func:`_uniform_loads`. For a run loop ("run") the init and final are only its
    runs' sums (one per query row while looping, one add per run after it); the general loop's own
    init and final (private rows, zero fills) serve both loops."""
    init, loop, final = "", "", ""
    run_init, run_final = "", ""
    uniform = _runs.loads(spec, "kv") if mode != "plain" else {}
    for i, gl in enumerate(spec.grad_loads):
        g = f"gmod{i}"
        p = f"buf{gl.slot}"
        contrib = f"gl{i}"
        # ds is already multiplied by dmod; the chain rule for the load needs the raw ∂L/∂s_mod.
        # The padding rows and keys add nothing: their scores are not masked in full tiles, so exp2
        # may overflow there (inf * 0) and ∂score_mod may be inf or NaN. Every way of adding below
        # takes the contribution as selected here, except a run's row sums (full tiles: their rows
        # are selected in ``grad_loop``) and the exact scope's stores (bounds-masked, coalesced)
        term = f"ds_raw * {g}"
        if not (gl.load in uniform and mode == "run") and (gl.load in uniform or gl.scope != "exact"):
            term = f"tl.where((q_idx < LQ) & (kv_idx < LKV), {term}, 0.0)"
        loop += f"{B}{contrib} = {term}\n"
        if gl.load in uniform and mode == "run":
            run_init += _runs.grad_init(i, "BLOCK_M")
            loop += _runs.grad_loop(i, contrib, "q_idx < LQ", B)
            run_final += _runs.grad_final(i, uniform[gl.load])
            continue
        if gl.load in uniform:
            # tile-uniform index: one entry gets the whole tile's sum; the per-element index
            # arithmetic and the span reduction below run only on the other tiles
            loop += em.take(2, B)
            uoff = clamped_offset(p, em.uniform_index[gl.load])
            idx, body = em.branch(2, B + I1, lambda: [em.emit(a, 2) for a in gl.load.args])
            pinit, pfinal = _private_row(gl, i, p, em)
            init, final = init + pinit, final + pfinal
            loop += (f"{B}if uni{uniform[gl.load]}:\n"
                     f"{B}{I1}tl.atomic_add(gdst{i} + ({uoff}), "
                     f"tl.sum(tl.sum({contrib}, 1), 0))\n"
                     f"{B}else:\n{body}")
            loop += _scatter_code(i, contrib, p, idx, B + I1, _diagonal_index(gl, p, em, B + I2))
            continue
        idx = [em.emit(a, 2 if gl.scope in ("exact", "scatter", "col") else (0 if gl.scope == "program" else 1))
               for a in gl.load.args]
        off = clamped_offset(p, idx)
        if gl.scope == "program":
            init += f"    gacc{i} = tl.zeros([1, 1], ACC_DTYPE)\n"
            loop += f"{B}gacc{i} += tl.sum(tl.sum({contrib}, 1, keep_dims=True), 0, keep_dims=True)\n"
            final += _reduced_write(gl, i, off, "1", "pid_bh.to(tl.int64) * tl.num_programs(0) + pid_m + tl.zeros([1, 1], tl.int64)", "")
        elif gl.scope == "row":
            init += f"    gacc{i} = tl.zeros([BLOCK_M, 1], ACC_DTYPE)\n"
            loop += f"{B}gacc{i} += tl.sum({contrib}, 1, keep_dims=True)\n"
            final += _reduced_write(gl, i, off, "BLOCK_M", "(pid_bh.to(tl.int64) * tl.num_programs(0) + pid_m) * BLOCK_M + "
                                    "tl.arange(0, BLOCK_M)[:, None]", ", mask=q_idx < LQ")
        elif gl.scope == "col":
            # index follows kv only: sum over the tile's query rows, one atomic add per key;
            # deterministic: one scalar add per entry into the program's own row
            pinit, pfinal = _private_row(gl, i, p, em)
            init, final = init + pinit, final + pfinal
            c, ok = f"gcol{i}", "(kv_idx < LKV)"
            setup, per_entry = _per_entry_adds(f"{c}_off", off, ok, c, f"gdst{i}", B + I1)
            loop += (f"{B}{c} = tl.sum({contrib}, 0, keep_dims=True)\n"
                     f"{B}if DETERMINISTIC:\n{setup}{per_entry}"
                     f"{B}else:\n"
                     f"{B}    tl.atomic_add(DBUF{gl.slot}_{i} + ({off}), {c}, mask={ok})\n")
        elif gl.scope == "scatter":
            pinit, pfinal = _private_row(gl, i, p, em)
            init, final = init + pinit, final + pfinal
            loop += _scatter_code(i, contrib, p, idx, B, _diagonal_index(gl, p, em, B + I1))
        else:
            # (.., q, kv) of distinct plain indices: q/kv terms stay unclamped (coalesced stores) and
            # are bounds-masked like the forward's load, so a pair the forward read as 0 adds nothing
            terms, ok = [], "(q_idx < LQ) & (kv_idx < LKV)"
            for d, (a, x) in enumerate(zip(gl.load.args, idx)):
                if a.attr in ("q", "kv"):
                    terms.append(f"({x}).to(tl.int64) * {p}_stride{d}")
                    ok += f" & ({x} < {p}_size{d})"
                else:
                    terms.append(f"tl.minimum(tl.maximum({x}, 0), {p}_size{d} - 1).to(tl.int64) * {p}_stride{d}")
            off = " + ".join(terms)
            dst = f"DBUF{gl.slot}_{i}"
            loop += (f"{B}if GL{i}_ATOMIC:\n{B}    tl.atomic_add({dst} + ({off}), {contrib}, mask={ok})\n"
                     f"{B}else:\n{B}    tl.store({dst} + ({off}), {contrib}.to({dst}.dtype.element_ty), mask={ok})\n")
            if spec.lowering.dq_whole_range:
                final += _zero_unvisited(gl, i, p)
    if mode == "run":
        return run_init, loop, run_final
    return init, loop, final


def _bounded_offset(gl, p: str, idx: list[str]) -> tuple[str, str]:
    """(offset, in-bounds test) of a learnable load's element at index codes ``idx``, as the forward
    read it (``ExprEmitter._emit_load``): a plain ``q``/``kv`` index unclamped and bounds-tested
    (the forward read 0 there, so nothing is added), any other index clamped into the tensor. The
    test is "" where no index is plain."""
    terms, ok = [], []
    for d, (a, x) in enumerate(zip(gl.load.args, idx)):
        if a.op == "var" and a.attr in ("q", "kv"):
            terms.append(f"({x}).to(tl.int64) * {p}_stride{d}")
            ok.append(f"({x} < {p}_size{d})")
        else:
            terms.append(f"tl.minimum(tl.maximum({x}, 0), {p}_size{d} - 1).to(tl.int64) * {p}_stride{d}")
    return " + ".join(terms) or "0", " & ".join(ok)


def dkdv_grad_adds(spec: KernelSpec, em: ExprEmitter, B: str) -> str:
    """The learnable tensors' gradients of one (key tile, query tile) pair of the dK/dV kernel when
    it also computes dQ (``DQ_ATOMIC``; the dQ kernel, which adds them otherwise, does not run).

    The tile is transposed (keys on the rows, ``dsT_raw``: ∂L/∂score_mod) and every pair is visited
    once, by one program of the key tile: each scope is summed over the indices it does not follow
    and added with atomic adds ("program": one scalar per tile; "row": one per query, summed over
    the tile's keys; "col": one per key; "exact": per element, a plain store where each element
    belongs to one pair, ``GL{i}_ATOMIC`` False; "scatter": per element, or for a table read along
    diagonals one add per diagonal, as the dQ kernel does, on the transposed tile: ``_diagonal_adds``).
    Never deterministic: a deterministic backward keeps the dQ kernel (``config.atomic_dq``)."""
    code = ""
    live = "(q_idx < LQ) & (kv_idx < LKV)"
    for i, gl in enumerate(spec.grad_loads):
        p, dst = f"buf{gl.slot}", f"DBUF{gl.slot}_{i}"
        # padding rows and keys add nothing (their unmasked scores may give inf * 0 there)
        code += f"{B}gl{i} = tl.where({live}, dsT_raw * gmod{i}, 0.0)\n"
        if gl.scope == "scatter" and gl.diagonal is not None:  # query rows, key columns, as in dQ
            diag = _diagonal_index(gl, p, em, B + I1)
            code += f"{B}gdst{i} = {dst}\n" + _diagonal_adds(i, f"tl.trans(gl{i})", *diag, B)
            continue
        idx, body = em.branch(2, B, lambda gl=gl: [em.emit(a, 2) for a in gl.load.args])
        off, ok = _bounded_offset(gl, p, idx)
        code += body
        if gl.scope == "program":
            code += f"{B}tl.atomic_add({dst} + ({off}), tl.sum(tl.sum(gl{i}, 1), 0))\n"
        elif gl.scope == "row":  # queries along the tile's columns
            mask = " & ".join(["(q_idx < LQ)"] + ([ok] if ok else []))
            code += f"{B}tl.atomic_add({dst} + ({off}), tl.sum(gl{i}, 0, keep_dims=True), mask={mask})\n"
        elif gl.scope == "col":
            mask = " & ".join(["(kv_idx < LKV)"] + ([ok] if ok else []))
            code += f"{B}tl.atomic_add({dst} + ({off}), tl.sum(gl{i}, 1, keep_dims=True), mask={mask})\n"
        else:
            mask = " & ".join([live] + ([ok] if ok else []))
            add = f"tl.atomic_add({dst} + ({off}), gl{i}, mask={mask})\n"
            if gl.scope == "exact":
                code += (f"{B}if GL{i}_ATOMIC:\n{B}    {add}{B}else:\n"
                         f"{B}    tl.store({dst} + ({off}), gl{i}.to({dst}.dtype.element_ty), mask={mask})\n")
            else:
                code += B + add
    return code

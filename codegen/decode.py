"""Decode family: short queries against a long (optionally paged) KV cache, split over the keys.

Rendered from the same :class:`KernelSpec` and :class:`ExprEmitter` as the dense kernels: the
pattern's mask, score modifier and captured loads are emitted at the stage where their inputs
exist, the visit range is the spec's closed-form ``fwd_range`` and the attention math is the
prelude's online softmax (``_softmax_start/_update/_finish``, ``_sigmoid_update``).

Kernels (``render_decode``):

* ``{name}_decode``: one program per (split, batch x KV head x row block). Its M rows are the
  ``GROUP`` query heads that share the KV head times the ``LQ`` query tokens (token-major:
  row ``r`` is token ``r // GROUP``, head ``r % GROUP``), padded to ``BLOCK_M``; padded rows
  repeat the last real row, so reductions over rows need no mask. Each K/V row is read once for
  all of them. ``h`` and ``q`` are per-row vectors ``[BLOCK_M, 1]``: a visit range or tile test
  that reads ``h`` is reduced over the rows (the union of the rows' ranges). Query row ``t`` of
  sequence ``b`` sits at position ``QOFF[b] + t``; ``kv_max = SEQ[b] - 1``. The visited key tiles
  ``[t_begin, t_end)`` are cut into ``NSPLIT`` contiguous pieces, one per program (an empty piece
  runs no iteration and writes a dead partial; ``ROTATE``: each program walks its piece from a tile
  of its own, wrapping, so programs that start together do not read aligned regions in
  lockstep). Each program writes a float32 partial
  ``(out, lse)`` (``DIRECT``: with one split, the final output instead, sinks included);
  ``FUSED``: then counts in on its program's counter (``CNT``, an acq_rel atomic), and the last
  split of those rows merges the partials (``_merge_splits``) and zeroes the counter.
* ``{name}_decode_gather``: the same for a token selector (``indices [B, G, LQ, K]`` of logical
  key positions, DSA top-k): one program per (split, batch x KV head x row block x query token),
  rows = the query heads of one token; the selected slots are split over programs in chunks of
  ``BLOCK_N`` and only the selected rows are read (paged: each translated through the page table).
* ``{name}_decode_merge`` (the two-kernel path, without ``FUSED``): ``BLOCK_ROWS`` (batch, head,
  token) rows per program, merged by ``_merge_splits``: the partials by their logsumexp, sink
  logits joining the denominator once; sigmoid partials summed.

Keys: contiguous ``K [B, Hkv, Lmax, D]`` (``PAGED`` false) or a paged pool
``K [pages, PAGE_SIZE, Hkv, D]`` with ``PT [B, max_pages]`` (``PAGED``): a key tile of
``BLOCK_N <= PAGE_SIZE`` rows lies in one page (one scalar page lookup per tile); smaller pages
are looked up per row. The mask and score modifier see logical positions.
"""
from __future__ import annotations

from attndsl import ir
from attndsl.spec import KernelSpec, VisitBox, VisitRange

from .expr import ExprEmitter
from .attention import _dot, plain_score_lines, score_unit, scores_of
from .prelude import module_header
from .writer import Writer, kernel_def

#: Bump when the decode kernels change meaning; it is part of their cache key.
DECODE_VERSION = 4


def _env() -> dict:
    # stage 0: program scalars; 1: per row [BLOCK_M, 1] (head, query position); 2: per key tile
    return {"b": ("b", 0), "q_lo": ("q_lo", 0), "q_hi": ("q_hi", 0), "q_max": ("q_max", 0),
            "kv_max": ("kv_max", 0), "h": ("h_idx", 1), "q": ("q_idx", 1), "kv": ("kv_idx", 2),
            "kv_lo": ("kv_lo", 2), "kv_hi": ("kv_hi", 2), "score": ("score", 2)}


def _scalar(em: ExprEmitter, x, stage: int, reduce: str) -> str:
    """A plan expression as one scalar per program: an expression of the per-row ``h`` is reduced
    over the rows (``reduce``: "min" or "max"; padded rows repeat a real one). An integer one is a
    plan bound: int32 (``emit_bound``), as the dense plan's, whatever the captured tensors' widths."""
    code = em.emit(x, stage) if x.dtype == ir.BOOL else em.emit_bound(x, stage)
    if "h" in ir.free_vars(x):
        if x.dtype == ir.BOOL:
            return f"(tl.{reduce}(({code}).to(tl.int32)) > 0)"
        return f"tl.{reduce}({code})"
    return code


def _plan(spec: KernelSpec):
    """The 1-D closed-form range of the spec's forward plan (a layout's box plan: its flat hull),
    and whether its tiles carry a per-tile classification the decode kernel can use."""
    rng = spec.fwd_range
    if isinstance(rng, VisitBox):
        return rng.flat, False
    checked = isinstance(rng, VisitRange) and rng.tile_check and spec.tile_full is not None \
        and not spec.data_dependent
    return rng, checked


def _prologue(w: Writer, gather: bool) -> None:
    """Program ids, the packed rows (heads x tokens), the sequence's length and query offset,
    Q's rows, the K/V bases."""
    w.code("""
        split = tl.program_id(0)
        rest = tl.program_id(1)
    """)
    if gather:
        w.code("""
            t_tok = rest % LQ
            rest = rest // LQ
        """)
    w.code("""
        rb = rest % NROWB
        rest = rest // NROWB
        hk = rest % HKV
        b = rest // HKV
        h0 = hk * GROUP
        kv_len = tl.load(SEQ + b)
        if QOFF_FROM_LEN:  # the default: the new tokens are the cache's last ones
            q_off = kv_len - LQ
        else:
            q_off = tl.load(QOFF + b)
        kv_max = kv_len - 1
        offs_r = rb * BLOCK_M + tl.arange(0, BLOCK_M)
    """)
    if gather:
        w.code("""
            row_ok = offs_r < GROUP
            g_row = tl.minimum(offs_r, GROUP - 1)  # padded rows repeat the last real one
            t_row = t_tok + g_row * 0
        """)
    else:
        w.code("""
            row_ok = offs_r < GROUP * LQ
            r_c = tl.minimum(offs_r, GROUP * LQ - 1)  # padded rows repeat the last real one
            t_row = r_c // GROUP
            g_row = r_c % GROUP
        """)
    w.code("""
        heads = h0 + g_row
        h_idx = heads[:, None]
        q_idx = (q_off + t_row)[:, None]
        q_lo = q_off + tl.min(t_row)
        q_hi = q_off + tl.max(t_row)
        q_max = tl.maximum(kv_max, q_off + LQ - 1)
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < HEAD_D
        offs_dv = tl.arange(0, BLOCK_DV)
        dv_ok = offs_dv < HEAD_DV
        q = tl.load(Q + b.to(tl.int64) * stride_qb + heads[:, None].to(tl.int64) * stride_qh
                    + t_row[:, None].to(tl.int64) * stride_qm + offs_d[None, :] * stride_qd,
                    mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
        if PAGED:  # pools [pages, PAGE_SIZE, Hkv, D]: stride_kb is the page stride
            k_base = K + hk.to(tl.int64) * stride_kh
            v_base = V + hk.to(tl.int64) * stride_vh
            pt_base = PT + b.to(tl.int64) * stride_ptb
        else:
            k_base = K + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh
            v_base = V + b.to(tl.int64) * stride_vb + hk.to(tl.int64) * stride_vh
        if HAS_BIAS:  # low-rank bias: u rows of the packed rows; w rows per key tile
            offs_rk = tl.arange(0, BLOCK_R)
            rk_ok = offs_rk < RANK
            u = tl.load(U + b.to(tl.int64) * stride_ub + heads[:, None].to(tl.int64) * stride_uh
                        + t_row[:, None].to(tl.int64) * stride_um + offs_rk[None, :] * stride_ur,
                        mask=row_ok[:, None] & rk_ok[None, :], other=0.0)
            if UPCAST:
                u = u.to(tl.float32)
            w_base = W + b.to(tl.int64) * stride_wb + (h0 // W_GROUP).to(tl.int64) * stride_wh
        if SIGMOID_DEFAULT:
            sigmoid_bias = -tl.log(tl.maximum(kv_len, 1).to(tl.float32))
    """)


def _rows(w: Writer, scalar_page: bool) -> None:
    """``k_rows``/``v_rows``: the element offsets of the tile's key rows ``offs_n`` (logical
    positions; ``n_ok`` the rows that exist). ``scalar_page``: the tile lies in one page."""
    per_row = """
        page = tl.load(pt_base + (offs_n // PAGE_SIZE).to(tl.int64) * stride_ptp, mask=n_ok, other=0).to(tl.int64)
        in_page = (offs_n % PAGE_SIZE).to(tl.int64)
    """
    with w.block("if PAGED:"):
        if scalar_page:
            # the whole tile lies in one page: one lookup, and rows kv_lo % PAGE_SIZE + arange (contiguous:
            # vectorised loads, where offs_n % PAGE_SIZE would hide the contiguity from Triton)
            with w.block("if BLOCK_N <= PAGE_SIZE:"):
                w.code("""
                    page = tl.load(pt_base + (kv_lo // PAGE_SIZE).to(tl.int64) * stride_ptp).to(tl.int64)
                    in_page = (kv_lo % PAGE_SIZE + offs_n0).to(tl.int64)
                """)
            with w.block("else:"):
                w.code(per_row)
        else:
            w.code(per_row)
    w.code("""
        if PAGED:
            k_rows = page * stride_kb + in_page * stride_kn
            v_rows = page * stride_vb + in_page * stride_vn
        else:
            k_rows = offs_n.to(tl.int64) * stride_kn
            v_rows = offs_n.to(tl.int64) * stride_vn
        kT = tl.load(k_base + k_rows[None, :] + offs_d[:, None] * stride_kd, mask=n_ok[None, :] & d_ok[:, None], other=0.0)
        v = tl.load(v_base + v_rows[:, None] + offs_dv[None, :] * stride_vd, mask=n_ok[:, None] & dv_ok[None, :], other=0.0)
        if UPCAST:
            kT = kT.to(tl.float32)
            v = v.to(tl.float32)
        if HAS_BIAS:  # w is indexed by logical position
            wT = tl.load(w_base + offs_n[None, :].to(tl.int64) * stride_wn + offs_rk[:, None] * stride_wr,
                         mask=n_ok[None, :] & rk_ok[:, None], other=0.0)
            if UPCAST:
                wT = wT.to(tl.float32)
    """)


def _score(spec: KernelSpec, em: ExprEmitter, w: Writer) -> None:
    """``s``: the tile's scores in the normaliser's units (``kernels.score_unit``)."""
    bias = _dot("u", "wT")
    w.line(f"qk = {_dot('q', 'kT')}")
    if spec.score is None:
        w.emitted(plain_score_lines(spec, w.ind, "qk", bias))
        return
    s = em.emit(spec.score, 2)
    w.line("score = qk * sm_scale")
    with w.block("if HAS_BIAS:"):
        w.line(f"score += {bias}")
    w.emitted(em.take(2, w.ind))
    w.line(f"s = {scores_of(spec, s, 'qk')}")


def _mask(spec: KernelSpec, em: ExprEmitter, w: Writer, keep: str) -> None:
    """``s`` set to -inf where the mask (and ``keep``) fails."""
    if spec.mask is not None:
        m, body = em.branch(2, w.ind, lambda: em.emit(spec.mask, 2))
        w.emitted(body)
        keep = f"({m}) & {keep}"
    w.line(f's = tl.where({keep}, s, float("-inf"))')


def _update(spec: KernelSpec, w: Writer) -> None:
    if spec.normalizer == "softmax":
        w.line("m_i, l_i, acc = _softmax_update(m_i, l_i, acc, s, v, 1.0, 0.0, DOT_PRECISION, False, False)")
    else:
        w.line("acc = _sigmoid_update(acc, s, v, sigmoid_bias, Q, DOT_PRECISION)")


def _start(w: Writer) -> None:
    """The running max and sum before the first key: a sink joins here only where this program
    writes the final output (``DIRECT``); split partials leave it to the merge."""
    w.code("""
        if DIRECT:
            m_i, l_i = _softmax_start(Sinks + heads, row_ok, BLOCK_M, HAS_SINKS)
        else:
            m_i, l_i = _softmax_start(Sinks + heads, row_ok, BLOCK_M, False)
    """)


def _epilogue(spec: KernelSpec, w: Writer) -> None:
    """The final output (``DIRECT``) or this split's float32 partial; ``FUSED``: the last split of
    the program's rows to finish merges them (``_merge_splits``, as the merge kernel does)."""
    softmax = spec.normalizer == "softmax"
    w.line("out, lse = _softmax_finish(acc, m_i, l_i)" if softmax else "out = acc")
    w.code("""
        rows = (b * HQ + heads).to(tl.int64) * LQ + t_row
        out_rows = b.to(tl.int64) * stride_ob + heads.to(tl.int64) * stride_oh + t_row.to(tl.int64) * stride_om
    """)
    with w.block("if DIRECT:"):
        w.code("""
            tl.store(Out + out_rows[:, None] + offs_dv[None, :] * stride_od, out.to(Out.dtype.element_ty),
                     mask=row_ok[:, None] & dv_ok[None, :])
        """)
        if softmax:
            w.line("tl.store(Lse + rows, lse, mask=row_ok)")
    with w.block("else:"):
        w.code("""
            part = rows * NSPLIT + split
            tl.store(OP + part[:, None] * HEAD_DV + offs_dv[None, :], out, mask=row_ok[:, None] & dv_ok[None, :])
        """)
        if softmax:
            w.line("tl.store(LP + part, lse, mask=row_ok)")
        w.code(f"""
            if FUSED:  # the splits of this program's rows count in; the last one to finish merges them all
                tl.debug_barrier()  # every thread's partial stored before the release
                done = tl.atomic_add(CNT + tl.program_id(1), 1, sem="acq_rel", scope="gpu")
                if done == NSPLIT - 1:  # after the acquire: the other splits' partials are visible
                    _merge_splits(OP, LP, Out, Lse, Sinks, rows, heads, out_rows, row_ok, stride_od, NSPLIT,
                                  HEAD_DV, BLOCK_DV, HAS_SINKS, {softmax})
                    tl.atomic_xchg(CNT + tl.program_id(1), 0, sem="relaxed", scope="gpu")  # zero for the next call
        """)


def _signature(w: Writer, spec: KernelSpec, name: str) -> None:
    """The ``def`` of a decode or gather decode kernel: the spec's "decode" signature (``spec.lowering``)."""
    w.line("")
    w.emitted(kernel_def(name, spec.lowering.signature("decode")))


def decode_kernel(spec: KernelSpec) -> str:
    """``{name}_decode``: split-KV decode over the closed-form visit range (see the module doc)."""
    em = ExprEmitter(_env(), 3, prefix="v")
    rng, checked = _plan(spec)
    softmax = spec.normalizer == "softmax"
    w = Writer()
    _signature(w, spec, f"{spec.name}_decode")
    with w.indented():
        w.line(f'"""Split-KV decode ({spec.normalizer}): GQA heads x query tokens packed in M."""')
        _prologue(w, gather=False)
        for ld, _level in spec.lowering.load_stages:  # the mask's loads that follow no key: once per program
            if "kv" not in ir.free_vars(ld):
                em.emit(ld, 0)
        if rng is None:  # no 1-D hull: every key, every tile partial
            plan = ["lo = 0", "hi = kv_max", "ilo = 1", "ihi = 0"]
        else:
            plan = [f"lo = {_scalar(em, rng.outer[0], 1, 'min')}", f"hi = {_scalar(em, rng.outer[1], 1, 'max')}",
                    f"ilo = {_scalar(em, rng.inner[0], 1, 'max')}", f"ihi = {_scalar(em, rng.inner[1], 1, 'min')}"]
        w.emitted(em.take(0, w.ind))
        w.emitted(em.take(1, w.ind))
        for line in plan:
            w.line(line)
        w.code("""
            lo = tl.maximum(lo, 0)
            hi = tl.minimum(hi, kv_max)
            t_begin = lo // BLOCK_N
            t_end = tl.where(lo <= hi, hi // BLOCK_N + 1, t_begin)
            # tiles every row sees whole (no mask code): inside the inner range and the sequence
            f_begin = (tl.maximum(ilo, 0) + BLOCK_N - 1) // BLOCK_N
            f_end = (tl.minimum(ihi, kv_max) + 1) // BLOCK_N
            per = (t_end - t_begin + NSPLIT - 1) // NSPLIT
            it_begin = tl.minimum(t_begin + split * per, t_end)
            it_end = tl.minimum(it_begin + per, t_end)
            acc = tl.zeros([BLOCK_M, BLOCK_DV], ACC_DTYPE)
            offs_n0 = tl.arange(0, BLOCK_N)
            if ROTATE:  # each program starts its piece at its own tile (wrapping): no lockstep over aligned regions
                n_it = tl.maximum(it_end - it_begin, 1)
                shift = (tl.program_id(1) * 17 + split * 5) % n_it
        """)
        if softmax:
            _start(w)
        with w.block("for it in range(it_begin, it_end):"):
            w.code("""
                if ROTATE:
                    tile = it_begin + (it - it_begin + shift) % n_it
                else:
                    tile = it
                kv_lo = tile * BLOCK_N
                kv_hi = kv_lo + BLOCK_N - 1
                offs_n = kv_lo + offs_n0
                kv_idx = offs_n[None, :]
                n_ok = offs_n < kv_len
                is_partial = (tile < f_begin) | (tile >= f_end)
            """)
            body = w
            if checked:
                full = _scalar(em, spec.tile_full, 2, "min")
                nonempty = _scalar(em, spec.tile_nonempty, 2, "max")
                w.emitted(em.take(2, w.ind))
                w.line(f"is_partial = is_partial | ({full} == 0)")
                ctx = w.block(f"if {nonempty}:")
            else:
                ctx = w.indented(False)
            with ctx:
                _rows(body, scalar_page=True)
                _score(spec, em, body)
                with body.block("if is_partial:"):
                    _mask(spec, em, body, "n_ok[None, :]")
                em.forget(2)
                _update(spec, body)
        _epilogue(spec, w)
    return w.text()


def gather_kernel(spec: KernelSpec) -> str:
    """``{name}_decode_gather``: split-KV decode over the selected keys of a token selector."""
    em = ExprEmitter(_env(), 3, prefix="v")
    softmax = spec.normalizer == "softmax"
    w = Writer()
    _signature(w, spec, f"{spec.name}_decode_gather")
    with w.indented():
        w.line(f'"""Split-KV gather decode ({spec.normalizer}): the heads of one token packed in M."""')
        _prologue(w, gather=True)
        w.emitted(em.take(0, w.ind))
        w.emitted(em.take(1, w.ind))
        w.code("""
            idx_base = IDX + b.to(tl.int64) * stride_ib + (h0 // QPG).to(tl.int64) * stride_ig + t_tok.to(tl.int64) * stride_im
            n_chunks = (NSEL + BLOCK_N - 1) // BLOCK_N
            per = (n_chunks + NSPLIT - 1) // NSPLIT
            it_begin = tl.minimum(split * per, n_chunks)
            it_end = tl.minimum(it_begin + per, n_chunks)
            acc = tl.zeros([BLOCK_M, BLOCK_DV], ACC_DTYPE)
            offs_j0 = tl.arange(0, BLOCK_N)
        """)
        if softmax:
            _start(w)
        with w.block("for chunk in range(it_begin, it_end):"):
            w.code("""
                offs_j = chunk * BLOCK_N + offs_j0
                sel = tl.load(idx_base + offs_j.to(tl.int64) * stride_ij, mask=offs_j < NSEL, other=-1)
                n_ok = (sel >= 0) & (sel < kv_len)
            """)
            # chunks of unused slots (the -1 tail) cost one index load, no gather
            with w.block("if tl.sum(n_ok.to(tl.int32), 0) > 0:"):
                w.code("""
                    offs_n = tl.where(n_ok, sel, 0)
                    kv_idx = offs_n[None, :]
                    kv_lo = tl.min(offs_n)
                    kv_hi = tl.max(offs_n)
                """)
                _rows(w, scalar_page=False)
                _score(spec, em, w)
                _mask(spec, em, w, "n_ok[None, :]")
                em.forget(2)
                _update(spec, w)
        _epilogue(spec, w)
    return w.text()


#: the merge of the splits' partials: one helper for the merge kernel and the fused path (``FUSED``)
MERGE_SPLITS = '''
@triton.jit
def _merge_splits(OP, LP, Out, Lse, Sinks, rows, heads, out_rows, row_ok, stride_od, NSPLIT,
                  HEAD_DV: tl.constexpr, BLOCK_DV: tl.constexpr, HAS_SINKS: tl.constexpr, SOFTMAX: tl.constexpr):
    """The ``NSPLIT`` float32 partials of ``rows`` (``OP``/``LP`` at ``row * NSPLIT + split``) merged
    by their logsumexp, the sink logits of ``heads`` joining the denominator once (softmax), or
    summed (sigmoid); stored to ``Out + out_rows`` and ``Lse + rows``. Partials are read through L2
    (``.cg``): in the fused path other programs wrote them during this launch."""
    offs_dv = tl.arange(0, BLOCK_DV)
    ok = row_ok[:, None] & (offs_dv < HEAD_DV)[None, :]
    part = rows * NSPLIT
    o_ptr = OP + part[:, None] * HEAD_DV + offs_dv[None, :]
    acc = tl.zeros([rows.shape[0], BLOCK_DV], tl.float32)
    if SOFTMAX:
        m = tl.full([rows.shape[0]], float("-inf"), tl.float32)
        for s in range(0, NSPLIT):
            m = tl.maximum(m, tl.load(LP + part + s, mask=row_ok, other=float("-inf"), cache_modifier=".cg"))
        if HAS_SINKS:
            sink = tl.load(Sinks + heads, mask=row_ok, other=0.0).to(tl.float32)
            m = tl.maximum(m, sink)
        m_use = tl.where(m == float("-inf"), 0.0, m)
        denom = tl.zeros([rows.shape[0]], tl.float32)
        if HAS_SINKS:
            denom += tl.exp2((sink - m_use) * LOG2E)
        for s in range(0, NSPLIT):
            lse = tl.load(LP + part + s, mask=row_ok, other=float("-inf"), cache_modifier=".cg")
            wt = tl.exp2((lse - m_use) * LOG2E)
            denom += wt
            acc += tl.load(o_ptr + s * HEAD_DV, mask=ok, other=0.0, cache_modifier=".cg") * wt[:, None]
        dead = denom == 0.0
        acc = acc / tl.where(dead, 1.0, denom)[:, None]
        tl.store(Lse + rows, tl.where(dead, float("-inf"), m_use + tl.log2(tl.where(dead, 1.0, denom)) * LN2),
                 mask=row_ok)
    else:
        for s in range(0, NSPLIT):
            acc += tl.load(o_ptr + s * HEAD_DV, mask=ok, other=0.0, cache_modifier=".cg")
    tl.store(Out + out_rows[:, None] + offs_dv[None, :] * stride_od, acc.to(Out.dtype.element_ty), mask=ok)
'''

#: the merge kernel's body (its ``def`` is the spec's "decode_merge" signature)
MERGE = '''    """BLOCK_ROWS rows ``(b * HQ + h) * LQ + t``: their splits' partials merged (``_merge_splits``)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_ok = offs < NROWS
    rows = tl.minimum(offs, NROWS - 1)
    t = rows % LQ
    h = (rows // LQ) % HQ
    b = rows // (LQ * HQ)
    _merge_splits(OP, LP, Out, Lse, Sinks, rows, h, b * stride_ob + h * stride_oh + t * stride_om, row_ok,
                  stride_od, NSPLIT, HEAD_DV, BLOCK_DV, HAS_SINKS, SOFTMAX)
'''


def merge_kernel(spec: KernelSpec) -> str:
    """``{name}_decode_merge``: the splits' partials merged (see the module doc)."""
    return "\n" + kernel_def(f"{spec.name}_decode_merge", spec.lowering.signature("decode_merge")) + MERGE


def kernel_names(spec: KernelSpec) -> dict[str, str]:
    n = spec.name
    return {"decode": f"{n}_decode", "gather": f"{n}_decode_gather", "merge": f"{n}_decode_merge"}


def render_decode(spec: KernelSpec) -> str:
    """The generated module of the decode kernels for ``spec`` (see :func:`kernel_names`)."""
    head = module_header(spec, f"dec{DECODE_VERSION}", f"{spec.key} (decode kernels)")
    return "\n".join([head, MERGE_SPLITS, decode_kernel(spec), gather_kernel(spec), merge_kernel(spec)])

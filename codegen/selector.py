"""Index-selector kernels: token-level gather attention (forward, backward) and the lightning indexer.

Rendered from the same :class:`KernelSpec` and :class:`ExprEmitter` as the dense kernels, so a
pattern's mask and score modifier fuse into the gather loop (``kv_idx`` is the gathered key's
position).

Gather attention (DSA): ``indices[b, g, q, j]`` lists the keys query ``q`` of batch ``b`` may
visit, shared by the query heads of group ``g``. One program serves one query token and one
*unit*: the query heads that share both the selection group and the key/value head. Those heads
are packed into the M dimension of the matrix multiplies (``BLOCK_H`` rows, padded), so each
gathered key/value row serves all of them. The selected slots are visited in chunks of
``BLOCK_N``; a slot holding ``-1`` (or any index outside ``[0, Lkv)``) is unused and never read.

Backward: one kernel per (query, unit) that recomputes the probabilities, accumulates dQ in
registers and scatters dK/dV into float32 buffers with atomic adds (many queries select the same
key; duplicates inside one selection are added once per slot). A low-rank bias ``u·wᵀ`` joins the
score as one more small product per chunk (``w``'s rows gathered like K's); dU is summed in
registers, dW scattered like dK. Learnable captured tensors get ``∂L/∂s · ∂score_mod/∂(loaded
value)``: summed over the slots into one value per packed head when the index does not follow
``kv_idx`` (a per-head slope), into per-head bins when it reads a short table (T5 buckets), and
added per element otherwise (``_grad_code``).

Lightning indexer (DSA): ``I[b, g, t, s] = Σ_j w[b, j, t] · f(q_I[b, j, t] · k_I[b, g, s])`` over the
indexer heads ``j`` of group ``g``, where ``f`` is the traced score modifier (``ReLU`` for DSA) and
the traced mask sets ``I = -inf`` (causal for DSA). It writes one chunk of query rows at a time so
the runtime can run top-k per chunk in bounded memory.
"""
from __future__ import annotations

from contextlib import contextmanager

from attndsl import ir
from attndsl.spec import KernelSpec

from .expr import ExprEmitter
from .attention import I1, I2, I3, SECOND_PART, _dot, plain_score_lines, score_unit, scores_of
from .prelude import module_header
from .writer import Writer, kernel_def

#: Bump when the selector kernels change meaning; it is part of their cache key.
SELECTOR_VERSION = 6


def _finish(spec: KernelSpec, parts: list[str], what: str) -> str:
    head = module_header(spec, f"sel{SELECTOR_VERSION}", f"{spec.key} ({what})")
    return "\n".join([head] + parts)


def _common_env():
    # stage 0: program scalars; 1: the packed heads (a [BLOCK_H, 1] column); 2: the gathered slots
    return {"b": ("b", 0), "q": ("q_idx", 0), "q_lo": ("q_idx", 0), "q_hi": ("q_idx", 0),
            "q_max": ("q_max", 0), "kv_max": ("kv_max", 0), "h": ("h_idx", 1),
            "kv": ("kv_idx", 2), "score": ("score", 2)}


def _prologue(w: Writer, em: ExprEmitter) -> None:
    """The program's query token, packed heads, q tile, bases; the pattern's program-level (stage
    0) and per-head (stage 1) sub-expressions where their inputs exist."""
    w.code("""
        pid_q = tl.program_id(0)
        pid_bu = tl.program_id(1)
        b = pid_bu // NU
        u = pid_bu % NU
        h0 = u * HPU
        hk = h0 // GROUP
        g = h0 // QPG
        q_idx = pid_q + tl.zeros([1, 1], tl.int32)  # a tile: the interpreter refuses a block mask "&" a scalar one
        q_max = LQ - 1
        kv_max = LKV - 1
    """)
    w.emitted(em.take(0, w.ind))
    w.code("""
        offs_h = tl.arange(0, BLOCK_H)
        offs_d = tl.arange(0, BLOCK_D)
        h_ok = offs_h < HPU
        d_ok = offs_d < HEAD_D
        offs_dv = tl.arange(0, BLOCK_DV)  # the value head dim (may differ from the query/key one)
        dv_ok = offs_dv < HEAD_DV
        heads = h0 + offs_h
        h_idx = heads[:, None]
        hd_ok = h_ok[:, None] & d_ok[None, :]
        hdv_ok = h_ok[:, None] & dv_ok[None, :]
        q = tl.load(Q + b.to(tl.int64) * stride_qb + heads[:, None].to(tl.int64) * stride_qh
                    + pid_q.to(tl.int64) * stride_qm + offs_d[None, :] * stride_qd, mask=hd_ok, other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
    """)
    w.emitted(SECOND_PART.format(I=w.ind))
    w.code("""
        if HAS_D2:
            q2 = tl.load(Q + b.to(tl.int64) * stride_qb + heads[:, None].to(tl.int64) * stride_qh
                         + pid_q.to(tl.int64) * stride_qm + offs_d2[None, :] * stride_qd, mask=h_ok[:, None] & d2_ok[None, :],
                         other=0.0)
            if UPCAST:
                q2 = q2.to(tl.float32)
        k_base = K + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh
        v_base = V + b.to(tl.int64) * stride_vb + hk.to(tl.int64) * stride_vh
        idx_base = IDX + b.to(tl.int64) * stride_ib + g.to(tl.int64) * stride_ig + pid_q.to(tl.int64) * stride_im
        if HAS_BIAS:  # low-rank bias: this query's u rows for the packed heads; w rows are gathered per chunk
            offs_r = tl.arange(0, BLOCK_R)
            r_ok = offs_r < RANK
            u = tl.load(U + b.to(tl.int64) * stride_ub + heads[:, None].to(tl.int64) * stride_uh
                        + pid_q.to(tl.int64) * stride_um + offs_r[None, :] * stride_ur, mask=h_ok[:, None] & r_ok[None, :],
                        other=0.0)
            if UPCAST:
                u = u.to(tl.float32)
            w_base = W + b.to(tl.int64) * stride_wb + (h0 // W_GROUP).to(tl.int64) * stride_wh
    """)
    w.emitted(em.take(1, w.ind))


@contextmanager
def _chunk_loop(w: Writer, transposed_v: bool):
    """``for j0 in range(0, NSEL, BLOCK_N):`` over the selected slots, and inside it the chunk's
    gathered keys, values and scores ``qk``. The body (the ``with`` block's) runs only for chunks
    with a used slot: chunks of unused slots (the ``-1`` tail of rows with fewer than K keys) cost
    one index load, no gather."""
    v = "vT" if transposed_v else "v"
    vload = (f"vT = tl.load(v_base + kv_safe[None, :] * stride_vn + offs_dv[:, None] * stride_vd, "
             f"mask=valid[None, :] & dv_ok[:, None], other=0.0)" if transposed_v else
             f"v = tl.load(v_base + kv_safe[:, None] * stride_vn + offs_dv[None, :] * stride_vd, "
             f"mask=valid[:, None] & dv_ok[None, :], other=0.0)")
    with w.block("for j0 in range(0, NSEL, BLOCK_N):"):
        w.code("""
            offs_j = j0 + tl.arange(0, BLOCK_N)
            sel = tl.load(idx_base + offs_j.to(tl.int64) * stride_ij, mask=offs_j < NSEL, other=-1)
            valid = (sel >= 0) & (sel < LKV)
        """)
        with w.block("if tl.sum(valid.to(tl.int32), 0) > 0:"):
            w.code("""
                kv_safe = tl.where(valid, sel, 0).to(tl.int64)
                kv_idx = kv_safe[None, :]
                kd_ok = valid[None, :] & d_ok[:, None]
                kT = tl.load(k_base + kv_safe[None, :] * stride_kn + offs_d[:, None] * stride_kd, mask=kd_ok, other=0.0)
                if HAS_D2:
                    kT2 = tl.load(k_base + kv_safe[None, :] * stride_kn + offs_d2[:, None] * stride_kd,
                                  mask=valid[None, :] & d2_ok[:, None], other=0.0)
            """)
            w.line(vload)
            w.code(f"""
                if UPCAST:
                    kT = kT.to(tl.float32)
                    {v} = {v}.to(tl.float32)
                    if HAS_D2:
                        kT2 = kT2.to(tl.float32)
                qk = {_dot("q", "kT")}
                if HAS_D2:
                    qk = tl.dot(q2, kT2, qk, input_precision=DOT_PRECISION)
                if HAS_BIAS:
                    wT = tl.load(w_base + kv_safe[None, :] * stride_wn + offs_r[:, None] * stride_wr,
                                 mask=valid[None, :] & r_ok[:, None], other=0.0)
                    if UPCAST:
                        wT = wT.to(tl.float32)
            """)
            yield w


def _score_and_mask(spec: KernelSpec, em: ExprEmitter, backward: bool, w: Writer) -> None:
    """Score (log2 units for softmax, 1/2 for sigmoid), its derivative in the backward, and the
    mask, inside the slot loop.

    ``keep``: the pairs that count (a valid slot, a real head, the mask). Sub-expressions that do
    not depend on the slot land in the prologue (stages 0 and 1), so the caller takes those stages
    only after calling this."""
    bias = _dot("u", "wT")  # the low-rank bias joins the scaled score before score_mod
    if spec.score is not None:
        s = em.emit(spec.score, 0)
        ds = em.emit(spec.dscore, 0) if backward else None
        w.line("score = qk * sm_scale")
        with w.block("if HAS_BIAS:"):
            w.line(f"score += {bias}")
        w.emitted(em.take(2, w.ind))
        w.line(f"s = {scores_of(spec, s, 'qk')}")
        if backward:
            w.line(f"dmod = {ds}")
    else:
        w.emitted(plain_score_lines(spec, w.ind, "qk", bias))
    keep = "valid[None, :] & h_ok[:, None]"
    if spec.mask is not None:
        m = em.emit(spec.mask, 0)
        w.emitted(em.take(2, w.ind))
        keep = f"({m}) & {keep}"
    w.line(f"keep = {keep}")
    w.line('s = tl.where(keep, s, float("-inf"))')


def _signature(w: Writer, name: str, params) -> None:
    w.line("")
    w.emitted(kernel_def(name, params))


def gather_forward(spec: KernelSpec) -> str:
    em = ExprEmitter(_common_env(), 3, prefix="v")
    w = Writer()
    _signature(w, f"{spec.name}_fwd", spec.lowering.signature("gather_fwd"))
    softmax = spec.normalizer == "softmax"
    body = Writer(3)
    _score_and_mask(spec, em, False, body)
    with w.indented():
        w.line(f'"""Gather forward ({spec.normalizer}): one program per (query token, batch*unit); heads packed in M."""')
        _prologue(w, em)
        w.line("acc = tl.zeros([BLOCK_H, BLOCK_DV], tl.float32)")
        if softmax:
            w.line("m_i, l_i = _softmax_start(Sinks + heads, h_ok, BLOCK_H, HAS_SINKS)")
        with _chunk_loop(w, transposed_v=False):
            w.emitted(body.text())
            if softmax:
                w.line("m_i, l_i, acc = _softmax_update(m_i, l_i, acc, s, v, 1.0, 0.0, DOT_PRECISION, False, False)")
            else:  # sigmoid: no row normaliser, no running maximum, no lse
                w.line("acc = _sigmoid_update(acc, s, v, sigmoid_bias, Q, DOT_PRECISION)")
        if softmax:
            w.line("out, lse = _softmax_finish(acc, m_i, l_i)")
            w.line("tl.store(Lse + (b * (NU * HPU) + heads).to(tl.int64) * LQ + pid_q, lse, mask=h_ok)")
        else:
            w.line("out = acc")
        w.code("""
            tl.store(Out + b.to(tl.int64) * stride_ob + heads[:, None].to(tl.int64) * stride_oh
                     + pid_q.to(tl.int64) * stride_om + offs_dv[None, :] * stride_od, out.to(Out.dtype.element_ty), mask=hdv_ok)
        """)
    return w.text()


def gather_backward(spec: KernelSpec) -> str:
    em = ExprEmitter(_common_env(), 3, prefix="v")
    softmax = spec.normalizer == "softmax"
    body = Writer(3)
    _score_and_mask(spec, em, True, body)
    grads = _grad_code(spec, em, body.ind)
    w = Writer()
    _signature(w, f"{spec.name}_bwd", spec.lowering.signature("gather_bwd"))
    with w.indented():
        w.code('''
            """Gather backward: dQ (and dU) in registers; dK/dV (and dW, captured tensors' gradients)
            added into float32 buffers with atomic adds."""
        ''')
        _prologue(w, em)
        w.code("""
            do = tl.load(DO + b.to(tl.int64) * stride_dob + heads[:, None].to(tl.int64) * stride_doh
                         + pid_q.to(tl.int64) * stride_dom + offs_dv[None, :] * stride_dod, mask=hdv_ok, other=0.0)
            o = tl.load(Out + b.to(tl.int64) * stride_ob + heads[:, None].to(tl.int64) * stride_oh
                        + pid_q.to(tl.int64) * stride_om + offs_dv[None, :] * stride_od, mask=hdv_ok, other=0.0)
            if UPCAST:
                do = do.to(tl.float32)
            row = (b * (NU * HPU) + heads).to(tl.int64) * LQ + pid_q
            delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
            if HAS_DLSE:
                # d lse_i / d s_ij = p_ij, so an lse gradient shifts the softmax correction term
                delta = delta - tl.load(DLse + row, mask=h_ok, other=0.0)
            lse = _lse_log2(tl.load(Lse + row, mask=h_ok, other=0.0))
            dk_base = DK + b.to(tl.int64) * stride_dkb + hk.to(tl.int64) * stride_dkh
            dv_base = DV + b.to(tl.int64) * stride_dvb + hk.to(tl.int64) * stride_dvh
            dq = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
            if HAS_D2:
                dq2 = tl.zeros([BLOCK_H, BLOCK_D2], tl.float32)
            if HAS_BIAS:
                du = tl.zeros([BLOCK_H, BLOCK_R], tl.float32)
                dw_base = DW + b.to(tl.int64) * stride_dwb + (h0 // W_GROUP).to(tl.int64) * stride_dwh
        """)
        w.emitted(grads[0])
        with _chunk_loop(w, transposed_v=True):
            w.emitted(body.text())
            if softmax:
                w.line("p = _softmax_probs(s, lse[:, None])")
            else:
                w.line("p = _sigmoid_probs(s, sigmoid_bias, Q)")
            w.line(f"dp = {_dot('do', 'vT')}")
            w.line("ds_raw = _softmax_dscore(p, dp, delta[:, None])" if softmax else "ds_raw = _sigmoid_dscore(p, dp)")
            w.line("ds = ds_raw * dmod" if spec.score is not None else "ds = ds_raw")
            w.emitted(grads[1])
            w.code(f"""
                if HAS_BIAS:  # the bias joins the score before score_mod: its gradient is ds, unscaled
                    du += {_dot("ds.to(wT.dtype)", "tl.trans(wT)")}
                    dw_rows = {_dot("tl.trans(ds).to(u.dtype)", "u")}
                    tl.atomic_add(dw_base + kv_safe[:, None] * stride_dwn + offs_r[None, :], dw_rows,
                                  mask=valid[:, None] & r_ok[None, :], sem="relaxed")
                # each row block is added as soon as it is made: two [BLOCK_N, D] float32 blocks live at
                # once would spill
                dq += {_dot("ds.to(kT.dtype)", "tl.trans(kT)")}
                dk_rows = {_dot("tl.trans(ds).to(q.dtype)", "q")} * sm_scale
                tl.atomic_add(dk_base + kv_safe[:, None] * stride_dkn + offs_d[None, :] * stride_dkd, dk_rows,
                              mask=valid[:, None] & d_ok[None, :], sem="relaxed")
                if HAS_D2:
                    dq2 += {_dot("ds.to(kT2.dtype)", "tl.trans(kT2)")}
                    dk2_rows = {_dot("tl.trans(ds).to(q2.dtype)", "q2")} * sm_scale
                    tl.atomic_add(dk_base + kv_safe[:, None] * stride_dkn + offs_d2[None, :] * stride_dkd, dk2_rows,
                                  mask=valid[:, None] & d2_ok[None, :], sem="relaxed")
                dv_rows = {_dot("tl.trans(p).to(do.dtype)", "do")}
                tl.atomic_add(dv_base + kv_safe[:, None] * stride_dvn + offs_dv[None, :] * stride_dvd, dv_rows,
                              mask=valid[:, None] & dv_ok[None, :], sem="relaxed")
            """)
        w.code("""
            dq = dq * sm_scale
            tl.store(DQ + b.to(tl.int64) * stride_dqb + heads[:, None].to(tl.int64) * stride_dqh
                     + pid_q.to(tl.int64) * stride_dqm + offs_d[None, :] * stride_dqd, dq.to(DQ.dtype.element_ty), mask=hd_ok)
            if HAS_D2:
                dq2 = dq2 * sm_scale
                tl.store(DQ + b.to(tl.int64) * stride_dqb + heads[:, None].to(tl.int64) * stride_dqh
                         + pid_q.to(tl.int64) * stride_dqm + offs_d2[None, :] * stride_dqd, dq2.to(DQ.dtype.element_ty),
                         mask=h_ok[:, None] & d2_ok[None, :])
            if HAS_BIAS:  # added: u may be shared by the batch or the heads (stride 0)
                tl.atomic_add(DU + b.to(tl.int64) * stride_dub + heads[:, None].to(tl.int64) * stride_duh
                              + pid_q.to(tl.int64) * stride_dum + offs_r[None, :], du, mask=h_ok[:, None] & r_ok[None, :],
                              sem="relaxed")
        """)
        w.emitted(grads[2])
    return w.text()


def _grad_code(spec: KernelSpec, em: ExprEmitter, B: str) -> tuple[str, str, str]:
    """(init, slot-loop body, final) adding each learnable captured tensor's gradient into its
    float32 buffer ``DBUF{slot}_{i}``: ``ds_raw · ∂score_mod/∂(loaded value)`` over the kept pairs.

    How, by the load's index:
    - it does not follow ``kv_idx`` (a slope per head, a value per query): summed over the slots in
      registers, added once per packed head after the loop;
    - a table whose one kv-indexed dimension has at most ``max_bins`` entries (``spec.lowering.binned``;
      relative-position and T5 tables): summed into [heads, bins] in registers by matrix products
      with the chunk's one-hot entries, ``GL{i}_PIECES`` pieces of ``GL{i}_BINS`` bins, each only
      when a key of the chunk falls in it; added once per bin after the loop. Per-element adds
      would all contend for the few saturated entries (BENCHMARKS.md: DSA with a relative table);
    - otherwise (pair biases, per-key tables) added per element, or per slot after a sum over the
      packed heads when the index does not follow the head.
    Plain ``q_idx``/``kv_idx`` indices past the tensor add nothing (the forward read 0 there); other
    indices are clamped into it, as the forward's load was."""
    init, loop, final = "", "", ""
    for i, gl in enumerate(spec.grad_loads):
        p, dst = f"buf{gl.slot}", f"DBUF{gl.slot}_{i}"
        loop += f"{B}gmod{i} = {em.emit(gl.grad, 0)}\n"
        follows_kv = any("kv" in ir.free_vars(a) for a in gl.load.args)
        follows_h = any("h" in ir.free_vars(a) for a in gl.load.args)
        idx = [em.emit(a, 0) for a in gl.load.args]
        terms, ok = [], ""
        for d, (a, x) in enumerate(zip(gl.load.args, idx)):
            if a.op == "var" and a.attr in ("q", "kv"):
                terms.append(f"({x}).to(tl.int64) * {p}_stride{d}")
                ok += f" & ({x} < {p}_size{d})"
            else:
                terms.append(f"tl.minimum(tl.maximum({x}, 0), {p}_size{d} - 1).to(tl.int64) * {p}_stride{d}")
        off = " + ".join(terms) or "0"
        contrib = f"tl.where(keep, ds_raw * gmod{i}, 0.0)"
        if not follows_kv:
            init += f"{I1}gacc{i} = tl.zeros([BLOCK_H, 1], tl.float32)\n"
            loop += f"{B}gacc{i} += tl.sum({contrib}, 1, keep_dims=True)\n"
            final += (f"{I1}goff{i} = {off} + tl.zeros([BLOCK_H, 1], tl.int64)\n"
                      f"{I1}tl.atomic_add({dst} + goff{i}, gacc{i}, mask=h_ok[:, None]{ok}, sem=\"relaxed\")\n")
            continue
        if follows_h:
            element = (f"goff{i} = {off} + tl.zeros([BLOCK_H, BLOCK_N], tl.int64)\n",
                       f"tl.atomic_add({dst} + goff{i}, {contrib}, mask=keep{ok}, sem=\"relaxed\")\n")
        else:  # every packed head adds to the same entry: one add per slot
            element = (f"goff{i} = {off} + tl.zeros([1, BLOCK_N], tl.int64)\n",
                       f"tl.atomic_add({dst} + goff{i}, tl.sum({contrib}, 0, keep_dims=True), "
                       f"mask=valid[None, :]{ok}, sem=\"relaxed\")\n")
        kd = spec.lowering.binned[i]
        if kd is None:
            loop += "".join(B + line for line in element)
            continue
        key = f"tl.minimum(tl.maximum({idx[kd]}, 0), {p}_size{kd} - 1)"
        rows = " + ".join(t for d, t in enumerate(terms) if d != kd) or "0"
        b_init, b_loop, b_final = _binned_adds(spec, i, key, rows, contrib, f"{dst} + ", f"{p}_stride{kd}",
                                               f"{p}_size{kd}", ok, B)
        init, final = init + b_init, final + b_final
        loop += b_loop + f"{B}else:\n" + "".join(B + I1 + line for line in element)
    return init, em.take(2, B) + loop if spec.grad_loads else loop, final


def _binned_adds(spec: KernelSpec, i: int, key: str, rows: str, contrib: str, dst: str, stride: str, size: str,
                 ok: str, B: str) -> tuple[str, str, str]:
    """(init, loop, final) of a table's gradient summed into per-head bins (see ``_grad_code``):
    ``key`` the slots' entries along the binned dim, ``rows`` the offset of each packed head's row;
    ``GL{i}_PIECES`` pieces of ``GL{i}_BINS`` bins. The loop part is an ``if GL{i}_PIECES > 0:``
    block, the caller's ``else`` follows it."""
    width, pieces = f"GL{i}_BINS", f"GL{i}_PIECES"
    init, final = "", ""
    B1, B2 = B + I1, B + I2
    loop = (f"{B}if {pieces} > 0:\n"
            f"{B1}gkey{i} = tl.trans({key} + tl.zeros([1, BLOCK_N], tl.int32))\n"
            f"{B1}gc{i} = {contrib}\n"
            f"{B1}if {pieces} == 1:  # every key in the one piece: no test\n"
            f"{B2}gbins{i}_0 = tl.dot(gc{i}, (gkey{i} == tl.arange(0, {width})[None, :]).to(tl.float32), "
            f"gbins{i}_0, input_precision=BIN_PRECISION)\n"
            f"{B1}else:\n"
            f"{B2}gpiece{i} = gkey{i} // {width}\n"
            f"{B2}ghot{i} = gkey{i} % {width} == tl.arange(0, {width})[None, :]\n")
    for c in range(spec.lowering.max_bins // spec.lowering.bin_piece):
        acc, lo = f"gbins{i}_{c}", (f"{c} * {width} + " if c else "")
        init += f"{I1}if {pieces} > {c}:\n{I2}{acc} = tl.zeros([BLOCK_H, {width}], tl.float32)\n"
        # a piece no key of the chunk falls in costs one compare (a saturated table's keys mostly
        # fall in its last piece)
        loop += (f"{B2}if {pieces} > {c}:\n"
                 f"{B2}{I1}if tl.sum((gpiece{i} == {c}).to(tl.int32)) > 0:\n"
                 f"{B2}{I2}{acc} = tl.dot(gc{i}, (ghot{i} & (gpiece{i} == {c})).to(tl.float32), {acc}, "
                 f"input_precision=BIN_PRECISION)\n")
        final += (f"{I1}if {pieces} > {c}:\n"
                  f"{I2}gbin{i} = {lo}tl.arange(0, {width})[None, :]\n"
                  f"{I2}goff{i} = {rows} + gbin{i}.to(tl.int64) * {stride} + tl.zeros([BLOCK_H, 1], tl.int64)\n"
                  f"{I2}tl.atomic_add({dst}goff{i}, {acc}, mask=h_ok[:, None] & (gbin{i} < {size}){ok}, "
                  f"sem=\"relaxed\")\n")
    return init, loop, final


def render_gather(spec: KernelSpec) -> str:
    """The generated module of gather kernels for ``spec`` (kernels ``{name}_fwd``, ``{name}_bwd``)."""
    return _finish(spec, [gather_forward(spec), gather_backward(spec)], "token-selector gather kernels")


# -------------------------------------------------------------------------------------------
def indexer_scores(spec: KernelSpec) -> str:
    """Lightning-indexer scores for one chunk of query rows: ``[B, G, rows, kv window]`` float32.

    The score modifier sees ``h`` = the indexer head ``j``; the mask sees ``h`` = the group ``g``.
    Tiles the mask rules out entirely (closed form, e.g. above the causal diagonal) skip the
    matrix multiplies and store ``-inf``.
    """
    env_s = {"b": ("b", 0), "q": ("t_idx", 0), "kv": ("s_idx", 0), "q_lo": ("t_lo", 0), "q_hi": ("t_hi", 0),
             "kv_lo": ("s_lo", 0), "kv_hi": ("s_hi", 0), "q_max": ("q_max", 0), "kv_max": ("kv_max", 0),
             "h": ("j", 1), "score": ("score", 1)}
    env_m = dict(env_s, h=("g", 0))
    es = ExprEmitter(env_s, 2, prefix="f")
    em = ExprEmitter(env_m, 2, prefix="m")
    f = es.emit(spec.score, 1) if spec.score is not None else "score"
    keep, nonempty = "ok", "1"
    if spec.mask is not None:
        keep = f"({em.emit(spec.mask, 0)}) & ok"
        if spec.tile_nonempty is not None:
            nonempty = em.emit(spec.tile_nonempty, 0)
    pre = em.take(0, I1) + es.take(0, I1)
    inner = es.take(1, I3)
    return f'''
{kernel_def(f"{spec.name}_scores", spec.lowering.signature("scores"))}    """Rows T0..T0+NT-1, keys S0..S0+NS-1 of I = sum_j w[j] * f(q_I[j] . k_I), masked to -inf."""
    pid_t = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_bg = tl.program_id(2)
    b = pid_bg // G
    g = pid_bg % G
    offs_t = T0 + pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_s = S0 + pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    t_in = offs_t < T0 + NT
    s_in = offs_s < S0 + NS
    t_idx = offs_t[:, None]
    s_idx = offs_s[None, :]
    t_lo = T0 + pid_t * BLOCK_T
    t_hi = tl.minimum(t_lo + BLOCK_T, T0 + NT) - 1
    s_lo = S0 + pid_s * BLOCK_S
    s_hi = tl.minimum(s_lo + BLOCK_S, S0 + NS) - 1
    q_max = LQ - 1
    kv_max = LKV - 1
    ok = t_in[:, None] & s_in[None, :]
{pre}    acc = tl.zeros([BLOCK_T, BLOCK_S], tl.float32)
    if {nonempty}:
        d_ok = offs_d < HEAD_D
        kT = tl.load(KI + b.to(tl.int64) * stride_kb + g.to(tl.int64) * stride_kg + offs_s[None, :].to(tl.int64) * stride_kn
                     + offs_d[:, None] * stride_kd, mask=s_in[None, :] & d_ok[:, None], other=0.0)
        if UPCAST:
            kT = kT.to(tl.float32)
        for jj in range(0, HPG):
            j = g * HPG + jj
            qi = tl.load(QI + b.to(tl.int64) * stride_qb + j.to(tl.int64) * stride_qh + offs_t[:, None].to(tl.int64) * stride_qm
                         + offs_d[None, :] * stride_qd, mask=t_in[:, None] & d_ok[None, :], other=0.0)
            if UPCAST:
                qi = qi.to(tl.float32)
            score = {_dot("qi", "kT")} * scale
{inner}            val = {f}
            if HAS_W:
                w = tl.load(W + b.to(tl.int64) * stride_wb + j.to(tl.int64) * stride_wh + offs_t.to(tl.int64) * stride_wm,
                            mask=t_in, other=0.0).to(tl.float32)
                val = val * w[:, None]
            acc += val
    acc = tl.where({keep}, acc, float("-inf"))
    tl.store(S + b.to(tl.int64) * stride_sb + g.to(tl.int64) * stride_sg + (offs_t - T0)[:, None].to(tl.int64) * stride_sm
             + (offs_s - S0)[None, :].to(tl.int64) * stride_sn, acc, mask=ok)
'''


def render_indexer(spec: KernelSpec) -> str:
    """The generated module of the lightning-indexer score kernel (``{name}_scores``)."""
    return _finish(spec, [indexer_scores(spec)], "lightning indexer")

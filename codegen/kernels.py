"""Triton kernel templates: forward, backward (delta, dK/dV, dQ) and the block-table kernel.

Each template is filled from a KernelSpec: the pattern's expressions are emitted by
:class:`ExprEmitter` at the loop level where their inputs exist, and the visit plan (which tiles
to visit, which are full) comes from the spec's closed-form ranges or from a block table.
"""
from __future__ import annotations

from attndsl import ir
from attndsl.passes.diagonal import DIST
from attndsl.spec import KernelSpec, VisitBox, VisitRange

from . import box as _box
from . import runs as _runs
from .expr import ExprEmitter, clamped_offset

I1, I2, I3, I4 = (" " * n for n in (4, 8, 12, 16))


def buffer_params(spec: KernelSpec) -> str:
    out = []
    for b in spec.buffers:
        p = f"buf{b.slot}"
        out.append(p)
        out += [f"{p}_size{d}" for d in range(b.ndim)]
        out += [f"{p}_stride{d}" for d in range(b.ndim)]
    return "".join(f"{x}, " for x in out)


def _plan_lines(em: ExprEmitter, rng: VisitRange, stage: int, block: str, t_max: str, table: bool) -> list[str]:
    """Scalar code computing the tiles to visit along the target index (closed form)."""
    if table:
        return []
    if isinstance(rng, VisitBox):  # a box of tiles over layout coordinates (codegen/box.py)
        return _box.plan_lines(em, rng, stage, t_max)
    lo, hi = (em.emit(x, stage) for x in rng.outer)
    ilo, ihi = (em.emit(x, stage) for x in rng.inner)
    return [
        f"lo = tl.maximum({lo}, 0)",
        f"hi = tl.minimum({hi}, {t_max})",
        f"t_begin = lo // {block}",
        f"t_end = tl.where(lo <= hi, hi // {block} + 1, t_begin)",
        f"f_begin = tl.maximum((tl.maximum({ilo}, 0) + {block} - 1) // {block}, t_begin)",
        f"f_end = tl.minimum((tl.minimum({ihi}, {t_max}) + 1) // {block}, t_end)",
        "n_full = tl.maximum(f_end - f_begin, 0)",
        "f_begin = tl.where(n_full > 0, f_begin, t_end)",
        "f_end = f_begin + n_full",
        "n_first = f_begin - t_begin",
        "n_tiles = t_end - t_begin",
    ]


def _table_plan_lines(prefix: str, bh_off: str, row: str) -> list[str]:
    return [
        f"tbl_off = {bh_off} + {row}.to(tl.int64) * tbl_stride_r",
        "n_full = tl.load(TBL_CNT + tbl_off // tbl_stride_r * 2)",
        "n_tiles = n_full + tl.load(TBL_CNT + tbl_off // tbl_stride_r * 2 + 1)",
    ]


def _tile_of_iteration(table: bool, rng=None, runs: bool = False, part: str = "both") -> list[str]:
    """Full tiles first (no mask), then the partial ones. Beside a run loop (``codegen/runs.py``)
    the loop starts at ``n_run`` and its full tiles are the ones between the two runs. ``part``:
    the tile of a loop over the full tiles only ("full") or the partial ones only ("partial")."""
    if isinstance(rng, VisitBox) and not table:
        return _box.iteration_lines(rng)
    if part == "full":
        return ["tile = tl.load(TBL_FULL + tbl_off + it)" if table else f"tile = f_begin + it{' - n_suf' if runs else ''}"]
    if part == "partial":
        if table:
            return ["tile = tl.load(TBL_PART + tbl_off + (it - n_full))"]
        return ["j = it - n_full", "tile = tl.where(j < n_first, t_begin + j, f_end + (j - n_first))"]
    if table:
        return [
            "is_partial = it >= n_full",
            "tile = tl.load(tl.where(is_partial, TBL_PART + tbl_off + (it - n_full), TBL_FULL + tbl_off + it))",
        ]
    return [
        "j = it - n_full",
        "is_partial = j >= 0",
        f"tile = tl.where(j < 0, f_begin + it{' - n_suf' if runs else ''}, tl.where(j < n_first, t_begin + j, f_end + (j - n_first)))",
    ]


TABLE_PARAMS = "TBL_FULL, TBL_PART, TBL_CNT, tbl_stride_b, tbl_stride_h, tbl_stride_r, "


def _tile_class(spec: KernelSpec, rng, em: ExprEmitter, table: bool):
    """``(full, nonempty)`` code of the current tile when the plan asks for per-tile checks."""
    if table:
        return None
    if isinstance(rng, VisitBox):
        return _box.tile_class(em, rng, 2, spec.mask)
    if rng.tile_check and spec.tile_full is not None:
        return em.emit(spec.tile_full, 2), em.emit(spec.tile_nonempty, 2)
    return None


def _split_extras(rng, table: bool, visit_if: str) -> bool:
    """Two loops where a box plan's per-tile test is only for its extra (non-grid) ranges?

    ``if nonempty:`` around a loop body keeps Triton from pipelining the K/V loads of every
    iteration. When only the extras need that test (the box itself is exact), the box's tiles get
    a loop of their own without it (``range(0, bx_n)``) and the extras keep theirs
    (``range(bx_n, n_tiles)``); both run the same iteration code."""
    return not table and bool(visit_if) and isinstance(rng, VisitBox) and not rng.tile_check and bool(rng.extras)


def _hoist_loads(spec: KernelSpec, em: ExprEmitter, stages: dict) -> None:
    """Emit the mask's captured loads whose loop level (``spec.lowering.load_stages``) is in
    ``stages`` (level -> emitter stage) ahead of the loops: a document mask's ``doc_ids[q_idx]``
    is then read once per query tile, not on every partial tile or column tile."""
    for ld, level in spec.lowering.load_stages:
        if level in stages:
            em.emit(ld, stages[level])


def _indent(lines, ind):
    return "".join(ind + line + "\n" for line in lines)


def _dot(a: str, b: str) -> str:
    return f"tl.dot({a}, {b}, input_precision=DOT_PRECISION)"


def _loop_head(spec: KernelSpec, run: bool, runs: bool, table: bool, rng, inner: str, ind: str,
               part: str = "both", bounds: tuple | None = None) -> str:
    """``for it in ...:`` and the iteration's tile: a constant-run loop (``codegen/runs.py``) or the
    general loop (beside run loops it starts at ``n_run``), whole or split into its full and its
    partial tiles (``part``)."""
    if run:
        return f"{ind}for it in range(0, n_run):\n{_indent(_runs.tile_lines(spec, inner), ind + I1)}"
    first = "n_run" if runs else "0"
    bounds = bounds or {"both": (first, "n_tiles"), "full": (first, "n_full"), "partial": ("n_full", "n_tiles")}[part]
    return (f"{ind}for it in range({bounds[0]}, {bounds[1]}):\n"
            f"{_indent(_tile_of_iteration(table, rng, runs, part), ind + I1)}")


def _kv_tile(B: str, tests: str, v: str, v_offs: str, v_mask: str, tma: bool = False) -> str:
    """A key tile of the forward or dQ loop: its indices, Kᵀ (and its second part ``kT2``, see
    ``SECOND_PART``), V (as ``v``: ``v`` or ``vT``) and the low-rank factor's Wᵀ. ``tests`` (the tile's classification, ``if nonempty:``) sits between the
    indices and the loads. ``tma``: K, V and Wᵀ may come through the tensor descriptors of
    ``KV_DESCRIPTORS`` and the forward's ``w_desc`` (the forward)."""
    first = f"{B}if EVEN_KV:\n"
    w_ptrs = ("wT = tl.load(w_base + offs_n[None, :].to(tl.int64) * stride_wn + offs_r[:, None] * stride_wr,",
              "             mask=(offs_n[None, :] < LKV) & (offs_r[:, None] < RANK), other=0.0)")
    w_load = _indent(w_ptrs, B + I1)
    if tma:
        w_load = (f"{B}    if W_TMA:\n{B}        wT = w_desc.load([kv_lo.to(tl.int32), 0]).T\n"
                  f"{B}    else:\n{_indent(w_ptrs, B + I2)}")
        # descriptor offsets are 32-bit (a captured int64 scalar can make the tile index int64)
        first = (f"{B}if KV_TMA:\n{B}    kT = k_desc.load([kv_lo.to(tl.int32), 0]).T\n"
                 f"{B}    if HAS_D2:\n{B}        kT2 = k2_desc.load([kv_lo.to(tl.int32), BLOCK_D]).T\n"
                 f"{B}    {v} = v_desc.load([kv_lo.to(tl.int32), 0])\n{B}elif EVEN_KV:\n")
    return f'''{I2}kv_lo = tile * BLOCK_N
{I2}kv_hi = kv_lo + BLOCK_N - 1
{I2}offs_n = kv_lo + offs_n0
{I2}kv_idx = offs_n[None, :]
{tests}{first}{B}    kT = tl.load(k_base + kv_lo.to(tl.int64) * stride_kn + kT_offs)
{B}    if HAS_D2:
{B}        kT2 = tl.load(k_base + kv_lo.to(tl.int64) * stride_kn + kT2_offs)
{B}    {v} = tl.load(v_base + kv_lo.to(tl.int64) * stride_vn + {v_offs})
{B}else:
{B}    kT = tl.load(k_base + kv_lo.to(tl.int64) * stride_kn + kT_offs, mask=(offs_n[None, :] < LKV) & d_ok[:, None], other=0.0)
{B}    if HAS_D2:
{B}        kT2 = tl.load(k_base + kv_lo.to(tl.int64) * stride_kn + kT2_offs, mask=(offs_n[None, :] < LKV) & d2_ok[:, None], other=0.0)
{B}    {v} = tl.load(v_base + kv_lo.to(tl.int64) * stride_vn + {v_offs}, mask={v_mask}, other=0.0)
{B}if UPCAST:
{B}    kT = kT.to(tl.float32)
{B}    {v} = {v}.to(tl.float32)
{B}    if HAS_D2:
{B}        kT2 = kT2.to(tl.float32)
{B}if HAS_BIAS:
{w_load}{B}    if UPCAST:
{B}        wT = wT.to(tl.float32)
'''


KV_DESCRIPTORS = f"""{I1}if KV_TMA:
{I1}    # K and V tiles through the tensor memory accelerator (Hopper and later): no per-element
{I1}    # address arithmetic or masks; rows past LKV and columns past HEAD_D (HEAD_DV) read as zeros. The
{I1}    # backward kernels keep pointer loads (no gain measured there: BENCHMARKS.md)
{I1}    k_desc = tl.make_tensor_descriptor(k_base, shape=[LKV, HEAD_D], strides=[stride_kn, 1], block_shape=[BLOCK_N, BLOCK_D])
{I1}    v_desc = tl.make_tensor_descriptor(v_base, shape=[LKV, HEAD_DV], strides=[stride_vn, 1], block_shape=[BLOCK_N, BLOCK_DV])
{I1}    if HAS_D2:
{I1}        k2_desc = tl.make_tensor_descriptor(k_base, shape=[LKV, HEAD_D], strides=[stride_kn, 1], block_shape=[BLOCK_N, BLOCK_D2])
"""


#: the query/key head dim's second part (columns BLOCK_D..HEAD_D, ``runtime.config.split_head_dim``):
#: a head dim like 192 runs as 128 + 64, every product over it as two, where one 256-wide tile would
#: multiply a quarter zeros. Its index vector and mask; the kernels add their tiles of it.
SECOND_PART = """{I}if HAS_D2:  # the query/key head dim's second part, columns BLOCK_D..HEAD_D (192 = 128 + 64)
{I}    offs_d2 = BLOCK_D + tl.arange(0, BLOCK_D2)
{I}    d2_ok = offs_d2 < HEAD_D
"""


def _dot_acc(a: str, b: str, acc: str) -> str:
    """``acc + a·b`` as one matrix multiply-accumulate."""
    return f"tl.dot({a}, {b}, {acc}, input_precision=DOT_PRECISION)"


def _second_q_rows(I: str) -> str:
    """The forward's and dQ's query tile, second part (``q2``), and the offsets of Kᵀ's (``kT2``)."""
    return (SECOND_PART.format(I=I) + f"""{I}    q2 = tl.load(Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh + offs_m[:, None].to(tl.int64) * stride_qm + offs_d2[None, :] * stride_qd,
{I}                 mask=(offs_m[:, None] < LQ) & d2_ok[None, :], other=0.0)
{I}    if UPCAST:
{I}        q2 = q2.to(tl.float32)
{I}    kT2_offs = offs_n0[None, :] * stride_kn + offs_d2[:, None] * stride_kd
""")


# -------------------------------------------------------------------------------------------
EXTRA_PARAMS = ("Sinks, U, W, stride_ub, stride_uh, stride_um, stride_ur, stride_wb, stride_wh, stride_wn, stride_wr, "
                "W_GROUP, RANK, sigmoid_bias,")
EXTRA_CONSTS = "HAS_SINKS: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_R: tl.constexpr,"


def _grad_params(spec: KernelSpec) -> str:
    return "".join(f"DBUF{g.slot}_{i}, GOFF{g.slot}_{i}, " for i, g in enumerate(spec.grad_loads))


def _grad_consts(spec: KernelSpec) -> str:
    s = "".join(f"GL{i}_ATOMIC: tl.constexpr, GL{i}_ZERO_FILL: tl.constexpr, GL{i}_WIDE: tl.constexpr, "
                for i, _ in enumerate(spec.grad_loads))
    return s + ("DETERMINISTIC: tl.constexpr, " if spec.grad_loads else "")


def _softmax(spec: KernelSpec) -> bool:
    return spec.normalizer == "softmax"


def _uniform_loads(spec: KernelSpec, em: ExprEmitter, ind: str, stage: int, inner: str, mode: str, qk: str) -> str:
    """Per tile-uniform load, by loop ``mode``: "tested" binds ``uni{j}`` (one entry for the whole
    tile) and the value, a splat of one scalar load when uniform, else the per-element index
    arithmetic and gather; "run" binds its constant run's scalar (``codegen/runs.py``); "plain"
    (the loop beside a run loop) leaves it a per-element load."""
    code = em.take(stage, ind)
    if mode == "run":
        _runs.bind(spec, em, inner, stage)
    if mode != "tested":
        return code
    for ld, j in _runs.loads(spec, inner).items():
        ul = spec.uniform_loads[j]
        los = [em.emit(x, stage) for x in ul.lo]
        his = [em.emit(x, stage) for x in ul.hi]
        cond = " & ".join(f"({lo} == {hi})" for lo, hi, v in zip(los, his, ul.varying) if v)
        code += em.take(stage, ind) + f"{ind}uni{j} = {cond}\n"
        name, body = em.branch(stage, ind + I1, lambda: em.emit(ld, stage))
        em.names[ld] = (name, stage)
        em.uniform_index[ld] = los
        code += (f"{ind}if uni{j}:\n{ind}{I1}{name} = tl.zeros_like({qk}) + {em.clamped_load(ld, los)}\n"
                 f"{ind}else:\n{body}")
    return code


def score_unit(normalizer: str) -> str:
    """What the kernels multiply scores by. Softmax: log2 e, for exp2. Sigmoid: 1/2, so that scale,
    unit and bias fold into one multiply-add per score, p = σ(2s) = 0.5 + 0.5·tanh(s) (``_sigmoid_probs``;
    1.5–2.4% faster forward on an H100 than a log2 unit and a multiply inside the sigmoid)."""
    return "LOG2E" if normalizer == "softmax" else "0.5"




def plain_score_lines(spec: KernelSpec, ind: str, qk: str, bias: str) -> str:
    """``s``, the scores in the normaliser's units (``score_unit``) with no score_mod: the scaled
    ``qk`` (plus a low-rank bias ``u·wᵀ`` where ``HAS_BIAS``)."""
    unit = score_unit(spec.normalizer)
    return (f"{ind}if HAS_BIAS:\n{ind}    s = ({qk} * sm_scale + {bias}) * {unit}\n"
            f"{ind}else:\n{ind}    s = {qk} * (sm_scale * {unit})\n")


def _score_lines(spec, em, ind, stage, qk, bias, backward=False, inner="kv", mode="tested") -> str:
    """score = qk * scale (+ u·wᵀ); s = score_mod(score) in the normaliser's units (``score_unit``).

    For the backward also ∂score_mod/∂score (``dmod``) and ∂score_mod/∂(learnable loads)
    (``gmod{i}``), emitted here, before the masked branch, so every name is in scope. ``inner``
    names the index of the kernel's inner loop (the one its tile-uniform loads vary along);
    ``mode`` says how this loop treats them (:func:`_uniform_loads`)."""
    unit = score_unit(spec.normalizer)
    if spec.score is None:
        return plain_score_lines(spec, ind, qk, bias)
    rest = spec.lowering.additive
    head = ""
    if rest is None:
        head = f"{ind}score = {qk} * sm_scale\n"
        if bias:
            head += f"{ind}if HAS_BIAS:\n{ind}    score += {bias}\n"
    head += _uniform_loads(spec, em, ind, stage, inner, mode, qk)
    if rest is not None:
        tail = f"{ind}s = {qk} * (sm_scale * {unit}) + {em.emit(rest, stage)} * {unit}\n"
        if bias:
            tail += f"{ind}if HAS_BIAS:\n{ind}    s += {bias} * {unit}\n"
    else:
        tail = f"{ind}s = {em.emit(spec.score, stage)} * {unit}\n"
    if backward:
        tail += f"{ind}dmod = {em.emit(spec.dscore, stage)}\n"
        own = _runs.loads(spec, inner) if mode != "plain" else {}
        for i, gl in enumerate(spec.grad_loads):
            tail += f"{ind}gmod{i} = {em.emit(gl.grad, stage)}\n"
            if gl.scope in ("exact", "scatter") and gl.load not in own:
                for a in gl.load.args:
                    em.emit(a, stage)
    return head + em.take(stage, ind) + tail


def _folds_scale(spec: KernelSpec) -> bool:
    """Does the softmax forward scale scores inside its exponent? With no score_mod the running
    max can be taken over the unscaled scores times the scale, and ``p = exp2(qk·c − m)`` is one
    multiply-add per score where ``s = qk·c`` then ``s − m`` were two: on an H100 (bf16, D=128,
    L=16384) the dense forward 4% faster and the causal 3.5% (BENCHMARKS.md). Only for a positive
    scale (``FOLD_SCALE``: the max of qk·c is c·max(qk) only then)."""
    return _softmax(spec) and spec.score is None


#: the folded forward's constants (``_folds_scale``); a scale that is not positive scales scores first
FOLDED_SCALE = '''    if FOLD_SCALE:
        qk_scale = sm_scale * LOG2E
        inv_scale = 1.0 / sm_scale
    else:
        qk_scale = 1.0
        inv_scale = 1.0
'''


def _run_score_lines(spec: KernelSpec, em: ExprEmitter, ind: str, bias: str) -> str:
    """The run loop's folded scores and ``s_add``, the run's scalar bias (``Lowering.run_folds``, ``passes/lower.py``)."""
    head = _uniform_loads(spec, em, ind, 2, "kv", "run", "qk")
    rest = em.emit(spec.lowering.additive, 2)
    return head + em.take(2, ind) + _folded_score_lines(ind, bias, rest)


def _folded_score_lines(ind: str, bias: str, add: str | None = None) -> str:
    """s: the scores in units of 1/scale (see ``_folds_scale``), a low-rank bias divided by the
    scale. ``add``: a scalar bias per tile, kept apart as ``s_add`` in log2 units (``Lowering.run_folds``);
    a scale that is not positive adds it to the scaled scores and leaves ``s_add`` 0."""
    head = f"{ind}s_add = {add} * LOG2E\n" if add else ""
    plus = " + s_add" if add else ""
    return (head
            + f"{ind}if FOLD_SCALE:\n{ind}    s = qk\n{ind}    if HAS_BIAS:\n{ind}        s += {bias} * inv_scale\n"
            + f"{ind}else:\n{ind}    s = qk * (sm_scale * LOG2E){plus}\n"
            + f"{ind}    if HAS_BIAS:\n{ind}        s += {bias} * LOG2E\n"
            + (f"{ind}    s_add = 0.0\n" if add else ""))


def _split_loop(spec: KernelSpec, rng, cls) -> bool:
    """Visit the full and the partial tiles in two loops (the first with no mask code) rather than
    one loop with ``if is_partial:``? For the sigmoid forward: on an H100 (bf16, causal, H=16,
    D=128, L=16384) 4% faster with pointer loads and 1.5% with TMA loads; at L=4096 within noise;
    the softmax forward was 1-3% slower split (BENCHMARKS.md). Per-tile classification and box
    plans set ``is_partial`` per tile and keep one loop."""
    return spec.normalizer == "sigmoid" and cls is None and not isinstance(rng, VisitBox)


def _split_backward(spec: KernelSpec, rng, cls, runs: bool) -> bool:
    """The dK/dV and dQ loops over the full and the partial tiles as two loops, the first with no
    mask code? On an H100 (bf16, D=128; BENCHMARKS.md) forward+backward 2-5% faster (causal softmax
    and sigmoid, GQA, sliding window, pair bias), but 3% slower beside constant-run loops (T5
    table), which keep one general loop. Per-tile classification and box plans set
    ``is_partial`` per tile: one loop."""
    return cls is None and not runs and not isinstance(rng, VisitBox)


def forward(spec: KernelSpec, table: bool) -> str:
    name = f"{spec.name}_fwd"
    env = {"b": ("b", 0), "h": ("h", 0), "q": ("q_idx", 1), "q_lo": ("q_lo", 1), "q_hi": ("q_hi", 1),
           "kv_max": ("kv_max", 1), "q_max": ("q_max", 1), "kv": ("kv_idx", 2), "kv_lo": ("kv_lo", 2),
           "kv_hi": ("kv_hi", 2), "score": ("score", 2)}
    em = ExprEmitter(env, 3, prefix="v")
    _hoist_loads(spec, em, {"program": 0, "row": 1})
    plan = _plan_lines(em, spec.fwd_range, 1, "BLOCK_N", "kv_max", table)
    if table:
        plan = _table_plan_lines("", "b.to(tl.int64) * tbl_stride_b + h.to(tl.int64) * tbl_stride_h", "pid_m")
    pre0 = em.take(0, I1)
    pre1 = em.take(1, I1)
    runs = spec.lowering.fwd_runs
    check, visit_if, Bg = "", "", I2
    cls = _tile_class(spec, spec.fwd_range, em, table)
    if cls is not None:
        full, nonempty = cls
        # a tile straddling the end of the keys is never full: its padding keys must be masked
        check = em.take(2, I2) + f"{I2}is_partial = is_partial & (({full} == 0) | (kv_lo + BLOCK_N > LKV))\n"
        visit_if = f"{I2}if {nonempty}:\n"
        Bg = I3
    fold = _folds_scale(spec)
    run_fold = spec.lowering.run_folds
    if _softmax(spec):
        init = ((FOLDED_SCALE if fold or run_fold else "")
                + "    m_i, l_i = _softmax_start(Sinks + h, True, BLOCK_M, HAS_SINKS)\n")
        finish = "    out, lse = _softmax_finish(acc, m_i, l_i)\n"
        store_lse = "    tl.store(Lse + pid_bh.to(tl.int64) * LQ + offs_m, lse, mask=offs_m < LQ)\n"
    else:
        init = ""
        finish = "    out = acc\n"
        store_lse = ""

    def kv_loop(mode: str, part: str = "both", bounds: tuple | None = None, tested: bool = True) -> str:
        """The loop over key tiles: a constant-run loop ("run": full tiles, no mask) or the general
        one, whole or as a loop over its full tiles (no mask code) and one over its partial tiles
        (``part``); ``bounds`` of its iterations and, with ``tested`` False, no emptiness test per
        tile (``_split_extras``)."""
        run = mode == "run"
        B = I2 if run or not tested else Bg
        head = _loop_head(spec, run, runs, table, spec.fwd_range, "kv", I1, part, bounds)
        folded = fold or (run and run_fold)
        if fold:
            score_block = _folded_score_lines(B, _dot("u", "wT"))
        elif folded:
            score_block = _run_score_lines(spec, em, B, _dot("u", "wT"))
        else:
            score_block = _score_lines(spec, em, B, 2, "qk", _dot("u", "wT"), mode=mode)
        masked = ""
        if not run and part != "full":
            M = B + I1 if part == "both" else B
            keep, mask_body = "kv_idx < LKV", ""
            if spec.mask is not None:
                m, mask_body = em.branch(2, M, lambda: em.emit(spec.mask, 2))
                keep = f"({m}) & (kv_idx < LKV)"
            masked = (f"{B}if is_partial:\n" if part == "both" else "") + mask_body + \
                f"{M}s = tl.where({keep}, s, float(\"-inf\"))\n"
        em.forget(2)
        tile = _kv_tile(B, "" if run else check + (visit_if if tested else ""), "v", "v_offs",
                        "(offs_n[:, None] < LKV) & dv_ok[None, :]", tma=True)
        if _softmax(spec):
            run_add = folded and not fold  # a run's scalar bias joins the max, leaves the exponent
            update = (f"{B}m_i, l_i, acc = _softmax_update(m_i, l_i, acc, s, v, {'qk_scale' if folded else '1.0'}, "
                      f"{'s_add' if run_add else '0.0'}, DOT_PRECISION, {folded}, {run_add})\n")
        else:
            update = f"{B}acc = _sigmoid_update(acc, s, v, sigmoid_bias, Q, DOT_PRECISION)\n"
        return f'''{head}{tile}{B}qk = {_dot("q", "kT")}
{B}if HAS_D2:
{B}    qk = {_dot_acc("q2", "kT2", "qk")}
{score_block}{masked}{update}{B}visited += 1
'''

    mode = "plain" if runs else "tested"
    if _split_loop(spec, spec.fwd_range, cls):
        loops = kv_loop(mode, "full") + kv_loop(mode, "partial")
    elif _split_extras(spec.fwd_range, table, visit_if):
        loops = kv_loop(mode, bounds=("0", "bx_n"), tested=False) + kv_loop(mode, bounds=("bx_n", "n_tiles"))
    else:
        loops = kv_loop(mode)
    if runs:
        loops = _runs.search(spec, "kv", "BLOCK_N", I1) + kv_loop("run") + loops
    src = f'''
@triton.jit
def {name}(
    Q, K, V, Out, Lse, VISITS,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    HQ, GROUP, LQ, LKV, sm_scale, SECTION,
    {EXTRA_PARAMS}
    {buffer_params(spec)}{TABLE_PARAMS if table else ""}
    HEAD_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HEAD_DV: tl.constexpr, BLOCK_DV: tl.constexpr, HAS_D2: tl.constexpr, BLOCK_D2: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, COUNT_VISITS: tl.constexpr, EVEN_KV: tl.constexpr,
    KV_TMA: tl.constexpr, W_TMA: tl.constexpr, FOLD_SCALE: tl.constexpr,
    {EXTRA_CONSTS}
):
    """Forward ({spec.normalizer}): one program per (query tile, batch*head), fp32 accumulation, exp2."""
    # under a causal mask the last query tiles see the most keys: start them first, across the
    # heads of a section, so the short ones fill the tail of the grid
    # ``prog``, not ``tile``: the loops' ``tile`` may be int64 (a bound read from an int64 tensor),
    # and a name assigned before a loop is loop-carried, its type fixed by the first assignment
    prog, pid_bh = _program_tile(SECTION)
    pid_m = tl.num_programs(0) - 1 - prog
    b = pid_bh // HQ
    h = pid_bh % HQ
    hk = h // GROUP
{pre0}
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q_idx = offs_m[:, None]
    q_lo = pid_m * BLOCK_M
    q_hi = tl.minimum(q_lo + BLOCK_M, LQ) - 1
    q_max = LQ - 1
    kv_max = LKV - 1
    d_ok = offs_d < HEAD_D
    offs_dv = tl.arange(0, BLOCK_DV)  # the value head dim (may differ from the query/key one)
    dv_ok = offs_dv < HEAD_DV
    q_ptrs = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh + offs_m[:, None].to(tl.int64) * stride_qm + offs_d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=(offs_m[:, None] < LQ) & d_ok[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    k_base = K + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + hk.to(tl.int64) * stride_vh
    offs_n0 = tl.arange(0, BLOCK_N)
    kT_offs = offs_n0[None, :] * stride_kn + offs_d[:, None] * stride_kd
    v_offs = offs_n0[:, None] * stride_vn + offs_dv[None, :] * stride_vd
{_second_q_rows(I1)}{KV_DESCRIPTORS}    if HAS_BIAS:
        offs_r = tl.arange(0, BLOCK_R)
        u = tl.load(U + b.to(tl.int64) * stride_ub + h.to(tl.int64) * stride_uh + offs_m[:, None].to(tl.int64) * stride_um + offs_r[None, :] * stride_ur,
                    mask=(offs_m[:, None] < LQ) & (offs_r[None, :] < RANK), other=0.0)
        w_base = W + b.to(tl.int64) * stride_wb + (h // W_GROUP).to(tl.int64) * stride_wh
        if W_TMA:  # W's [BLOCK_N, R] tiles like K and V (columns past RANK read as zeros)
            w_desc = tl.make_tensor_descriptor(w_base, shape=[LKV, RANK], strides=[stride_wn, 1], block_shape=[BLOCK_N, BLOCK_R])
        if UPCAST:
            u = u.to(tl.float32)
{pre1}{_indent(plan, I1)}
{init}    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    visited = 0
{loops}{finish}    o_ptrs = Out + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh + offs_m[:, None].to(tl.int64) * stride_om + offs_dv[None, :] * stride_od
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=(offs_m[:, None] < LQ) & dv_ok[None, :])
{store_lse}    if COUNT_VISITS:
        tl.store(VISITS + pid_bh.to(tl.int64) * tl.num_programs(0) + pid_m, visited)
        tl.store(VISITS + (tl.num_programs(1) + pid_bh).to(tl.int64) * tl.num_programs(0) + pid_m, {"n_run" if runs else "0"})
'''
    return src


def preprocess(spec: KernelSpec) -> str:
    return f'''
@triton.jit
def {spec.name}_bwd_delta(
    Out, DO, Delta,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_db, stride_dh, stride_dm, stride_dd,
    HQ, LQ,
    HEAD_DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """delta = rowsum(dO * O) over the value head dim, the softmax backward's correction term."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // HQ
    h = pid_bh % HQ
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, BLOCK_DV)
    ok = (offs_m[:, None] < LQ) & (offs_dv[None, :] < HEAD_DV)
    o = tl.load(Out + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh + offs_m[:, None].to(tl.int64) * stride_om + offs_dv[None, :] * stride_od, mask=ok, other=0.0)
    do = tl.load(DO + b.to(tl.int64) * stride_db + h.to(tl.int64) * stride_dh + offs_m[:, None].to(tl.int64) * stride_dm + offs_dv[None, :] * stride_dd, mask=ok, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(Delta + pid_bh.to(tl.int64) * LQ + offs_m, delta, mask=offs_m < LQ)
'''


def _bwd_mask(spec: KernelSpec, em: ExprEmitter, ind: str, stage: int, part: str = "both") -> str:
    """The mask on a partial tile's scores: under ``if is_partial:`` in a loop over every tile
    (``part`` "both"), unconditional in a loop over the partial tiles only ("partial")."""
    keep, code = "(q_idx < LQ) & (kv_idx < LKV)", ""
    body_ind = ind + I1 if part == "both" else ind
    if spec.mask is not None:
        # emitted inside `if is_partial:`; its names are not in scope after the branch
        m, body = em.branch(stage, body_ind, lambda: em.emit(spec.mask, stage))
        keep = f"({m}) & {keep}"
        code += body
    head = f"{ind}if is_partial:\n" if part == "both" else ""
    return head + code + f"{body_ind}s = tl.where({keep}, s, float(\"-inf\"))\n"


def _bwd_dscore(spec: KernelSpec, ind: str, p: str, dp: str, ds: str, row: str, raw: bool = False) -> str:
    """ds = ∂L/∂score (natural units, before ∂score_mod) from probabilities and dP, then times
    ∂score_mod/∂score; with ``raw`` the first kept as ``ds_raw`` (the chain rule of learnable loads)."""
    first = f"{ds}_raw" if raw and spec.score is not None else ds
    if _softmax(spec):
        delta = "delta[None, :]" if row == "col" else "delta[:, None]"
        lines = f"{ind}{first} = _softmax_dscore({p}, {dp}, {delta})\n"
    else:
        lines = f"{ind}{first} = _sigmoid_dscore({p}, {dp})\n"
    if spec.score is not None:
        lines += f"{ind}{ds} = {first} * dmod\n"
    return lines


def _probs(spec: KernelSpec, ind: str, p: str, lse: str) -> str:
    if _softmax(spec):
        return f"{ind}{p} = _softmax_probs(s, {lse})\n"
    return f"{ind}{p} = _sigmoid_probs(s, sigmoid_bias, Q)\n"


def dkdv(spec: KernelSpec, table: bool) -> str:
    """dK/dV (and dW of a low-rank bias): one program per (key tile, batch*kv head)."""
    env = {"b": ("b", 0), "kv": ("kv_idx", 0), "kv_lo": ("kv_lo", 0), "kv_hi": ("kv_hi", 0),
           "kv_max": ("kv_max", 0), "q_max": ("q_max", 0), "h": ("h", 1),
           "q": ("q_idx", 2), "q_lo": ("q_lo", 2), "q_hi": ("q_hi", 2), "score": ("score", 2)}
    em = ExprEmitter(env, 3, prefix="v")
    _hoist_loads(spec, em, {"program": 0, "col": 0})
    plan = (_table_plan_lines("", "b.to(tl.int64) * tbl_stride_b + h.to(tl.int64) * tbl_stride_h", "pid_n") if table
            else _plan_lines(em, spec.bwd_range, 1, "BLOCK_M", "q_max", False))
    pre0 = em.take(0, I1)
    pre1 = em.take(1, I2)
    runs = spec.lowering.bwd_runs
    check, visit_if, Bg = "", "", I3
    cls = _tile_class(spec, spec.bwd_range, em, table)
    if cls is not None:
        full, nonempty = cls
        check = em.take(2, I3) + f"{I3}is_partial = is_partial & (({full} == 0) | (q_lo + BLOCK_M > LQ))\n"
        visit_if = f"{I3}if {nonempty}:\n"
        Bg = I4

    def q_loop(mode: str, part: str = "both", bounds: tuple | None = None, tested: bool = True) -> str:
        """The loop over query tiles: a constant-run loop ("run": full tiles, no mask) or the general
        one, whole or split into its full and its partial tiles (``part``); ``bounds`` and
        ``tested`` as in the forward's ``kv_loop``."""
        run = mode == "run"
        B = I3 if run or not tested else Bg
        head = _loop_head(spec, run, runs, table, spec.bwd_range, "q", I2, part, bounds)
        score = _score_lines(spec, em, B, 2, "qkT", _dot("w", "tl.trans(u)"), backward=True, inner="q", mode=mode)
        mask = "" if run or part == "full" else _bwd_mask(spec, em, B, 2, part)
        ds = _bwd_dscore(spec, B, "pT", "dpT", "dsT", "col")
        if _softmax(spec):
            stats = f'''{B}lse = _lse_log2(tl.load(Lse + bh.to(tl.int64) * LQ + offs_m, mask=offs_m < LQ, other=0.0))
{B}delta = tl.load(Delta + bh.to(tl.int64) * LQ + offs_m, mask=offs_m < LQ, other=0.0)
'''
        else:
            stats = ""
        em.forget(2)
        return f'''{head}            q_lo = tile * BLOCK_M
            q_hi = q_lo + BLOCK_M - 1
            offs_m = q_lo + offs_m0
            q_idx = offs_m[None, :]
{"" if run else check + (visit_if if tested else "")}{B}if EVEN_Q:
{B}    q = tl.load(q_base + q_lo.to(tl.int64) * stride_qm + q_offs)
{B}    do = tl.load(do_base + q_lo.to(tl.int64) * stride_dom + do_offs)
{B}else:
{B}    q = tl.load(q_base + q_lo.to(tl.int64) * stride_qm + q_offs, mask=(offs_m[:, None] < LQ) & d_ok[None, :], other=0.0)
{B}    do = tl.load(do_base + q_lo.to(tl.int64) * stride_dom + do_offs, mask=(offs_m[:, None] < LQ) & dv_ok[None, :], other=0.0)
{B}if HAS_D2:
{B}    if EVEN_Q:
{B}        q2 = tl.load(q_base + q_lo.to(tl.int64) * stride_qm + q2_offs)
{B}    else:
{B}        q2 = tl.load(q_base + q_lo.to(tl.int64) * stride_qm + q2_offs, mask=(offs_m[:, None] < LQ) & d2_ok[None, :], other=0.0)
{B}if UPCAST:
{B}    q = q.to(tl.float32)
{B}    do = do.to(tl.float32)
{B}    if HAS_D2:
{B}        q2 = q2.to(tl.float32)
{B}if HAS_BIAS:
{B}    u = tl.load(U + b.to(tl.int64) * stride_ub + h.to(tl.int64) * stride_uh + offs_m[:, None].to(tl.int64) * stride_um + offs_r[None, :] * stride_ur,
{B}                mask=(offs_m[:, None] < LQ) & (offs_r[None, :] < RANK), other=0.0)
{B}    if UPCAST:
{B}        u = u.to(tl.float32)
{stats}{B}qkT = {_dot("k", "tl.trans(q)")}
{B}if HAS_D2:
{B}    qkT = {_dot_acc("k2", "tl.trans(q2)", "qkT")}
{score}{mask}{_probs(spec, B, "pT", "lse[None, :]")}{B}dv += {_dot("pT.to(do.dtype)", "do")}
{B}dpT = {_dot("v", "tl.trans(do)")}
{ds}{B}dk += {_dot("dsT.to(q.dtype)", "q")}
{B}if HAS_D2:
{B}    dk2 += {_dot("dsT.to(q2.dtype)", "q2")}
{B}if HAS_BIAS:
{B}    dw += {_dot("dsT.to(u.dtype)", "u")}
'''

    mode = "plain" if runs else "tested"
    if _split_backward(spec, spec.bwd_range, cls, runs):
        loops = q_loop(mode, "full") + q_loop(mode, "partial")
    elif _split_extras(spec.bwd_range, table, visit_if):
        loops = q_loop(mode, bounds=("0", "bx_n"), tested=False) + q_loop(mode, bounds=("bx_n", "n_tiles"))
    else:
        loops = q_loop(mode)
    if runs:
        loops = _runs.search(spec, "q", "BLOCK_M", I2) + q_loop("run") + loops
    src = f'''
@triton.jit
def {spec.name}_bwd_dkdv(
    Q, K, V, DO, DK, DV, Lse, Delta, DW,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    HQ, HKV, GROUP, LQ, LKV, sm_scale, SECTION,
    {EXTRA_PARAMS}
    {buffer_params(spec)}{TABLE_PARAMS if table else ""}
    HEAD_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HEAD_DV: tl.constexpr, BLOCK_DV: tl.constexpr, HAS_D2: tl.constexpr, BLOCK_D2: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, EVEN_Q: tl.constexpr,
    {EXTRA_CONSTS}
):
    pid_n, pid_bh = _program_tile(SECTION)  # the first key tiles see the most queries
    b = pid_bh // HKV
    hk = pid_bh % HKV
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_D
    offs_dv = tl.arange(0, BLOCK_DV)  # the value head dim (may differ from the query/key one)
    dv_ok = offs_dv < HEAD_DV
    kv_idx = offs_n[:, None]
    kv_lo = pid_n * BLOCK_N
    kv_hi = tl.minimum(kv_lo + BLOCK_N, LKV) - 1
    kv_max = LKV - 1
    q_max = LQ - 1
{pre0}
    kv_ok = (offs_n[:, None] < LKV) & d_ok[None, :]
    v_ok = (offs_n[:, None] < LKV) & dv_ok[None, :]
    k = tl.load(K + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh + offs_n[:, None].to(tl.int64) * stride_kn + offs_d[None, :] * stride_kd, mask=kv_ok, other=0.0)
    v = tl.load(V + b.to(tl.int64) * stride_vb + hk.to(tl.int64) * stride_vh + offs_n[:, None].to(tl.int64) * stride_vn + offs_dv[None, :] * stride_vd, mask=v_ok, other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    if HAS_BIAS:
        offs_r = tl.arange(0, BLOCK_R)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    offs_m0 = tl.arange(0, BLOCK_M)
    q_offs = offs_m0[:, None] * stride_qm + offs_d[None, :] * stride_qd
    do_offs = offs_m0[:, None] * stride_dom + offs_dv[None, :] * stride_dod
{SECOND_PART.format(I=I1)}        k2 = tl.load(K + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh + offs_n[:, None].to(tl.int64) * stride_kn + offs_d2[None, :] * stride_kd,
                     mask=(offs_n[:, None] < LKV) & d2_ok[None, :], other=0.0)
        if UPCAST:
            k2 = k2.to(tl.float32)
        dk2 = tl.zeros([BLOCK_N, BLOCK_D2], tl.float32)
        q2_offs = offs_m0[:, None] * stride_qm + offs_d2[None, :] * stride_qd
    for g in range(0, GROUP):
        h = hk * GROUP + g
        bh = b * HQ + h
        q_base = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
        do_base = DO + b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh
        if HAS_BIAS:
            w = tl.load(W + b.to(tl.int64) * stride_wb + (h // W_GROUP).to(tl.int64) * stride_wh + offs_n[:, None].to(tl.int64) * stride_wn + offs_r[None, :] * stride_wr,
                        mask=(offs_n[:, None] < LKV) & (offs_r[None, :] < RANK), other=0.0)
            if UPCAST:
                w = w.to(tl.float32)
            dw = tl.zeros([BLOCK_N, BLOCK_R], tl.float32)
{pre1}{_indent(plan, I2)}{loops}        if HAS_BIAS:
            dw_ptrs = DW + (bh.to(tl.int64) * LKV + offs_n[:, None]) * RANK + offs_r[None, :]
            tl.store(dw_ptrs, dw, mask=(offs_n[:, None] < LKV) & (offs_r[None, :] < RANK))
    dk = dk * sm_scale
    tl.store(DK + b.to(tl.int64) * stride_dkb + hk.to(tl.int64) * stride_dkh + offs_n[:, None].to(tl.int64) * stride_dkn + offs_d[None, :] * stride_dkd, dk.to(DK.dtype.element_ty), mask=kv_ok)
    if HAS_D2:
        dk2 = dk2 * sm_scale
        tl.store(DK + b.to(tl.int64) * stride_dkb + hk.to(tl.int64) * stride_dkh + offs_n[:, None].to(tl.int64) * stride_dkn + offs_d2[None, :] * stride_dkd,
                 dk2.to(DK.dtype.element_ty), mask=(offs_n[:, None] < LKV) & d2_ok[None, :])
    tl.store(DV + b.to(tl.int64) * stride_dvb + hk.to(tl.int64) * stride_dvh + offs_n[:, None].to(tl.int64) * stride_dvn + offs_dv[None, :] * stride_dvd, dv.to(DV.dtype.element_ty), mask=v_ok)
'''
    return src


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
            f"{B}for w in tl.static_range((BLOCK_M + BLOCK_N - 2) // BLOCK_N + 1):\n"
            f"{B}    {d} = tl.sum(tl.where(gwrap{i} == w, grot{i}, 0.0), 0)\n"
            f"{B}    dist = q_lo - kv_lo + w * BLOCK_N - {cols}\n"
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
            f"{B}    per_row = tl.zeros([BLOCK_M, {SCATTER_SPAN}], tl.float32)\n"
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
            init += f"    gacc{i} = tl.zeros([1, 1], tl.float32)\n"
            loop += f"{B}gacc{i} += tl.sum(tl.sum({contrib}, 1, keep_dims=True), 0, keep_dims=True)\n"
            final += _reduced_write(gl, i, off, "1", "pid_bh.to(tl.int64) * tl.num_programs(0) + pid_m + tl.zeros([1, 1], tl.int64)", "")
        elif gl.scope == "row":
            init += f"    gacc{i} = tl.zeros([BLOCK_M, 1], tl.float32)\n"
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


def dq(spec: KernelSpec, table: bool) -> str:
    """dQ (and dU of a low-rank bias, and gradients of learnable captured tensors)."""
    dq_rng = spec.dq_range or spec.fwd_range  # box plans may give dQ tiles of its own
    env = {"b": ("b", 0), "h": ("h", 0), "q": ("q_idx", 1), "q_lo": ("q_lo", 1), "q_hi": ("q_hi", 1),
           "kv_max": ("kv_max", 1), "q_max": ("q_max", 1), "kv": ("kv_idx", 2), "kv_lo": ("kv_lo", 2),
           "kv_hi": ("kv_hi", 2), "score": ("score", 2), DIST: (DIST, 2)}
    em = ExprEmitter(env, 3, prefix="v")
    _hoist_loads(spec, em, {"program": 0, "row": 1})
    plan = (_table_plan_lines("", "b.to(tl.int64) * tbl_stride_b + h.to(tl.int64) * tbl_stride_h", "pid_m") if table
            else _plan_lines(em, dq_rng, 1, "BLOCK_N", "kv_max", False))
    runs = spec.lowering.dq_runs
    check, visit_if, Bg = "", "", I2
    cls = _tile_class(spec, dq_rng, em, table)
    if cls is not None:
        full, nonempty = cls
        # a tile straddling the end of the keys is never full: its padding keys must be masked
        check = em.take(2, I2) + f"{I2}is_partial = is_partial & (({full} == 0) | (kv_lo + BLOCK_N > LKV))\n"
        visit_if = f"{I2}if {nonempty}:\n"
        Bg = I3
    grads = {}

    def kv_loop(mode: str, part: str = "both", bounds: tuple | None = None, tested: bool = True) -> str:
        """The loop over key tiles: a constant-run loop ("run": full tiles, no mask) or the general
        one, whole or split into its full and its partial tiles (``part``); ``bounds`` and
        ``tested`` as in the forward's."""
        run = mode == "run"
        B = I2 if run or not tested else Bg
        head = _loop_head(spec, run, runs, table, dq_rng, "kv", I1, part, bounds)
        score = _score_lines(spec, em, B, 2, "qk", _dot("u", "wT"), backward=True, mode=mode)
        mask = "" if run or part == "full" else _bwd_mask(spec, em, B, 2, part)
        ds = _bwd_dscore(spec, B, "p", "dp", "ds", "row", raw=bool(spec.grad_loads))
        grads[mode] = _grad_load_code(spec, em, B, mode)
        em.forget(2)
        tile = _kv_tile(B, "" if run else check + (visit_if if tested else ""), "vT", "vT_offs",
                        "(offs_n[None, :] < LKV) & dv_ok[:, None]")
        return f'''{head}{tile}{B}qk = {_dot("q", "kT")}
{B}if HAS_D2:
{B}    qk = {_dot_acc("q2", "kT2", "qk")}
{score}{mask}{_probs(spec, B, "p", "lse[:, None]")}{B}dp = {_dot("do", "vT")}
{ds}{grads[mode][1]}{B}dq += {_dot("ds.to(kT.dtype)", "tl.trans(kT)")}
{B}if HAS_D2:
{B}    dq2 += {_dot("ds.to(kT2.dtype)", "tl.trans(kT2)")}
{B}if HAS_BIAS:
{B}    du += {_dot("ds.to(wT.dtype)", "tl.trans(wT)")}
'''

    mode = "plain" if runs else "tested"
    if _split_backward(spec, dq_rng, cls, runs):
        loops = kv_loop(mode, "full") + kv_loop(mode, "partial")
    elif _split_extras(dq_rng, table, visit_if):
        loops = kv_loop(mode, bounds=("0", "bx_n"), tested=False) + kv_loop(mode, bounds=("bx_n", "n_tiles"))
    else:
        loops = kv_loop(mode)
    g_init, _, g_final = grads[mode]
    if runs:
        run_loop = kv_loop("run")
        r_init, _, r_final = grads["run"]
        loops = _runs.search(spec, "kv", "BLOCK_N", I1) + r_init + run_loop + r_final + loops
    pre0 = em.take(0, I1)
    pre1 = em.take(1, I1)
    if _softmax(spec):
        stats = '''    lse = _lse_log2(tl.load(Lse + pid_bh.to(tl.int64) * LQ + offs_m, mask=offs_m < LQ, other=0.0))
    delta = tl.load(Delta + pid_bh.to(tl.int64) * LQ + offs_m, mask=offs_m < LQ, other=0.0)
'''
    else:
        stats = ""
    src = f'''
@triton.jit
def {spec.name}_bwd_dq(
    Q, K, V, DO, DQ, Lse, Delta, DU,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    HQ, GROUP, LQ, LKV, sm_scale, SECTION,
    {EXTRA_PARAMS}
    {buffer_params(spec)}{_grad_params(spec)}{TABLE_PARAMS if table else ""}
    HEAD_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HEAD_DV: tl.constexpr, BLOCK_DV: tl.constexpr, HAS_D2: tl.constexpr, BLOCK_D2: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, EVEN_KV: tl.constexpr,
    {EXTRA_CONSTS} {_grad_consts(spec)}
):
    prog, pid_bh = _program_tile(SECTION)  # not ``tile``: see the forward
    pid_m = tl.num_programs(0) - 1 - prog  # longest query tiles first, as in the forward
    b = pid_bh // HQ
    h = pid_bh % HQ
    hk = h // GROUP
{pre0}
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_D
    offs_dv = tl.arange(0, BLOCK_DV)  # the value head dim (may differ from the query/key one)
    dv_ok = offs_dv < HEAD_DV
    q_idx = offs_m[:, None]
    q_lo = pid_m * BLOCK_M
    q_hi = tl.minimum(q_lo + BLOCK_M, LQ) - 1
    q_max = LQ - 1
    kv_max = LKV - 1
    q_ok = (offs_m[:, None] < LQ) & d_ok[None, :]
    q = tl.load(Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh + offs_m[:, None].to(tl.int64) * stride_qm + offs_d[None, :] * stride_qd, mask=q_ok, other=0.0)
    do = tl.load(DO + b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh + offs_m[:, None].to(tl.int64) * stride_dom + offs_dv[None, :] * stride_dod, mask=(offs_m[:, None] < LQ) & dv_ok[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
{stats}    k_base = K + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + hk.to(tl.int64) * stride_vh
    offs_n0 = tl.arange(0, BLOCK_N)
    kT_offs = offs_n0[None, :] * stride_kn + offs_d[:, None] * stride_kd
    vT_offs = offs_n0[None, :] * stride_vn + offs_dv[:, None] * stride_vd
{_second_q_rows(I1)}    if HAS_BIAS:
        offs_r = tl.arange(0, BLOCK_R)
        u = tl.load(U + b.to(tl.int64) * stride_ub + h.to(tl.int64) * stride_uh + offs_m[:, None].to(tl.int64) * stride_um + offs_r[None, :] * stride_ur,
                    mask=(offs_m[:, None] < LQ) & (offs_r[None, :] < RANK), other=0.0)
        w_base = W + b.to(tl.int64) * stride_wb + (h // W_GROUP).to(tl.int64) * stride_wh
        if UPCAST:
            u = u.to(tl.float32)
        du = tl.zeros([BLOCK_M, BLOCK_R], tl.float32)
{pre1}{_indent(plan, I1)}
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    if HAS_D2:
        dq2 = tl.zeros([BLOCK_M, BLOCK_D2], tl.float32)
{g_init}{loops}    dq = dq * sm_scale
    tl.store(DQ + b.to(tl.int64) * stride_dqb + h.to(tl.int64) * stride_dqh + offs_m[:, None].to(tl.int64) * stride_dqm + offs_d[None, :] * stride_dqd, dq.to(DQ.dtype.element_ty), mask=q_ok)
    if HAS_D2:
        dq2 = dq2 * sm_scale
        tl.store(DQ + b.to(tl.int64) * stride_dqb + h.to(tl.int64) * stride_dqh + offs_m[:, None].to(tl.int64) * stride_dqm + offs_d2[None, :] * stride_dqd,
                 dq2.to(DQ.dtype.element_ty), mask=(offs_m[:, None] < LQ) & d2_ok[None, :])
    if HAS_BIAS:
        du_ptrs = DU + (pid_bh.to(tl.int64) * LQ + offs_m[:, None]) * RANK + offs_r[None, :]
        tl.store(du_ptrs, du, mask=(offs_m[:, None] < LQ) & (offs_r[None, :] < RANK))
{g_final}'''
    return src


def block_table(spec: KernelSpec, transposed: bool) -> str:
    """Classify (row tile, column tile) pairs on the device: full / partial / empty lists.

    Forward tables have query tiles as rows and key tiles as columns; the transposed table
    (for dK/dV) the other way round. Only columns in the closed-form outer range are examined.
    """
    row, col = ("kv", "q") if transposed else ("q", "kv")
    rng = spec.bwd_range if transposed else spec.fwd_range
    env = {"b": ("b", 0), "h": ("h", 0),
           row: (f"{row}_idx", 1), f"{row}_lo": (f"{row}_lo", 1), f"{row}_hi": (f"{row}_hi", 1),
           f"{row}_max": (f"{row}_max", 1), f"{col}_max": (f"{col}_max", 1),
           col: (f"{col}_idx", 2), f"{col}_lo": (f"{col}_lo", 2), f"{col}_hi": (f"{col}_hi", 2)}
    em = ExprEmitter(env, 3, prefix="v")
    _hoist_loads(spec, em, {"program": 0, "col" if transposed else "row": 1})
    plan = _plan_lines(em, rng, 1, "BLOCK_C", f"{col}_max", False)
    pre0 = em.take(0, I1)
    pre1 = em.take(1, I1)
    m = em.emit(spec.mask, 2)
    elem = em.take(2, I2)
    r_len, c_len = ("LKV", "LQ") if transposed else ("LQ", "LKV")
    r_shape, c_shape = ("offs_r[:, None]", "offs_c[None, :]")
    name = f"{spec.name}_table{'_t' if transposed else ''}"
    return f'''
@triton.jit
def {name}(
    TBL_FULL, TBL_PART, TBL_CNT, tbl_stride_b, tbl_stride_h, tbl_stride_r,
    TH, LQ, LKV,
    {buffer_params(spec)}
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Block table: for one {row} tile, the {col} tiles where the mask holds everywhere / somewhere."""
    pid_r = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // TH
    h = pid_bh % TH
{pre0}
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    {row}_idx = {r_shape.replace("offs_r", "offs_r")}
    {row}_lo = pid_r * BLOCK_R
    {row}_hi = tl.minimum({row}_lo + BLOCK_R, {r_len}) - 1
    {row}_max = {r_len} - 1
    {col}_max = {c_len} - 1
    r_ok = offs_r[:, None] < {r_len}
{pre1}{_indent(plan, I1)}
    base = b.to(tl.int64) * tbl_stride_b + h.to(tl.int64) * tbl_stride_h + pid_r.to(tl.int64) * tbl_stride_r
    n_full = 0
    n_part = 0
    for tile in range(t_begin, t_end):
        {col}_lo = tile * BLOCK_C
        {col}_hi = {col}_lo + BLOCK_C - 1
        offs_c = {col}_lo + tl.arange(0, BLOCK_C)
        {col}_idx = {c_shape}
        valid = r_ok & (offs_c[None, :] < {c_len})
{elem}        keep = ({m}) & valid
        n_keep = tl.sum(tl.sum(keep.to(tl.int32), 1), 0)
        n_valid = tl.sum(tl.sum(valid.to(tl.int32), 1), 0)
        if n_keep == BLOCK_R * BLOCK_C:
            tl.store(TBL_FULL + base + n_full, tile)
            n_full += 1
        elif n_keep > 0:
            tl.store(TBL_PART + base + n_part, tile)
            n_part += 1
    cnt = TBL_CNT + (base // tbl_stride_r) * 2
    tl.store(cnt, n_full)
    tl.store(cnt + 1, n_part)
'''

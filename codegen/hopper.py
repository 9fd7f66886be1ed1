"""The Hopper (sm_90) target: a warp-specialised FlashAttention-3-style forward in Gluon, rendered
from the same KernelSpec as the portable Triton kernels.

One program owns ``CONSUMERS`` query tiles of ``BLOCK_M`` rows of one (batch, head) and splits
into three partitions (``gl.warp_specialize``):

* a producer warp (``_hopper_load``) that brings the query tiles and then every visited key tile's
  K and V into a ring of ``STAGES`` shared-memory buffers through the tensor memory accelerator
  (TMA), each buffer guarded by mbarriers: ``k_ready``/``v_ready`` (the bytes arrived) and
  ``kv_empty`` (every consumer is done with it);
* ``CONSUMERS`` consumer warp groups (``{name}_fwd_sm90_consumer``: the default partition and one
  worker per further group), each running the online softmax of its own ``BLOCK_M`` rows over the
  shared K/V stream: ``S = Q·Kᵀ`` and ``O += P·V`` as asynchronous warp-group MMAs (wgmma), the
  scores in registers. By default the two groups run independently (one group's softmax overlaps
  the other's matrix products where the warp schedulers happen to interleave them); ``PINGPONG``
  makes it strict, as FlashAttention-3's scheduler barrier: the groups take turns issuing their
  matrix products (``_mma_turn`` / ``_mma_pass``, two mbarriers), so one group's softmax always
  runs under the other's products instead of both colliding on the tensor cores.

What depends on the pattern comes from the spec, never from a hand-written variant: the visit plan
(``spec.fwd_range``'s closed-form range, emitted by ``codegen/plan.py``; full tiles first, with no
mask code, then the partial ones; a per-tile classification where the plan has one), the mask on
partial tiles, the score modifier and its captured-tensor loads (emitted by ``codegen/expr.py`` at
the loop level where their inputs exist). ``PIPELINE`` picks FlashAttention-3's intra-warpgroup
overlap of one tile's softmax with the previous tile's P·V. ``HEAVY_FIRST`` launches the query tiles
in decreasing order of work, over all heads (:func:`attndsl.passes.visit_width.heavy_first`, decided once per spec: plans whose
visited range grows along the query tiles, such as causal ones). The module starts with the
portable module's header (``codegen/prelude.py``): Gluon kernels call its ``@triton.jit`` index
helpers and ``tl`` elementwise ops, which take the layouts of their Gluon operands.

:func:`supports` says which specs this target renders (decided once per spec); every other spec
runs on the portable kernels.
"""
from __future__ import annotations

from attndsl import ir
from attndsl.passes.lower import _buffers
from attndsl.spec import KernelSpec, Param, VisitRange

from .attention import score_unit, scores_of
from .expr import ExprEmitter
from .plan import _plan_lines
from .prelude import module_header
from .writer import Writer

#: Bump when the generated Hopper code changes meaning (part of the module's cache key).
HOPPER_VERSION = 3

#: the Hopper kernels' parameters Triton does not specialise: lengths and head counts (a length of 1
#: or a multiple of 16 would compile another kernel, seconds each, for no gain: TMA loads the
#: tiles). Strides stay specialised (divisible by 16: vectorised stores of the outputs).
UNSPECIALISED = ("HQ", "HKV", "GROUP", "LQ", "LKV")

#: the Gluon imports and the helpers both Hopper kernels (forward, ``codegen/hopper_bwd.py``) call
GLUON_IMPORTS = '''
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import async_copy, mbarrier, tma, warpgroup_mma, warpgroup_mma_wait
'''

GLUON_HELPERS = '''

@gluon.jit
def _hopper_tile(it, n_full, f_begin, t_begin, n_first, f_end):
    """The key tile of iteration ``it``: the full tiles first, then the partial ones (codegen/plan.py)."""
    j = it - n_full
    return gl.where(j < 0, f_begin + it, gl.where(j < n_first, t_begin + j, f_end + (j - n_first)))


@gluon.jit
def _kv_tile(ring, slot):
    """Buffer ``slot`` of a K or V ring as the [BLOCK_N, D] operand of a wgmma (a [1, 1, BLOCK_N, D] TMA box)."""
    buf = ring.index(slot)
    return buf.reshape([buf.shape[2], buf.shape[3]])
'''

GLUON_COMMON = GLUON_IMPORTS + GLUON_HELPERS

GLUON_HEADER = GLUON_COMMON + '''

@gluon.jit
def _hopper_load(q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_bar, k_ready, v_ready, kv_empty,
                 k_ready1, v_ready1, kv_empty1, b, h, hk, q_lo, n_full, f_begin, t_begin, n_first, f_end, n_tiles,
                 BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr, CONSUMERS: gl.constexpr,
                 UNROLL: gl.constexpr, PERIOD: gl.constexpr):
    """The producer warp: the query tiles once, then K and V of each visited tile into the ring.
    The descriptors are 4-D over [B, H, L, D] with any strides: rows past a head's length read
    as zeros. ``UNROLL`` 2: tile ``it``'s buffer is guarded by the second set of barriers
    (``k_ready1``, ``v_ready1``, ``kv_empty1``) where ``n_tiles - 1 - it`` is odd (the consumers'
    paired loop), and each barrier completes a phase every ``PERIOD`` tiles (the ring's and the
    pair's common multiple)."""
    mbarrier.expect(q_bar, CONSUMERS * q_desc.block_type.nbytes)
    for c in gl.static_range(CONSUMERS):
        tma.async_copy_global_to_shared(q_desc, [b, h, q_lo + c * BLOCK_M, 0], q_bar, q_smem.index(c))
    for it in range(0, n_tiles):
        tile = _hopper_tile(it, n_full, f_begin, t_begin, n_first, f_end)
        slot = it % STAGES
        row = tile * BLOCK_N
        if UNROLL == 2:
            # tile it's barriers: the second set where n_tiles - 1 - it is odd (the consumers'
            # paired loop); the buffer's previous tile, it - STAGES (none in the first pass over
            # the ring), freed it on its own set
            freed = ((it - STAGES) // PERIOD) & 1
            if (n_tiles - 1 - it + STAGES) % 2 == 1:
                mbarrier.wait(kv_empty1.index(slot), freed, pred=it >= STAGES)
            else:
                mbarrier.wait(kv_empty.index(slot), freed, pred=it >= STAGES)
            odd = (n_tiles - 1 - it) % 2 == 1
        else:
            # a fresh barrier counts as having completed the phase before its first: the first pass
            # over the ring does not wait
            mbarrier.wait(kv_empty.index(slot), ((it // STAGES) & 1) ^ 1)
            odd = False
        if odd:
            _load_kv(k_desc, v_desc, k_smem, v_smem, k_ready1, v_ready1, slot, b, hk, row)
        else:
            _load_kv(k_desc, v_desc, k_smem, v_smem, k_ready, v_ready, slot, b, hk, row)


@gluon.jit
def _load_kv(k_desc, v_desc, k_smem, v_smem, k_ready, v_ready, slot, b, hk, row):
    """K and V of the key tile starting at ``row`` into buffer ``slot``, each completing its
    barrier of ``k_ready`` / ``v_ready`` (the first or, for the paired loop's odd tiles, the
    second set)."""
    mbarrier.expect(k_ready.index(slot), k_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(k_desc, [b, hk, row, 0], k_ready.index(slot), k_smem.index(slot))
    mbarrier.expect(v_ready.index(slot), v_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(v_desc, [b, hk, row, 0], v_ready.index(slot), v_smem.index(slot))


@gluon.jit
def _mma_turn(my_turn, k, WG: gl.constexpr, PINGPONG: gl.constexpr):
    """Ping-pong (FlashAttention-3's scheduler barrier): consumer group ``WG`` waits for its ``k``-th
    turn to issue matrix products. ``my_turn`` (group ``g``'s barrier, ``turn{g}``) completes a
    phase each time the other group passes the turn to ``g`` (:func:`_release`: one arrival per
    group, or one per thread of it). Group 0 goes first: its turn 0 waits on the phase before a
    fresh barrier's first, which counts as complete. Each group takes and passes the same number
    of turns (both walk the program's one visit plan), and a group cannot pass twice before the
    other has waited, so the parity of ``k`` names the phase without ambiguity. The two barriers
    are two allocations, not one array of two: Triton's barrier placement (Membar) puts a
    ``bar.sync`` between a wait and a later arrive on the same allocation."""
    if PINGPONG:
        mbarrier.wait(my_turn, (k & 1) ^ (1 - WG))


@gluon.jit
def _mma_pass(next_turn, PINGPONG: gl.constexpr, THREAD_ARRIVE: gl.constexpr):
    """Ping-pong: this group has issued its matrix products; the other group's turn (its barrier)."""
    if PINGPONG:
        _release(next_turn, THREAD_ARRIVE)


@gluon.jit
def _release(bar, THREAD_ARRIVE: gl.constexpr):
    """A consumer warp group arrives on ``bar`` (a K/V buffer is free, or a ping-pong turn passes).
    ``THREAD_ARRIVE`` False: ``mbarrier.arrive``, which Gluon lowers to a sync of the group's 128
    threads (``bar.sync``) and one thread's arrive (``bar`` counts one arrival per group). True:
    every thread arrives on its own (``cp.async.mbarrier.arrive.noinc``: the arrival fires once
    the thread's earlier ``cp.async`` copies are done, and the consumers issue none), no sync
    (``bar`` counts ``GROUP_THREADS`` arrivals per group). Either way a thread arrives only after
    its own ``warpgroup_mma_wait``, so the buffer is read by then."""
    if THREAD_ARRIVE:
        async_copy.mbarrier_arrive(bar, increment_count=False)
    else:
        mbarrier.arrive(bar, count=1)
'''


def supports(spec: KernelSpec) -> str | None:
    """None when this target renders ``spec``; else why not (the runtime records it and runs the
    portable kernels). Decided from the spec alone."""
    if spec.normalizer != "softmax":
        return f"normaliser {spec.normalizer!r} (the Hopper forward is softmax only)"
    if spec.data_dependent:
        return "data-dependent mask (needs a block table)"
    if not isinstance(spec.fwd_range, VisitRange):
        return "layout (box) visit plan"
    if spec.lowering.fwd_runs:
        return "constant-run loops"
    return None


def kernel_name(spec: KernelSpec) -> str:
    return f"{spec.name}_fwd"


#: the Hopper forward's parameters, in order (the runtime fills them by name)
def signature(spec: KernelSpec) -> tuple:
    t = [Param(n, "tensor") for n in ("q_desc", "k_desc", "v_desc", "Out", "Lse", "Sinks")]
    i = [Param(n, "int") for n in ("stride_ob", "stride_oh", "stride_om", "HQ", "GROUP", "LQ", "LKV")]
    c = [Param(n, "constexpr") for n in ("BLOCK_M", "BLOCK_N", "HEAD_D", "STAGES", "CONSUMERS", "PIPELINE",
                                              "PINGPONG", "THREAD_ARRIVE", "UNROLL", "HEAVY_FIRST", "HAS_SINKS")]
    # captured tensors (score_mod's tables): pointer, sizes and strides, as the portable kernels take them
    return tuple(t + i + [Param("sm_scale", "float")] + _buffers(spec) + c)


def _buffer_names(spec: KernelSpec) -> str:
    """The captured tensors' parameters, passed on to the consumer partitions ("" for none)."""
    return "".join(f"{p.name}, " for p in _buffers(spec))


def _env(stage_of_q: int) -> dict:
    return {"b": ("b", 0), "h": ("h", 0), "q": ("q_idx", stage_of_q), "q_lo": ("q_lo", stage_of_q),
            "q_hi": ("q_hi", stage_of_q), "kv_max": ("kv_max", 0), "q_max": ("q_max", 0),
            "kv": ("kv_idx", 2), "kv_lo": ("kv_lo", 2), "kv_hi": ("kv_hi", 2), "score": ("score", 2)}


def _tile_step(w: Writer, cls: str, head: list, score_body: str, score: list, mask_body: str, keep: str) -> None:
    """One key tile's softmax step on ``qk`` (iteration ``it``): the scores (score_mod), the mask
    on a partial tile, the running max and sum, the rescale factor ``alpha`` and ``p16`` (P in the
    inputs' type, as the A operand of the P·V wgmma). Written once per place it runs (the
    pipelined loop's first tile and its loop body); its names are per tile."""
    w.code("""
    is_partial = it >= n_full
    tile = _hopper_tile(it, n_full, f_begin, t_begin, n_first, f_end)
    kv_lo = tile * BLOCK_N
    kv_hi = kv_lo + BLOCK_N - 1
    kv_idx = gl.expand_dims(kv_lo + offs_n0, 0)
    """)
    w.emitted("".join(w.ind + ln + "\n" for ln in cls.splitlines()))
    for ln in head:
        w.line(ln)
    w.emitted("".join(w.ind + ln + "\n" for ln in score_body.splitlines()))
    for ln in score:
        w.line(ln)
    with w.block("if is_partial:"):
        w.emitted("".join(w.ind + ln + "\n" for ln in mask_body.splitlines()))
        w.line(f's = gl.where({keep}, s, float("-inf"))')
    w.code("""
    m_new = gl.maximum(m_i, gl.max(s, 1))
    m_use = gl.where(m_new == float("-inf"), 0.0, m_new)
    p = gl.exp2(s - gl.expand_dims(m_use, 1))
    alpha = gl.exp2(m_i - m_use)
    l_i = l_i * alpha + gl.sum(p, 1)
    m_i = m_new
    p16 = gl.convert_layout(p.to(k_smem.dtype), p_layout)
    """)


def _pipelined_step(w: Writer, step: tuple, k_ready: str, v_ready: str, kv_empty: str, period: str) -> None:
    """One step ``it`` of the pipelined loop: tile ``it``'s ``Q·Kᵀ`` and tile ``it - 1``'s ``P·V``
    issued together, tile ``it``'s softmax under ``P·V``, then tile ``it - 1``'s buffer freed.
    ``k_ready``, ``v_ready``, ``kv_empty``: the barrier arrays of tile ``it``'s K and of tile
    ``it - 1``'s V and buffer (the second set's names for odd tiles of the paired loop);
    ``period``: tiles between two uses of one barrier."""
    w.code(f"""
    slot = it % STAGES
    prev = (it - 1) % STAGES
    mbarrier.wait({k_ready}.index(slot), (it // {period}) & 1)
    _mma_turn(my_turn, it - 1, WG, PINGPONG)
    qk = warpgroup_mma(q_tile, _kv_tile(k_smem, slot).permute((1, 0)), qk0, use_acc=False, is_async=True)
    mbarrier.wait({v_ready}.index(prev), ((it - 1) // {period}) & 1)
    acc = warpgroup_mma(p16, _kv_tile(v_smem, prev), acc, is_async=True)
    _mma_pass(next_turn, PINGPONG, THREAD_ARRIVE)
    # wgmma groups complete in order: at most one pending means Q·Kᵀ is done, P·V may not be
    qk = warpgroup_mma_wait(num_outstanding=1, deps=(qk, ))
    """)
    _tile_step(w, *step)
    w.code(f"""
    acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
    _release({kv_empty}.index(prev), THREAD_ARRIVE)
    acc = acc * gl.expand_dims(gl.convert_layout(alpha, orow_layout), 1)
    """)


def _consumer(spec: KernelSpec, w: Writer) -> None:
    """One consumer warp group: the online softmax of ``BLOCK_M`` query rows over the K/V ring.

    ``PIPELINE`` (FlashAttention-3's intra-warpgroup overlap): the next tile's ``Q·Kᵀ`` and this
    tile's ``P·V`` are issued together and the softmax of the next tile runs while ``P·V`` is in
    flight; without it each tile waits for its ``Q·Kᵀ``, then its ``P·V``.

    ``PINGPONG`` (group ``WG`` of two) takes turns with the other group, as FlashAttention-3's
    mainloop does: pipelined, a turn covers one loop step's ``Q·Kᵀ`` and ``P·V`` (the first
    ``Q·Kᵀ`` and the last ``P·V`` are outside the turns: ``n_tiles - 1`` turns); plain, a turn runs
    from a tile's ``P·V`` to the next tile's issued ``Q·Kᵀ`` (the first turn before tile 0's
    ``Q·Kᵀ``, the last passed after the last ``P·V``: ``n_tiles + 1`` turns)."""
    em = ExprEmitter(_env(1), 3, prefix="v")
    unit = score_unit(spec.normalizer)
    cls = ""
    if spec.fwd_range.tile_check and spec.tile_full is not None:
        # per-tile classification (plan.py's _tile_class): a tile the plan counts partial may be
        # full for these rows; a tile straddling the end of the keys never is. Empty tiles are
        # loaded and masked whole (their P is 0), not skipped
        full = em.emit(spec.tile_full, 2)
        cls = em.take(2, "") + f"is_partial = is_partial & (({full} == 0) | (kv_lo + BLOCK_N > LKV))\n"
    # the pattern's per-tile code, emitted first so that its hoisted parts can be written ahead of the loop
    head = [] if spec.score is None else ["score = qk * sm_scale"]
    if spec.score is None:
        score = [f"s = qk * (sm_scale * {unit})"]
    else:
        fv = ir.free_vars(spec.score)
        code = em.emit(spec.score, 2)
        # a score_mod of fewer indices than the tile is broadcast over it (attention.scores_of);
        # Gluon creates tensors with a layout: gl.zeros_like
        full = ir.SCORE in fv or {"q", "kv"} <= fv
        score = [f"s = {scores_of(spec, code, 'qk')}" if full else f"s = {code} * {unit} + gl.zeros_like(qk)"]
    score_body = em.take(2, "")
    mask_body, keep = "", "kv_idx < LKV"
    if spec.mask is not None:
        m, mask_body = em.branch(2, "", lambda: em.emit(spec.mask, 2))
        keep = f"({m}) & (kv_idx < LKV)"
    step = (cls, head, score_body, score, mask_body, keep)
    w.code(f"""
    @gluon.jit
    def {kernel_name(spec)}_consumer(q_smem, k_smem, v_smem, q_bar, k_ready, v_ready, kv_empty, k_ready1, v_ready1, kv_empty1,
                 Out, Lse, Sinks,
                 stride_ob, stride_oh, stride_om, b, h, pid_bh, q0, LQ, LKV, sm_scale, {_buffer_names(spec)}
                 n_full, f_begin, t_begin, n_first, f_end, n_tiles, my_turn, next_turn,
                 BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_D: gl.constexpr, STAGES: gl.constexpr,
                 PIPELINE: gl.constexpr, PINGPONG: gl.constexpr, THREAD_ARRIVE: gl.constexpr, UNROLL: gl.constexpr,
                 PERIOD: gl.constexpr, WG: gl.constexpr, HAS_SINKS: gl.constexpr):
        \"\"\"Online softmax of query rows q0..q0+BLOCK_M over the visited key tiles (one warp group).\"\"\"
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BLOCK_N, 16])
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, HEAD_D, 16])
        p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
        row_layout: gl.constexpr = gl.SliceLayout(1, s_layout)
        orow_layout: gl.constexpr = gl.SliceLayout(1, o_layout)
        q_max = LQ - 1
        kv_max = LKV - 1
        q_lo = q0
        q_hi = gl.minimum(q0 + BLOCK_M, LQ) - 1
        offs_m = q0 + gl.arange(0, BLOCK_M, layout=row_layout)
        q_idx = gl.expand_dims(offs_m, 1)
        offs_n0 = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
        q_tile = q_smem.reshape([BLOCK_M, HEAD_D])  # a [1, 1, BLOCK_M, D] TMA box
    """)
    with w.indented():
        w.emitted(em.take(0, w.ind))
        w.emitted(em.take(1, w.ind))
        w.code("""
        if HAS_SINKS:  # _softmax_start: the head's sink logit joins the denominator with a count of one
            m_i = gl.zeros([BLOCK_M], gl.float32, layout=row_layout) + gl.load(Sinks + h).to(gl.float32) * LOG2E
            l_i = gl.zeros([BLOCK_M], gl.float32, layout=row_layout) + 1.0
        else:
            m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, layout=row_layout)
            l_i = gl.zeros([BLOCK_M], gl.float32, layout=row_layout)
        acc = gl.zeros([BLOCK_M, HEAD_D], gl.float32, layout=o_layout)
        qk0 = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, layout=s_layout)
        p16 = gl.zeros([BLOCK_M, BLOCK_N], k_smem.dtype, layout=p_layout)
        mbarrier.wait(q_bar, 0)
        """)
        with w.block("if PIPELINE:"):
            with w.block("if n_tiles > 0:"):
                w.code("""
                it = 0
                if UNROLL == 2 and (n_tiles - 1) % 2 == 1:  # (the paired loop's barrier sets, below)
                    mbarrier.wait(k_ready1.index(0), 0)
                else:
                    mbarrier.wait(k_ready.index(0), 0)
                qk = warpgroup_mma(q_tile, _kv_tile(k_smem, 0).permute((1, 0)), qk0, use_acc=False, is_async=True)
                qk = warpgroup_mma_wait(num_outstanding=0, deps=(qk, ))
                """)
                _tile_step(w, *step)
            with w.block("if UNROLL == 2:"):
                # two tiles per iteration, each guarded by its own set of barriers: tile it by the
                # second set where n_tiles - 1 - it is odd, so the pairs end at the last tile, tile
                # 1 runs alone first where n_tiles - 1 is odd, and the last P·V takes the first set.
                # Triton syncs the group before a wait on a barrier allocation already waited on
                # since its last sync: once per pair instead of once per tile. (A tile left over
                # after the pairs cost ptxas spills; one under an `if` in the loop serialised every
                # wgmma: warning C7513.)
                w.line("lead = gl.minimum(1 + (n_tiles + 1) % 2, n_tiles)  # 2: tile 1 alone")
                with w.block("for it in range(1, lead):"):
                    _pipelined_step(w, step, "k_ready", "v_ready1", "kv_empty1", "PERIOD")
                # the first tile's wait would otherwise still count as unsynced in the pairs
                w.line("gl.thread_barrier()")
                with w.block("for it0 in range(lead, n_tiles, 2):"):
                    w.line("it = it0")
                    _pipelined_step(w, step, "k_ready1", "v_ready", "kv_empty", "PERIOD")
                    w.line("it = it0 + 1")
                    _pipelined_step(w, step, "k_ready", "v_ready1", "kv_empty1", "PERIOD")
            with w.block("else:"):
                with w.block("for it in range(1, n_tiles):"):
                    _pipelined_step(w, step, "k_ready", "v_ready", "kv_empty", "STAGES")
            with w.block("if n_tiles > 0:"):
                w.code("""
                last = (n_tiles - 1) % STAGES
                # (the last tile takes the first set of barriers with UNROLL 2 too)
                mbarrier.wait(v_ready.index(last), ((n_tiles - 1) // PERIOD) & 1)
                acc = warpgroup_mma(p16, _kv_tile(v_smem, last), acc, is_async=True)
                acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
                _release(kv_empty.index(last), THREAD_ARRIVE)
                """)
        with w.block("else:"):
            with w.block("if n_tiles > 0:"):
                w.line("_mma_turn(my_turn, 0, WG, PINGPONG)")
            with w.block("for it in range(0, n_tiles):"):
                w.code("""
                slot = it % STAGES
                phase = (it // STAGES) & 1
                mbarrier.wait(k_ready.index(slot), phase)
                qk = warpgroup_mma(q_tile, _kv_tile(k_smem, slot).permute((1, 0)), qk0, use_acc=False, is_async=True)
                _mma_pass(next_turn, PINGPONG, THREAD_ARRIVE)
                qk = warpgroup_mma_wait(num_outstanding=0, deps=(qk, ))
                """)
                _tile_step(w, *step)
                w.code("""
                acc = acc * gl.expand_dims(gl.convert_layout(alpha, orow_layout), 1)
                mbarrier.wait(v_ready.index(slot), phase)
                _mma_turn(my_turn, it + 1, WG, PINGPONG)
                acc = warpgroup_mma(p16, _kv_tile(v_smem, slot), acc, is_async=True)
                acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
                _release(kv_empty.index(slot), THREAD_ARRIVE)
                """)
            with w.block("if n_tiles > 0:"):
                w.line("_mma_pass(next_turn, PINGPONG, THREAD_ARRIVE)")
        # _softmax_finish's rule: a row with nothing visited gives 0 and -inf, never NaN
        w.code("""
        dead = l_i == 0.0
        l_safe = gl.where(dead, 1.0, l_i)
        lse = gl.where(dead, float("-inf"), gl.where(m_i == float("inf"), m_i, (m_i + gl.log2(l_safe)) * LN2))
        gl.store(Lse + pid_bh.to(gl.int64) * LQ + offs_m, lse, mask=offs_m < LQ)
        out = acc / gl.expand_dims(gl.convert_layout(l_safe, orow_layout), 1)
        om = q0 + gl.arange(0, BLOCK_M, layout=orow_layout)
        od = gl.arange(0, HEAD_D, layout=gl.SliceLayout(0, o_layout))
        o_ptrs = Out + b.to(gl.int64) * stride_ob + h.to(gl.int64) * stride_oh + gl.expand_dims(om.to(gl.int64) * stride_om, 1) + gl.expand_dims(od, 0)
        gl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=gl.expand_dims(om < LQ, 1))
        """)


def _kernel(spec: KernelSpec, w: Writer) -> None:
    """The entry: the visit plan of the program's CONSUMERS·BLOCK_M rows, shared memory, barriers, partitions."""
    em = ExprEmitter(_env(1), 3, prefix="w")
    plan = _plan_lines(em, spec.fwd_range, 1, "BLOCK_N", "kv_max", False)
    params = signature(spec)
    runtime = ", ".join(p.name for p in params if p.kind != "constexpr")
    consts = ", ".join(f"{p.name}: gl.constexpr" for p in params if p.kind == "constexpr")
    name = kernel_name(spec)
    unspecialised = [n for n in UNSPECIALISED if any(p.name == n for p in params)]
    w.code(f'''
    @gluon.jit(do_not_specialize={unspecialised!r})
    def {name}({runtime},
            {consts}):
        """Forward (softmax), warp-specialised for Hopper: one program per CONSUMERS query tiles of one (batch, head)."""
        if HEAVY_FIRST:
            # work grows along the query tiles (heavy_first): the grid is (B·HQ, query tiles), the
            # heads vary fastest, and the last query tiles of every head start first
            pid_m = gl.num_programs(1) - 1 - gl.program_id(1)
            pid_bh = gl.program_id(0)
        else:
            pid_m = gl.program_id(0)
            pid_bh = gl.program_id(1)
        b = pid_bh // HQ
        h = pid_bh % HQ
        hk = h // GROUP
        q_lo = pid_m * (BLOCK_M * CONSUMERS)
        q_hi = gl.minimum(q_lo + BLOCK_M * CONSUMERS, LQ) - 1
        q_max = LQ - 1
        kv_max = LKV - 1
    ''')
    with w.indented():
        w.emitted(em.take(0, w.ind))
        w.emitted(em.take(1, w.ind))
        for ln in plan:
            w.line(ln)
        w.code(f'''
        dtype: gl.constexpr = q_desc.dtype
        q_smem = gl.allocate_shared_memory(dtype, [CONSUMERS, 1, 1, BLOCK_M, HEAD_D], q_desc.layout)
        k_smem = gl.allocate_shared_memory(dtype, [STAGES, 1, 1, BLOCK_N, HEAD_D], k_desc.layout)
        v_smem = gl.allocate_shared_memory(dtype, [STAGES, 1, 1, BLOCK_N, HEAD_D], v_desc.layout)
        q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        k_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        v_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        kv_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        # PINGPONG's turns: one allocation each (see _mma_turn)
        turn0 = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        turn1 = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        # UNROLL 2: a second set of K/V barriers for the odd tiles (the consumers' paired loop); a
        # barrier then serves every PERIOD-th tile (a multiple of the ring and of the pair)
        if UNROLL == 2:
            k_ready1 = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
            v_ready1 = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
            kv_empty1 = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        else:
            k_ready1 = k_ready
            v_ready1 = v_ready
            kv_empty1 = kv_empty
        PERIOD: gl.constexpr = STAGES * UNROLL if STAGES % 2 == 1 else STAGES
        # arrivals per consumer group on kv_empty and turn (_release): one, or each of its threads
        ARRIVALS: gl.constexpr = GROUP_THREADS if THREAD_ARRIVE else 1
        mbarrier.init(q_bar, count=1)
        mbarrier.init(turn0, count=ARRIVALS)
        mbarrier.init(turn1, count=ARRIVALS)
        for i in gl.static_range(STAGES):
            mbarrier.init(k_ready.index(i), count=1)
            mbarrier.init(v_ready.index(i), count=1)
            mbarrier.init(kv_empty.index(i), count=CONSUMERS * ARRIVALS)
            if UNROLL == 2:
                mbarrier.init(k_ready1.index(i), count=1)
                mbarrier.init(v_ready1.index(i), count=1)
                mbarrier.init(kv_empty1.index(i), count=CONSUMERS * ARRIVALS)
        ''')
        tiles = "n_full, f_begin, t_begin, n_first, f_end, n_tiles"
        bufs = _buffer_names(spec)
        common = ("k_smem, v_smem, q_bar, k_ready, v_ready, kv_empty, k_ready1, v_ready1, kv_empty1, Out, Lse, Sinks, "
                  "stride_ob, stride_oh, stride_om, b, h, pid_bh")
        consumer = [f"({name}_consumer, (q_smem.index({c}), {common}, q_lo + {c} * BLOCK_M, LQ, LKV, sm_scale, {bufs}"
                    f"{tiles}, turn{c}, turn{1 - c}, BLOCK_M, BLOCK_N, HEAD_D, STAGES, PIPELINE, PINGPONG, THREAD_ARRIVE, UNROLL, "
                    f"PERIOD, {c}, HAS_SINKS))"
                    for c in range(2)]
        load = (f"(_hopper_load, (q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_bar, k_ready, v_ready, kv_empty, "
                f"k_ready1, v_ready1, kv_empty1, b, h, hk, q_lo, {tiles}, BLOCK_M, BLOCK_N, STAGES, CONSUMERS, UNROLL, "
                f"PERIOD))")
        partitions(w, consumer, load)


def partitions(w: Writer, consumer: list, load: str) -> None:
    """``gl.warp_specialize`` of a Hopper kernel: ``consumer`` (the (function, args) code of the
    first and the second consumer group) and the producer ``load``, for ``CONSUMERS`` 1 or 2. The
    default partition (the program's warps) is the first consumer group; the second group and the
    producer warp are workers, their registers set by setmaxnreg (``CONSUMER_REGS``, ``LOADER_REGS``)."""
    with w.block("if CONSUMERS == 2:"):
        w.line(f"gl.warp_specialize([{consumer[0]},")
        w.line(f"                    {consumer[1]},")
        w.line(f"                    {load}], [4, 1], [CONSUMER_REGS, LOADER_REGS])")
    with w.block("else:"):
        w.line(f"gl.warp_specialize([{consumer[0]},")
        w.line(f"                    {load}], [1], [LOADER_REGS])")


def render(spec: KernelSpec) -> str:
    """The Gluon module of ``spec``'s Hopper forward (call only where :func:`supports` is None)."""
    why = supports(spec)
    if why is not None:
        raise ValueError(f"the Hopper target does not render this pattern: {why}")
    w = Writer()
    w.code(GLUON_HEADER)
    w.line()
    w.line("#: registers per thread of a worker consumer warp group and of the producer warp (setmaxnreg)")
    w.line("CONSUMER_REGS = gl.constexpr(232)")
    w.line("LOADER_REGS = gl.constexpr(40)")
    w.line("#: threads of a consumer warp group (warp_specialize's 4 warps per group)")
    w.line("GROUP_THREADS = gl.constexpr(128)")
    w.line()
    w.line()
    _consumer(spec, w)
    w.line()
    w.line()
    _kernel(spec, w)
    return module_header(spec, f"hopper{HOPPER_VERSION}", spec.key, "  (dense, no modifiers)") + w.text()

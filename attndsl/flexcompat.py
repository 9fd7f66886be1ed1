"""FlexAttention's argument conventions, as :func:`attndsl.attention` accepts them: what
``block_mask=`` means (a :class:`PatternMask`, or a torch ``BlockMask`` run from its ``mask_mod`` or
as block selections merged through the logsumexp), ``kernel_options`` and ``return_aux``.

A FlexAttention ``BlockMask`` made by torch's ``create_block_mask`` is a materialised summary of
its ``mask_mod``; attndsl analyses the ``mask_mod`` itself and runs it from that (after one host
check that the block tensors are indeed what the ``mask_mod`` implies). A BlockMask whose block
tensors say more (``BlockMask.from_kv_blocks``, VSA) runs as a block selection
(:mod:`attndsl.selectors.blocks`). The drop-in entry points are in :mod:`attndsl.flex`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

try:  # torch >= 2.8: AuxRequest/AuxOutput
    from torch.nn.attention.flex_attention import AuxOutput, AuxRequest
except ImportError:  # pragma: no cover - older torch
    AuxOutput = AuxRequest = None

#: FlexAttention kernel options that set attndsl's tiles (our keyword)
_TILE_KEYS = {"BLOCK_M": 0, "BLOCK_N": 1, "num_warps": 2, "num_stages": 3}


def _flex_option_names() -> frozenset:
    try:
        from torch.nn.attention.flex_attention import FlexKernelOptions
        names = set(getattr(FlexKernelOptions, "__annotations__", {}))
    except ImportError:  # pragma: no cover
        names = set()
    return frozenset(names | set(_TILE_KEYS) | {"PRESCALE_QK", "ROWS_GUARANTEED_SAFE", "BLOCKS_ARE_CONTIGUOUS",
                                                "WRITE_DQ", "FORCE_USE_FLEX_ATTENTION", "BACKEND"})


def tile_options(kernel_options: dict) -> tuple:
    """``(block_m, block_n, num_warps, num_stages)`` from FlexAttention's ``kernel_options``: those four
    keys map to attndsl's tiles; Flex's other options tune Flex's own kernel and are ignored; a key
    Flex does not know raises (a typo should not pass silently)."""
    if not isinstance(kernel_options, dict):
        raise TypeError(f"kernel_options must be a dict, got {type(kernel_options).__name__}")
    known = _flex_option_names()
    unknown = sorted(k for k in kernel_options if k not in known)
    if unknown:
        raise ValueError(f"kernel_options: unknown option(s) {unknown}; attndsl reads BLOCK_M, BLOCK_N, num_warps, "
                         "num_stages and ignores FlexAttention's other options")
    out = [None, None, None, None]
    for k, i in _TILE_KEYS.items():
        if kernel_options.get(k) is not None:
            val = kernel_options[k]
            if not isinstance(val, int) or isinstance(val, bool) or val <= 0:
                raise ValueError(f"kernel_options[{k!r}] must be a positive int, got {val!r}")
            out[i] = val
    return tuple(out)


@dataclass(frozen=True)
class PatternMask:
    """What :func:`create_block_mask` returns: a ``mask_mod`` and the lengths it was made for.

    Accepted wherever FlexAttention's ``BlockMask`` is (``block_mask=`` of :func:`attndsl.attention`
    and :func:`flex_attention`). Nothing is evaluated or stored on a device.

    Attributes:
        mask_mod: ``mask_mod(b, h, q_idx, kv_idx) -> bool``.
        B, H: batch and heads the mask was made for (None: broadcast over them).
        seq_lengths: ``(Q_LEN, KV_LEN)``.
        BLOCK_SIZE: ``(q, kv)`` block size requested (kept for FlexAttention compatibility; attndsl
            picks its own tiles).
        device: the device requested.
    """

    mask_mod: Callable
    B: int | None
    H: int | None
    seq_lengths: tuple[int, int]
    BLOCK_SIZE: tuple[int, int] = (128, 128)
    device: Any = None

    @property
    def shape(self) -> tuple:
        """``(B, H, Q_LEN, KV_LEN)`` as FlexAttention's BlockMask reports it (1 for a broadcast dim)."""
        return (self.B or 1, self.H or 1, *self.seq_lengths)

    def to(self, device) -> "PatternMask":
        """The same mask, recorded for ``device`` (nothing to move)."""
        return PatternMask(self.mask_mod, self.B, self.H, self.seq_lengths, self.BLOCK_SIZE, device)

    def __repr__(self):
        name = getattr(self.mask_mod, "__name__", repr(self.mask_mod))
        return f"PatternMask(mask_mod={name}, shape={self.shape})"


def _noop(mask_mod) -> bool:
    try:
        from torch.nn.attention.flex_attention import noop_mask
    except ImportError:  # pragma: no cover
        return False
    return mask_mod is noop_mask


def mask_of_block_mask(block_mask, query: torch.Tensor, key: torch.Tensor):
    """The ``mask_mod`` of a FlexAttention ``BlockMask`` or a :class:`PatternMask` (None for a
    BlockMask without a mask), after checking its lengths against the call's as FlexAttention does."""
    mask_mod = getattr(block_mask, "mask_mod", None)
    seq = getattr(block_mask, "seq_lengths", None)
    if seq is None:
        raise TypeError(f"block_mask must be a torch.nn.attention.flex_attention.BlockMask or the result of "
                        f"attndsl.create_block_mask, got {type(block_mask).__name__}")
    if getattr(mask_mod, "__name__", "") == "_sliced_mask_mod_error":
        raise RuntimeError("Cannot use mask_mod from a sliced BlockMask")
    Lq, Lkv = query.shape[-2], key.shape[-2]
    if (int(seq[0]), int(seq[1])) != (Lq, Lkv):
        raise ValueError(f"block_mask was created for lengths (Q_LEN, KV_LEN) = {tuple(seq)} but the call has "
                         f"q_len={Lq} and kv_len={Lkv}; create the block mask for the call's lengths")
    if mask_mod is None or _noop(mask_mod):
        return None
    return mask_mod


# ---------------------------------------------------------------------------------------------
# torch BlockMasks: what their block tensors mean
# ---------------------------------------------------------------------------------------------
# FlexAttention visits, per (b, h, q block), the kv blocks listed in kv_indices (partial: mask_mod
# applies) and full_kv_indices (full: mask_mod is skipped). A BlockMask made by torch's
# create_block_mask lists exactly the blocks its mask_mod implies, so the mask_mod alone says the
# same (the fast path: closed-form analysis, no tables to read); any other (from_kv_blocks, VSA)
# runs as a block selection of the listed blocks.

#: how often each path was taken (tests read it): "mask_mod" (fast), "selection", "split"
#: (full blocks that disagree with the mask_mod: two selections merged), "checks" (host checks run)
PATH_COUNTS = {"mask_mod": 0, "selection": 0, "split": 0, "checks": 0}

#: the plan per BlockMask object: id -> (weakref, {call and version key: {"verdict", "parts"}})
_VERDICTS: dict = {}

def forget_block_masks() -> None:
    """Drop every BlockMask's cached verdict and selections (:func:`attndsl.clear_cache`)."""
    _VERDICTS.clear()


#: dense evaluation of a mask_mod (for the fast-path check only) up to this many (b, h, q, kv) points
DENSE_CHECK_LIMIT = 1 << 28


@dataclass(frozen=True)
class BlockMaskPart:
    """One call of a BlockMask's selection path: ``mask_mod`` on the key blocks ``blocks``."""
    mask_mod: Callable | None
    blocks: Any  # attndsl.selectors.BlockSelection


def _is_torch_block_mask(block_mask) -> bool:
    return getattr(block_mask, "kv_num_blocks", None) is not None and getattr(block_mask, "kv_indices", None) is not None


def _block_sizes(block_mask) -> tuple[int, int]:
    bs = block_mask.BLOCK_SIZE
    qb, kb = (bs, bs) if isinstance(bs, int) else (int(bs[0]), int(bs[1]))
    for name, x in (("Q_BLOCK_SIZE", qb), ("KV_BLOCK_SIZE", kb)):
        if x < 16 or x & (x - 1):
            raise ValueError(f"block_mask.BLOCK_SIZE {tuple(bs) if not isinstance(bs, int) else bs}: attndsl runs a "
                             f"BlockMask's blocks with tiles inside them, so {name} must be a power of two >= 16, "
                             f"got {x}")
    return qb, kb


def _listed(num: torch.Tensor, idx: torch.Tensor, nqb: int) -> torch.Tensor:
    """The first ``num`` entries of ``idx`` per row, the rest -1: ``[Bm, Hm, nqb, K]`` int32."""
    num, idx = num[..., :nqb], idx[..., :nqb, :]
    used = torch.arange(idx.shape[-1], device=idx.device) < num[..., None].to(torch.int64)
    return torch.where(used, idx.to(torch.int32), torch.full_like(idx, -1, dtype=torch.int32))


def _check_broadcast(block_mask, query: torch.Tensor) -> None:
    Bm, Hm = block_mask.kv_num_blocks.shape[:2]
    B, Hq = query.shape[:2]
    if Bm not in (1, B) or Hm not in (1, Hq):
        raise ValueError(f"block_mask has batch {Bm} and heads {Hm} (kv_num_blocks {tuple(block_mask.kv_num_blocks.shape)}); "
                         f"the call has B={B} and Hq={Hq}: each must be 1 or the call's")


def _dense_classes(mask_mod, B: int, H: int, Lq: int, Lkv: int, qb: int, kb: int, device):
    """``(all true, any true)`` per (b, h, q block, kv block) from evaluating ``mask_mod`` on every
    in-range point, a q block at a time (None when too large or when the mask_mod does not
    broadcast over index tensors)."""
    if B * H * Lq * Lkv > DENSE_CHECK_LIMIT:
        return None
    nqb, nkb = -(-Lq // qb), -(-Lkv // kb)
    b = torch.arange(B, device=device).view(B, 1, 1, 1)
    h = torch.arange(H, device=device).view(1, H, 1, 1)
    kv = torch.arange(Lkv, device=device).view(1, 1, 1, Lkv)
    pad = nkb * kb - Lkv
    alls, anys = [], []
    try:
        with torch.no_grad():
            for i in range(nqb):
                q = torch.arange(i * qb, min(Lq, (i + 1) * qb), device=device).view(1, 1, -1, 1)
                m = torch.as_tensor(mask_mod(b, h, q, kv), device=device).to(torch.bool).expand(B, H, q.shape[2], Lkv)
                all_m = torch.nn.functional.pad(m, (0, pad), value=True).view(B, H, -1, nkb, kb)
                any_m = torch.nn.functional.pad(m, (0, pad), value=False).view(B, H, -1, nkb, kb)
                alls.append(all_m.all(-1).all(2))
                anys.append(any_m.any(-1).any(2))
    except Exception:  # a mask_mod written for scalars only: no verdict, the selection path is exact
        return None
    return torch.stack(alls, 2), torch.stack(anys, 2)


def _classify(bm, mask_mod, compiled, tensors, query, key, qb: int, kb: int) -> str:
    """The verdict of one host check: ``"mask_mod"`` when the mask_mod alone means the same as
    ``bm``, ``"union"`` when its full blocks are full of the mask_mod's True (one selection of the
    listed blocks, the mask applied everywhere, is exact), ``"split"`` otherwise."""
    PATH_COUNTS["checks"] += 1
    B, Hq, Lq, Lkv = query.shape[0], query.shape[1], query.shape[2], key.shape[2]
    nqb, nkb = -(-Lq // qb), -(-Lkv // kb)
    dev = bm.kv_num_blocks.device

    def dense(num, idx):
        if num is None:
            return torch.zeros((1, 1, nqb, nkb), dtype=torch.bool, device=dev)
        from .selectors.blocks import BlockSelection
        got = BlockSelection(_listed(num, idx, nqb), qb, kb).selected(nkb)
        # rows the BlockMask does not have visit nothing
        return torch.nn.functional.pad(got, (0, 0, 0, nqb - got.shape[2])) if got.shape[2] < nqb else got

    part, full = dense(bm.kv_num_blocks, bm.kv_indices), dense(bm.full_kv_num_blocks, bm.full_kv_indices)
    listed = part | full
    if mask_mod is None:  # no mask: every listed block is visited whole, full or not
        return "mask_mod" if bool(listed.all()) else "union"
    from .selectors.blocks import _tile_class
    all_t, any_t = _tile_class(compiled.spec, tensors, B, Hq, Lq, Lkv, qb, kb, dev)
    # every block the mask reaches is listed, every full block is full of its True: sound with the
    # closed form's over-approximated "any" and under-approximated "all"
    ok_any = not bool((any_t & ~listed).any())
    ok_all = not bool((full & ~all_t).any())
    if not (ok_any and ok_all):
        got = _dense_classes(mask_mod, B, Hq, Lq, Lkv, qb, kb, dev)
        if got is not None:
            all_t, any_t = got
            ok_any = not bool((any_t & ~listed).any())
            ok_all = not bool((full & ~all_t).any())
    return "mask_mod" if ok_any and ok_all else ("union" if ok_all else "split")


def _plan(bm, mask_mod, query, key, qb: int, kb: int, compiled_of) -> dict | None:
    """The cached plan of ``bm`` for this call (``{"verdict": ..., "parts": ...}``): checked once per
    BlockMask, call shape and version of its block tensors and of the tensors the mask_mod reads.
    None inside a CUDA graph capture when not checked before (no host reads there). ``compiled_of``:
    the pattern cache's lookup (``mask_mod -> (CompiledAttention, its captured tensors)``)."""
    compiled, tensors = compiled_of(mask_mod) if mask_mod is not None else (None, ())
    watched = [bm.kv_num_blocks, bm.kv_indices, bm.full_kv_num_blocks, bm.full_kv_indices, *tensors]
    vkey = (tuple(query.shape[:3]), key.shape[2], compiled.spec.key if compiled is not None else None,
            tuple((id(t), t._version) if isinstance(t, torch.Tensor) else None for t in watched))
    entry = _VERDICTS.get(id(bm))
    if entry is not None and entry[0]() is bm and vkey in entry[1]:
        return entry[1][vkey]
    if query.is_cuda and torch.cuda.is_current_stream_capturing():
        return None
    plan = {"verdict": _classify(bm, mask_mod, compiled, tensors, query, key, qb, kb), "parts": None}
    if entry is None or entry[0]() is not bm:
        import weakref
        key_id = id(bm)
        try:
            ref = weakref.ref(bm, lambda _r, k=key_id: _VERDICTS.pop(k, None))
        except TypeError:  # not weak-referenceable: checked on every call
            return plan
        entry = _VERDICTS[key_id] = (ref, {})
    entry[1][vkey] = plan
    return plan


def block_mask_parts(block_mask, query: torch.Tensor, key: torch.Tensor, compiled_of):
    """What ``block_mask=`` means for this call (``compiled_of``: the pattern cache's lookup of a
    ``mask_mod``, ``(CompiledAttention, captured tensors)``, for the check): ``(mask_mod, None)`` (run the mask_mod alone) or
    ``(None, [BlockMaskPart, ...])`` (block selections whose results are merged).

    A :class:`PatternMask` is its mask_mod. A torch ``BlockMask`` is run from its mask_mod alone when
    its block tensors list exactly what the mask_mod implies (checked once per BlockMask, eager
    calls only); otherwise, and under ``torch.compile`` or in a CUDA graph capture of a BlockMask
    not checked before (no host reads there), as a block selection: the listed kv blocks (partial
    and full) with the mask_mod. Full blocks skip the mask_mod in FlexAttention; where they might
    not be full of its True, they run as a second selection without the mask_mod, merged with the
    first through the logsumexp. The selections are kept with the check's verdict, so their block
    tables are built once too."""
    mask_mod = mask_of_block_mask(block_mask, query, key)
    if not _is_torch_block_mask(block_mask):
        PATH_COUNTS["mask_mod"] += 1
        return mask_mod, None
    from .selectors.blocks import BlockSelection
    qb, kb = _block_sizes(block_mask)
    _check_broadcast(block_mask, query)
    bm = block_mask
    has_full = bm.full_kv_num_blocks is not None
    plan = None if torch.compiler.is_compiling() else _plan(bm, mask_mod, query, key, qb, kb, compiled_of)
    if plan is None:  # not checked (tracing, graph capture): the selections are exact without a check
        plan = {"verdict": "union" if mask_mod is None or not has_full else "split", "parts": None}
    verdict = plan["verdict"]
    if verdict == "mask_mod":
        PATH_COUNTS["mask_mod"] += 1
        return mask_mod, None
    PATH_COUNTS[verdict if verdict == "split" else "selection"] += 1
    if plan["parts"] is None:
        nqb = -(-query.shape[2] // qb)
        part = _listed(bm.kv_num_blocks, bm.kv_indices, nqb)
        full = _listed(bm.full_kv_num_blocks, bm.full_kv_indices, nqb) if has_full else None
        if verdict == "split":
            plan["parts"] = [BlockMaskPart(mask_mod, BlockSelection(part, qb, kb)),
                             BlockMaskPart(None, BlockSelection(full, qb, kb))]
        else:
            sel = part if full is None else torch.cat([part, full], dim=-1)
            plan["parts"] = [BlockMaskPart(mask_mod, BlockSelection(sel, qb, kb))]
    return None, plan["parts"]


def merge_parts(results: list, softmax: bool, return_lse: bool):
    """One result from the block selections' results: softmax parts ``(out, lse)`` merged through
    the logsumexp (rows no part reaches: 0 and ``-inf``); sigmoid parts summed."""
    def wide(t):  # float32 accumulation, float64 kept
        return t.to(torch.promote_types(t.dtype, torch.float32))
    if not softmax:
        return sum(wide(r) for r in results).to(results[0].dtype)
    lses = [lse for _, lse in results]
    lse = lses[0]
    for other in lses[1:]:
        lse = torch.logaddexp(lse, other)
    safe = torch.where(torch.isneginf(lse), torch.zeros_like(lse), lse)  # no nan through exp(-inf - -inf)
    out = sum(wide(o) * torch.exp(wide(l) - wide(safe)).unsqueeze(-1) for o, l in results)
    out = out.to(results[0][0].dtype)
    return (out, lse) if return_lse else out


def check_aux(return_aux, return_lse: bool, normalizer: str) -> None:
    """Validate ``return_aux`` as FlexAttention does."""
    if AuxRequest is None:  # pragma: no cover
        raise TypeError("return_aux needs torch.nn.attention.flex_attention.AuxRequest (torch >= 2.8)")
    if not isinstance(return_aux, AuxRequest):
        raise TypeError(f"return_aux must be a torch.nn.attention.flex_attention.AuxRequest, "
                        f"got {type(return_aux).__name__}")
    if return_lse:
        raise ValueError("Cannot specify both return_lse and return_aux. return_lse is deprecated, please use "
                         "return_aux=AuxRequest(lse=True) instead.")
    if return_aux.max_scores:
        raise NotImplementedError("return_aux=AuxRequest(max_scores=True): attndsl does not compute the rows' "
                                  "maximum scores; request lse only")
    if return_aux.lse and normalizer != "softmax":
        raise ValueError("return_aux=AuxRequest(lse=True) is not available with normalizer='sigmoid'")


def aux_output(got, return_aux):
    """``(out, AuxOutput(lse=...))`` from the call's result."""
    if return_aux.lse:
        out, lse = got
        return out, AuxOutput(lse=lse)
    return got, AuxOutput()

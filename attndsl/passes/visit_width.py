"""How much of the other index the closed-form visit ranges of a spec name: per tile, on average over
a call's tiles, and whether the forward's work grows along the query tiles. Analyses of
``spec.fwd_range`` / ``spec.bwd_range`` that the Hopper target and its selection read: the Hopper
forward orders its programs by :func:`heavy_first` (decided once per spec), and the runtime weighs
the kernels' measured speeds by :func:`mean_visited` per call shape."""
from __future__ import annotations

import torch

from attndsl import ir
from attndsl.ir.evaluate import evaluate
from attndsl.spec import KernelSpec, VisitRange


def range_widths(rng, starts: torch.Tensor, rows: int, other_len: int, target_len: int) -> torch.Tensor | None:
    """Target positions the closed-form visit range ``rng`` names for each tile of ``rows`` positions
    of the other index starting at ``starts`` (batch and head 0), with ``other_len`` positions of
    the other index and ``target_len`` of the target; None where the range reads captured tensors
    or another variable (a layout's coordinates)."""
    other = "q" if rng.target == "kv" else "kv"
    names = {"b", "h", f"{other}_lo", f"{other}_hi", "q_max", "kv_max"}
    if any(ir.loads([x]) or not ir.free_vars(x) <= names for x in rng.outer):
        return None
    env = {"b": torch.tensor(0), "h": torch.tensor(0), f"{other}_lo": starts,
           f"{other}_hi": torch.minimum(starts + rows, torch.tensor(other_len)) - 1,
           f"{other}_max": torch.tensor(other_len - 1), f"{rng.target}_max": torch.tensor(target_len - 1)}
    lo, hi = evaluate(list(rng.outer), env, ())
    return (hi.clamp(max=target_len - 1) - lo.clamp(min=0) + 1).clamp(min=0).broadcast_to(starts.shape)


def mean_visited(spec: KernelSpec, rng, other_len: int, target_len: int, rows: int) -> float | None:
    """Target positions the closed-form visit range ``rng`` of ``spec`` (its ``fwd_range``: keys per
    query tile; ``bwd_range``: queries per key tile) names per tile of ``rows`` positions of the
    other index, on average over the tiles of a call with ``other_len`` and ``target_len``
    positions (batch and head 0); None where the range reads captured tensors, or the mask is
    data-dependent (the range only bounds its work, as causality bounds a document mask's: its
    block table, on the device, holds it)."""
    if spec.data_dependent or not isinstance(rng, VisitRange):
        return None
    width = range_widths(rng, torch.arange(0, other_len, rows), rows, other_len, target_len)
    return None if width is None else float(width.float().mean())


def heavy_first(spec: KernelSpec, length: int = 4096, rows: int = 128) -> bool:
    """Whether the forward's work grows along the query tiles (a causal mask's last tiles visit
    every key, its first almost none): the Hopper forward then launches its programs heaviest
    first, so that the long ones do not start last and leave a tail. Decided once per spec from
    the closed-form visit range at ``length`` queries and keys, tiles of ``rows`` rows: the last
    query tile visits more keys than the middle one (a sliding window's first tiles are lighter,
    the rest alike: not growing). A range that reads captured tensors (per batch or head) counts
    as not growing."""
    if not isinstance(spec.fwd_range, VisitRange):
        return False
    starts = torch.tensor([length // 2 // rows * rows, (length - 1) // rows * rows])
    width = range_widths(spec.fwd_range, starts, rows, length, length)
    return width is not None and bool(width[1] > width[0])

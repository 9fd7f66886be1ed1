"""Block tables of data-dependent masks, kept across calls and layers.

A document mask (``doc_ids[q_idx] == doc_ids[kv_idx]``) needs a block table (which tiles are
full, partial or empty) built on the device from the captured tensors. Every layer of a step calls
attention with the same ``doc_ids``: the table is built once and found again by

* the pattern (its spec key: which table kernel),
* the call's shape ``(B, Hq, Lq, Lkv)`` and device (the tiles are the inner key of
  :class:`~attndsl.runtime.blocktables.BlockTables`, built on first use per tile size),
* for every captured tensor the mask reads: its address, dtype, shape, strides and **version
  counter** (``t._version``; an in-place change such as ``doc_ids.copy_(...)`` bumps it, so the
  next call rebuilds).

An entry holds its tensors, so their memory cannot be freed and reused by another tensor at the
same address while the entry lives (an address is only an identity while the tensor is alive).
Where the mask's data-dependent parts can be bounded per tile, a new table is built in
O(L + tiles²) by the tile-bounds kernels (``runtime/tilebounds.py``), else by the dense table kernel.
Inference-mode tensors have no version counter: their tables are built per call. While a CUDA
graph is being captured tables are built inside the capture (a replay then rebuilds them from
the tensors' current contents), never taken from the cache.
"""
from __future__ import annotations

import collections
import os

import torch

from ..ir.graph import loads
from .tilebounds import bounded_table, dense_table

#: build tables from per-tile bounds where possible (``ATTNDSL_TABLE_BOUNDS=0``: always the dense kernel)
BOUNDS = os.environ.get("ATTNDSL_TABLE_BOUNDS", "1") != "0"

#: tables kept (least recently used dropped first); a table of L=32K is about 1 MB
MAX_TABLES = 32


def mask_slots(spec) -> tuple[int, ...]:
    """The captured-tensor slots the mask reads (a score-only tensor never changes the table)."""
    if spec.mask is None:
        return ()
    return tuple(sorted({n.attr[0] for n in loads([spec.mask])}))


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def build_table(runner, tables, buffers, transposed: bool, br: int, bc: int):
    """Build the table of one launch (rows ``br`` wide, columns ``bc``; rows are key tiles when
    ``transposed``) for ``tables``' call shape, and keep it in ``tables``: from per-tile bounds
    where the mask allows (and :data:`BOUNDS`), else by the dense table kernel. The tables of one
    call shape are built on first use per tile size (forward, dK/dV and dQ tiles may differ)."""
    dev = buffers[0].device if buffers else tables.device
    t = bounded_table(runner, tables.shape, buffers, transposed, br, bc, dev) if BOUNDS else None
    if t is None:
        t = dense_table(runner, tables.shape, buffers, transposed, br, bc, dev)
    tables.tables[(transposed, br, bc)] = t
    return t


class TableCache:
    """An LRU map from (pattern, call shape, captured tensors' identity and version) to tables."""

    def __init__(self, size: int = MAX_TABLES):
        self.size = size
        self.entries: collections.OrderedDict = collections.OrderedDict()
        self._slots: dict = {}  # spec key -> mask slots

    def layout_key(self, runner, q, k, tensors) -> tuple:
        """The part of a call's key that its call plan fixes (``attndsl.api``'s plan key covers
        it): the pattern, the backend, the call shape and device, which captured tensors the mask
        reads and their dtypes, shapes and strides."""
        spec = runner.spec
        slots = self._slots.get(spec.key)
        if slots is None:
            slots = self._slots[spec.key] = mask_slots(spec)
        return (spec.key, runner.interpret, q.shape[0], q.shape[1], q.shape[2], k.shape[2], q.device, slots,
                tuple((tensors[s].dtype, tensors[s].shape, tensors[s].stride()) for s in slots))

    def get(self, runner, q, k, tensors, layout: tuple | None = None):
        """The :class:`BlockTables` of this call: cached, or new (and cached) when the key is new.
        ``layout``: the call's :meth:`layout_key`, when its plan kept it; the rest of the key is
        each mask-read tensor's address and version counter."""
        if layout is None:
            layout = self.layout_key(runner, q, k, tensors)
        device, slots = layout[6], layout[7]
        if _capturing(device):
            return runner.new_tables(q, k, tensors)
        try:
            key = (layout, tuple([(tensors[s].data_ptr(), tensors[s]._version) for s in slots]))
        except RuntimeError:  # inference tensors track no version: nothing to key on
            return runner.new_tables(q, k, tensors)
        hit = self.entries.get(key)
        if hit is not None:
            self.entries.move_to_end(key)
            return hit[0]
        tables = runner.new_tables(q, k, tensors)
        self.entries[key] = (tables, tuple(tensors[s] for s in slots))
        if len(self.entries) > self.size:
            self.entries.popitem(last=False)
        return tables

    def clear(self) -> None:
        self.entries.clear()
        self._slots.clear()


TABLES = TableCache()

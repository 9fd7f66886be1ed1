"""Block tables of data-dependent masks: per row tile of a launch, its full and partial column
tiles (:class:`Table`), and the set of them one call's launches read (:class:`BlockTables`, the
public build-once object). Built by ``tables.py`` (``tilebounds.py`` where the mask's captured
indices can be bounded per tile) and by the block selectors (``selectors/blocks.py``); read by the
runners (``launch.py``) and the Hopper backward (``hopper_bwd.py``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .memo import arg_classes


@dataclass
class Table:
    """One block table: per row tile, the full and partial column tiles."""

    full: torch.Tensor
    part: torch.Tensor
    count: torch.Tensor
    uses_b: bool
    uses_h: bool

    #: the kernels' parameter names of ``args`` (``passes/lower.py``'s ``_TABLE``), in its order
    PARAMS = ("TBL_FULL", "TBL_PART", "TBL_CNT", "tbl_stride_b", "tbl_stride_h", "tbl_stride_r")

    def args(self) -> tuple:
        """The kernels' table arguments (``PARAMS``); worked out once (a table never changes)."""
        got = self.__dict__.get("_args")
        if got is None:
            TB, TH, R, C = self.full.shape
            sb = TH * R * C if self.uses_b else 0
            sh = R * C if self.uses_h else 0
            got = self._args = (self.full, self.part, self.count, sb, sh, C)
        return got

    def classes(self) -> tuple:
        """``memo.arg_classes`` of :meth:`args` (what a launch memo's specialisation depends on)."""
        got = self.__dict__.get("_classes")
        if got is None:
            got = self._classes = arg_classes(self.args())
        return got


class BlockTables:
    """Device-side tile classification for data-dependent masks, reusable across calls.

    ``tables`` maps ``(transposed, rows, cols)`` (the tile sizes of one launch; rows are key tiles
    when ``transposed``) to the :class:`Table` built for it. Read it through :meth:`get_table`: a
    kind of tables that makes its entries on demand (``selectors/blocks.py: SelectionTables``)
    overrides that method, not the dict."""

    def __init__(self, shape):
        self.shape = shape  # (B, Hq, Lq, Lkv)
        self.tables: dict = {}

    def get_table(self, key: tuple) -> Table | None:
        """The table of ``key`` = ``(transposed, rows, cols)``, or None when none is built yet (the
        runner then builds it: ``runtime/tables.py: build_table``)."""
        return self.tables.get(key)

    def __repr__(self):
        return f"BlockTables(shape={self.shape}, built={sorted(self.tables)})"

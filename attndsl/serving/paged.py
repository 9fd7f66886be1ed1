"""A paged KV cache: page pools, a free-page allocator, the page table and sequence lengths.

Layout (vLLM / FlashInfer): ``k_pool, v_pool [num_pages, page_size, Hkv, D]``; sequence ``b``'s
logical position ``p`` lives in pool page ``page_table[b, p // page_size]`` at row
``p % page_size``. The pools are stored that way (``layout="NHD"``, a token's heads side by side) or
head-major (``"HND"``, FlashInfer's other layout: storage ``[num_pages, Hkv, page_size, D]``, so a
page of one head is one contiguous block) and then shown through the same ``[num_pages, page_size,
Hkv, D]`` view: the decode kernels read any strides. Pages are handed out on the host (a free
list and a host copy of every sequence's length, so appending never reads the device); the device
tensors ``page_table`` and ``seq_lens`` are what :func:`attndsl.serving.decode` reads.

Two ways to write new keys and values:

* :meth:`PagedKVCache.append` / :meth:`PagedKVCache.prefill`: any number of tokens, pages allocated
  on the host as needed (a small host-to-device copy of the touched page-table rows);
* :meth:`PagedKVCache.append_step`: one token per sequence at position ``seq_lens[b]``, torch ops on
  device tensors only, so it can be captured in a CUDA graph with the decode call; the pages must
  have been reserved (:meth:`PagedKVCache.reserve`), and :meth:`PagedKVCache.sync_lengths` brings
  the host's lengths up to date afterwards.
"""
from __future__ import annotations

import torch


class PagedKVCache:
    """Page pools and per-sequence page tables for up to ``max_batch`` sequences.

    Args:
        num_pages (int): pages in each pool.
        page_size (int): tokens per page, a power of two (16-256 typical).
        num_kv_heads (int): ``Hkv``.
        head_dim (int): ``D``; ``head_dim_v`` the value head dim (default ``D``).
        max_batch (int): sequence slots (rows of ``page_table``).
        max_seq_len (int): longest sequence; ``page_table`` has ``ceil(max_seq_len / page_size)`` columns.
        dtype, device: of the pools.
        layout (str): ``"NHD"`` (default: a page stores its tokens one after another, each token's
            heads side by side) or ``"HND"`` (a page stores each head's tokens together).

    Attributes:
        k_pool, v_pool (Tensor): ``[num_pages, page_size, Hkv, D]`` / ``[..., Dv]`` (with ``"HND"`` a
            view of storage ``[num_pages, Hkv, page_size, D]``).
        layout (str): ``"NHD"`` or ``"HND"``.
        page_table (Tensor): ``[max_batch, max_pages]`` int32 (unused entries 0).
        seq_lens (Tensor): ``[max_batch]`` int32, tokens held per sequence.
    """

    def __init__(self, num_pages: int, page_size: int, num_kv_heads: int, head_dim: int, *, max_batch: int,
                 max_seq_len: int, head_dim_v: int | None = None, dtype=torch.float16, device=None,
                 layout: str = "NHD"):
        if layout not in ("NHD", "HND"):
            raise ValueError(f"layout must be 'NHD' or 'HND', got {layout!r}")
        if page_size < 1 or page_size & (page_size - 1):
            raise ValueError(f"page_size must be a power of two, got {page_size}")
        if num_pages < 1 or max_batch < 1 or max_seq_len < 1:
            raise ValueError(f"num_pages, max_batch and max_seq_len must be positive, got {num_pages}, "
                             f"{max_batch}, {max_seq_len}")
        self.page_size = page_size
        self.max_seq_len = max_seq_len
        self.max_pages = -(-max_seq_len // page_size)
        dv = head_dim if head_dim_v is None else head_dim_v
        self.layout = layout

        def pool(d):
            if layout == "HND":
                return torch.zeros((num_pages, num_kv_heads, page_size, d), dtype=dtype, device=device).transpose(1, 2)
            return torch.zeros((num_pages, page_size, num_kv_heads, d), dtype=dtype, device=device)
        self.k_pool, self.v_pool = pool(head_dim), pool(dv)
        self.page_table = torch.zeros((max_batch, self.max_pages), dtype=torch.int32, device=device)
        self.seq_lens = torch.zeros((max_batch,), dtype=torch.int32, device=device)
        self._free = list(range(num_pages - 1, -1, -1))  # pop() hands out low pages first
        self._pages: list[list[int]] = [[] for _ in range(max_batch)]
        self._lens = [0] * max_batch

    # -- host bookkeeping -----------------------------------------------------------------------
    @property
    def free_pages(self) -> int:
        return len(self._free)

    def length(self, seq_id: int) -> int:
        """Tokens held by sequence ``seq_id`` (the host's copy; no device read)."""
        return self._lens[seq_id]

    def reserve(self, seq_id: int, n_tokens: int) -> None:
        """Make sure sequence ``seq_id`` has pages for ``n_tokens`` positions (before a captured
        :meth:`append_step`)."""
        if n_tokens > self.max_seq_len:
            raise ValueError(f"sequence {seq_id}: {n_tokens} tokens exceed max_seq_len={self.max_seq_len}")
        pages = self._pages[seq_id]
        need = -(-n_tokens // self.page_size) - len(pages)
        if need <= 0:
            return
        if need > len(self._free):
            raise RuntimeError(f"PagedKVCache: sequence {seq_id} needs {need} more pages, {len(self._free)} free")
        new = [self._free.pop() for _ in range(need)]
        first = len(pages)
        pages += new
        self.page_table[seq_id, first:first + need] = torch.tensor(new, dtype=torch.int32).to(self.page_table.device)

    def free(self, seq_id: int) -> None:
        """Return sequence ``seq_id``'s pages to the pool and set its length to 0."""
        self._free += reversed(self._pages[seq_id])
        self._pages[seq_id] = []
        self._lens[seq_id] = 0
        self.page_table[seq_id].zero_()
        self.seq_lens[seq_id] = 0

    # -- writes ---------------------------------------------------------------------------------
    def append(self, k_new: torch.Tensor, v_new: torch.Tensor, seq_ids=None) -> None:
        """Append ``Lnew`` tokens to each of the sequences ``seq_ids`` (default ``0 .. N-1``).

        Args:
            k_new (Tensor): ``[N, Hkv, Lnew, D]``; ``v_new`` ``[N, Hkv, Lnew, Dv]``.
            seq_ids (Sequence[int] | None): the ``N`` sequence slots.
        """
        N, H, L, _ = k_new.shape
        seq_ids = list(range(N)) if seq_ids is None else [int(s) for s in seq_ids]
        if len(seq_ids) != N or v_new.shape[:3] != k_new.shape[:3]:
            raise ValueError(f"append: k_new {tuple(k_new.shape)}, v_new {tuple(v_new.shape)} and {len(seq_ids)} "
                             "sequence ids do not match")
        if H != self.k_pool.shape[2] or k_new.shape[3] != self.k_pool.shape[3] or v_new.shape[3] != self.v_pool.shape[3]:
            raise ValueError(f"append: k_new {tuple(k_new.shape)} / v_new {tuple(v_new.shape)} do not fit pools "
                             f"{tuple(self.k_pool.shape)} / {tuple(self.v_pool.shape)}")
        if L == 0:
            return
        pages, rows = [], []
        for s in seq_ids:
            start = self._lens[s]
            self.reserve(s, start + L)
            pos = range(start, start + L)
            pages += [self._pages[s][p // self.page_size] for p in pos]
            rows += [p % self.page_size for p in pos]
            self._lens[s] = start + L
        dev = self.k_pool.device
        pages = torch.tensor(pages, dtype=torch.int64).to(dev)
        rows = torch.tensor(rows, dtype=torch.int64).to(dev)
        # [N, H, L, D] -> [N * L, H, D] rows in the order of (pages, rows)
        self.k_pool[pages, rows] = k_new.transpose(1, 2).reshape(N * L, H, -1).to(self.k_pool.dtype)
        self.v_pool[pages, rows] = v_new.transpose(1, 2).reshape(N * L, H, -1).to(self.v_pool.dtype)
        ids = torch.tensor(seq_ids, dtype=torch.int64).to(dev)
        self.seq_lens[ids] = torch.tensor([self._lens[s] for s in seq_ids], dtype=torch.int32).to(dev)

    def prefill(self, seq_id: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write one sequence's prompt keys/values ``k [Hkv, L, D]``, ``v [Hkv, L, Dv]`` after what it holds."""
        self.append(k[None], v[None], [seq_id])

    def append_step(self, k_new: torch.Tensor, v_new: torch.Tensor) -> None:
        """One token per sequence slot, ``k_new [max_batch, Hkv, 1, D]``, written at position
        ``seq_lens[b]`` and ``seq_lens += 1``: device ops only (capturable in a CUDA graph). The
        pages must be reserved (:meth:`reserve`). The host's lengths do not move (a graph replay could
        not move them): call :meth:`sync_lengths` before the next :meth:`append`."""
        B = self.seq_lens.shape[0]
        if k_new.shape[0] != B or k_new.shape[2] != 1:
            raise ValueError(f"append_step: k_new must be [max_batch={B}, Hkv, 1, D], got {tuple(k_new.shape)}")
        pos = self.seq_lens.to(torch.int64)
        page = self.page_table.gather(1, (pos // self.page_size)[:, None])[:, 0].to(torch.int64)
        row = pos % self.page_size
        self.k_pool[page, row] = k_new[:, :, 0].to(self.k_pool.dtype)
        self.v_pool[page, row] = v_new[:, :, 0].to(self.v_pool.dtype)
        self.seq_lens += 1

    def sync_lengths(self) -> None:
        """Copy ``seq_lens`` to the host's lengths (a device read): after :meth:`append_step` calls
        (eager or replayed from a graph, which the host does not see) and before :meth:`append`."""
        self._lens = [int(n) for n in self.seq_lens.tolist()]

    # -- reads ----------------------------------------------------------------------------------
    def gather(self, seq_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Sequence ``seq_id``'s keys and values as contiguous ``[Hkv, L, D]`` copies (tests, debugging)."""
        n = self._lens[seq_id]
        if n == 0:
            return self.k_pool.new_zeros((self.k_pool.shape[2], 0, self.k_pool.shape[3])), \
                self.v_pool.new_zeros((self.v_pool.shape[2], 0, self.v_pool.shape[3]))
        pos = torch.arange(n)
        pages = torch.tensor(self._pages[seq_id], dtype=torch.int64)[pos // self.page_size].to(self.k_pool.device)
        rows = (pos % self.page_size).to(self.k_pool.device)
        return self.k_pool[pages, rows].transpose(0, 1), self.v_pool[pages, rows].transpose(0, 1)

    def decode(self, query: torch.Tensor, **kwargs):
        """:func:`attndsl.serving.decode` over this cache (``query [max_batch, Hq, Lq, D]``)."""
        from .decoding import decode
        kwargs.setdefault("max_seq_len", self.max_pages * self.page_size)
        return decode(query, self.k_pool, self.v_pool, seq_lens=self.seq_lens, page_table=self.page_table, **kwargs)

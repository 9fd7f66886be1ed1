"""Serving: decoding with a KV cache (contiguous or paged), for every pattern.

``decode`` runs a few new query tokens per sequence against the cache with split-KV kernels
generated from the pattern (``codegen/decode.py``); under ``torch.compile`` it is the
``attndsl::decode`` op (``serving/op.py``). ``PagedKVCache`` holds the page pools, the page table
and the sequence lengths, and writes new keys and values into the pool.
"""
from . import op as _op  # noqa: F401  (registers the attndsl::decode op)
from .decoding import decode
from .paged import PagedKVCache

__all__ = ["decode", "PagedKVCache"]

"""Serving: decoding with a KV cache (contiguous or paged), for every pattern.

``decode`` runs a few new query tokens per sequence against the cache with split-KV kernels
generated from the pattern (``codegen/decode.py``); ``PagedKVCache`` holds the page pools, the
page table and the sequence lengths, and writes new keys and values into the pool.
"""
from .decoding import decode
from .paged import PagedKVCache

__all__ = ["decode", "PagedKVCache"]

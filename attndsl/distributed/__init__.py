"""Context parallelism: attention over a sequence sharded across ranks (torch.distributed).

* :class:`Sharding` (contiguous, zig-zag, striped) and :func:`balance` (any mask, by the block
  analysis's tile counts) say which global positions each rank holds; :func:`shard`,
  :func:`unshard` and :func:`unshard_local` move tensors (q/k/v, per-token ids, bias factors)
  between the full sequence and the shards.
* :class:`ContextParallelAttention` / :func:`context_parallel_attention` run any attndsl pattern
  (mask, score mod, captured and learnable tensors, sinks, bias factors, GQA) over the shards,
  by a ring of K/V blocks or an all-gather, forward and backward.

See ``docs/context_parallel.md``.
"""
from .attention import ContextParallelAttention, context_parallel_attention
from .plan import balance, chunk_pairs, imbalance, tile_counts
from .sharding import Chunk, Sharding, shard, unshard, unshard_local
from .shifted import ShiftedPattern

__all__ = ["ContextParallelAttention", "context_parallel_attention", "Sharding", "Chunk", "shard", "unshard",
           "unshard_local", "balance", "chunk_pairs", "tile_counts", "imbalance", "ShiftedPattern"]

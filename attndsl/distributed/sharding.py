"""How a sequence is cut into per-rank shards: chunks of global positions, and tensor helpers.

A rank's local tensor is the concatenation of its chunks along the sequence dimension; a chunk is
the global positions ``start, start + stride, ..., start + (length - 1) * stride``. Contiguous
sharding gives each rank one chunk of stride 1; zig-zag gives rank ``r`` chunks ``r`` and
``2P - 1 - r`` of ``2P``; striped gives rank ``r`` the positions ``r, r + P, r + 2P, ...`` (one
chunk of stride ``P``). Every rank holds the same number of tokens (the ring exchanges buffers of
one size).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Chunk:
    """Global positions ``start + i * stride`` for ``0 <= i < length``."""

    start: int
    length: int
    stride: int = 1

    @property
    def last(self) -> int:
        """The last global position of the chunk."""
        return self.start + (self.length - 1) * self.stride

    def positions(self, device=None) -> torch.Tensor:
        """The chunk's global positions, int64 ``[length]``."""
        return torch.arange(self.start, self.last + 1, self.stride, dtype=torch.int64, device=device)


class Sharding:
    """Which global positions each rank holds, in its local order.

    Args:
        length: the global sequence length ``L``.
        ranks: one tuple of :class:`Chunk` per rank; a rank's local tensor is its chunks
            concatenated in this order. Every position ``0 .. L-1`` must appear exactly once and
            every rank must hold ``L / P`` positions.

    Build one with :meth:`contiguous`, :meth:`zigzag`, :meth:`striped` or
    :func:`attndsl.distributed.balance`.
    """

    def __init__(self, length: int, ranks):
        self.length = int(length)
        self.ranks = tuple(tuple(c if isinstance(c, Chunk) else Chunk(*c) for c in r) for r in ranks)
        if not self.ranks:
            raise ValueError("a sharding needs at least one rank")
        sizes = [sum(c.length for c in r) for r in self.ranks]
        if len(set(sizes)) != 1:
            raise ValueError(f"every rank must hold the same number of tokens, got {sizes}")
        for r, chunks in enumerate(self.ranks):
            for c in chunks:
                if c.length < 1 or c.stride < 1 or c.start < 0 or c.last >= self.length:
                    raise ValueError(f"rank {r}: chunk {c} is empty or outside 0..{self.length - 1}")
        seen = torch.cat([c.positions() for r in self.ranks for c in r]).sort().values
        if seen.numel() != self.length or not torch.equal(seen, torch.arange(self.length)):
            raise ValueError(f"the chunks must cover every position 0..{self.length - 1} exactly once")

    # -- constructors ------------------------------------------------------------------------
    @classmethod
    def contiguous(cls, length: int, world_size: int) -> "Sharding":
        """Rank ``r`` holds ``[r * L/P, (r+1) * L/P)``. ``L`` must be divisible by ``P``."""
        n = _split(length, world_size, world_size, "contiguous")
        return cls(length, [(Chunk(r * n, n),) for r in range(world_size)])

    @classmethod
    def zigzag(cls, length: int, world_size: int) -> "Sharding":
        """``2P`` equal chunks; rank ``r`` holds chunks ``r`` and ``2P - 1 - r`` (balances causal
        masks: every rank gets one early and one late chunk). ``L`` must be divisible by ``2P``."""
        n = _split(length, world_size, 2 * world_size, "zig-zag")
        return cls(length, [(Chunk(r * n, n), Chunk((2 * world_size - 1 - r) * n, n)) for r in range(world_size)])

    @classmethod
    def striped(cls, length: int, world_size: int) -> "Sharding":
        """Rank ``r`` holds positions ``r, r + P, r + 2P, ...`` (balances causal masks token by
        token). ``L`` must be divisible by ``P``."""
        n = _split(length, world_size, world_size, "striped")
        return cls(length, [(Chunk(r, n, world_size),) for r in range(world_size)])

    # -- queries -----------------------------------------------------------------------------
    @property
    def world_size(self) -> int:
        return len(self.ranks)

    @property
    def local_length(self) -> int:
        """Tokens per rank, ``L / P``."""
        return sum(c.length for c in self.ranks[0])

    def chunk_slices(self, rank: int) -> list[tuple[Chunk, slice]]:
        """``(chunk, local slice)`` of each chunk of ``rank``, in local order."""
        out, at = [], 0
        for c in self.ranks[rank]:
            out.append((c, slice(at, at + c.length)))
            at += c.length
        return out

    def positions(self, rank: int, device=None) -> torch.Tensor:
        """Global positions of ``rank``'s local tokens, in local order: int64 ``[L / P]``."""
        return torch.cat([c.positions(device) for c in self.ranks[rank]])

    def all_positions(self, device=None) -> torch.Tensor:
        """Rank-major concatenation of every rank's positions, int64 ``[L]``: position ``p`` of
        the result is where the gathered (rank-major) token ``p`` sits globally."""
        return torch.cat([self.positions(r, device) for r in range(self.world_size)])

    def __eq__(self, other):
        return isinstance(other, Sharding) and (self.length, self.ranks) == (other.length, other.ranks)

    def __hash__(self):
        return hash((self.length, self.ranks))

    def __repr__(self):
        return f"Sharding(length={self.length}, ranks={list(map(list, self.ranks))})"


def _split(length: int, world_size: int, parts: int, what: str) -> int:
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if length < parts or length % parts:
        raise ValueError(f"{what} sharding over {world_size} ranks needs a length divisible by {parts}, got {length}")
    return length // parts


def shard(x: torch.Tensor, sharding: Sharding, rank: int, dim: int = -2) -> torch.Tensor:
    """``rank``'s shard of a full-sequence tensor.

    Args:
        x: a tensor whose dimension ``dim`` has the global length ``L`` (q/k/v ``[B, H, L, D]``
            with ``dim=-2``, per-token ids ``[L]`` with ``dim=0``, bias factors ``[B, H, L, R]``).
        sharding: the :class:`Sharding`.
        rank: which rank's shard.
        dim: the sequence dimension.

    Returns:
        ``x`` restricted to ``sharding.positions(rank)`` along ``dim`` (a new tensor, length
        ``L / P``; gradients flow back to ``x``).
    """
    _check_len(x, sharding.length, dim)
    return x.index_select(dim, sharding.positions(rank, x.device))


def unshard_local(shards, sharding: Sharding, dim: int = -2) -> torch.Tensor:
    """The full-sequence tensor from every rank's shard, on one process (no communication).

    Args:
        shards: one tensor per rank, in rank order, each with ``L / P`` along ``dim``.
        sharding: the :class:`Sharding` they were cut with.
        dim: the sequence dimension.

    Returns:
        The tensor with ``L`` along ``dim``, tokens in global order.
    """
    if len(shards) != sharding.world_size:
        raise ValueError(f"expected {sharding.world_size} shards, got {len(shards)}")
    cat = torch.cat(list(shards), dim)
    inv = torch.empty(sharding.length, dtype=torch.int64, device=cat.device)
    inv[sharding.all_positions(cat.device)] = torch.arange(sharding.length, device=cat.device)
    return cat.index_select(dim, inv)


def unshard(x: torch.Tensor, sharding: Sharding, group=None, dim: int = -2) -> torch.Tensor:
    """Gather every rank's shard (``all_gather`` over ``group``) into the full-sequence tensor.

    Args:
        x: this rank's shard, ``L / P`` along ``dim`` (same shape on every rank).
        sharding: the :class:`Sharding`.
        group: the process group (default: the world).
        dim: the sequence dimension.

    Returns:
        The full tensor, ``L`` along ``dim`` in global order, on every rank (not differentiable).
    """
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        return unshard_local([x], sharding, dim)
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return unshard_local(parts, sharding, dim)


def _check_len(x, length, dim):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"expected a tensor, got {type(x).__name__}")
    if x.shape[dim] != length:
        raise ValueError(f"dimension {dim} of the tensor {tuple(x.shape)} should be the global length {length}")

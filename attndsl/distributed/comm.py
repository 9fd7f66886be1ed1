"""torch.distributed transport for context parallelism: the ring exchange and the collectives.

Only torch.distributed is used (gloo on CPU, NCCL on GPU). On CUDA the ring's sends and receives
are issued from a side stream that first waits for the compute stream (the buffers are ready);
the compute stream waits for the exchange only when :meth:`RingExchange.wait` hands the received
buffers over, so the next block's transfer overlaps this block's attention. On CPU the side
stream is a no-op and gloo's isend/irecv run in the background the same way.
"""
from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist


class Group:
    """A process group and this process's place in it (a world of one when torch.distributed is
    not initialised, so the same code runs single-process)."""

    def __init__(self, group=None):
        self.group = group
        self.active = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank(group) if self.active else 0
        self.size = dist.get_world_size(group) if self.active else 1
        self.backend = dist.get_backend(group) if self.active else None
        # benchmarks only: every transfer becomes a local stand-in of the same shapes (the ring
        # "receives" what it sent), so the compute alone can be timed; results are then wrong
        self.offline = False

    def global_rank(self, r: int) -> int:
        if self.group is None or not self.active:
            return r
        return dist.get_global_rank(self.group, r)

    @property
    def next(self) -> int:
        return self.global_rank((self.rank + 1) % self.size)

    @property
    def prev(self) -> int:
        return self.global_rank((self.rank - 1) % self.size)

    def all_reduce_(self, t: torch.Tensor) -> torch.Tensor:
        """Sum ``t`` over the group in place (no-op for a world of one)."""
        if self.size > 1 and not self.offline:
            dist.all_reduce(t, group=self.group)
        return t

    def all_gather(self, t: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's ``t`` (same shape everywhere), in rank order."""
        if self.size == 1 or self.offline:
            return [t] * self.size
        parts = [torch.empty_like(t) for _ in range(self.size)]
        dist.all_gather(parts, t.contiguous(), group=self.group)
        return parts

    def reduce_scatter(self, parts: list[torch.Tensor]) -> torch.Tensor:
        """``Σ_ranks parts[self.rank]``: NCCL's reduce-scatter; gloo has none, so there the stacked
        parts are all-reduced and this rank's part is kept (O(P) memory, fine for CPU runs)."""
        if self.size == 1 or self.offline:
            return parts[self.rank]
        if self.backend == "nccl":
            out = torch.empty_like(parts[0])
            dist.reduce_scatter(out, [p.contiguous() for p in parts], group=self.group)
            return out
        full = torch.stack(parts)
        dist.all_reduce(full, group=self.group)
        return full[self.rank].clone()


def _side_stream(device: torch.device):
    if device.type != "cuda":
        return None
    key = device.index if device.index is not None else torch.cuda.current_device()
    s = _STREAMS.get(key)
    if s is None:
        s = _STREAMS[key] = torch.cuda.Stream(device)
    return s


_STREAMS: dict = {}


class RingExchange:
    """Send tensors to the next rank and receive the same shapes from the previous one, in the
    background. ``start`` returns at once; ``wait`` returns the received tensors."""

    def __init__(self, group: Group, tensors: list[torch.Tensor], tag: int = 0):
        self.group = group
        self.sent = [t.contiguous() for t in tensors]
        self.recv = [torch.empty_like(t) for t in self.sent]
        self.reqs = []
        self.stream = _side_stream(self.sent[0].device) if self.sent else None
        if group.size == 1 or group.offline:
            self.recv = self.sent
            return
        ctx = contextlib.nullcontext()
        if self.stream is not None:
            self.stream.wait_stream(torch.cuda.current_stream(self.sent[0].device))
            ctx = torch.cuda.stream(self.stream)
        with ctx:
            ops = []
            # one tag per tensor (gloo matches by tag; NCCL by order, identical on every rank)
            for i, t in enumerate(self.sent):
                ops.append(dist.P2POp(dist.isend, t, group.next, group.group, tag=tag + i))
            for i, t in enumerate(self.recv):
                ops.append(dist.P2POp(dist.irecv, t, group.prev, group.group, tag=tag + i))
            self.reqs = dist.batch_isend_irecv(ops)
        if self.stream is not None:  # allocated on the compute stream, used on the side one
            for t in (*self.sent, *self.recv):
                t.record_stream(self.stream)

    def wait(self) -> list[torch.Tensor]:
        for r in self.reqs:
            r.wait()
        if self.stream is not None and self.reqs:
            torch.cuda.current_stream(self.sent[0].device).wait_stream(self.stream)
        self.reqs = []
        return self.recv

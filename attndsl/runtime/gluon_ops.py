"""Gluon operations the generated Hopper kernels call that some Triton versions lack in Gluon's
language: the TMA reduce-add of a shared-memory tile into global memory
(``cp.reduce.async.bulk.tensor.add``, FlashAttention-3's way of accumulating dQ). Triton 3.6's
Gluon builder has it (``create_async_tma_reduce``) but its language does not; later versions name
it ``tma.async_atomic_add``, which is used where present."""
from __future__ import annotations

from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, tma

__all__ = ["async_atomic_add", "fence_async_shared"]

if hasattr(tma, "async_atomic_add"):
    async_atomic_add = tma.async_atomic_add
else:
    from triton._C.libtriton import ir
    from triton.experimental.gluon.language._core import builtin

    @builtin
    def async_atomic_add(tensor_desc, coord, src, _semantic=None):
        """Add the shared-memory tile ``src`` into the global tensor of ``tensor_desc`` at ``coord``
        by TMA (asynchronous: ``tma.store_wait`` before ``src`` is written again); elements outside
        the descriptor's shape are dropped.

        Args:
            tensor_desc: the destination's tensor descriptor (tiled).
            coord: the box's coordinates in the destination (one per dimension).
            src: the shared-memory tile, in the descriptor's box shape and layout.
        """
        coord = _semantic._convert_to_ir_values(coord, require_i64=False)
        _semantic.builder.create_async_tma_reduce(ir.DESCRIPTOR_REDUCE_KIND.ADD, tensor_desc.handle, coord,
                                                  src.handle)

"""Running kernels through Triton's interpreter in a process that may also compile for a GPU.

``triton.jit`` picks interpreted or compiled functions from ``TRITON_INTERPRET`` when a module is
executed, and Triton's own library helpers (``tl.zeros``, ``tl.max``, ``tl.sigmoid``...) were
decorated when ``triton.language`` was imported. So that CPU tensors work on a GPU machine too,
interpreted launches run inside :func:`interpreting`, which sets the knob and lets compiled-mode
library helpers be called the way the interpreter calls its own.
"""
from __future__ import annotations

import contextlib
import os
import threading

_LOCK = threading.RLock()


def _descriptor_reduce() -> None:
    """Give Triton's interpreter the tensor descriptors' reduce-adds (``desc.atomic_add``: a TMA
    reduce on a GPU) where it lacks them: masked atomic adds of the block's elements inside the
    tensor, as the hardware adds them (the atomic dQ mode's ``DQ_TMA``)."""
    from triton._C.libtriton import ir
    from triton.runtime.interpreter import InterpreterBuilder
    if hasattr(InterpreterBuilder, "create_descriptor_reduce"):
        return

    def create_descriptor_reduce(self, kind, desc, value, indices):
        if kind != ir.DESCRIPTOR_REDUCE_KIND.ADD:
            raise NotImplementedError(f"tensor descriptor reduce {kind} in the interpreter (only ADD)")
        ptrs, mask = desc.materialize_pointers(indices)
        op = ir.ATOMIC_OP.FADD if ptrs.get_element_ty().is_floating() else ir.ATOMIC_OP.ADD
        self.create_atomic_rmw(op, ptrs, value, mask, ir.MEM_SEMANTIC.RELAXED, ir.MEM_SYNC_SCOPE.GPU)

    InterpreterBuilder.create_descriptor_reduce = create_descriptor_reduce


@contextlib.contextmanager
def interpreting():
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    _descriptor_reduce()

    with _LOCK:
        old_env = os.environ.get("TRITON_INTERPRET")
        old_call = JITFunction.__call__

        def call(self, *args, **kwargs):
            # kept on the function itself: a table keyed by id() would hand a collected function's
            # wrapper to a new function at the same address (JITFunction hashing parses its source)
            f = self.__dict__.get("_attndsl_interpreted")
            if f is None:
                f = self._attndsl_interpreted = InterpretedFunction(self.fn)
            return f(*args, **kwargs)

        os.environ["TRITON_INTERPRET"] = "1"
        JITFunction.__call__ = call
        try:
            yield
        finally:
            JITFunction.__call__ = old_call
            if old_env is None:
                os.environ.pop("TRITON_INTERPRET", None)
            else:
                os.environ["TRITON_INTERPRET"] = old_env

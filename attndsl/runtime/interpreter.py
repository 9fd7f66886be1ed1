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


@contextlib.contextmanager
def interpreting():
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

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

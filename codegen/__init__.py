"""Triton source emission from a KernelSpec. Never imports the tracer.

The runtime uses only these entries: ``render`` (the dense kernels of a spec), ``render_gather``
(token-selector gather kernels), ``render_indexer`` (the lightning indexer), the version constants
that key the kernel cache, and ``kernel_names``; besides them the decode family (``render_decode``,
``DECODE_VERSION``, ``decode.kernel_names``) and the Hopper target's modules (``hopper``,
``hopper_bwd``: ``supports``, ``render``, ``kernel_name``, ``signature``)."""
from .module import CODEGEN_VERSION, kernel_names, render
from .selector import SELECTOR_VERSION, render_gather, render_indexer


def __getattr__(name):
    # the decode family (``render_decode``, ``DECODE_VERSION``) is loaded on first use by attndsl.serving
    if name in ("DECODE_VERSION", "render_decode"):
        from . import decode
        return getattr(decode, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

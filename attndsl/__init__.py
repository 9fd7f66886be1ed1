"""attndsl: attention patterns as a few lines of Python, compiled to fused Triton kernels."""
import logging as _logging
import os as _os

# quiet unless the application configures logging: attndsl.cache, attndsl.compile report there
_logging.getLogger("attndsl").addHandler(_logging.NullHandler())

# An installed attndsl holds ``attndsl.codegen`` and ``attndsl.patterns`` (setup.py maps the
# top-level folders there). A source checkout on PYTHONPATH has them beside this package: make
# the same names resolve to them.
_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if (not _os.path.isdir(_os.path.join(__path__[0], "codegen"))
        and _os.path.isfile(_os.path.join(_root, "codegen", "__init__.py"))):
    __path__.append(_root)
from . import reference
from .api import CompiledAttention, attention, clear_cache, compile
from .flex import PatternMask, create_block_mask, flex_attention
from . import selectors  # index selectors: indices= (DSA), blocks= (MoBA, NSA), the lightning indexer
from . import serving  # decoding with a (paged) KV cache: serving.decode, serving.PagedKVCache
from .lowrank import BiasFactors, factorize_bias
from .dsl import Mask, PatternError, ScoreMod, and_masks, chain, mask, not_mask, or_masks, score_mod
from .dsl.intops import bit_length
from .layout import Layout
from . import tuning  # autotuned tiles: tuning.autotune, export/load of entries (docs/tuning.md)
from .tuning import autotune

__all__ = ["attention", "compile", "CompiledAttention", "clear_cache", "flex_attention", "create_block_mask",
           "PatternMask", "reference", "PatternError", "mask", "score_mod",
           "and_masks", "or_masks", "not_mask", "chain", "Mask", "ScoreMod",
           "factorize_bias", "BiasFactors", "Layout", "bit_length", "autotune", "tuning"]
__version__ = "0.1.0"

"""attndsl: attention patterns as a few lines of Python, compiled to fused Triton kernels."""
from . import reference
from .api import CompiledAttention, attention, compile
from . import selectors  # index selectors: indices= (DSA), blocks= (MoBA, NSA), the lightning indexer
from .lowrank import BiasFactors, factorize_bias
from .dsl import Mask, PatternError, ScoreMod, and_masks, chain, mask, not_mask, or_masks, score_mod
from .dsl.intops import bit_length
from .layout import Layout

__all__ = ["attention", "compile", "CompiledAttention", "reference", "PatternError", "mask", "score_mod",
           "and_masks", "or_masks", "not_mask", "chain", "Mask", "ScoreMod",
           "factorize_bias", "BiasFactors", "Layout", "bit_length"]
__version__ = "0.1.0"

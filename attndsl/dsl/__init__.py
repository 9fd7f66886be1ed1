"""The pattern DSL: tracing FlexAttention-style functions (torch's make_fx) and composing patterns."""
from .compose import Mask, ScoreMod, and_masks, chain, mask, not_mask, or_masks, score_mod
from .errors import PatternError
from .trace import Trace, trace

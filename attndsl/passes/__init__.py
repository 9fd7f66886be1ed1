"""Passes: pure IR → IR (or analysis) transformations, each with its own tests."""
from .simplify import simplify
from .block_analysis import tile_range, tile_class, is_data_dependent
from .grad import derivative
from .fuse import build_spec

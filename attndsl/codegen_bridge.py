"""The one place the library reaches into ``codegen`` (kept separate so the tracer never does)."""
from attndsl.codegen import CODEGEN_VERSION, kernel_names, render  # noqa: F401
from attndsl.codegen.selector import (BIN_PIECE, MAX_BINS, SELECTOR_VERSION, binned_dim, render_gather,  # noqa: F401
                              render_indexer)
from attndsl.codegen.kernels import dq_visits_whole_range  # noqa: F401

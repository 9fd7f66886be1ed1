"""Benchmark harness: attndsl vs FlexAttention and SDPA (``python -m benchmarks --help``).

Importing this package needs no GPU and does not import the compiler core; the harness
loads ``attndsl`` lazily when a case runs. ``benchmarks.results`` is the results format
(``benchmarks/results/<gpu>-<yyyy-mm-dd>.json``), ``benchmarks.table`` turns the newest file into
BENCHMARKS.md's table (``python -m benchmarks.table``).
"""
from .cases import CASES, Case, CaseInstance, register_case
from .harness import (BenchConfig, attention_flops, main, markdown_report, mask_density, ratio,
                      rel_error, run, tflops)
from .results import REQUIRED, load_results, newest_results, rows_from_result, validate_row, write_results

__all__ = ["CASES", "Case", "CaseInstance", "register_case", "BenchConfig", "attention_flops", "main",
           "markdown_report", "mask_density", "ratio", "rel_error", "run", "tflops", "REQUIRED", "load_results",
           "newest_results", "rows_from_result", "validate_row", "write_results"]

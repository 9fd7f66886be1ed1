"""Benchmark harness: attndsl vs FlexAttention and SDPA (``python -m benchmarks --help``).

Importing this package needs no GPU and does not import the compiler core; the harness
loads ``attndsl`` lazily when a case runs.
"""
from .cases import CASES, Case, CaseInstance, register_case
from .harness import (BenchConfig, attention_flops, main, markdown_report, mask_density, ratio,
                      rel_error, run, tflops)

__all__ = ["CASES", "Case", "CaseInstance", "register_case", "BenchConfig", "attention_flops", "main",
           "markdown_report", "mask_density", "ratio", "rel_error", "run", "tflops"]

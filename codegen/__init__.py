"""Triton source emission from a KernelSpec. Never imports the tracer."""
from .module import CODEGEN_VERSION, kernel_names, render

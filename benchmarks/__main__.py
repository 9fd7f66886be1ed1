"""``python -m benchmarks [--cases ...] [--L 16384] [--D 128] [--H 16] [--dtype bf16] [--bwd] [--quick]``"""
import sys

from .harness import main

if __name__ == "__main__":
    sys.exit(main())

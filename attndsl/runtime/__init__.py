"""Runtime: source cache, JIT, launches, autograd and input checks."""

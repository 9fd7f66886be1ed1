"""Test-session setup shared by every test file.

* ``ATTNDSL_POISON=1`` is set here, before anything imports attndsl: the runtime then fills
  every output it allocates (out, lse, dq/dk/dv, scratch) with NaN before each launch, so an
  element a kernel forgets to write shows up as NaN and fails the comparison instead of
  passing by luck with zeros from the allocator. Export ``ATTNDSL_POISON=0`` to turn it off.
* ``ATTNDSL_VERIFY_MEMO=1``: every launch that a repeated call takes from the runner's memo
  (``Runner._launch``) is checked against a fresh computation of its grid, constants and argument
  specialisation, so a call key that misses something fails here rather than launching wrongly.
* ``ATTNDSL_CACHE_DIR``: generated kernels go to a temporary directory of this test session
  (removed at exit), never into the user's own ``~/.cache/attndsl``. Export it to keep them.
* Tests marked ``gpu`` are skipped when CUDA is not available.
* Every distinct kernel launch the session runs through Triton's interpreter is also compiled for
  an H100 (sm_90), in background processes beside the tests (``attndsl.testing.sm90``): a kernel
  the GPU compiler rejects fails the run even with no GPU. Each launch goes to TTGIR, and on to a
  cubin when its TTGIR has operations no earlier cubin had (``ATTNDSL_SM90_FULL=all``: every
  launch to a cubin); ``ATTNDSL_SM90_JOBS`` sets the process count. Successes are cached
  (``ATTNDSL_SM90_CACHE``, default ``~/.cache/attndsl-sm90``); ``ATTNDSL_SM90=0`` turns it off.
"""
import atexit
import os
import shutil
import tempfile

os.environ.setdefault("ATTNDSL_POISON", "1")
os.environ.setdefault("ATTNDSL_VERIFY_MEMO", "1")
if "ATTNDSL_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="attndsl-test-cache-")
    os.environ["ATTNDSL_CACHE_DIR"] = _cache
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def pytest_configure(config):
    if os.environ.get("ATTNDSL_SM90", "1") not in ("0", "false", "no"):
        from attndsl.testing import sm90
        sm90.install_session(config)

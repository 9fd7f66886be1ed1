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
* Every distinct kernel the session runs through Triton's interpreter is also compiled for an
  H100 (sm_90) when the session ends (``attndsl.testing.sm90``): a kernel the GPU compiler rejects
  fails the run even with no GPU. Successes are cached (``ATTNDSL_SM90_CACHE``, default
  ``~/.cache/attndsl-sm90``); ``ATTNDSL_SM90=0`` turns the step off.
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


_SM90 = {}


def pytest_configure(config):
    if os.environ.get("ATTNDSL_SM90", "1") in ("0", "false", "no"):
        return
    from attndsl.testing import sm90
    if sm90.available():
        _SM90["recorder"] = sm90.Recorder().install()


def pytest_sessionfinish(session, exitstatus):
    rec = _SM90.get("recorder")
    if rec is None:
        return
    rec.uninstall()
    if not rec.records or exitstatus not in (0, 1):  # interrupted or broken: nothing to add
        return
    from attndsl.testing import sm90
    try:
        failures, stats = sm90.compile_all(rec.records)
    except Exception as e:  # a broken toolchain is reported, not hidden
        failures, stats = [(None, f"{type(e).__name__}: {e}")], {}
    _SM90["result"] = (failures, stats, rec.skipped)
    if failures:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if "result" not in _SM90:
        return
    from attndsl.testing import sm90
    failures, stats, skipped = _SM90["result"]
    tr = terminalreporter
    tr.write_sep("=", "sm_90 compile of the interpreted kernels", red=bool(failures), green=not failures)
    if stats:
        tr.write_line(f"{stats['kernels']} distinct kernels ({stats['cached']} compiled before, cached), "
                      f"{stats['compiled']} compiled now in {stats['seconds']:.1f} s; {skipped} launches not "
                      "recorded (a test's own kernel, or an argument with no signature type)")
    if failures:
        if failures[0][0] is None:
            tr.write_line(failures[0][1], red=True)
        else:
            tr.write_line(f"{len(failures)} kernels do not compile for sm_90:", red=True)
            tr.write_line(sm90.describe(failures))

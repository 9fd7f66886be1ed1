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
* Two of Triton's interpreter's own costs are cut (:func:`_lighten_interpreter`; the kernels run
  the same operations on the same values): it re-patched ``triton.language`` at every call of a
  ``@triton.jit`` helper (``tl.max``, ``tl.sum``... per program and loop step), a scan that inside
  a launch finds everything patched already, and rebuilt its dtype table at every operation
  (measured: 20 to 30 % of an interpreter test's time). ``ATTNDSL_TEST_PLAIN_INTERPRETER=1`` keeps
  Triton's own.
"""
import atexit
import os
import shutil
import tempfile
import threading

os.environ.setdefault("ATTNDSL_POISON", "1")
os.environ.setdefault("ATTNDSL_VERIFY_MEMO", "1")
if "ATTNDSL_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="attndsl-test-cache-")
    os.environ["ATTNDSL_CACHE_DIR"] = _cache
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)

import pytest  # noqa: E402


def _lighten_interpreter() -> bool:
    """Cut two repeated costs of Triton's interpreter; what kernels compute does not change.

    * ``GridExecutor.__call__`` (one launch) patches the language modules its kernel's globals
      name and restores them when the launch ends; ``InterpretedFunction.__call__`` (a call of a jit
      helper inside it) calls ``_patch_lang`` again on every call, which walks every member of
      ``tl``, ``tl.core``, ``tl.math`` and ``tl.tensor`` to patch the builtins it finds, sets the
      same tensor/dtype/range shims again, and is never restored. Within a launch, a second call for
      helpers of the same module (same globals, hence the same language modules) finds every
      builtin already patched and sets shims equal to those already set: it is skipped. The first
      call of each module per launch still runs, so what it leaves patched is as before.
    * ``_get_np_dtype`` (at every operation) builds its table of 19 dtypes on each call: the
      same lookups go to one table built here from its own answers (anything else still to it).

    Returns False (and changes nothing) when this Triton's interpreter is not laid out so."""
    try:
        import triton.language as tl
        from triton.runtime import interpreter as ti
        orig_patch, orig_launch, empty_scope = ti._patch_lang, ti.GridExecutor.__call__, ti._LangPatchScope
        orig_np_dtype = ti._get_np_dtype
    except (ImportError, AttributeError):
        return False
    state = threading.local()  # the globals (by id) patched in the launch running on this thread

    def patch_lang(fn):
        done = getattr(state, "done", None)
        if done is None:  # outside a launch: as Triton does
            return orig_patch(fn)
        key = id(fn.__globals__)
        if key in done:
            return empty_scope()  # the helpers' caller ignores it; a launch's own call is always first
        scope = orig_patch(fn)
        done.add(key)
        return scope

    def launch(self, *args, **kwargs):
        outer = getattr(state, "done", None)
        state.done = set()
        try:
            return orig_launch(self, *args, **kwargs)
        finally:
            state.done = outer

    names = ("int1", "float16", "float32", "float64", "int8", "uint8", "int16", "uint16", "int32", "uint32", "int64",
             "uint64", "bfloat16", "float8e5", "float8e5b16", "float8e4nv", "float8e4b8", "float8e4b15")
    table = {d: orig_np_dtype(d) for d in (getattr(tl, n, None) for n in names) if d is not None}
    pointer, block, u64 = tl.pointer_type, tl.block_type, orig_np_dtype(tl.pointer_type(tl.float32))

    def np_dtype(tt_dtype):  # the same branches as Triton's, the table built once
        if isinstance(tt_dtype, pointer):
            return u64
        scalar = tt_dtype.element_ty if isinstance(tt_dtype, block) else tt_dtype
        if isinstance(scalar, pointer):
            return u64
        found = table.get(scalar)
        return orig_np_dtype(tt_dtype) if found is None else found

    ti._patch_lang = patch_lang
    ti.GridExecutor.__call__ = launch
    ti._get_np_dtype = np_dtype
    return True


if os.environ.get("ATTNDSL_TEST_PLAIN_INTERPRETER", "0") in ("0", "", "false", "no"):
    _lighten_interpreter()


@pytest.hookimpl(trylast=True)  # after -m / -k deselection: only the tests that will run
def pytest_collection_modifyitems(config, items):
    import torch

    _start_compiles_ahead(items)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def _start_compiles_ahead(items):
    """Tests marked ``compile_ahead("NAME")`` run the compile script held in their module's ``NAME``
    through ``sm90.run_compile_script``: it is started here, niced, beside the tests, and the test
    waits for its result instead of running it then (the test's assertions unchanged)."""
    for item in items:
        mark = item.get_closest_marker("compile_ahead")
        if mark is not None and not any(m.name in ("skip", "skipif") for m in item.iter_markers()):
            from attndsl.testing import sm90
            sm90.start_compile_script(getattr(item.module, mark.args[0]))


def pytest_configure(config):
    if os.environ.get("ATTNDSL_SM90", "1") not in ("0", "false", "no"):
        from attndsl.testing import sm90
        sm90.install_session(config)

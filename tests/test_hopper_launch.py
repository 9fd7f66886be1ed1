"""The Hopper forward's prepared launch (``runtime/gluonlaunch.py``) without a GPU.

Triton's edges are replaced by recorders: the Gluon kernel's ``run`` binds its arguments as
Triton 3.6's ``JITFunction.run`` does and calls the compiled kernel's launcher through a copy of
3.6's descriptor wrapper (``wrap_handle_tensordesc``), whose C launcher records what it receives;
a descriptor's expansion (``make_tensordesc_arg``: tensor map, shape, strides) records its inputs.
The tests check that the first call of a key goes through ``run``, that later calls of the key
skip it and hand the C launcher exactly what the ordinary path would (fresh tensors included),
and that a new shape, stride, dtype or sink tensor, a launch hook, or the switch turned off take
the ordinary path. The real launcher is checked on an H100 (``tests/test_gpu_hopper.py``).
"""
import pytest
import torch
import triton

import attndsl
from attndsl.codegen import hopper as gen
from attndsl.patterns import alibi, alibi_slopes, causal
from attndsl.codegen import hopper_bwd as gen_bwd
from attndsl.runtime import fastlaunch, gluonlaunch, hopper, hopper_bwd

BASE = 13  # the launcher's leading arguments (grid, stream, function, flags, scratch, metadata, hooks)


def _wrap_handle_tensordesc(launcher, signature, tensordesc_meta):
    """Triton 3.6's ``triton.backends.nvidia.driver.wrap_handle_tensordesc`` (the shape
    ``gluonlaunch._unwrap`` reads), expanding descriptors through ``gluonlaunch._expand``."""
    tensordesc_indices = {i for i, sig in enumerate(signature) if sig == "tensordesc"}

    def inner(*args):
        final_args = list(args[:BASE])
        tensordesc_idx = 0
        for i, arg in enumerate(args[BASE:]):
            if i in tensordesc_indices:
                final_args.extend(gluonlaunch._expand(arg, tensordesc_meta[tensordesc_idx]))
                tensordesc_idx += 1
            else:
                final_args.append(arg)
        return launcher(*final_args)

    return inner


class Launcher:
    """A compiled kernel's launcher (``CudaLauncher``): its C launch records each call."""

    global_scratch_size = profile_scratch_size = 0
    launch_cooperative_grid = launch_pdl = False
    num_ctas = 1

    def __init__(self, signature, calls):
        metas = [{"swizzle": 128, "slot": i} for i, sig in enumerate(signature) if sig == "tensordesc"]
        self.launch = _wrap_handle_tensordesc(lambda *a: calls.append(a), signature, metas)


class Compiled:
    def __init__(self, signature, calls):
        self.run = Launcher(signature, calls)
        self.function, self.packed_metadata = "function", ("packed",)


class Kernel:
    """A Gluon kernel: ``run`` specialises per (descriptor block, dtype, constants) as a compile would
    and launches as Triton 3.6's ``JITFunction.run`` does; ``compiles`` and ``runs`` count."""

    def __init__(self, spec, calls, signature=gen.signature):
        self.params = signature(spec)
        self.arg_names = [p.name for p in self.params]
        self.pre_run_hooks = []
        self.signature = ["tensordesc" if p.name.endswith("_desc") else p.kind for p in self.params]
        self.calls, self.cache, self.runs = calls, {}, 0

    def run(self, *args, grid, warmup, num_warps, **consts):
        assert not warmup and num_warps == 4
        self.runs += 1
        bound = [*args, *(consts[n] for n in self.arg_names[len(args):])]
        assert len(bound) == len(self.params)
        key = (tuple(str(a.block_shape) + str(a.base.dtype) for a in args[:3]), tuple(consts.items()))
        ck = self.cache.setdefault(key, Compiled(self.signature, self.calls))
        g = (*grid, 1, 1)[:3]
        ck.run.launch(*g, 77, ck.function, False, False, None, None, ck.packed_metadata, "launch metadata",
                      "enter hook", "exit hook", *bound)
        return ck


class Driver:
    def get_current_device(self):
        return 0

    def get_current_stream(self, device):
        return 77


@pytest.fixture
def env(monkeypatch):
    """A HopperForward of a causal pattern with an ALiBi score mod (a captured tensor) whose launches
    record, and whose descriptor expansions count per address."""
    monkeypatch.setattr(fastlaunch, "DIRECT_TRITON", (triton.__version__,))
    monkeypatch.setattr(fastlaunch, "_raw_stream", None)
    monkeypatch.setattr(triton.runtime.driver, "_active", Driver())
    monkeypatch.setattr(gluonlaunch, "PREPARED", True)
    expanded = []

    def expand(desc, meta):
        expanded.append(desc.base.data_ptr())
        tmap = ("tensor map", desc.base.data_ptr(), tuple(desc.shape), tuple(desc.strides), tuple(desc.block_shape),
                meta["slot"])
        return [tmap, *desc.shape, *desc.strides]

    monkeypatch.setattr(gluonlaunch, "_expand", expand)
    comp = attndsl.compile(mask_mod=causal, score_mod=alibi(alibi_slopes(4)))
    hf = hopper.HopperForward(comp.spec)
    calls = []
    hf._kernel = Kernel(hf.spec, calls)
    return hf, comp.tensors, calls, expanded


def qkv(B=1, Hq=4, Hkv=2, Lq=100, Lkv=90, D=64, dtype=torch.bfloat16):
    return (torch.randn(B, Hq, Lq, D, dtype=dtype), torch.randn(B, Hkv, Lkv, D, dtype=dtype),
            torch.randn(B, Hkv, Lkv, D, dtype=dtype))


def same(a, b) -> bool:
    """Launch arguments alike: tensors the very same object, everything else equal (the launch
    metadata and hooks, which the prepared launch passes as None, aside)."""
    a, b = list(a), list(b)
    a[10:13] = b[10:13] = [None] * 3
    return len(a) == len(b) and all(x is y if isinstance(x, torch.Tensor) else x == y for x, y in zip(a, b))


def ordinary(hf, monkeypatch, *args, **kw):
    """The ordinary path's launch of these arguments (prepared launches off)."""
    with monkeypatch.context() as m:
        m.setattr(gluonlaunch, "PREPARED", False)
        return hf.forward(*args, **kw)


def test_second_call_is_prepared_with_the_ordinary_arguments(env, monkeypatch):
    hf, bufs, calls, expanded = env
    q, k, v = qkv()
    out1, lse1 = hf.forward(q, k, v, 0.125, buffers=bufs)
    assert hf._kernel.runs == 1 and len(calls) == 1
    out2, lse2 = hf.forward(q, k, v, 0.125, buffers=bufs)
    assert hf._kernel.runs == 1, "the second call of a key went through the Gluon JIT"
    assert len(calls) == 2
    assert out2 is not out1 and out2.shape == q.shape and out2.dtype == q.dtype and lse2.shape == (1, 4, 100)
    # the same arguments but the outputs (the call's own): the first call's, with the second's outputs
    want = list(calls[0])
    want[BASE + 3 * 9], want[BASE + 3 * 9 + 1], want[BASE + 3 * 9 + 2] = out2, lse2, lse2  # Out, Lse, Sinks (= lse)
    assert same(calls[1], want)
    assert calls[1][9:13] == (("packed",), None, None, None)  # metadata bound, no launch metadata or hooks
    assert expanded.count(q.data_ptr()) == 2  # the ordinary launch's, the prepared one's
    hf.forward(q, k, v, 0.125, buffers=bufs)
    assert expanded.count(q.data_ptr()) == 2, "a known address's tensor map was built again"
    # fresh inputs of the same key: prepared, and exactly what the ordinary path launches for them
    q2, k2, v2 = qkv()
    out3, lse3 = hf.forward(q2, k2, v2, 0.3, buffers=bufs)
    assert hf._kernel.runs == 1
    got = calls[-1]
    ordinary(hf, monkeypatch, q2, k2, v2, 0.3, buffers=bufs)
    assert hf._kernel.runs == 2
    want = list(calls[-1])
    want[BASE + 27], want[BASE + 28], want[BASE + 29] = out3, lse3, lse3
    assert same(got, want)
    assert any(isinstance(x, tuple) and x[:2] == ("tensor map", k2.data_ptr()) for x in got)
    assert got[BASE + 37] == 0.3  # sm_scale: the call's own


def test_new_shapes_strides_dtypes_and_sinks_rekey(env):
    hf, bufs, calls, _ = env
    cases = [qkv(), qkv(Lq=130), qkv(Lkv=200), qkv(dtype=torch.float16), qkv(D=128), qkv(B=2)]
    q, k, v = qkv()
    # [B, L, H, D] storage: other strides, of q, k or v alone
    blhd = lambda t: t.transpose(1, 2).contiguous().transpose(1, 2)  # noqa: E731
    cases += [(blhd(q), k, v), (q, blhd(k), v), (q, k, blhd(v))]
    for i, (q, k, v) in enumerate(cases):
        hf.forward(q, k, v, 0.1, buffers=bufs)
        assert hf._kernel.runs == i + 1, f"case {i}: a new key must take the ordinary path"
        hf.forward(*(t.clone() if t.is_contiguous() else t for t in (q, k, v)), 0.1, buffers=bufs)
        assert hf._kernel.runs == i + 1, f"case {i}: its second call must be prepared"
    q, k, v = cases[0]
    sinks = torch.randn(4)
    hf.forward(q, k, v, 0.1, sinks=sinks, buffers=bufs)
    assert hf._kernel.runs == len(cases) + 1
    hf.forward(q, k, v, 0.1, sinks=torch.randn(4), buffers=bufs)
    assert hf._kernel.runs == len(cases) + 1
    assert calls[-1][BASE + 29] is not calls[-2][BASE + 29]  # the call's own sinks
    hf.forward(q, k, v, 0.1, sinks=torch.randn(4, dtype=torch.float64), buffers=bufs)  # another dtype
    assert hf._kernel.runs == len(cases) + 2
    # other tiles, program order, captured tensor
    hf.forward(q, k, v, 0.1, hopper.HopperConfig(stages=3), buffers=bufs)
    hf.forward(q, k, v, 0.1, buffers=bufs, heavy_first=not hf.heavy_first)
    hf.forward(q, k, v, 0.1, buffers=[bufs[0][:2]])
    assert hf._kernel.runs == len(cases) + 5


def test_hooks_version_and_switch_take_the_ordinary_path(env, monkeypatch):
    hf, bufs, calls, _ = env
    q, k, v = qkv()
    hf.forward(q, k, v, 0.1, buffers=bufs)
    with monkeypatch.context() as m:  # a profiler's launch hook sees every launch: Triton's path
        m.setattr(fastlaunch._knobs.runtime, "launch_enter_hook", lambda *a: None)
        hf.forward(q, k, v, 0.1, buffers=bufs)
        assert hf._kernel.runs == 2
    hf.forward(q, k, v, 0.1, buffers=bufs)
    assert hf._kernel.runs == 2  # still prepared once the hook is gone
    ordinary(hf, monkeypatch, q, k, v, 0.1, buffers=bufs)
    assert hf._kernel.runs == 3
    # a Triton whose launcher Direct does not know: never prepared, every call through the JIT
    monkeypatch.setattr(fastlaunch, "DIRECT_TRITON", ("0.0.",))
    hf2 = hopper.HopperForward(attndsl.compile(mask_mod=causal).spec)
    hf2._kernel = Kernel(hf2.spec, calls)
    for i in range(3):
        hf2.forward(q, k, v, 0.1)
        assert hf2._kernel.runs == i + 1


def test_tensor_maps_kept_per_address_and_bounded(env, monkeypatch):
    hf, bufs, _, expanded = env
    monkeypatch.setattr(gluonlaunch, "MAPS_KEPT", 4)
    inputs = [qkv() for _ in range(6)]
    for q, k, v in inputs + inputs[-1:]:
        hf.forward(q, k, v, 0.1, buffers=bufs)
    # the first call's three descriptors come from the ordinary path, then one expansion per new
    # address; the last call's addresses are known
    assert len(expanded) == 3 + 3 * 5
    slots = next(p for p in hf._prepared.values() if p is not None).slots
    assert all(len(s.maps) <= 4 for s in slots)


def test_environment_read_once(monkeypatch):
    """``ATTNDSL_HOPPER`` is read on first use and by ``enable(None)``, not per call."""
    monkeypatch.setenv("ATTNDSL_HOPPER", "1")
    hopper.enable(None)
    try:
        assert hopper.enabled() is True
        monkeypatch.setenv("ATTNDSL_HOPPER", "0")
        assert hopper.enabled() is True  # kept
        hopper.enable(None)
        assert hopper.enabled() is False
        hopper.enable(True)
        assert hopper.enabled() is True
        monkeypatch.delenv("ATTNDSL_HOPPER")
        hopper.enable(None)
        assert hopper.enabled() is None
    finally:
        monkeypatch.undo()  # the environment as it was, then the switch follows it
        hopper.enable(None)


@pytest.mark.skipif(not (triton.__version__.startswith("3.6.") and hopper.gluon_available()),
                    reason="needs Triton 3.6's Gluon (the launcher the prepared launch is written for)")
def test_prepared_matches_triton_36(monkeypatch):
    """With Triton 3.6 itself: Gluon's ``kernel.run`` (binder, specialisation, cache, launch
    metadata), the compiled kernel's launcher class and its descriptor wrapper and
    ``make_tensordesc_arg`` run for real; only the driver, the compile and the C side are stand-ins
    (``benchmarks/hopper_host.py``'s ``fake_gpu``). The prepared launch hands the C launcher what
    Triton's path hands it, for fresh tensors and a captured tensor."""
    from benchmarks.hopper_host import fake_gpu
    launched = []
    fake_gpu(monkeypatch.setattr, launched)
    monkeypatch.setattr(fastlaunch, "_raw_stream", None)
    monkeypatch.setattr(gluonlaunch, "PREPARED", True)
    comp = attndsl.compile(mask_mod=causal, score_mod=alibi(alibi_slopes(4)))
    hf = hopper.HopperForward(comp.spec)
    kernel = hf.kernel()
    # Gluon's cache of this kernel starts empty (on a GPU machine, a real compiled kernel of the same
    # key must not be launched with these CPU tensors) and is emptied after (no stand-in stays)
    kernel.device_caches.clear()
    try:
        q, k, v = qkv(D=128)
        hf.forward(q, k, v, 0.1, buffers=comp.tensors)
        assert len(launched) == 1 and len(hf._prepared) == 1
        assert next(iter(hf._prepared.values())) is not None, "no prepared launch with Triton 3.6's launcher"
        q, k, v = qkv(D=128)
        out, lse = hf.forward(q, k, v, 0.2, buffers=comp.tensors)
        got = launched[-1]
        ordinary(hf, monkeypatch, q, k, v, 0.2, buffers=comp.tensors)
        want = list(launched[-1])
        assert len(launched) == 3
        out_at = next(i for i, a in enumerate(want) if isinstance(a, torch.Tensor) and a.shape == q.shape)
        want[out_at], want[out_at + 1], want[out_at + 2] = out, lse, lse  # Out, Lse, Sinks: the call's own
        assert same(got, want)
        assert ("tensor map", q.data_ptr()) == want[BASE][:2]
    finally:
        kernel.device_caches.clear()


def bwd_inputs(B=1, Hq=4, Hkv=2, Lq=100, Lkv=90, D=64, dtype=torch.bfloat16):
    q, k, v = qkv(B, Hq, Hkv, Lq, Lkv, D, dtype)
    do = torch.randn_like(q)
    lse, delta = torch.randn(B, Hq, Lq), torch.randn(B, Hq, Lq)
    return q, k, v, do, lse, delta, torch.empty_like(k), torch.empty_like(v)


@pytest.mark.parametrize("dq", ["atomic", "kernel"])
def test_backward_second_call_is_prepared_with_the_ordinary_arguments(env, monkeypatch, dq):
    """The Hopper backward's launch (``HopperBackward.backward``) as the forward's: the first call of
    a key through the Gluon JIT, later ones prepared with what the ordinary path would hand the
    launcher (fresh tensors, the call's own scale); without atomic dQ the dQ descriptor's
    placeholder is kept, so its tensor map is built once; a new length or configuration re-keys."""
    hb = hopper_bwd.HopperBackward(attndsl.compile(mask_mod=causal).spec)
    calls, expanded = [], env[3]
    hb._kernel = Kernel(hb.spec, calls, gen_bwd.signature)
    cfg = hopper_bwd.HopperBwdConfig(stages=2, dq=dq)
    args = bwd_inputs()
    dq1 = hb.backward(*args, 0.125, cfg=cfg)
    assert hb._kernel.runs == 1 and len(calls) == 1
    assert (dq1 is None) == (dq == "kernel")
    fresh = bwd_inputs()
    dq2 = hb.backward(*fresh, 0.3, cfg=cfg)
    assert hb._kernel.runs == 1, "the second call of a key went through the Gluon JIT"
    got = calls[-1]
    with monkeypatch.context() as m:
        m.setattr(gluonlaunch, "PREPARED", False)
        hb.backward(*fresh, 0.3, cfg=cfg)
    assert hb._kernel.runs == 2
    want = list(calls[-1])
    if dq == "atomic":  # dQ's float32 sum: the call's own zeroed buffer
        at = next(i for i, a in enumerate(got) if isinstance(a, tuple) and a[0] == "tensor map" and a[-1] == 4)
        assert got[at][2:] == want[at][2:] and dq2.shape == fresh[0].shape and dq2.dtype == fresh[0].dtype
        want[at] = got[at]  # (its address: the allocator's choice)
    else:
        assert dq2 is None
        placeholder = next(iter(hb._placeholders.values()))
        n = expanded.count(placeholder.data_ptr())  # the two ordinary launches', the prepared one's
        hb.backward(*bwd_inputs(), 0.3, cfg=cfg)
        assert hb._kernel.runs == 2 and expanded.count(placeholder.data_ptr()) == n == 3
    assert same(got, want)
    assert any(isinstance(x, tuple) and x[:2] == ("tensor map", fresh[3].data_ptr()) for x in got)  # dO
    assert any(type(x) is float and x == 0.3 for x in got)  # sm_scale: the call's own
    runs = hb._kernel.runs
    hb.backward(*bwd_inputs(Lq=130), 0.3, cfg=cfg)
    hb.backward(*bwd_inputs(), 0.3, cfg=hopper_bwd.HopperBwdConfig(stages=3, dq=dq))
    assert hb._kernel.runs == runs + 2


@pytest.mark.skipif(not (triton.__version__.startswith("3.6.") and hopper.gluon_available()),
                    reason="needs Triton 3.6's Gluon (the launcher the prepared launch is written for)")
def test_backward_prepared_matches_triton_36(monkeypatch):
    """The Hopper backward's prepared launch against Triton 3.6's own path (as
    ``test_prepared_matches_triton_36`` for the forward): the C launcher gets the same arguments."""
    from benchmarks.hopper_host import fake_gpu
    launched = []
    fake_gpu(monkeypatch.setattr, launched)
    monkeypatch.setattr(fastlaunch, "_raw_stream", None)
    monkeypatch.setattr(gluonlaunch, "PREPARED", True)
    hb = hopper_bwd.HopperBackward(attndsl.compile(mask_mod=causal).spec)
    kernel = hb.kernel()
    kernel.device_caches.clear()
    cfg = hopper_bwd.HopperBwdConfig(dq="kernel")
    try:
        hb.backward(*bwd_inputs(D=128), 0.1, cfg=cfg)
        assert len(launched) == 1 and next(iter(hb._prepared.values())) is not None
        fresh = bwd_inputs(D=128)
        hb.backward(*fresh, 0.2, cfg=cfg)
        got = launched[-1]
        with monkeypatch.context() as m:
            m.setattr(gluonlaunch, "PREPARED", False)
            hb.backward(*fresh, 0.2, cfg=cfg)
        assert len(launched) == 3
        assert same(got, launched[-1])
    finally:
        kernel.device_caches.clear()


def test_backward_prepared_by_a_given_key(env, monkeypatch):
    """``HopperBackward.backward(key=...)`` (a prepared backward's call key and gradient layout)
    keys the prepared launch in place of the arguments' own keys: later calls of the key with fresh
    tensors launch what the ordinary path would; another key, or none, goes through the JIT."""
    hb = hopper_bwd.HopperBackward(attndsl.compile(mask_mod=causal).spec)
    calls = []
    hb._kernel = Kernel(hb.spec, calls, gen_bwd.signature)
    cfg = hopper_bwd.HopperBwdConfig(dq="kernel")
    hb.backward(*bwd_inputs(), 0.1, cfg=cfg, key=("call", "dout"))
    fresh = bwd_inputs()
    hb.backward(*fresh, 0.2, cfg=cfg, key=("call", "dout"))
    assert hb._kernel.runs == 1
    got = calls[-1]
    with monkeypatch.context() as m:
        m.setattr(gluonlaunch, "PREPARED", False)
        hb.backward(*fresh, 0.2, cfg=cfg)
    assert same(got, calls[-1])
    hb.backward(*bwd_inputs(), 0.2, cfg=cfg, key=("another", "dout"))
    hb.backward(*bwd_inputs(), 0.2, cfg=cfg)
    assert hb._kernel.runs == 4

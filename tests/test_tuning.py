"""Autotuning (attndsl.tuning, its entries in attndsl.runtime.tuned): the search with a fake timer in the interpreter, the on-disk entries,
their keys, and how calls take them (or not)."""
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import attndsl
import attndsl.reference
from attndsl import tuning
from attndsl.runtime import tuned
from attndsl.runtime.config import Configs, TileConfig


def causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def window(b, h, q_idx, kv_idx):
    return (q_idx - kv_idx).abs() <= 9


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A private cache directory and no shipped entries; entries in effect forgotten before and after."""
    monkeypatch.setenv("ATTNDSL_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(tuned, "SHIPPED_DIR", tmp_path / "shipped")
    monkeypatch.delenv("ATTNDSL_TUNING", raising=False)
    tuning.reset()
    yield tmp_path
    tuning.reset()


def qkv(Lq=40, Lkv=40, Hq=2, Hkv=1, D=16, dtype=torch.float32, grad=False):
    q = torch.randn(1, Hq, Lq, D, dtype=dtype, requires_grad=grad)
    k = torch.randn(1, Hkv, Lkv, D, dtype=dtype, requires_grad=grad)
    v = torch.randn(1, Hkv, Lkv, D, dtype=dtype, requires_grad=grad)
    return q, k, v


SMALL = [TileConfig(16, 16, 4, 1, tma=True), TileConfig(16, 32, 4, 1, tma=True)]


def ranked_timer(times: dict):
    """A fake timer: each (kernel, config) a fixed random time; every call recorded."""
    def timer(fn, kernel, cfg):
        return times.setdefault((kernel, cfg), random.uniform(1.0, 2.0))
    return timer


def test_search_picks_the_fake_fastest(cache):
    q, k, v = qkv()
    times = {}
    res = tuning.autotune(causal, q, k, v, timer=ranked_timer(times), progress=False, save=False)
    for kn in ("fwd", "dkdv", "dq"):
        tried = {c: t for (kk, c), t in times.items() if kk == kn}
        assert len(tried) == 4  # the default (32x32) and three more interpreter tiles
        assert getattr(res.tuned.configs, kn) == min(tried, key=tried.get)
        assert res.best(kn).ms == min(tried.values())
    assert not res.skipped and res.path is None
    assert [t.default for t in res.trials if t.kernel == "fwd"] == [True, False, False, False]


def test_wrong_and_failing_candidates_are_skipped(cache, monkeypatch):
    import triton
    from attndsl.runtime import fastlaunch
    q, k, v = qkv()
    wrong, bad, big, good = (TileConfig(16, 32, 4, 1, tma=True), TileConfig(32, 16, 4, 1, tma=True),
                             TileConfig(16, 32, 4, 2, tma=True), SMALL[0])
    real_forward, real_prepared = tuning._forward, fastlaunch.prepared

    def forward(r, *a):
        if r.cfg.fwd == bad:  # a launch that fails
            raise RuntimeError("launch failed: invalid argument")
        out, lse = real_forward(r, *a)
        if r.cfg.fwd == wrong:  # a kernel that computes the wrong thing
            out = out + 1e-2
        return out, lse

    def prepared(kernel, grid, args, consts, interpret, num_warps, num_stages):
        if num_stages == 2:  # as if two stages overflowed shared memory: the runner retries with one
            raise triton.runtime.errors.OutOfResources(300000, 232448, "shared memory")
        return real_prepared(kernel, grid, args, consts, interpret, num_warps, num_stages)
    monkeypatch.setattr(tuning, "_forward", forward)
    monkeypatch.setattr(fastlaunch, "prepared", prepared)
    fast = {wrong: 0.1, bad: 0.2, big: 0.3, good: 0.5}
    res = tuning.autotune(causal, q, k, v, backward=False, candidates={"fwd": [wrong, bad, big, good]},
                          timer=lambda fn, kn, c: fast.get(c, 1.0), progress=False, save=False)
    errors = {t.config: t.error for t in res.trials}
    assert "max error" in errors[wrong]
    assert errors[bad] == "RuntimeError: launch failed: invalid argument"
    assert errors[big] == "out of shared memory: the launch fell back to 16x32 w4 s1 tma"
    assert errors[good] is None
    assert res.tuned.configs.fwd == good
    assert {t.config for t in res.skipped} == {wrong, bad, big}


def test_progress_line(cache, capsys):
    q, k, v = qkv()
    tuning.autotune(causal, q, k, v, backward=False, candidates={"fwd": SMALL}, timer=lambda *a: 1.0, save=False)
    err = capsys.readouterr().err
    assert "attndsl.autotune [fwd] 3/3" in err and "best 1 ms" in err and err.endswith("\n")
    tuning.autotune(causal, q, k, v, backward=False, candidates={"fwd": SMALL}, timer=lambda *a: 1.0, save=False,
                    progress=False)
    assert capsys.readouterr().err == ""


def test_cache_round_trips_on_disk(cache):
    q, k, v = qkv()
    res = tuning.autotune(causal, q, k, v, candidates={kn: SMALL for kn in ("fwd", "dkdv", "dq")},
                          timer=lambda fn, kn, c: 1.0 if c == SMALL[1] else 2.0, progress=False)
    assert res.path == cache / "cache" / "tuning.json" and res.path.is_file()
    on_disk = json.loads(res.path.read_text())
    assert on_disk["format"] == 1 and res.key in on_disk["entries"]
    tuning.reset()  # forget: the next lookup reads the file again
    spec = attndsl.compile(mask_mod=causal).spec
    got = tuning.entry_for(spec, q, k, v.shape[-1])
    assert got == res.tuned and got.configs.fwd == SMALL[1]
    # a fresh process finds it too
    code = ("import torch, attndsl\nfrom attndsl import tuning\n"
            "def causal(b, h, q_idx, kv_idx):\n    return q_idx >= kv_idx\n"
            "q = torch.zeros(1, 2, 33, 16); k = torch.zeros(1, 1, 64, 16)\n"
            "print(tuning.entry_for(attndsl.compile(mask_mod=causal).spec, q, k, 16).configs.fwd)\n")
    root = str(Path(__file__).resolve().parents[1])
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": root}, cwd=root)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "block_m=16, block_n=32" in p.stdout


def test_key_rekeys(cache):
    spec, other = attndsl.compile(mask_mod=causal).spec, attndsl.compile(mask_mod=window).spec
    q, k, v = qkv(Lq=40, Lkv=40)
    key = tuning.entry_key(spec.key, q, k, 16)
    same_bucket = tuning.entry_key(spec.key, qkv(Lq=33, Lkv=64)[0], qkv(Lq=33, Lkv=64)[1], 16)
    assert key == same_bucket and "|q64|kv64|" in key and key.endswith("|float32|cpu-interpreter")
    q2, k2, _ = qkv(Lq=65, Lkv=40)
    q3, k3, _ = qkv(Lq=40, Lkv=65)
    qh, kh, _ = qkv(dtype=torch.float16)
    qd, kd, _ = qkv(D=32)
    qg, kg, _ = qkv(Hkv=2)
    keys = {key, tuning.entry_key(other.key, q, k, 16), tuning.entry_key(spec.key, q2, k2, 16),
            tuning.entry_key(spec.key, q3, k3, 16), tuning.entry_key(spec.key, qh, kh, 16),
            tuning.entry_key(spec.key, qd, kd, 32), tuning.entry_key(spec.key, q, k, 32),
            tuning.entry_key(spec.key, qg, kg, 16)}
    assert len(keys) == 8


def _tune_small(q, k, v):
    """An entry whose forward tiles are 16 rows (the interpreter's default is 32)."""
    return tuning.autotune(causal, q, k, v, backward=False, candidates={"fwd": [SMALL[0]]},
                           timer=lambda fn, kn, c: 1.0 if c == SMALL[0] else 2.0, progress=False)


def test_calls_take_entries_unless_overridden_or_off(cache, monkeypatch):
    q, k, v = qkv()
    res = _tune_small(q, k, v)
    assert res.tuned.configs.fwd == SMALL[0]
    tuned, explicit = attndsl.compile(mask_mod=causal), attndsl.compile(mask_mod=causal, block_m=32)
    # visits per forward program: one column per query tile (16 rows: 3 tiles of 40; 32 rows: 2)
    assert tuned.visit_counts(q, k, v).shape[1] == 3
    assert tuned.runner(q, 16, k).cfg == res.tuned.configs
    assert explicit.visit_counts(q, k, v).shape[1] == 2  # explicit tiles win
    # the torch.compile op's runner too (runtime/op.py)
    from attndsl.runtime.op import _dense_runner
    assert _dense_runner(tuned, q, k, v, [], None, 0, 0)[0].cfg == res.tuned.configs
    other = qkv(Lq=100)  # another bucket: no entry
    assert tuned.runner(other[0], 16, other[1]).cfg.fwd.block_m == 32
    monkeypatch.setenv("ATTNDSL_TUNING", "0")
    assert attndsl.compile(mask_mod=causal).visit_counts(q, k, v).shape[1] == 2


def test_outputs_with_an_entry_match_the_reference(cache):
    q, k, v = qkv(grad=True)
    res = tuning.autotune(causal, q.detach(), k.detach(), v.detach(),
                          candidates={"fwd": [SMALL[0]], "dkdv": [SMALL[1]], "dq": [SMALL[1]]},
                          timer=lambda fn, kn, c: 1.0 if c in SMALL else 2.0, progress=False)
    assert res.tuned.configs.dkdv == SMALL[1]
    out = attndsl.attention(q, k, v, mask_mod=causal)  # the pattern autotune tuned: its runners were reset
    compiled = attndsl.api._compiled(causal, None, "softmax", False, None)[0]  # attention's, from its cache
    assert [r.cfg for r in compiled._runners.values()] == [res.tuned.configs]
    dout = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), dout)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    want_out, _ = attndsl.reference.attention(q64, k64, v64, mask_mod=causal)
    want = torch.autograd.grad(want_out, (q64, k64, v64), dout.double())
    torch.testing.assert_close(out.double(), want_out, atol=1e-4, rtol=1e-4)
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w, atol=1e-4, rtol=1e-4)


def test_export_load_and_shipped_entries(cache):
    q, k, v = qkv()
    res = _tune_small(q, k, v)
    spec = attndsl.compile(mask_mod=causal).spec
    out = cache / "export.json"
    assert tuning.export(out) == 1
    tuning.clear()  # the user's file is gone
    assert not tuning.user_file().exists() and tuning.entry_for(spec, q, k, 16) is None
    # shipped entries are defaults ...
    shipped = cache / "shipped"
    shipped.mkdir()
    (shipped / "h100.json").write_text(out.read_text())
    tuning.reset()
    assert tuning.entry_for(spec, q, k, 16) == res.tuned
    # ... under the user's entries
    user = json.loads(out.read_text())
    user["entries"][res.key]["fwd"]["block_n"] = 16
    mine = cache / "mine.json"
    mine.write_text(json.dumps(user))
    assert tuning.load(mine) == 1
    assert tuning.entry_for(spec, q, k, 16).configs.fwd == TileConfig(16, 16, 4, 1, tma=True)
    tuning.reset()
    assert tuning.entry_for(spec, q, k, 16).configs.fwd == TileConfig(16, 16, 4, 1, tma=True)
    with pytest.raises(FileNotFoundError, match="no tuning file"):
        tuning.load(cache / "missing.json")


def test_sibling_gpu_takes_the_entry_of_its_architecture(cache, monkeypatch):
    """A GPU with no entry of its own takes an entry tuned on a GPU of the same architecture and SM
    count (an H200 the H100's); its own entry wins where it has one; another architecture takes none."""
    q, k, v = qkv()
    spec = attndsl.compile(mask_mod=causal).spec
    key = tuning.entry_key(spec.key, q, k, 16)
    stem = key.rsplit("|", 1)[0]

    def entry(gpu, arch, block_n):
        t = tuned.Tuned(f"{stem}|{gpu}", Configs(*(TileConfig(16, block_n, 4, 1, tma=True),) * 3), arch=arch)
        return t.key, t.to_json()

    shipped = cache / "shipped"
    shipped.mkdir()
    (shipped / "h100.json").write_text(json.dumps(
        {"format": tuned.FORMAT, "entries": dict([entry("NVIDIA H100 80GB HBM3", "sm90-132", 16),
                                                  entry("NVIDIA A100-SXM4-80GB", "sm80-108", 32)])}))
    monkeypatch.setattr(tuned, "device_label", lambda t: "NVIDIA H200")
    arch = {"now": "sm90-132"}
    monkeypatch.setattr(tuned, "device_arch", lambda t: arch["now"])
    tuning.reset()
    got = tuning.entry_for(spec, q, k, 16)
    assert got is not None and got.key.endswith("|NVIDIA H100 80GB HBM3") and got.configs.fwd.block_n == 16
    assert got.arch == "sm90-132"
    arch["now"] = "sm89-128"  # an architecture nobody tuned for
    tuning.reset()
    assert tuning.entry_for(spec, q, k, 16) is None
    # the GPU's own entry (the user's) over its sibling's
    arch["now"] = "sm90-132"
    own = tuned.Tuned(f"{stem}|NVIDIA H200", Configs(*(TileConfig(16, 16, 4, 1),) * 3), arch="sm90-132")
    tuned.save({own.key: own})
    assert tuning.entry_for(spec, q, k, 16) == own


def test_damaged_files_are_ignored(cache, caplog):
    tuning.user_file().write_text("{not json")
    q, k, _ = qkv()
    assert tuning.entry_for(attndsl.compile(mask_mod=causal).spec, q, k, 16) is None
    assert "ignoring the tuning file" in caplog.text


def test_bad_arguments(cache):
    q, k, v = qkv()
    with pytest.raises(ValueError, match="explicit tiles"):
        tuning.autotune(attndsl.compile(mask_mod=causal, block_m=16), q, k, v, progress=False)
    with pytest.raises(ValueError, match="unknown kernels"):
        tuning.autotune(causal, q, k, v, candidates={"fwdd": SMALL}, progress=False)
    with pytest.raises(TypeError, match="CompiledAttention or a mask_mod"):
        tuning.autotune(3, q, k, v, progress=False)


def test_hopper_forward_follows_its_entry(monkeypatch):
    """An entry's Hopper verdict replaces ``MEASURED_WINS`` for its runner (``enable``/``ATTNDSL_HOPPER``
    still win); the call conditions are faked, as there is no sm_90 GPU here."""
    from attndsl.runtime import hopper
    monkeypatch.setattr(hopper, "call_fits", lambda *a: True)
    monkeypatch.setattr(hopper, "SWITCH", hopper.Switch("ATTNDSL_HOPPER"))
    monkeypatch.setattr(hopper.SWITCH, "_env", [None])  # ATTNDSL_HOPPER unset, whatever it was read as
    monkeypatch.delenv("ATTNDSL_HOPPER", raising=False)
    hf = hopper.HopperForward(attndsl.compile(mask_mod=causal).spec)
    assert hf.unsupported is None
    short = torch.zeros(1, 1, 40, 128, dtype=torch.bfloat16)
    long = torch.zeros(1, 16, 8192, 128, dtype=torch.bfloat16)  # 16 heads at 8192²: MEASURED_WINS
    assert not hf.applies(short, short, short) and hf.applies(long, long, long)  # MEASURED_WINS
    cfg = hopper.HopperConfig(stages=2)
    r = type("R", (), {"hopper": hf, "cfg": None})()
    tuning.Tuned("k", None, cfg, True).install(r)
    assert hf.tuned == (cfg, True) and hf.applies(short, short, short)
    tuning.Tuned("k", None, cfg, False).install(r)
    assert not hf.applies(long, long, long)
    hopper.enable(True)
    assert hf.applies(long, long, long)


class _HopperBwdStandIn:
    """A Hopper backward on the CPU (no sm_90 here): causal softmax gradients in float64 torch ops,
    taken where its ``tuned`` says it wins, as the real one; ``wrong`` configurations double dK."""

    def __init__(self, wrong=()):
        self.tuned, self.wrong, self.unsupported, self.seen = None, wrong, None, []

    def applies(self, q, k, v, dout, extras=None, tables=None, precise=False):
        from attndsl.runtime import hopper_bwd
        return self.tuned is not None and self.tuned[1] and hopper_bwd.backward_enabled() is not False

    def config(self, q, k):
        return self.tuned[0]

    def backward(self, q, k, v, dout, lse, delta, dk, dv, scale, buffers=(), deterministic=False, cfg=None,
                 table=None, key=None):
        self.seen.append(self.tuned[0])
        Lq, Lkv = q.shape[2], k.shape[2]
        g = q.shape[1] // k.shape[1]
        kk, vv = (t.double().repeat_interleave(g, 1) for t in (k, v))
        s = (q.double() @ kk.transpose(-1, -2)) * scale
        keep = torch.arange(Lq)[:, None] >= torch.arange(Lkv)[None, :]
        p = torch.where(keep, torch.exp(s - lse.double()[..., None]), 0.0)
        ds = p * (dout.double() @ vv.transpose(-1, -2) - delta.double()[..., None])
        grad_k = (ds.transpose(-1, -2) @ q.double() * scale).unflatten(1, (k.shape[1], g)).sum(2)
        grad_v = (p.transpose(-1, -2) @ dout.double()).unflatten(1, (k.shape[1], g)).sum(2)
        dk.copy_(grad_k * (2 if self.tuned[0] in self.wrong else 1))
        dv.copy_(grad_v)
        cfg = cfg or self.tuned[0]
        if deterministic or (cfg is not None and cfg.dq == "kernel"):
            return None  # dK/dV only: the portable dQ kernel adds dQ
        return (ds @ kk * scale).to(q.dtype)


@pytest.mark.parametrize("portable_atomic", [False, True])
@pytest.mark.parametrize("dq", ["atomic", "kernel"])
def test_hopper_backward_with_dq_by_the_portable_kernel(dq, portable_atomic):
    """A Hopper backward whose configuration leaves dQ to the portable dQ kernel (``dq="kernel"``):
    the runner launches that kernel, also where the portable backward would add dQ atomically in
    its dK/dV kernel (which does not run); gradients against the float64 reference."""
    from attndsl.runtime import hopper_bwd
    from attndsl.runtime.config import enable_atomic_dq
    torch.manual_seed(3)
    q, k, v = qkv(Lq=45, Lkv=45, Hq=4, Hkv=2, D=16, grad=True)
    do = torch.randn_like(q)
    comp = attndsl.compile(mask_mod=causal)
    stand_in = _HopperBwdStandIn()
    stand_in.tuned = (hopper_bwd.HopperBwdConfig(dq=dq), True)
    enable_atomic_dq(portable_atomic)
    try:
        r = comp.runner(q, 16, k)
        r.hopper_bwd = stand_in
        comp(q, k, v).backward(do)
    finally:
        enable_atomic_dq(None)
    assert stand_in.seen, "the Hopper backward stand-in did not run"
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref, _ = attndsl.reference.attention(q64, k64, v64, mask_mod=causal)
    ref.backward(do.double())
    for n, got, want in (("dq", q.grad, q64.grad), ("dk", k.grad, k64.grad), ("dv", v.grad, v64.grad)):
        err = float((got.double() - want).abs().max()) / float(want.abs().max())
        assert err < 1e-4, (n, err)


def test_hopper_backward_is_tuned_against_the_portable_one(cache, monkeypatch):
    """The Hopper backward's configurations are timed as whole backwards against the best portable
    backward (a stand-in on the CPU): a wrong one is skipped, the fastest kept with the verdict, the
    entry round-trips through its file and gives a new runner's Hopper backward its tiles."""
    from attndsl.runtime import hopper_bwd
    q, k, v = qkv(Lq=40, Lkv=40, Hq=2, Hkv=1, D=16)
    cfgs = [hopper_bwd.HopperBwdConfig(stages=2), hopper_bwd.HopperBwdConfig(stages=3),
            hopper_bwd.HopperBwdConfig(stages=1, consumers=1)]
    for hop_ms, wins in ((0.5, True), (5.0, False)):
        stand_in = _HopperBwdStandIn(wrong=(cfgs[1],))
        monkeypatch.setattr(tuning, "_hopper_backward", lambda *a, s=stand_in: s)

        def timer(fn, kernel, cfg, hop_ms=hop_ms):
            if kernel == "hopper_bwd":
                return hop_ms if cfg == cfgs[2] else hop_ms * 2
            return 1.0
        res = tuning.autotune(causal, q, k, v, candidates={"fwd": SMALL[:1], "dkdv": SMALL[:1], "dq": SMALL[:1],
                                                           "hopper_bwd": cfgs},
                              timer=timer, progress=False)
        tried = [t for t in res.trials if t.kernel == "hopper_bwd"]
        assert [t.config for t in tried] == cfgs
        assert tried[1].error.startswith("output 1: max error")  # dK, doubled
        assert [t.error for t in (tried[0], tried[2])] == [None, None]
        assert set(stand_in.seen) == set(cfgs) and stand_in.tuned is None  # each ran; left untuned
        assert res.tuned.hopper_bwd == cfgs[2] and res.tuned.hopper_bwd_wins is wins
        tuning.reset()
        got = tuning.entry_for(attndsl.compile(mask_mod=causal).spec, q, k, 16)
        assert got == res.tuned  # through the file
        runner = type("R", (), {"hopper": None, "hopper_bwd": hopper_bwd.HopperBackward(
            attndsl.compile(mask_mod=causal).spec), "cfg": None})()
        got.install(runner)
        assert runner.hopper_bwd.tuned == (cfgs[2], wins)
    # no Hopper backward for the call (the interpreter): no such trials, no verdict
    monkeypatch.undo()
    res = tuning.autotune(causal, q, k, v, candidates={kn: SMALL[:1] for kn in ("fwd", "dkdv", "dq")},
                          timer=lambda *a: 1.0, progress=False, save=False)
    assert not [t for t in res.trials if t.kernel == "hopper_bwd"] and res.tuned.hopper_bwd is None


def test_hopper_backward_follows_its_entry(monkeypatch):
    """An entry's verdict replaces ``MEASURED_BWD_WINS`` for its runner's Hopper backward, and its
    tiles are the ones launched (``enable_backward`` still wins); call conditions faked (no sm_90)."""
    from attndsl.runtime import hopper_bwd
    monkeypatch.setattr(hopper_bwd, "call_fits", lambda *a: True)
    monkeypatch.setattr(hopper_bwd, "SWITCH", hopper_bwd.Switch("ATTNDSL_HOPPER_BWD"))
    monkeypatch.setattr(hopper_bwd.SWITCH, "_env", [None])
    monkeypatch.delenv("ATTNDSL_HOPPER_BWD", raising=False)
    hb = hopper_bwd.HopperBackward(attndsl.compile(mask_mod=causal).spec)
    t = torch.zeros(1, 2, 40, 128, dtype=torch.bfloat16)
    assert not hb.applies(t, t, t, t)  # too short for MEASURED_BWD_WINS
    cfg = hopper_bwd.HopperBwdConfig(stages=3, consumers=1)
    r = type("R", (), {"hopper": None, "hopper_bwd": hb, "cfg": None})()
    tuning.Tuned("k", None, hopper_bwd=cfg, hopper_bwd_wins=True).install(r)
    assert hb.tuned == (cfg, True) and hb.applies(t, t, t, t)
    with pytest.raises(ValueError, match="stages=3, consumers=1.*more than sm_90"):  # the tuned tiles are used
        hb.backward(*(torch.zeros(1, 2, 40, 512, dtype=torch.bfloat16) for _ in range(4)), torch.zeros(1, 2, 40),
                    torch.zeros(1, 2, 40), torch.zeros(1, 2, 40, 512), torch.zeros(1, 2, 40, 512), 0.1)
    tuning.Tuned("k", None, hopper_bwd=cfg, hopper_bwd_wins=False).install(r)
    assert not hb.applies(t, t, t, t)
    hopper_bwd.enable_backward(True)
    try:
        assert hb.applies(t, t, t, t)
    finally:
        hopper_bwd.enable_backward(None)


@pytest.mark.gpu
def test_gpu_autotune_causal_entry_is_used(tmp_path, monkeypatch):
    """On the GPU: tune a causal pattern at L=1024 (bf16, D=128), and check the entry is written,
    taken by the next call's runner, and that the call matches the float64 reference."""
    monkeypatch.setenv("ATTNDSL_CACHE_DIR", str(tmp_path))
    tuning.reset()
    from attndsl.runtime import hopper, hopper_bwd
    q, k, v = (torch.randn(1, 4, 1024, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    # a few candidates per kernel (each one compiles): the default's and some of candidate_tiles'
    cands = {"fwd": [TileConfig(64, 64, 4, 3), TileConfig(128, 64, 8, 2, tma=True), TileConfig(128, 128, 8, 3)],
             "dkdv": [TileConfig(32, 128, 8, 2), TileConfig(64, 64, 4, 2)],
             "dq": [TileConfig(64, 64, 4, 2), TileConfig(128, 32, 8, 2)],
             "hopper": hopper.sweep_configs(128)[:3], "hopper_bwd": hopper_bwd.sweep_configs(128)[:2]}
    res = tuning.autotune(causal, q, k, v, candidates=cands, rep=20)
    print(res)
    assert res.path.is_file() and res.best("fwd") is not None and res.best("dq") is not None
    compiled = attndsl.compile(mask_mod=causal)
    r = compiled.runner(q, 128, k)
    assert r.cfg == res.tuned.configs
    if res.tuned.hopper_wins is not None:
        assert r.hopper.tuned == (res.tuned.hopper, res.tuned.hopper_wins)
    if res.tuned.hopper_bwd_wins is not None:
        assert r.hopper_bwd.tuned == (res.tuned.hopper_bwd, res.tuned.hopper_bwd_wins)
    out = compiled(q, k, v)
    want, _ = attndsl.reference.attention(q, k, v, mask_mod=causal)
    assert float((out.double() - want).abs().max()) < 2e-2
    tuning.reset()


def test_shipped_entries_parse_and_match_current_patterns():
    """The shipped files load whole (no entry skipped as damaged), and each entry's pattern key is
    one the benchmark's model cases still trace to: a change to the IR or KernelSpec that renames
    the patterns would otherwise leave the shipped tiles silently unused."""
    import json

    from attndsl.api import _compiled
    from benchmarks.cases import get_case

    files = sorted(tuned.SHIPPED_DIR.glob("*.json"))
    assert files, f"no shipped tuning files in {tuned.SHIPPED_DIR}"
    keys = set()
    for f in files:
        raw = json.loads(f.read_text())["entries"]
        got = tuned._read(f)
        assert set(got) == set(raw), f"{f.name}: entries skipped as damaged: {sorted(set(raw) - set(got))}"
        keys |= {k.split("|")[0] for k in got}
    current = set()
    for name in ("gpt2_step", "vit_b16", "llama3_8b", "packed_docs_64x32k"):
        inst = get_case(name).build(L=256, H=2, B=1, device="cpu", seed=0, dtype=torch.bfloat16)
        current.add(_compiled(inst.mask_mod, inst.score_mod, "softmax", False, None)[0].spec.key)
    assert keys <= current, f"shipped entries for patterns no model case traces to: {sorted(keys - current)}"


@pytest.mark.parametrize("verify", [False, True])
@pytest.mark.parametrize("dq", ["atomic", "kernel"])
def test_calls_the_hopper_backward_takes_are_prepared(dq, verify, monkeypatch):
    """Repeated calls of a key the Hopper backward takes (a stand-in on the CPU) take the prepared
    path around it (``HopperFastBackward``: the memoised delta and, where dQ is left to it, dQ
    launches): fresh inputs and an lse gradient each call, gradients against the float64
    reference; ``Runner.backward`` runs for the first call only (and, under ``ATTNDSL_VERIFY_MEMO``,
    after each verified one). The switch turned off: the portable backward, prepared in turn; on
    again: the Hopper one."""
    from attndsl.runtime import hopper_bwd, launch
    monkeypatch.setattr(launch, "VERIFY_MEMO", verify)
    seen = []
    full = launch.Runner.backward

    def spy(self, *a, **kw):
        seen.append(kw.get("hop"))
        return full(self, *a, **kw)
    monkeypatch.setattr(launch.Runner, "backward", spy)
    comp = attndsl.compile(mask_mod=causal)
    q, k, v = qkv(Lq=45, Lkv=45, Hq=4, Hkv=2, D=16)
    stand_in = _HopperBwdStandIn()
    stand_in.tuned = (hopper_bwd.HopperBwdConfig(dq=dq), True)
    comp.runner(q, 16, k).hopper_bwd = stand_in

    def step(n):
        for _ in range(n):
            q, k, v = qkv(Lq=45, Lkv=45, Hq=4, Hkv=2, D=16, grad=True)
            do, dl = torch.randn(1, 4, 45, 16), torch.randn(1, 4, 45)
            o, lse = comp(q, k, v, return_lse=True)
            torch.autograd.backward((o, lse), (do, dl))
            q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
            r, rl = attndsl.reference.attention(q64, k64, v64, mask_mod=causal)
            torch.autograd.backward((r, rl), (do.double(), dl.double()))
            for n_, got, want in (("dq", q.grad, q64.grad), ("dk", k.grad, k64.grad), ("dv", v.grad, v64.grad)):
                err = float((got.double() - want).abs().max()) / float(want.abs().max())
                assert err < 1e-4, (n_, err)

    step(3)
    assert len(stand_in.seen) == 3
    assert len(seen) == (3 if verify else 1)
    fast = [b for b in comp.runner(q, 16, k)._fast_bwd.values() if b is not None]
    assert len(fast) == 1 and type(fast[0]) is launch.HopperFastBackward
    hopper_bwd.enable_backward(False)
    try:
        step(2)
        assert len(stand_in.seen) == 3  # the portable backward
        assert [type(b) for b in comp.runner(q, 16, k)._fast_bwd.values()] == [launch.FastBackward]
    finally:
        hopper_bwd.enable_backward(None)
    step(2)
    assert len(stand_in.seen) == 5
    assert [type(b) for b in comp.runner(q, 16, k)._fast_bwd.values()] == [launch.HopperFastBackward]

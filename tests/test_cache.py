"""The kernel cache trusts only what this process renders (issue 31, part 3).

An edited or foreign file in the cache directory is never executed; an unsafe directory (owned by
another user, writable by group or others) and an unusable one (a file, a read-only file system)
fall back to a private temporary directory with one warning naming ``ATTNDSL_CACHE_DIR``.
The process runs as root here, which ignores permission bits: read-only directories and foreign
owners are simulated by monkeypatching ``os.access`` and ``os.getuid``.
"""
from __future__ import annotations

import logging
import os
import stat
import warnings

import pytest
import torch

import attndsl
from attndsl.runtime import cache

UID = os.getuid()  # before any test pretends to be another user


def causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


@pytest.fixture
def fresh(tmp_path, monkeypatch):
    """A new configured cache directory, no module loaded yet, no directory decided yet."""
    d = tmp_path / "cache"
    monkeypatch.setenv("ATTNDSL_CACHE_DIR", str(d))
    monkeypatch.setattr(cache, "_MODULES", {})
    monkeypatch.setattr(cache, "_DIRS", {})
    monkeypatch.setattr(cache, "_FALLBACK", [])
    return d


def qkv(L=24, D=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, 2, L, D, generator=g) for _ in range(3)]


def check_output(comp, q, k, v):
    out = comp(q, k, v)
    ref, _ = attndsl.reference.attention(q.double(), k.double(), v.double(), mask_mod=comp.mask_mod)
    assert (out.double() - ref).abs().max().item() < 1e-4


def _plant_exit(text):
    # valid Python that would end the process if it were executed
    return "raise SystemExit(42)\n" + text


def _plant_arithmetic(text):
    # the attack of issue 31: a silently wrong output (2x) from a still-valid kernel
    assert "out = acc / l_safe[:, None]" in text
    return text.replace("out = acc / l_safe[:, None]", "out = 2.0 * acc / l_safe[:, None]")


@pytest.mark.parametrize("plant", [_plant_exit, _plant_arithmetic])
def test_edited_file_is_never_run(fresh, plant, caplog):
    q, k, v = qkv()
    comp = attndsl.compile(mask_mod=causal)
    check_output(comp, q, k, v)
    path = cache.source_path(comp.spec)
    good = path.read_text()
    path.write_text(plant(good))
    cache._MODULES.clear()  # a new process, as far as the cache knows
    rebuilt = cache.STATS["rebuilt"]
    with caplog.at_level(logging.WARNING, logger="attndsl.cache"):
        check_output(attndsl.compile(mask_mod=causal), q, k, v)  # no SystemExit, no 2x output
    assert cache.STATS["rebuilt"] == rebuilt + 1
    assert path.read_text() == good
    assert any("differs from the source" in r.getMessage() and r.name == "attndsl.cache" for r in caplog.records)


def test_file_swapped_after_the_check_is_not_run(fresh, monkeypatch):
    """The module runs the rendered text, not the file: a file changed between the comparison and
    the import (or after it, when Triton reads the source) changes nothing."""
    q, k, v = qkv()
    comp = attndsl.compile(mask_mod=causal)
    path = cache.source_path(comp.spec)
    real_import = cache._import

    def swap_then_import(p, source, interpret, tag):
        p.write_text(_plant_exit(source))
        return real_import(p, source, interpret, tag)

    monkeypatch.setattr(cache, "_import", swap_then_import)
    check_output(comp, q, k, v)
    assert path.read_text().startswith("raise SystemExit(42)")


def test_new_directory_is_private(fresh):
    assert cache.cache_dir() == fresh
    assert stat.S_IMODE(os.stat(fresh).st_mode) == 0o700


def _fallback_warning(record) -> bool:
    return issubclass(record.category, RuntimeWarning) and "ATTNDSL_CACHE_DIR" in str(record.message)


def _assert_falls_back_once(fresh, why):
    """The first kernel load warns once (naming ATTNDSL_CACHE_DIR and ``why``), every load uses a
    private temporary directory, and results stay right."""
    q, k, v = qkv()
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        comp = attndsl.compile(mask_mod=causal)
        check_output(comp, q, k, v)
        check_output(attndsl.compile(mask_mod=lambda b, h, q_idx, kv_idx: q_idx <= kv_idx + 3), q, k, v)
    ours = [w for w in got if _fallback_warning(w)]
    assert len(ours) == 1, [str(w.message) for w in got]
    assert why in str(ours[0].message)
    d = cache.cache_dir()
    assert d != fresh and d == cache.source_path(comp.spec).parent
    st = os.stat(d)
    assert stat.S_IMODE(st.st_mode) == 0o700 and st.st_uid == UID
    assert cache.source_path(comp.spec).read_text() == comp.source


def test_world_writable_directory_is_refused(fresh):
    fresh.mkdir()
    fresh.chmod(0o777)
    _assert_falls_back_once(fresh, "writable by group or others")


def test_group_writable_directory_is_refused(fresh):
    fresh.mkdir()
    fresh.chmod(0o770)
    _assert_falls_back_once(fresh, "writable by group or others")


def test_directory_of_another_user_is_refused(fresh, monkeypatch):
    fresh.mkdir(mode=0o700)
    real = os.getuid()
    monkeypatch.setattr(cache.os, "getuid", lambda: real + 1)
    _assert_falls_back_once(fresh, "owned by uid")


def test_path_that_is_a_file(fresh):
    fresh.write_text("not a directory")
    _assert_falls_back_once(fresh, "not a directory")


def test_path_under_a_file(fresh, monkeypatch):
    fresh.write_text("not a directory")
    monkeypatch.setenv("ATTNDSL_CACHE_DIR", str(fresh / "kernels"))
    _assert_falls_back_once(fresh / "kernels", "cannot create")


def test_read_only_directory(fresh, monkeypatch):
    """A read-only file system (or home): ``os.access`` says no even to root there."""
    fresh.mkdir(mode=0o700)
    real = os.access
    monkeypatch.setattr(cache.os, "access",
                        lambda p, mode, **kw: False if str(p) == str(fresh) else real(p, mode, **kw))
    _assert_falls_back_once(fresh, "not writable")


def test_read_only_parent(fresh, monkeypatch):
    """The directory does not exist and cannot be created (mkdir fails with EROFS)."""
    real = type(fresh).mkdir

    def mkdir(self, *a, **kw):
        if str(self) == str(fresh):
            raise OSError(30, "Read-only file system", str(self))
        return real(self, *a, **kw)

    monkeypatch.setattr(type(fresh), "mkdir", mkdir)
    _assert_falls_back_once(fresh, "Read-only file system")


def test_usable_directory_gives_no_warning(fresh):
    fresh.mkdir(mode=0o755)  # readable by others is fine: only writers could plant code
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        assert cache.cache_dir() == fresh
    assert not [w for w in got if _fallback_warning(w)]


# --- logging (issue 26, part 8) ---------------------------------------------------------------------
def test_compile_and_cache_events_are_logged(fresh, caplog):
    q, k, v = qkv()
    with caplog.at_level(logging.DEBUG, logger="attndsl"):
        comp = attndsl.compile(mask_mod=causal)
        check_output(comp, q, k, v)
    compiled = [r for r in caplog.records if r.name == "attndsl.compile"]
    assert len(compiled) == 1 and compiled[0].levelno == logging.INFO
    msg = compiled[0].getMessage()
    assert comp.spec.key in msg and "attn_fwd" in msg and "attn_bwd_dq" in msg and " ms " in msg
    assert any(r.name == "attndsl.cache" and "cache miss" in r.getMessage() for r in caplog.records)
    caplog.clear()
    cache._MODULES.clear()  # a new process: the file is found and matches
    with caplog.at_level(logging.DEBUG, logger="attndsl"):
        check_output(attndsl.compile(mask_mod=causal), q, k, v)
    assert any(r.name == "attndsl.cache" and r.levelno == logging.DEBUG and "cache hit" in r.getMessage()
               for r in caplog.records)
    assert not any("cache miss" in r.getMessage() for r in caplog.records)


def test_logging_is_quiet_by_default(tmp_path):
    """With no logging configured, a first compile (and a rejected file) prints nothing."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    script = (
        "import torch, attndsl\n"
        "from attndsl.runtime import cache\n"
        "c = attndsl.compile(mask_mod=lambda b, h, q, kv: q >= kv)\n"
        "x = torch.randn(1, 1, 8, 16)\n"
        "c(x, x, x)\n"
        "p = cache.source_path(c.spec); p.write_text('raise SystemExit(42)\\n')\n"
        "cache._MODULES.clear(); attndsl.compile(mask_mod=lambda b, h, q, kv: q >= kv)(x, x, x)\n"
        "import logging\n"
        "assert any(isinstance(h, logging.NullHandler) for h in logging.getLogger('attndsl').handlers)\n"
    )
    env = dict(os.environ, ATTNDSL_CACHE_DIR=str(tmp_path / "c"), PYTHONPATH=str(root))
    r = subprocess.run([sys.executable, "-c", script], env=env, cwd=root, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "attndsl" not in r.stderr and r.stdout == "", r.stderr[-2000:]

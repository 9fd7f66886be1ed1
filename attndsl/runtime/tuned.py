"""Tuned entries: the tiles ``attndsl.autotune`` found, keyed per pattern and call shape, on disk and
in effect (``docs/tuning.md``).

An entry holds the portable kernels' tiles (forward, dK/dV, dQ), the backward's dQ mode ("dq_mode":
"kernel", the dQ kernel, or "atomic", dQ added by the dK/dV kernel; ``config.atomic_dq``; entries
without it: "kernel") and, where they were tuned, the Hopper forward's
:class:`~attndsl.runtime.hopper.HopperConfig` and whether it beat the portable forward, and the
Hopper backward's :class:`~attndsl.runtime.hopper_bwd.HopperBwdConfig` and whether it beat the
portable backward (entries without them: the built-in choice). Keys
(:func:`entry_key`): the pattern (``KernelSpec.key``), ``Lq`` and ``Lkv`` rounded up to powers of two,
the head dims, the GQA group, the dtype and the GPU. A GPU with no entry of its own takes the entry of a
sibling: a GPU of the same architecture and SM count (``arch``, e.g. ``sm90-132`` for the H100 SXM and
the H200), whose tiles fit the same shared memory and fill the same grid. Entries shipped with the
package (``attndsl/tuned/*.json``) are read first, the user's file (``tuning.json`` in the kernel cache
directory, ``$ATTNDSL_CACHE_DIR``) over them; files are written atomically. ``CompiledAttention.runner``
asks :func:`entry_for` once per call key; ``ATTNDSL_TUNING=0`` ignores every entry. The search that
makes entries is ``attndsl/tuning.py``, above the API.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import Configs, TileConfig
from .hopper import HopperConfig
from .hopper_bwd import HopperBwdConfig

__all__ = ["Tuned", "entry_key", "entry_for", "entries", "export", "load", "clear", "reset", "user_file",
           "save", "bucket", "device_label", "device_arch", "SHIPPED_DIR", "KERNELS"]

log = logging.getLogger("attndsl.tuning")

#: the entries' file format; files of another version are ignored (with a warning)
FORMAT = 1
#: the user's entries: this file in the kernel cache directory
FILE_NAME = "tuning.json"
#: entries shipped with the package, read as defaults under the user's (``*.json`` here; may be empty)
SHIPPED_DIR = Path(__file__).resolve().parent.parent / "tuned"
#: the kernels an entry holds tiles for ("dq_mode": how the backward computes dQ, ``Configs.dq_mode``)
KERNELS = ("fwd", "dkdv", "dq", "dq_mode", "hopper", "hopper_bwd")

_LOCK = threading.Lock()
_ENTRIES: list = []  # [dict key -> Tuned] once loaded (shipped, then the user's file over them)
_LOOKUPS: dict = {}  # entry_for's answers per call shape (cleared whenever the entries change)
_SIBLINGS: dict = {}  # (key without its GPU, arch) -> Tuned, the first by key (rebuilt with the entries)


# -- entries ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Tuned:
    """One tuned entry: the portable kernels' tiles (``configs``) and, where the Hopper forward was
    tuned, its tiles (``hopper``) and whether it beat the portable forward (``hopper_wins``); the
    same for the Hopper backward (``hopper_bwd``, ``hopper_bwd_wins``)."""

    key: str
    configs: Configs
    hopper: HopperConfig | None = None
    hopper_wins: bool | None = None
    times: tuple = ()  # ((kernel, default ms, best ms), ...), for the record
    arch: str | None = None  # the tuning GPU's architecture and SM count (:func:`device_arch`)
    hopper_bwd: HopperBwdConfig | None = None
    hopper_bwd_wins: bool | None = None

    def install(self, runner) -> None:
        """Give ``runner`` (``launch.Runner``, just made) these tiles."""
        runner.cfg = self.configs
        if runner.hopper is not None and self.hopper_wins is not None:
            runner.hopper.tuned = (self.hopper, self.hopper_wins)
        if getattr(runner, "hopper_bwd", None) is not None and self.hopper_bwd_wins is not None:
            runner.hopper_bwd.tuned = (self.hopper_bwd, self.hopper_bwd_wins)

    def to_json(self) -> dict:
        c = self.configs
        return {"fwd": dataclasses.asdict(c.fwd), "dkdv": dataclasses.asdict(c.dkdv), "dq": dataclasses.asdict(c.dq),
                "dq_mode": c.dq_mode, "hopper": None if self.hopper is None else dataclasses.asdict(self.hopper),
                "hopper_wins": self.hopper_wins, "arch": self.arch,
                "hopper_bwd": None if self.hopper_bwd is None else dataclasses.asdict(self.hopper_bwd),
                "hopper_bwd_wins": self.hopper_bwd_wins,
                "ms": {k: {"default": d, "best": b} for k, d, b in self.times}}

    @staticmethod
    def from_json(key: str, d: dict) -> "Tuned":
        def tile(x):
            return TileConfig(int(x["block_m"]), int(x["block_n"]), int(x.get("num_warps", 4)),
                              int(x.get("num_stages", 2)), bool(x.get("tma", False)))
        hop = d.get("hopper")
        wins = d.get("hopper_wins")
        times = tuple((k, v.get("default"), v.get("best")) for k, v in (d.get("ms") or {}).items())
        cfgs = Configs(tile(d["fwd"]), tile(d["dkdv"]), tile(d["dq"]), dq_mode=str(d.get("dq_mode", "kernel")))
        arch = d.get("arch")
        hb, hb_wins = d.get("hopper_bwd"), d.get("hopper_bwd_wins")
        return Tuned(key, cfgs, None if hop is None else HopperConfig(**hop), None if wins is None else bool(wins),
                     times, None if arch is None else str(arch), None if hb is None else HopperBwdConfig(**hb),
                     None if hb_wins is None else bool(hb_wins))


def bucket(n: int) -> int:
    """A length's bucket: ``n`` rounded up to a power of two."""
    return 1 << max(0, n - 1).bit_length()


@functools.lru_cache(maxsize=None)
def _gpu_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


@functools.lru_cache(maxsize=None)
def _gpu_arch(index: int) -> str:
    p = torch.cuda.get_device_properties(index)
    return f"sm{p.major}{p.minor}-{p.multi_processor_count}"


def _of_gpu(t: torch.Tensor, what) -> str:
    """``what(index)`` of ``t``'s GPU, or "cpu-interpreter" where its kernels run in Triton's interpreter."""
    from .launch import use_interpreter
    if use_interpreter(t):
        return "cpu-interpreter"
    return what(t.device.index if t.device.index is not None else torch.cuda.current_device())


def device_label(t: torch.Tensor) -> str:
    """The GPU of an entry: ``torch.cuda.get_device_name`` of ``t``'s device, or "cpu-interpreter"
    where its kernels run in Triton's interpreter."""
    return _of_gpu(t, _gpu_name)


def device_arch(t: torch.Tensor) -> str:
    """The architecture of ``t``'s GPU as tuned entries record it: ``sm<major><minor>-<SM count>``
    (``sm90-132`` for an H100 SXM or an H200), or "cpu-interpreter"."""
    return _of_gpu(t, _gpu_arch)


def entry_key(spec_key: str, q: torch.Tensor, k: torch.Tensor, head_dim_v: int) -> str:
    """The key of a tuned entry for calls of the pattern ``spec_key`` (``KernelSpec.key``) with
    queries like ``q [B, Hq, Lq, D]``, keys like ``k [B, Hkv, Lkv, D]`` and values of head dim
    ``head_dim_v``: the pattern, ``Lq`` and ``Lkv`` rounded up to powers of two, the head dims,
    the GQA group ``Hq // Hkv``, the dtype and the GPU (:func:`device_label`)."""
    return (f"{spec_key}|q{bucket(q.shape[2])}|kv{bucket(k.shape[2])}|d{q.shape[-1]}|dv{head_dim_v}"
            f"|g{q.shape[1] // max(1, k.shape[1])}|{str(q.dtype).replace('torch.', '')}|{device_label(q)}")


def user_file() -> Path:
    """The user's entries: ``tuning.json`` in the kernel cache directory (``attndsl.runtime.cache``)."""
    from . import cache
    return cache.cache_dir() / FILE_NAME


def _read(path: Path) -> dict:
    """``key -> Tuned`` of one file; a missing file has none, a damaged one or a damaged entry is
    skipped with a warning (``attndsl.tuning`` logger)."""
    try:
        raw = json.loads(Path(path).read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        log.warning("attndsl: ignoring the tuning file %s (%s)", path, e)
        return {}
    if not isinstance(raw, dict) or raw.get("format") != FORMAT or not isinstance(raw.get("entries"), dict):
        log.warning("attndsl: ignoring the tuning file %s: not a format-%d attndsl tuning file", path, FORMAT)
        return {}
    got = {}
    for key, d in raw["entries"].items():
        try:
            got[key] = Tuned.from_json(key, d)
        except (KeyError, TypeError, ValueError) as e:
            log.warning("attndsl: ignoring the tuned entry %s of %s (%s)", key, path, e)
    return got


def _write(path: Path, found: dict) -> None:
    """Write ``found`` (key -> Tuned) to ``path`` atomically (a temporary file, then ``os.replace``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps({"format": FORMAT, "entries": {k: t.to_json() for k, t in sorted(found.items())}}, indent=1)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _loaded() -> dict:
    if not _ENTRIES:
        with _LOCK:
            if not _ENTRIES:
                found = {}
                for p in sorted(SHIPPED_DIR.glob("*.json")):
                    found.update(_read(p))
                found.update(_read(user_file()))
                _LOOKUPS.clear()
                _siblings(found)
                _ENTRIES.append(found)
    return _ENTRIES[0]


def _siblings(found: dict) -> None:
    """Index ``found``'s entries by key without its GPU and by architecture (the first by key)."""
    _SIBLINGS.clear()
    for key in sorted(found):
        t = found[key]
        if t.arch is not None:
            _SIBLINGS.setdefault((key.rsplit("|", 1)[0], t.arch), t)


def reset() -> None:
    """Forget the entries read so far: the next lookup reads the files again."""
    with _LOCK:
        _ENTRIES.clear()
        _LOOKUPS.clear()
        _SIBLINGS.clear()


def entries() -> dict:
    """Every entry in effect, ``key -> Tuned`` (shipped ones under the user's)."""
    return dict(_loaded())


def entry_for(spec, q: torch.Tensor, k: torch.Tensor, head_dim_v: int) -> Tuned | None:
    """The tuned entry for a call of ``spec`` with ``q``, ``k`` and values of head dim
    ``head_dim_v`` (:func:`entry_key`); where this GPU has none, a sibling GPU's entry of the same
    key (same :func:`device_arch`); or None: neither, or ``ATTNDSL_TUNING=0``."""
    found = _loaded()
    if not found or os.environ.get("ATTNDSL_TUNING") == "0":
        return None
    # per call shape, remembered (the torch.compile op path asks on every call)
    memo = (spec.key, q.shape[1:], k.shape[1:3], head_dim_v, q.dtype, q.device)
    got = _LOOKUPS.get(memo, _LOOKUPS)
    if got is _LOOKUPS:
        if len(_LOOKUPS) >= 4096:
            _LOOKUPS.clear()
        key = entry_key(spec.key, q, k, head_dim_v)
        got = found.get(key)
        if got is None and _SIBLINGS:
            got = _SIBLINGS.get((key.rsplit("|", 1)[0], device_arch(q)))
            if got is not None:
                log.info("attndsl: tuned entry %s serves %s (same architecture)", got.key, key)
        _LOOKUPS[memo] = got
    return got


def save(new: dict) -> Path:
    """Merge ``new`` (key -> Tuned) into the user's file and the entries in effect."""
    path = user_file()
    with _LOCK:
        found = _read(path)
        found.update(new)
        _write(path, found)
        if _ENTRIES:
            _ENTRIES[0].update(new)
            _siblings(_ENTRIES[0])
        _LOOKUPS.clear()
    return path


def export(path: str | os.PathLike, *, shipped: bool = False) -> int:
    """Write the user's tuned entries to ``path`` (a JSON file another machine can :func:`load`,
    or that a release ships in ``attndsl/tuned/``).

    Args:
        path: the file to write (atomically).
        shipped: also write the entries shipped with the package.

    Returns:
        How many entries were written.
    """
    found = dict(entries()) if shipped else _read(user_file())
    _write(Path(path), found)
    return len(found)


def load(path: str | os.PathLike) -> int:
    """Merge the entries of a file written by :func:`export` into the user's tuned entries (on
    disk, and in effect for runners made from now on; an entry of the same key is replaced).

    Args:
        path: a tuning file (``{"format": 1, "entries": {...}}``).

    Returns:
        How many entries were read.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no tuning file at {str(path)!r}")
    found = _read(path)
    save(found)
    return len(found)


def clear() -> None:
    """Delete the user's tuned entries (the file in the cache directory); shipped entries stay.
    Runners made before keep their tiles: compile the pattern again (or restart) to drop them."""
    with _LOCK:
        user_file().unlink(missing_ok=True)
        _ENTRIES.clear()
        _LOOKUPS.clear()
        _SIBLINGS.clear()

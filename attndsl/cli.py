"""The ``attndsl`` command line (also ``python -m attndsl``).

    attndsl show PATTERN [--score S] [--source]   IR, visit plan and source summary; --source: the Triton
    attndsl bench PATTERN [--L ...] [--json F]    time it against FlexAttention / SDPA (GPU; exit 3 without)
    attndsl check PATTERN [--max-examples N]      property-test it against the float64 reference
    attndsl tilemap PATTERN --out MAP.png         picture of the key tiles each query tile visits
    attndsl cache [--clear]                       show or empty the kernel source cache

A pattern is named ``FILE.py`` (module-level ``mask_mod`` / ``score_mod``), ``FILE.py:NAME``
(a module-level function) or ``FILE.py:FACTORY(ARGS)`` (a factory called with literal
arguments, e.g. ``patterns/sliding_window.py:sliding_window(256, causal=True)``). The
arguments are read with ``ast.literal_eval``: numbers, strings, tuples, lists, dicts,
booleans and None; nothing else is evaluated. What it names may be a mask_mod, a score_mod, a
tuple of them or a dict (:func:`pattern_parts`).

Exit codes: 0 done, 1 ``check`` (or ``bench``'s check) found a mismatch, 2 a bad argument or
pattern (one ``attndsl ...: error:`` line), 3 ``bench`` on a machine without a CUDA device.

The compiler core, the harness and torch are imported lazily, so ``attndsl --help`` is fast
and this module imports without them.
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import hashlib
import importlib.util
import inspect
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any, List, Optional, Sequence, Tuple


class CLIError(Exception):
    """A user error: printed as 'attndsl: error: ...' with exit code 2."""


# --------------------------------------------------------------------------------------
# FILE.py:FUNC loading
# --------------------------------------------------------------------------------------

def split_spec(spec: str) -> Tuple[str, Optional[str]]:
    """``'dir/f.py:g(1)'`` -> ``('dir/f.py', 'g(1)')``; ``'f.py'`` -> ``('f.py', None)``.

    The file part is the first prefix ending in ``.py`` that is followed by ``:`` or the end
    and names an existing file (or, when none exists, the first such prefix).
    """
    spec = spec.strip()
    candidates = []
    i = spec.find(".py")
    while i != -1:
        end = i + 3
        if end == len(spec) or spec[end] == ":":
            candidates.append(end)
        i = spec.find(".py", i + 1)
    if not candidates:
        raise CLIError(f"expected FILE.py or FILE.py:FUNC, got {spec!r}")
    chosen = next((e for e in candidates if Path(spec[:e]).expanduser().is_file()), candidates[0])
    path, rest = spec[:chosen], spec[chosen + 1:]
    if chosen < len(spec) and not rest.strip():
        raise CLIError(f"nothing after ':' in {spec!r}")
    return path, (rest.strip() or None) if chosen < len(spec) else None


@contextlib.contextmanager
def _sys_path(*dirs: str):
    added = [d for d in dirs if d and d not in sys.path]
    sys.path[:0] = added
    try:
        yield
    finally:
        for d in added:
            with contextlib.suppress(ValueError):
                sys.path.remove(d)


def import_file(path: str):
    """Import a Python file as a fresh module (its directory and the cwd on sys.path meanwhile)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise CLIError(f"no such file: {path}")
    p = p.resolve()
    digest = hashlib.sha1(str(p).encode()).hexdigest()[:10]
    name = f"_attndsl_user_{p.stem.replace('-', '_')}_{digest}"
    spec = importlib.util.spec_from_file_location(name, p)
    if spec is None or spec.loader is None:
        raise CLIError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        with _sys_path(str(p.parent), os.getcwd()):
            spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module


def _resolve_name(node: ast.AST, module, expr: str):
    """Name or dotted attribute chain, looked up in the module."""
    parts: List[str] = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        raise CLIError(f"{expr!r}: expected NAME, NAME.ATTR or NAME(literal arguments)")
    parts.append(node.id)
    obj: Any = module
    where = getattr(module, "__file__", "module")
    for part in reversed(parts):
        if part.startswith("__"):
            raise CLIError(f"{expr!r}: dunder attributes are not allowed")
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise CLIError(f"{where} has no attribute {part!r} (in {expr!r})") from None
    return obj


def _literal(node: ast.AST, expr: str):
    try:
        return ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError):
        raise CLIError(f"{expr!r}: arguments must be Python literals "
                       f"(numbers, strings, tuples, lists, dicts, True/False/None), "
                       f"got {ast.unparse(node)!r}") from None


def evaluate_expr(module, expr: str):
    """``NAME`` -> the attribute; ``NAME(args)`` -> the factory called with literal arguments."""
    try:
        tree = ast.parse(expr.strip(), mode="eval").body
    except SyntaxError as e:
        raise CLIError(f"cannot parse {expr!r}: {e.msg}") from None
    if isinstance(tree, ast.Call):
        fn = _resolve_name(tree.func, module, expr)
        if not callable(fn):
            raise CLIError(f"{expr!r}: {ast.unparse(tree.func)} is not callable")
        args, kwargs = [], {}
        for a in tree.args:
            if isinstance(a, ast.Starred):
                raise CLIError(f"{expr!r}: *args are not allowed")
            args.append(_literal(a, expr))
        for kw in tree.keywords:
            if kw.arg is None:
                raise CLIError(f"{expr!r}: **kwargs are not allowed")
            kwargs[kw.arg] = _literal(kw.value, expr)
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # the user's factory: its own message, without our traceback
            raise CLIError(f"{expr!r} raised {type(e).__name__}: {e} (arguments on the command line are "
                           "Python literals; a factory that needs a tensor must be wrapped in a function "
                           "of its own file)") from None
    return _resolve_name(tree, module, expr)


def load_pattern(spec: str, default_attr: Optional[str] = None):
    """Load ``FILE.py[:FUNC | :FACTORY(ARGS)]``; without ``:FUNC`` take ``default_attr``."""
    path, expr = split_spec(spec)
    module = import_file(path)
    if expr is None:
        if default_attr is None or not hasattr(module, default_attr):
            raise CLIError(f"{path}: name the function, as in {path}:FUNC"
                           + (f" (no module-level {default_attr!r})" if default_attr else ""))
        expr = default_attr
    obj = evaluate_expr(module, expr)
    if obj is None:
        raise CLIError(f"{spec!r} evaluated to None")
    return obj


# --------------------------------------------------------------------------------------
# what a pattern spec may evaluate to
# --------------------------------------------------------------------------------------

def _arity(fn) -> Optional[int]:
    """Required positional parameters of ``fn`` (None when it cannot be told: ``*args``, builtins)."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return None
    n = 0
    for p in sig.parameters.values():
        if p.kind is p.VAR_POSITIONAL:
            return None
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty:
            n += 1
    return n


def pattern_parts(obj, where: str = "the pattern") -> Tuple[Optional[Any], Optional[Any]]:
    """``(mask_mod, score_mod)`` from what a pattern spec evaluated to.

    Accepted: a function of 4 arguments ``(b, h, q_idx, kv_idx)`` (a mask_mod) or of 5
    ``(score, b, h, q_idx, kv_idx)`` (a score_mod); a tuple or list of those, in any order,
    where ``None`` and non-callables (a :class:`~attndsl.Layout`, as ``neighborhood_2d`` returns)
    are skipped; a dict with keys ``mask_mod`` and/or ``score_mod``; a FlexAttention
    ``BlockMask`` (its ``mask_mod``).
    """
    if isinstance(obj, dict):
        unknown = sorted(set(map(str, obj)) - {"mask_mod", "score_mod"})
        if unknown:
            raise CLIError(f"{where}: a pattern dict has keys 'mask_mod' and/or 'score_mod', got {unknown}")
        mask, score = obj.get("mask_mod"), obj.get("score_mod")
        for what, fn, n in (("mask_mod", mask, 4), ("score_mod", score, 5)):
            if fn is not None and not callable(fn):
                raise CLIError(f"{where}: {what} is a {type(obj).__name__}, not a function of {n} arguments")
        if mask is None and score is None:
            raise CLIError(f"{where}: the dict holds neither a mask_mod nor a score_mod")
        return mask, score
    if type(obj).__name__ == "BlockMask" and callable(getattr(obj, "mask_mod", None)):
        return obj.mask_mod, None
    items = list(obj) if isinstance(obj, (tuple, list)) else [obj]
    mask = score = None
    for x in items:
        if x is None or (isinstance(obj, (tuple, list)) and not callable(x)):
            continue
        if not callable(x):
            raise CLIError(f"{where} is a {type(x).__name__}: expected a mask_mod (b, h, q_idx, kv_idx), a "
                           "score_mod (score, b, h, q_idx, kv_idx), a tuple of them or a dict "
                           "{'mask_mod': ..., 'score_mod': ...}")
        n = _arity(x)
        if n not in (4, 5):
            raise CLIError(f"{where}: cannot tell whether {getattr(x, '__name__', x)!r} is a mask_mod (4 arguments) "
                           f"or a score_mod (5 arguments){'' if n is None else f'; it takes {n}'}; return a "
                           "dict {'mask_mod': ..., 'score_mod': ...}")
        if (mask if n == 4 else score) is not None:
            raise CLIError(f"{where} holds two {'mask_mod' if n == 4 else 'score_mod'}s: combine them first "
                           "(attndsl.and_masks, attndsl.chain)")
        if n == 4:
            mask = x
        else:
            score = x
    if mask is None and score is None:
        raise CLIError(f"{where} holds no mask_mod or score_mod")
    return mask, score


def load_parts(spec: Optional[str], score_spec: Optional[str] = None) -> Tuple[Optional[Any], Optional[Any]]:
    """``(mask_mod, score_mod)`` named by ``PATTERN`` (``FILE.py``: its module-level ``mask_mod``
    and ``score_mod``; ``FILE.py:NAME`` or ``FILE.py:FACTORY(ARGS)``: see :func:`pattern_parts`)
    and by ``--score FILE.py[:FUNC]``."""
    if spec is None and score_spec is None:
        raise CLIError("name a pattern: FILE.py, FILE.py:FUNC or FILE.py:FACTORY(args) (and/or --score FILE.py:FUNC)")
    mask = score = None
    if spec is not None:
        path, expr = split_spec(spec)
        if expr is None:
            module = import_file(path)
            mask, score = getattr(module, "mask_mod", None), getattr(module, "score_mod", None)
            if mask is None and score is None:
                raise CLIError(f"{path} defines neither mask_mod nor score_mod; name one as {path}:FUNC")
        else:
            mask, score = pattern_parts(load_pattern(spec), repr(spec))
    if score_spec is not None:
        m2, s2 = pattern_parts(load_pattern(score_spec, default_attr="score_mod"), repr(score_spec))
        if m2 is not None or s2 is None:
            raise CLIError(f"--score {score_spec!r} is not a score_mod (score, b, h, q_idx, kv_idx)")
        if score is not None:
            raise CLIError(f"two score_mods: {spec!r} has one and --score names another; chain them in a file "
                           "(attndsl.chain)")
        score = s2
    return mask, score


# --------------------------------------------------------------------------------------
# argument types and checks
# --------------------------------------------------------------------------------------

def positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


def check_writable(path: str, what: str = "--out") -> None:
    """Refuse an output path that cannot be written, before any work."""
    p = Path(path).expanduser()
    if p.is_dir():
        raise CLIError(f"{what} {path}: is a directory, expected a file name")
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise CLIError(f"{what} {path}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK) or (p.exists() and not os.access(p, os.W_OK)):
        raise CLIError(f"{what} {path}: not writable")


def _require_matplotlib(what: str) -> None:
    if importlib.util.find_spec("matplotlib") is None:
        raise CLIError(f"{what} needs matplotlib: pip install 'attndsl[plot]' (or pip install matplotlib)")


# --------------------------------------------------------------------------------------
# subcommands
# --------------------------------------------------------------------------------------

def cmd_show(ns, out=None) -> int:
    out = out or sys.stdout
    mask_mod, score_mod = load_parts(ns.pattern, ns.score)
    import attndsl  # lazily: the compiler core
    attn = attndsl.compile(mask_mod=mask_mod, score_mod=score_mod)
    print(attn.source if getattr(ns, "source", False) else attn.explain(), file=out)
    return 0


def _as_mask(obj):
    """Factories like ``neighborhood_2d`` return ``(layout, mask)``: take the mask."""
    mask, _ = pattern_parts(obj)
    return mask


def cmd_tilemap(ns, out=None) -> int:
    out = out or sys.stdout
    check_writable(ns.out)
    _require_matplotlib("attndsl tilemap")
    obj, _score = load_parts(ns.pattern)
    if obj is None:
        raise CLIError(f"{ns.pattern!r} has no mask_mod: a tile map shows which tiles a mask visits")
    import attndsl  # lazily: the compiler core
    from attndsl.tilemap import map_tiles, save_tile_map, summary
    attn = attndsl.compile(mask_mod=obj, block_m=ns.block_m, block_n=ns.block_n)
    if ns.length is None and getattr(obj, "layout", None) is None:
        raise CLIError("the pattern declares no layout: give --length")
    if attn.spec.data_dependent:
        raise CLIError("the mask reads captured tensors (data-dependent): its tiles are classified on the device "
                       "per call, there is no static tile map")
    try:
        tmap = save_tile_map(attn, ns.out, ns.length, title=ns.title, grid_every=ns.grid_every, dpi=ns.dpi)
    except OSError as e:
        raise CLIError(f"--out {ns.out}: {e.strerror or e}") from None
    except ValueError as e:  # matplotlib: an image format it does not write
        raise CLIError(f"--out {ns.out}: {e}") from None
    tiles = map_tiles(attn)
    print(f"{ns.out}: {summary(tmap)} (tiles {tiles[0]}x{tiles[1]}; blue = full, orange = partial, "
          f"white = skipped)", file=out)
    return 0


def _dtype_list(text: str) -> List[str]:
    from attndsl.bench import DTYPES
    names = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in names if t not in DTYPES]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of {', '.join(DTYPES)}, got {text!r}")
    return names


def cmd_bench(ns, out=None) -> int:
    out = out or sys.stdout
    for path, what in ((ns.json, "--json"), (ns.plot, "--plot")):
        if path:
            check_writable(path, what)
    if ns.plot:
        _require_matplotlib("--plot")
    from attndsl import bench as B  # lazily: torch
    passes = {"fwd": ("fwd",), "fwd+bwd": ("fwd+bwd",), "both": ("fwd", "fwd+bwd")}[ns.passes]
    try:
        cfg = B.BenchConfig(B=ns.B, Hq=ns.H, Hkv=ns.Hkv, Lq=ns.L, Lkv=ns.Lkv, D=ns.D, dtype=ns.dtype,
                            device=ns.device, passes=passes, quick=ns.quick)
    except ValueError as e:
        raise CLIError(str(e)) from None
    for spec in (ns.pattern, ns.score):  # a missing file is a bad argument on any machine
        if spec is not None and not Path(split_spec(spec)[0]).expanduser().is_file():
            raise CLIError(f"no such file: {split_spec(spec)[0]}")
    if ns.pattern is None and ns.score is None:
        load_parts(None)  # raises: name a pattern
    if cfg.device == "cuda" and not _cuda_available():
        print("attndsl bench: no CUDA device (torch.cuda.is_available() is False): timings need a GPU; "
              "'--device cpu' runs a dry run in Triton's interpreter at small sizes", file=sys.stderr)
        return B.EXIT_NO_GPU
    mask_mod, score_mod = load_parts(ns.pattern, ns.score)
    layout = getattr(mask_mod, "layout", None)
    if layout is not None and ns.L_given is False:
        cfg.Lq = cfg.Lkv = len(layout)
    name = ns.name or (ns.pattern or "") + (f" + {ns.score}" if ns.score else "")
    try:
        rows = B.bench(mask_mod, score_mod, cfg, name=name,
                       log=None if ns.quiet else (lambda s: print(f"attndsl bench: {s}", file=sys.stderr)))
    except B.CheckFailed as e:
        print(f"attndsl bench: check failed, nothing timed: {e}", file=sys.stderr)
        return 1
    except ValueError as e:  # shapes that do not fit the pattern (a layout's length)
        raise CLIError(str(e)) from None
    if ns.markdown:
        print(B.markdown_table(rows), file=out)
    else:
        for r in rows:
            flex = "—" if r["flex_ms"] is None else f"{r['flex_ms']:.3f} ms"
            sdpa = "—" if r["sdpa_ms"] is None else f"{r['sdpa_ms']:.3f} ms"
            peak = "" if r["peak_mib"] is None else f"  peak {r['peak_mib']:.0f} MiB"
            print(f"{r['pass']:8} {r['api']:10} ours {r['ours_ms']:.3f} ms  Flex {flex}  SDPA {sdpa}  "
                  f"host {r['host_us']:.0f} µs{peak}", file=out)
    if ns.json:
        with open(ns.json, "w") as f:
            json.dump(rows, f, indent=1)
            f.write("\n")
        print(f"wrote {ns.json}", file=sys.stderr)
    if ns.plot:
        B.plot_rows(rows, ns.plot)
        print(f"wrote {ns.plot}", file=sys.stderr)
    return 0


def _cuda_available() -> bool:
    import torch
    return torch.cuda.is_available()


def cmd_check(ns, out=None) -> int:
    out = out or sys.stdout
    mask_mod, score_mod = load_parts(ns.pattern, ns.score)
    if ns.device == "cuda" and not _cuda_available():
        raise CLIError("--device cuda: no CUDA device (torch.cuda.is_available() is False)")
    from attndsl.bench import DTYPES
    from attndsl.check import check_pattern
    res = check_pattern(mask_mod, score_mod, max_examples=ns.max_examples, max_len=ns.max_len,
                        max_heads=ns.max_heads, dtypes=[DTYPES[d] for d in ns.dtypes], grads=not ns.no_grads,
                        device=ns.device, seed=ns.seed)
    what = "forward" + ("" if ns.no_grads else " and gradients")
    if res.passed:
        print(f"attndsl check: PASS: {res.examples} examples match the float64 reference ({what}; "
              f"L <= {ns.max_len}, H <= {ns.max_heads}, dtypes {','.join(ns.dtypes)}, device {ns.device})", file=out)
        return 0
    print(f"attndsl check: FAIL after {res.examples} examples; hypothesis's minimal failing example:\n"
          f"{res.example}\n{res.error}", file=out)
    return 1


def _tree_size(d: Path) -> Tuple[int, int]:
    files = size = 0
    for root, _dirs, names in os.walk(d):
        for n in names:
            files += 1
            with contextlib.suppress(OSError):
                size += os.lstat(os.path.join(root, n)).st_size
    return files, size


def _unsafe_to_clear(d: Path) -> Optional[str]:
    d = d.resolve()
    forbidden = {Path("/").resolve(), Path.home().resolve(), Path.cwd().resolve(),
                 Path(__file__).resolve().parents[1]}
    if d in forbidden or len(d.parts) < 3:
        return f"refusing to clear {d}: it is not a dedicated cache directory"
    return None


def cmd_cache(ns, out=None) -> int:
    out = out or sys.stdout
    from attndsl.runtime.cache import cache_dir  # lazily: the compiler core
    d = Path(cache_dir())
    if not d.exists():
        print(f"{d} (does not exist yet)", file=out)
        return 0
    files, size = _tree_size(d)
    if not ns.clear:
        print(f"{d}\n{files} files, {size / 2**20:.2f} MiB", file=out)
        return 0
    why = _unsafe_to_clear(d)
    if why:
        raise CLIError(why)
    for child in d.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()
    print(f"cleared {d}: removed {files} files, {size / 2**20:.2f} MiB", file=out)
    return 0


# --------------------------------------------------------------------------------------
# the parser
# --------------------------------------------------------------------------------------

class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad argument as one line, ``attndsl: error: ...``, and exits 2."""

    def error(self, message: str):
        self.exit(2, f"attndsl: error: {message} (see '{self.prog} --help')\n")


PATTERN_HELP = ("FILE.py (its module-level mask_mod/score_mod), FILE.py:FUNC or FILE.py:FACTORY(literal args); "
                "the object may be a mask_mod, a score_mod, a tuple of them (a Layout in it is skipped) or a dict "
                "{'mask_mod': ..., 'score_mod': ...}")


def _pattern_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("pattern", nargs="?", default=None, metavar="PATTERN", help="the pattern")
    p.add_argument("--score", default=None, metavar="FILE.py[:FUNC]", help="a score_mod (with a mask PATTERN)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="attndsl", description="attndsl: a compiler-driven attention DSL. A PATTERN is " + PATTERN_HELP
                + ".", epilog="'attndsl COMMAND --help' describes each command. Also: python -m attndsl.")
    p.add_argument("--version", action="version", version=f"attndsl {_version()}")
    sub = p.add_subparsers(dest="command", metavar="{show,bench,check,tilemap,cache}")
    sub.required = True

    s = sub.add_parser("show", help="print the IR, visit plan and generated source summary of a pattern",
                       description="Print attndsl.compile(mask_mod, score_mod).explain(), or with --source the "
                                   "generated Triton module. PATTERN is " + PATTERN_HELP + ".")
    _pattern_arguments(s)
    s.add_argument("--source", action="store_true", help="print the generated Triton source instead")

    b = sub.add_parser("bench", help="time a pattern against FlexAttention and SDPA (needs a GPU)",
                       description="Check, then time, PATTERN forward and forward+backward: the one-shot "
                                   "attndsl.attention call and attndsl.compile's, against "
                                   "torch.compile(flex_attention) (block mask built once, timed apart) and SDPA "
                                   "(no mask/score_mod, or causal). Exits 3 without a CUDA device, 1 when the "
                                   "check fails. The protocol cases of the repository run with "
                                   "'python -m benchmarks' from a checkout. PATTERN is " + PATTERN_HELP + ".")
    _pattern_arguments(b)
    b.add_argument("--B", type=positive_int, default=1, help="batch (default 1)")
    b.add_argument("--H", type=positive_int, default=16, help="query heads (default 16)")
    b.add_argument("--Hkv", type=positive_int, default=None, help="key/value heads (default: --H)")
    b.add_argument("--L", type=positive_int, default=None,
                   help="query length (default 4096, or the length of the mask's layout)")
    b.add_argument("--Lkv", type=positive_int, default=None, help="key length (default: --L)")
    b.add_argument("--D", type=positive_int, default=64, help="head dim (default 64)")
    b.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16", help="input dtype (default bf16)")
    b.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                   help="cuda (default), or cpu: a dry run in Triton's interpreter (tiny shapes; eager Flex)")
    b.add_argument("--pass", dest="passes", choices=("fwd", "fwd+bwd", "both"), default="both",
                   help="what to time (default both)")
    b.add_argument("--quick", action="store_true", help="fewer repetitions")
    b.add_argument("--name", default=None, help="the rows' 'case' (default: PATTERN)")
    b.add_argument("--json", default=None, metavar="FILE", help="write the rows as JSON")
    b.add_argument("--markdown", action="store_true", help="print a markdown table")
    b.add_argument("--plot", default=None, metavar="FILE.png", help="draw a bar chart (matplotlib)")
    b.add_argument("--quiet", action="store_true", help="no progress lines on stderr")

    k = sub.add_parser("check", help="property-test a pattern against the float64 reference (hypothesis)",
                       description="Draw shapes (batch, GQA heads, Lq != Lkv, lengths near tile boundaries), "
                                   "dtypes, tiles and seeds with hypothesis; compare the compiled pattern's output, "
                                   "logsumexp and gradients with attndsl.reference; print the minimal failing "
                                   "example. Exits 0 on a pass, 1 on a failure. PATTERN is " + PATTERN_HELP + ".")
    _pattern_arguments(k)
    k.add_argument("--max-examples", type=positive_int, default=20, help="examples to try (default 20)")
    k.add_argument("--max-len", type=positive_int, default=64, help="longest sequence drawn (default 64)")
    k.add_argument("--max-heads", type=positive_int, default=4, help="most query heads drawn (default 4)")
    k.add_argument("--dtypes", type=_dtype_list, default=["fp32", "fp16", "bf16"],
                   help="comma-separated input dtypes (default fp32,fp16,bf16)")
    k.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="cpu (default; Triton's interpreter) or cuda")
    k.add_argument("--seed", type=int, default=None, help="repeatable draws")
    k.add_argument("--no-grads", action="store_true", help="compare the forward only")

    c = sub.add_parser("cache", help="show or clear the kernel source cache")
    c.add_argument("--clear", action="store_true", help="delete every entry of the cache directory")

    t = sub.add_parser("tilemap", help="draw the key tiles each query tile visits (full / partial / skipped)",
                       description="Replay the forward visit plan of a mask and draw it with matplotlib: one cell "
                                   "per (query tile, key tile), tile indices on the axes; blue = full (no mask), "
                                   "orange = partial, white = skipped. PATTERN is " + PATTERN_HELP + ".")
    t.add_argument("pattern", metavar="PATTERN", help="the mask")
    t.add_argument("--out", required=True, help="image file to write (.png, .svg, .pdf)")
    t.add_argument("--length", type=positive_int, default=None,
                   help="sequence length (default: the pattern's layout)")
    t.add_argument("--block-m", type=positive_int, default=None, help="query tile size (default: the layout's choice)")
    t.add_argument("--block-n", type=positive_int, default=None, help="key tile size (default: the layout's choice)")
    t.add_argument("--grid-every", type=positive_int, default=None,
                   help="light grid lines every N tiles (default: every tile up to 48 tiles a side)")
    t.add_argument("--title", default=None, help="the title (default: pattern, length, tiles, visited share)")
    t.add_argument("--dpi", type=positive_int, default=110, help="resolution of a PNG (default 110)")
    return p


def _version() -> str:
    try:
        from importlib.metadata import version
        return version("attndsl")
    except Exception:  # noqa: BLE001 - a source checkout that is not installed
        return "0.1.0 (source)"


COMMANDS = {"show": cmd_show, "bench": cmd_bench, "check": cmd_check, "cache": cmd_cache, "tilemap": cmd_tilemap}


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line; returns the exit code (0 ok, 1 a check failed, 2 a bad argument or
    pattern, 3 ``bench`` without a CUDA device)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"] and "--cases" in argv:
        print("attndsl: error: the protocol cases (--cases) run with 'python -m benchmarks' from a checkout; "
              "'attndsl bench PATTERN' times your own pattern", file=sys.stderr)
        return 2
    parser = build_parser()
    try:
        ns = parser.parse_args(argv)
    except SystemExit as e:  # --help / --version (0) or a bad argument (2, its line already printed)
        return int(e.code or 0)
    if ns.command == "bench":
        ns.L_given = ns.L is not None
        ns.L = 4096 if ns.L is None else ns.L
    prog = "attndsl"
    try:
        return COMMANDS[ns.command](ns)
    except CLIError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        from attndsl.dsl.errors import PatternError
        if not isinstance(e, PatternError):
            raise
        print(f"{prog}: error: {e}", file=sys.stderr)  # names the pattern's file and line
        return 2


if __name__ == "__main__":
    sys.exit(main())

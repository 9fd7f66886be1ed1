"""The ``attndsl`` command line.

    attndsl show FILE.py:FUNC [--score FILE.py:FUNC]   print IR, visit plan and generated source
    attndsl bench [--cases ...] [--L ...] [--bwd] ...  attndsl vs FlexAttention / SDPA (GPU)
    attndsl cache [--clear]                            show or empty the kernel source cache
    attndsl tilemap FILE.py:FUNC --out MAP.png [...]   picture of the key tiles each query tile visits

A pattern is named ``FILE.py`` (module-level ``mask_mod`` / ``score_mod``), ``FILE.py:NAME``
(a module-level function) or ``FILE.py:FACTORY(ARGS)`` (a factory called with literal
arguments, e.g. ``patterns/sliding_window.py:sliding_window(256, causal=True)``). The
arguments are read with ``ast.literal_eval``: numbers, strings, tuples, lists, dicts,
booleans and None; nothing else is evaluated.

The compiler core, the harness and torch are imported lazily, so ``attndsl --help`` is fast
and this module imports without them.
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import hashlib
import importlib.util
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
# subcommands
# --------------------------------------------------------------------------------------

def cmd_show(ns, out=None) -> int:
    out = out or sys.stdout
    if ns.pattern is None and ns.score is None:
        raise CLIError("show needs a pattern (FILE.py:FUNC) and/or --score FILE.py:FUNC")
    mask_mod = score_mod = None
    if ns.pattern is not None:
        path, expr = split_spec(ns.pattern)
        if expr is None:
            module = import_file(path)
            mask_mod = getattr(module, "mask_mod", None)
            score_mod = getattr(module, "score_mod", None)
            if mask_mod is None and score_mod is None:
                raise CLIError(f"{path} defines neither mask_mod nor score_mod; name one as {path}:FUNC")
        else:
            mask_mod = _as_mask(load_pattern(ns.pattern))
    if ns.score is not None:
        score_mod = load_pattern(ns.score, default_attr="score_mod")
    import attndsl  # lazily: the compiler core
    attn = attndsl.compile(mask_mod=mask_mod, score_mod=score_mod)
    print(attn.explain(), file=out)
    return 0


def _as_mask(obj):
    """Factories like ``neighborhood_2d`` return ``(layout, mask)``: take the mask."""
    if isinstance(obj, tuple):
        obj = next((x for x in obj if callable(x)), obj)
    return obj


def cmd_tilemap(ns, out=None) -> int:
    out = out or sys.stdout
    obj = _as_mask(load_pattern(ns.pattern, default_attr="mask_mod"))
    if not callable(obj):
        raise CLIError(f"{ns.pattern!r} is not a mask_mod")
    import attndsl  # lazily: the compiler core
    from attndsl.tilemap import map_tiles, save_tile_map, summary
    attn = attndsl.compile(mask_mod=obj, block_m=ns.block_m, block_n=ns.block_n)
    if ns.length is None and getattr(obj, "layout", None) is None:
        raise CLIError("the pattern declares no layout: give --length")
    tmap = save_tile_map(attn, ns.out, ns.length, scale=ns.scale, grid_every=ns.grid_every)
    tiles = map_tiles(attn)
    print(f"{ns.out}: {summary(tmap)} (tiles {tiles[0]}x{tiles[1]}; blue = full, orange = partial, "
          f"white = skipped)", file=out)
    return 0


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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="attndsl", description="attndsl: a compiler-driven attention DSL.")
    sub = p.add_subparsers(dest="command", metavar="{show,bench,cache,tilemap}")
    sub.required = True
    s = sub.add_parser("show", help="print the IR, visit plan and generated source of a pattern",
                       description="Print attndsl.compile(mask_mod, score_mod).explain(). PATTERN is "
                                   "FILE.py (module-level mask_mod/score_mod), FILE.py:FUNC or "
                                   "FILE.py:FACTORY(literal args).")
    s.add_argument("pattern", nargs="?", default=None, metavar="FILE.py[:FUNC]", help="the mask_mod")
    s.add_argument("--score", default=None, metavar="FILE.py[:FUNC]", help="the score_mod")
    sub.add_parser("bench", add_help=False,
                   help="time attndsl against FlexAttention and SDPA (see 'attndsl bench --help')")
    c = sub.add_parser("cache", help="show or clear the kernel source cache")
    c.add_argument("--clear", action="store_true", help="delete every entry of the cache directory")
    t = sub.add_parser("tilemap", help="write a PNG of the key tiles each query tile visits (full / partial)",
                       description="Replay the forward visit plan of a mask and draw it: one pixel block per "
                                   "(query tile, key tile); blue = full (no mask), orange = partial, white = "
                                   "skipped. PATTERN is FILE.py:FUNC or FILE.py:FACTORY(literal args); a factory "
                                   "may return (layout, mask).")
    t.add_argument("pattern", metavar="FILE.py[:FUNC]", help="the mask_mod")
    t.add_argument("--out", required=True, help="PNG file to write")
    t.add_argument("--length", type=int, default=None, help="sequence length (default: the pattern's layout)")
    t.add_argument("--block-m", type=int, default=None, help="query tile size (default: the layout's choice)")
    t.add_argument("--block-n", type=int, default=None, help="key tile size (default: the layout's choice)")
    t.add_argument("--scale", type=int, default=None, help="pixels per tile (default: fit ~512 px)")
    t.add_argument("--grid-every", type=int, default=None, help="light grid lines every N tiles")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "bench":
        # forwarded untouched: the harness owns its arguments (and its --help); it lives in the
        # repository's benchmarks/ folder, not in the installed package
        try:
            from benchmarks import harness
        except ImportError:
            print("attndsl: error: the protocol benchmark harness lives in the repository's benchmarks/ "
                  "folder; run 'python -m benchmarks' from a checkout", file=sys.stderr)
            return 2
        parser = harness.build_parser()
        parser.prog = "attndsl bench"
        ns = parser.parse_args(argv[1:])
        return harness.main_from_namespace(ns, argv[1:])
    parser = build_parser()
    ns = parser.parse_args(argv)
    try:
        if ns.command == "show":
            return cmd_show(ns)
        if ns.command == "cache":
            return cmd_cache(ns)
        if ns.command == "tilemap":
            return cmd_tilemap(ns)
    except CLIError as e:
        print(f"attndsl: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        from attndsl.dsl.errors import PatternError
        if not isinstance(e, PatternError):
            raise
        print(f"attndsl: error: {e}", file=sys.stderr)  # names the pattern's file and line
        return 2
    parser.error(f"unknown command {ns.command!r}")
    return 2


if __name__ == "__main__":
    sys.exit(main())

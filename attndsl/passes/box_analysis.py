"""Block analysis over layout coordinates: the *box* of tiles a tile must visit.

For a mask written on layout coordinates (``Layout.coords``, the ``coord`` IR op), the keys a
query tile needs are, in tile-major order, not one contiguous range of positions but a box of
key tiles in tile coordinates (e.g. a 3x3 block of 8x8 tiles around a 2-D window). This pass
derives that box in closed form, per tile of the other index, as IR the kernel evaluates:

1. The layout is found from the ``coord`` nodes (all of one layout, of ``q`` and ``kv`` only);
   the kernel tile sizes must cut the grid into boxes (``Grid.block_shape``) and line up with the
   grid start.
2. ``coord(target)`` becomes one variable per axis (``kv_c0, kv_c1, ...``) and ``coord(other)``
   likewise; the other tile's coordinates lie in ``[{other}_c{a}_lo, {other}_c{a}_hi]``, the
   corners of its box (axes where a tile is one coordinate wide keep an exact variable, so that
   expressions of them stay exact). Atoms that read the raw target index are decided for target
   positions inside the grid (``kv >= N`` is false there); if one cannot be, there is no box.
3. Every atom is solved for the one target coordinate it reads with the 1-D solver of
   ``block_analysis`` (affine comparisons, ``abs``, clamps, ``//`` by constants); an atom reading
   several target axes is opaque. The formula then gives per axis an *outer* range (every target
   coordinate the mask may allow) and an *inner* range (the box where it holds for every row):
   conjunctions intersect per axis, disjunctions take the hull (and ask for per-tile checks), and
   disjunctions with tile-uniform atoms (``is_text(q) | window``) switch between the whole grid
   and the window without checks. Because a separable mask's "some pair of the two tiles is
   allowed" factorises over axes, the outer box is exact for conjunctions of per-axis windows.
4. Target positions outside the grid (prefix/suffix tokens) are *extra* 1-D ranges, from the
   1-D analysis of the mask with the raw target atoms decided for that region.
5. When the box is not exact (opaque atoms, unions), a per-tile classification over the tile
   boxes (interval analysis on coordinates) lets the kernel skip empty tiles and the mask on full
   ones; it is exact when each factor it combines is (e.g. radial attention, whose frame axis is
   one coordinate per tile).

The result is a :class:`~attndsl.spec.VisitBox`; codegen (``codegen/box.py``) turns it into one
flattened loop over the box's tiles (div/mod of the iteration counter) followed by the extras.
"""
from __future__ import annotations

from .. import ir
from ..ir import Node, const, node
from ..ir.coords import Grid
from ..spec import ExtraRange, VisitBox, VisitRange
from .block_analysis import All, Any, Free, Opaque, _Ranges, _Solver, nnf, tile_class, tile_range
from .bounds import IntervalAnalysis
from .simplify import simplify


def find_grid(mask: Node) -> Grid | None:
    """The one layout whose coordinates the mask reads (of ``q``/``kv`` only), else None."""
    grids = set()
    for n in ir.topo_order([mask]):
        if n.op == "coord":
            a = n.args[0]
            if not (a.op == "var" and a.attr in ("q", "kv")):
                return None
            grids.add((tuple(n.attr[0]), tuple(n.attr[1]), n.attr[2]))
    if len(grids) != 1:
        return None
    shape, tile, prefix = grids.pop()
    return Grid(shape, tile, prefix)


class _AxisF:
    """A formula (of the 1-D solver) over one target axis."""

    __slots__ = ("axis", "f")

    def __init__(self, axis, f):
        self.axis, self.f = axis, f


class _AxisRanges(_Ranges):
    def __init__(self, t_max: Node, ia: IntervalAnalysis):
        self.t_max = t_max
        self.ia = ia
        self.check = False


def _flatten(f, cls):
    out = []
    for p in f.parts:
        out.extend(_flatten(p, cls) if isinstance(p, cls) else [p])
    return out


def _decide(m: Node, var: str, lo: Node, hi: Node) -> Node | None:
    """Replace atoms of the NNF ``m`` that read ``var`` by their value for ``var in [lo, hi]``;
    None when one of them is not decided there."""
    ia = IntervalAnalysis({var: (lo, hi)})
    fv: dict = {}
    memo: dict = {}

    def go(n):
        r = memo.get(n, ...)
        if r is not ...:
            return r
        if n.op in ("and", "or"):
            a, b = go(n.args[0]), go(n.args[1])
            r = None if a is None or b is None else node(n.op, a, b)
        elif var not in ir.free_vars(n, fv):
            r = n
        else:
            must, may = (simplify(x) for x in ia(n))
            r = const(True) if ir.is_const(must, True) else const(False) if ir.is_const(may, False) else None
        memo[n] = r
        return r

    r = go(m)
    return None if r is None else simplify(r)


def _decide_some(m: Node, var: str, lo: Node, hi: Node) -> Node:
    """Like :func:`_decide` but leaves undecided atoms as they are."""
    ia = IntervalAnalysis({var: (lo, hi)})
    fv: dict = {}

    def go(n):
        if n.op in ("and", "or"):
            return node(n.op, go(n.args[0]), go(n.args[1]))
        if var not in ir.free_vars(n, fv):
            return n
        must, may = (simplify(x) for x in ia(n))
        return const(True) if ir.is_const(must, True) else const(False) if ir.is_const(may, False) else n

    return simplify(go(nnf(simplify(m))))


#: an upper bound on any position, for deciding masks over whole regions with constant bounds
_ANY_POSITION = 1 << 40


def _region_empty(mask: Node, target: str, other: str, r_lo: Node, r_hi: Node) -> bool:
    """True when no pair has the target in ``[r_lo, r_hi]`` (a non-grid region; a symbolic end such
    as ``kv_max`` is taken as unbounded) and any other index.

    With constant bounds the interval analysis folds to a constant where the window's clamps decide
    it: tokens past the grid have first-axis coordinates past its end, which a clamped window
    (neighborhood, sliding tile) never reaches. A region found empty needs no visit range at all,
    so the kernel's loop keeps no per-tile test around its body (which would stop pipelining)."""
    if r_hi.op != "const":
        r_hi = const(_ANY_POSITION)
    ia = IntervalAnalysis({target: (r_lo, r_hi), other: (const(0), const(_ANY_POSITION))})
    _, may = ia(simplify(mask))
    return ir.is_const(simplify(may), False)


class _Boxes:
    """Per-axis outer/inner ranges of a formula over the target coordinates."""

    def __init__(self, grid: Grid, target_vars, ia: IntervalAnalysis):
        self.grid = grid
        self.tv = target_vars
        self.ia = ia
        self.nd = grid.ndim
        self.check = False

    def full(self):
        return [(const(0), const(s - 1)) for s in self.grid.shape]

    def empty(self):
        return [(const(1), const(0)) for _ in self.grid.shape]

    def formula(self, n: Node, fv: dict):
        if n.op == "and":
            return All((self.formula(n.args[0], fv), self.formula(n.args[1], fv)))
        if n.op == "or":
            return Any((self.formula(n.args[0], fv), self.formula(n.args[1], fv)))
        names = ir.free_vars(n, fv)
        axes = [a for a, v in enumerate(self.tv) if v in names]
        if not axes:
            return Free(n)
        if len(axes) > 1:
            return Opaque(n)
        return _AxisF(axes[0], _Solver(self.tv[axes[0]]).formula(n))

    def _where(self, c, x, y):
        return [(node("where", c, a[0], b[0]), node("where", c, a[1], b[1])) for a, b in zip(x, y)]

    def ranges(self, f):
        """``(outer, inner)``: lists of per-axis ``(lo, hi)``."""
        if isinstance(f, Free):
            must, may = self.ia(f.atom)
            if may.op != "const":
                self.check = True
            return self._where(may, self.full(), self.empty()), self._where(must, self.full(), self.empty())
        if isinstance(f, Opaque):
            self.check = True
            return self.full(), self.empty()
        if isinstance(f, _AxisF):
            a = f.axis
            rg = _AxisRanges(const(self.grid.shape[a] - 1), self.ia)
            o, i = rg.outer(f.f), rg.inner(f.f)
            self.check |= rg.check
            outer, inner = self.full(), self.full()
            outer[a], inner[a] = o, i
            return outer, inner
        if isinstance(f, All):
            parts = [self.ranges(p) for p in _flatten(f, All)]
            outer, inner = parts[0]
            for o2, i2 in parts[1:]:
                outer = [(node("maximum", x[0], y[0]), node("minimum", x[1], y[1])) for x, y in zip(outer, o2)]
                inner = [(node("maximum", x[0], y[0]), node("minimum", x[1], y[1])) for x, y in zip(inner, i2)]
            return outer, inner
        # Any: tile-uniform parts switch between everything and the rest
        parts = _flatten(f, Any)
        free = [p for p in parts if isinstance(p, Free)]
        rest = [p for p in parts if not isinstance(p, Free)]
        if not rest:
            outer, inner = self.empty(), self.empty()
        elif len(rest) == 1:
            outer, inner = self.ranges(rest[0])
        else:
            self.check = True
            boxes = [self.ranges(p) for p in rest]
            outer, inner = self._hull([b[0] for b in boxes]), self._pick([b[1] for b in boxes])
        if free:
            mays, musts = zip(*((self.ia(p.atom)[1], self.ia(p.atom)[0]) for p in free))
            may, must = mays[0], musts[0]
            for x in mays[1:]:
                may = node("or", may, x)
            for x in musts[1:]:
                must = node("or", must, x)
            outer = self._where(may, self.full(), outer)
            inner = self._where(must, self.full(), inner)
        return outer, inner

    @staticmethod
    def _nonempty(box):
        ne = None
        for lo, hi in box:
            c = node("le", lo, hi)
            ne = c if ne is None else node("and", ne, c)
        return ne

    def _hull(self, boxes):
        big = [const(s) for s in self.grid.shape]
        out = None
        for b in boxes:
            ne = self._nonempty(b)
            cur = [(node("where", ne, lo, big[a]), node("where", ne, hi, const(-1))) for a, (lo, hi) in enumerate(b)]
            out = cur if out is None else [(node("minimum", x[0], y[0]), node("maximum", x[1], y[1]))
                                           for x, y in zip(out, cur)]
        return out

    def _pick(self, boxes):
        out = boxes[-1]
        for b in reversed(boxes[:-1]):
            out = self._where(self._nonempty(b), b, out)
        return out


def box_range(mask: Node, target: str, block_t: int, block_o: int) -> VisitBox | None:
    """The box visit plan of ``target`` tiles (``block_t`` tokens) per tile of the other index
    (``block_o`` tokens), or None when the mask is not written on one layout's coordinates or
    the tile sizes do not cut that layout into boxes."""
    grid = find_grid(mask)
    if grid is None:
        return None
    ext_t, ext_o = grid.block_shape(block_t), grid.block_shape(block_o)
    if ext_t is None or ext_o is None or grid.prefix % block_t or grid.prefix % block_o:
        return None
    other = "q" if target == "kv" else "kv"
    nd = grid.ndim
    tvars = [f"{target}_c{a}" for a in range(nd)]
    ovars = [f"{other}_c{a}" for a in range(nd)]
    mapping = {}
    for a in range(nd):
        mapping[ir.coord(ir.var(target), grid.attr(a))] = ir.var(tvars[a])
        mapping[ir.coord(ir.var(other), grid.attr(a))] = ir.var(ovars[a])
    m = simplify(ir.substitute(simplify(mask), mapping))
    if any(n.op == "coord" for n in ir.topo_order([m])):
        return None
    g_lo, g_hi = const(grid.prefix), const(grid.prefix + grid.size - 1)
    if target in ir.free_vars(m):
        m = _decide(nnf(m), target, g_lo, g_hi)
        if m is None:
            return None
    # the other tile: its coordinate box (exact variables where it is one coordinate wide)
    env = {other: (ir.var(f"{other}_lo"), ir.var(f"{other}_hi"))}
    for a in range(nd):
        if ext_o[a] > 1:
            env[ovars[a]] = (ir.var(f"{ovars[a]}_lo"), ir.var(f"{ovars[a]}_hi"))
    ia = IntervalAnalysis(env)
    bx = _Boxes(grid, tvars, ia)
    f = bx.formula(nnf(m), {})
    outer, inner = bx.ranges(f)
    outer = tuple((simplify(lo), simplify(hi)) for lo, hi in outer)
    inner = tuple((simplify(lo), simplify(hi)) for lo, hi in inner)
    full = nonempty = None
    exact_check = False
    if bx.check:
        # residues of a coordinate that varies inside a tile (dilation: x % d == q % d) defeat
        # interval reasoning when a tile straddles periods: the kernel then also evaluates the mask
        varying = {tvars[a] for a in range(nd) if ext_t[a] > 1}
        fv: dict = {}
        exact_check = any(n.op == "mod" and ir.free_vars(n.args[0], fv) & varying for n in ir.topo_order([m]))
        env2 = dict(env)
        for a in range(nd):
            if ext_t[a] > 1:
                env2[tvars[a]] = (ir.var(f"{tvars[a]}_lo"), ir.var(f"{tvars[a]}_hi"))
        must, may = IntervalAnalysis(env2)(m)
        full, nonempty = simplify(must), simplify(may)
    # target positions outside the grid: 1-D ranges of the mask restricted to each region
    t_max = ir.var(f"{target}_max")
    regions = []
    if grid.prefix:
        regions.append((const(0), const(grid.prefix - 1)))
    regions.append((const(grid.prefix + grid.size), t_max))
    extras = []
    for r_lo, r_hi in regions:
        if _region_empty(mask, target, other, r_lo, r_hi):
            continue
        mr = _decide_some(mask, target, r_lo, r_hi)
        if ir.is_const(mr, False):
            continue
        tr = tile_range(mr, target)
        o = (simplify(node("maximum", tr.outer[0], r_lo)), simplify(node("minimum", tr.outer[1], r_hi)))
        i = (simplify(node("maximum", tr.inner[0], r_lo)), simplify(node("minimum", tr.inner[1], r_hi)))
        cls = tile_class(mr) if tr.tile_check else (None, None)
        extras.append(ExtraRange(VisitRange(target, o, i, tr.tile_check), *cls))
    return VisitBox(target=target, grid=(grid.shape, grid.tile, grid.prefix), block=block_t, other_block=block_o,
                    tile_shape=ext_t, other_shape=ext_o, box_outer=outer, box_inner=inner, tile_check=bx.check,
                    tile_full=full, tile_nonempty=nonempty, extras=tuple(extras), mask=m,
                    exact_check=exact_check, flat=_flat(mask, target))


def _flat(mask: Node, target: str) -> VisitRange:
    """The plain 1-D analysis, kept beside the box for consumers that want one contiguous range."""
    tr = tile_range(mask, target)
    return VisitRange(target, tr.outer, tr.inner, tr.tile_check)


KERNEL_TILE_SIZES = (64, 128, 32, 16)


#: the backward kernels hold more float32 tiles than the forward (dK, dV, P, dP or dQ, P, dP):
#: their inner tile (queries for dK/dV, keys for dQ) is capped here when the layout allows it,
#: as the dense kernels' defaults do (dK/dV 64x128, dQ 128x64)
BWD_INNER_TILE = 64


def box_plans(mask: Node, block_m=None, block_n=None):
    """``(fwd, dkdv, dq, tiles, dkdv_tiles, dq_tiles)`` for a mask on layout coordinates, or None.

    ``fwd`` and ``dq`` are VisitBoxes of key tiles per query tile, ``dkdv`` of query tiles per key
    tile; each kernel gets its own ``(block_m, block_n)``. Unspecified forward tile sizes are the
    first of ``KERNEL_TILE_SIZES`` that cut the layout's grid into boxes (e.g. one 8x8 layout tile
    per 64-token kernel tile); the backward kernels cap their inner tile at ``BWD_INNER_TILE``."""
    grid = find_grid(mask)
    if grid is None:
        return None

    def ok(b):
        return b is not None and grid.block_shape(b) is not None and grid.prefix % b == 0

    if block_m is None or block_n is None:
        pick = next((s for s in KERNEL_TILE_SIZES if ok(s)), None)
        block_m, block_n = block_m or pick, block_n or pick
    if not (ok(block_m) and ok(block_n)):
        return None

    def cap(b):
        return BWD_INNER_TILE if b > BWD_INNER_TILE and ok(BWD_INNER_TILE) else b

    tiles, dkdv_tiles, dq_tiles = (block_m, block_n), (cap(block_m), block_n), (block_m, cap(block_n))
    fwd = box_range(mask, "kv", block_n, block_m)
    dkdv = box_range(mask, "q", *dkdv_tiles)
    dq = fwd if dq_tiles == tiles else box_range(mask, "kv", dq_tiles[1], dq_tiles[0])
    if fwd is None or dkdv is None or dq is None:
        return None
    return fwd, dkdv, dq, tiles, dkdv_tiles, dq_tiles


def required_length(spec) -> int:
    """Sequences must hold the whole grid for box plans (0 when the spec has none)."""
    box = spec.fwd_range
    if not isinstance(box, VisitBox):
        return 0
    g = Grid(*box.grid)
    return g.prefix + g.size

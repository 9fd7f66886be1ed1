"""The IR: interning, the structural hash (the cache key) and the printer."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import attndsl
from attndsl import ir
from attndsl.dsl import trace

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
q, kv, h = ir.var("q"), ir.var("kv"), ir.var("h")
N, C = ir.node, ir.const


# --- interning -------------------------------------------------------------------------------
def test_same_structure_is_same_object():
    a = N("and", N("ge", q, kv), N("lt", N("sub", q, kv), C(4)))
    b = N("and", N("ge", q, kv), N("lt", N("sub", q, kv), C(4)))
    assert a is b
    assert a.args[1].args[0] is N("sub", q, kv)
    assert ir.var("q") is q and ir.const(4) is C(4)


def test_distinct_structures_are_distinct_objects():
    assert N("sub", q, kv) is not N("sub", kv, q)
    assert C(1) is not C(1.0) and C(1) is not C(True) and C(1.0) is not C(True)
    assert ir.var("q") is not ir.var("q", ir.FLOAT)
    assert N("lt", q, C(4)) is not N("le", q, C(4))
    # -0.0 and 0.0 are one constant (so they hash alike)
    assert C(-0.0) is C(0.0)


def test_node_types_and_coercions():
    assert N("add", q, C(1)).dtype == ir.INT
    assert N("add", q, C(1.5)).dtype == ir.FLOAT
    assert N("truediv", q, C(2)).dtype == ir.FLOAT
    assert N("lt", q, kv).dtype == ir.BOOL
    assert N("exp", q).args[0].op == "to_float"
    # int + float: the int operand is converted
    n = N("add", q, C(1.5))
    assert n.args[0].op == "to_float" and n.args[0].args[0] is q
    with pytest.raises(TypeError):
        N("and", q, kv)
    with pytest.raises(TypeError):
        N("where", q, q, kv)
    with pytest.raises(TypeError):
        N("add", q, 1)


def test_tracing_twice_gives_the_same_nodes():
    doc = torch.tensor([0, 0, 1, 1])

    def m(b, h, q_idx, kv_idx):
        return (doc[q_idx] == doc[kv_idx]) & (q_idx >= kv_idx)

    def s(score, b, h, q_idx, kv_idx):
        return 30.0 * torch.tanh(score / 30.0)

    t1, t2 = trace(m, s), trace(m, s)
    assert t1.mask is t2.mask and t1.score is t2.score


def test_load_nodes_intern_by_buffer_key():
    b_int = ir.Buffer(0, ir.INT, 1, "int32")
    b_int64 = ir.Buffer(0, ir.INT, 1, "int64")
    assert ir.load(b_int, (q,)) is ir.load(ir.Buffer(0, ir.INT, 1, "int32"), (q,))
    assert ir.load(b_int, (q,)) is not ir.load(b_int64, (q,))
    assert ir.load(b_int, (q,)) is not ir.load(b_int, (kv,))
    with pytest.raises(ValueError):
        ir.load(b_int, (q, kv))


def test_graph_helpers():
    e = N("add", N("mul", q, C(2)), N("floordiv", kv, C(3)))
    assert ir.free_vars(e) == frozenset({"q", "kv"})
    assert ir.free_vars(C(3)) == frozenset()
    order = ir.topo_order([e])
    assert order[-1] is e
    assert all(order.index(a) < order.index(n) for n in order for a in n.args)
    assert len(order) == len(set(order))
    r = ir.substitute(e, {q: C(5)})
    assert r is N("add", N("mul", C(5), C(2)), N("floordiv", kv, C(3)))
    g = ir.to_networkx([e])
    assert g.number_of_nodes() == len(order)
    assert g.has_edge(q, e.args[0])


# --- structural hash ---------------------------------------------------------------------------
PATTERNS_SRC = textwrap.dedent('''
    import torch
    DOC = torch.tensor([0, 0, 1, 1, 1, 2], dtype=torch.int32)
    SLOPES = torch.tensor([0.5, 0.25])
    def causal(b, h, q, kv): return q >= kv
    def window(b, h, q, kv): return (q - kv).abs() <= 5
    def document(b, h, q, kv): return (DOC[q] == DOC[kv]) & (q >= kv)
    def alibi(s, b, h, q, kv): return s + SLOPES[h] * (kv - q)
    def softcap(s, b, h, q, kv): return 20.0 * torch.tanh(s / 20.0)
    CASES = [(causal, None), (window, None), (document, alibi), (None, softcap), (causal, softcap)]
''')


def _hashes_here(ns):
    from attndsl.ir import structural_hash
    out = []
    for m, s in ns["CASES"]:
        t = trace(m, s)
        out.append(structural_hash(t.mask if t.mask is not None else "none",
                                   t.score if t.score is not None else "none"))
        out.append(attndsl.compile(mask_mod=m, score_mod=s).spec.key)
    return out


LISTING_SRC = textwrap.dedent('''
    from attndsl import ir
    from attndsl.passes import simplify
    T = torch.tensor([0.5, 0.25])
    def lm(b, h, q, kv): return ((q // 8 == kv // 8) & (q >= kv)) | (kv < 4)
    def ls(score, b, h, q, kv): return torch.where(q - kv > 3, score + T[h] * (kv - q), score)
    def listing_text():
        t = trace(lm, ls)
        return ir.listing({"mask": simplify(t.mask), "score": simplify(t.score)})
''')

SCRIPT = PATTERNS_SRC + textwrap.dedent('''
    import attndsl
    from attndsl.dsl import trace
    from attndsl.ir import structural_hash
    out = []
    for m, s in CASES:
        t = trace(m, s)
        out.append(structural_hash(t.mask if t.mask is not None else "none",
                                   t.score if t.score is not None else "none"))
        out.append(attndsl.compile(mask_mod=m, score_mod=s).spec.key)
    print(" ".join(out))
''') + LISTING_SRC + "print(listing_text())\n"


@pytest.fixture(scope="module")
def other_processes():
    """Hashes and a listing computed in two fresh interpreters with different hash seeds."""
    outs = []
    for seed in ("0", "12345"):
        env = dict(os.environ, PYTHONHASHSEED=seed, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        r = subprocess.run([sys.executable, "-c", SCRIPT], env=env, cwd=ROOT, capture_output=True, text=True,
                           timeout=120)
        assert r.returncode == 0, r.stderr
        first, _, rest = r.stdout.partition("\n")
        outs.append((first.split(), rest))
    return outs


def test_structural_hash_stable_across_processes(other_processes):
    ns = {}
    exec(PATTERNS_SRC, ns)
    here = _hashes_here(ns)
    assert len(set(here)) == len(here)  # every pattern hashes differently
    for hashes, _ in other_processes:
        assert hashes == here


def test_structural_hash_is_a_short_hex_digest():
    hsh = ir.structural_hash(N("ge", q, kv))
    assert len(hsh) == 24 and int(hsh, 16) >= 0


DISTINCT = {
    "causal": lambda b, h, q, kv: q >= kv,
    "strict_causal": lambda b, h, q, kv: q > kv,
    "anti_causal": lambda b, h, q, kv: kv >= q,
    "window4": lambda b, h, q, kv: (q - kv).abs() <= 4,
    "window5": lambda b, h, q, kv: (q - kv).abs() <= 5,
    "window_and_causal": lambda b, h, q, kv: ((q - kv).abs() <= 4) & (q >= kv),
    "window_or_causal": lambda b, h, q, kv: ((q - kv).abs() <= 4) | (q >= kv),
    "chunk8": lambda b, h, q, kv: q // 8 == kv // 8,
    "chunk16": lambda b, h, q, kv: q // 16 == kv // 16,
    "mod3": lambda b, h, q, kv: (q - kv) % 3 == 0,
    "head": lambda b, h, q, kv: (h < 2) | (q >= kv),
    "batch": lambda b, h, q, kv: (b < 2) | (q >= kv),
}


def test_different_patterns_hash_differently():
    hashes = {name: ir.structural_hash(trace(fn).mask) for name, fn in DISTINCT.items()}
    assert len(set(hashes.values())) == len(hashes), hashes
    keys = {name: attndsl.compile(mask_mod=fn).spec.key for name, fn in DISTINCT.items()}
    assert len(set(keys.values())) == len(keys), keys


def test_hash_distinguishes_constants_types_and_buffers():
    assert ir.structural_hash(C(1)) != ir.structural_hash(C(1.0))
    assert ir.structural_hash(C(1)) != ir.structural_hash(C(True))
    assert ir.structural_hash(N("add", q, C(1))) != ir.structural_hash(N("add", C(1), q))
    a32 = torch.tensor([1, 2], dtype=torch.int32)
    a64 = torch.tensor([1, 2], dtype=torch.int64)
    f32 = torch.tensor([1.0, 2.0])
    k = [attndsl.compile(score_mod=lambda s, b, h, q, kv, t=t: s + t[h]).spec.key for t in (a32, a64, f32)]
    assert len(set(k)) == 3
    # the value of a captured tensor is not part of the key
    other = torch.tensor([7, 9], dtype=torch.int32)
    assert attndsl.compile(score_mod=lambda s, b, h, q, kv: s + other[h]).spec.key == k[0]
    # the order of parts matters
    assert ir.structural_hash(q, kv) != ir.structural_hash(kv, q)


def test_hash_same_for_equivalent_spellings_after_simplify():
    k1 = attndsl.compile(mask_mod=lambda b, h, q, kv: q + 1 - kv > 0).spec.key
    k2 = attndsl.compile(mask_mod=lambda b, h, q, kv: (q - kv) + 1 > 0).spec.key
    assert k1 == k2


# --- printer -----------------------------------------------------------------------------------
def test_expr_str():
    e = N("and", N("ge", q, kv), N("lt", N("abs", N("sub", q, kv)), C(4)))
    assert ir.expr_str(e) == "((q >= kv) & (abs((q - kv)) < 4))"
    assert ir.expr_str(N("neg", q)) == "-q"
    assert ir.expr_str(N("not", N("lt", q, kv))) == "~(q < kv)"
    assert ir.expr_str(C(2.5)) == "2.5"


def test_listing_exact_and_shares_nodes():
    def m(b, h, q_idx, kv_idx):
        d = q_idx - kv_idx
        return (d >= 0) & (d < 5) & (h < 2)

    def s(score, b, h, q_idx, kv_idx):
        return score * 2.0 + torch.tanh(score)

    t = trace(m, s)
    text = ir.listing({"mask": t.mask, "score_mod": t.score})
    assert text == "\n".join([
        "  %0: int = q - kv",
        "  %1: bool = %0 >= 0",
        "  %2: bool = %0 < 5",
        "  %3: bool = %1 & %2",
        "  %4: bool = h < 2",
        "  %5: bool = %3 & %4",
        "  %6: float = score * 2.0",
        "  %7: float = tanh(score)",
        "  %8: float = %6 + %7",
        "  mask = %5",
        "  score_mod = %8",
    ])
    # the shared difference is computed once
    assert text.count("q - kv") == 1
    # deterministic
    assert ir.listing({"mask": t.mask, "score_mod": t.score}) == text


def test_listing_shows_loads_with_dtype():
    doc = torch.tensor([0, 1], dtype=torch.int32)
    t = trace(lambda b, h, q, kv: doc[q] == doc[kv])
    text = ir.listing({"mask": t.mask})
    assert "buf0[q]   # int32" in text and "buf0[kv]   # int32" in text
    assert text.splitlines()[-1] == "  mask = %2"


def test_listing_deterministic_across_processes(other_processes):
    ns = {"trace": trace}
    exec("import torch\n" + LISTING_SRC, ns)
    here = ns["listing_text"]()
    assert "mask = %" in here and "score = %" in here
    for _, text in other_processes:
        assert text.rstrip("\n") == here

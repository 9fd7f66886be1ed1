"""benchmarks/host_overhead.py's method: interleaved rounds, ratios to SDPA taken per round.

The timing core runs on fake case functions and a fake clock, so the figures are exact: a case
that costs exactly twice SDPA's time must report 2.0 whatever load bursts hit single loops or
whole rounds. One CPU run of the real tool (launches stubbed, two rounds) checks the JSON rows."""
import json
import math

import pytest

from benchmarks import host_overhead as H


class FakeMachine:
    """A clock that only the fake cases move: each call of a case adds its cost, times the load of
    the machine in the current round (``load[round]``), times a burst on that one loop
    (``bursts[(case, round)]``)."""

    def __init__(self, calls, load=None, bursts=None):
        self.now = 0.0
        self.calls = calls
        self.load = load or {}
        self.bursts = bursts or {}
        self.count = {}

    def clock(self):
        return self.now

    def case(self, name, cost):
        def call():
            n = self.count[name] = self.count.get(name, 0) + 1
            rnd = (n - 1) // self.calls
            self.now += cost * self.load.get(rnd, 1.0) * self.bursts.get((name, rnd), 1.0)
        return call


def test_ratios_are_taken_per_round_and_a_burst_moves_one_round_only():
    calls, rounds = 3, 7
    m = FakeMachine(calls, load={2: 5.0, 4: 0.5},  # whole rounds slowed down / sped up: ratios unmoved
                    bursts={("twice", 3): 10.0, ("same", 5): 4.0})  # one loop of one case hit
    loops = {("sdpa causal", "fwd"): m.case("sdpa causal", 1e-6), ("twice", "fwd"): m.case("twice", 2e-6),
             ("same", "fwd"): m.case("same", 1e-6)}
    times = H.interleaved(loops, rounds, calls, clock=m.clock, warmup=0, seed=3)
    assert all(len(t) == rounds for t in times.values())
    rows = {r["case"]: r for r in H.summarise(times)}
    assert set(rows) == {"sdpa causal", "twice", "same"}
    two, one = rows["twice"], rows["same"]
    assert two["ratio_median"] == pytest.approx(2.0) and two["ratio_min"] == pytest.approx(2.0)
    assert two["ratio_p10"] == pytest.approx(2.0)
    assert max(t / b for t, b in zip(times[("twice", "fwd")], times[("sdpa causal", "fwd")])) == pytest.approx(20.0)
    assert one["ratio_median"] == pytest.approx(1.0) and one["ratio_min"] == pytest.approx(1.0)
    assert rows["sdpa causal"]["ratio_median"] == 1.0
    # the absolute medians are the plain per-call times (rounds 2 and 4 are off by their load)
    assert two["median_us"] == pytest.approx(2.0) and two["sdpa_median_us"] == pytest.approx(1.0)
    assert two["rounds"] == rounds and two["pass"] == "fwd"


def test_a_timing_per_block_would_be_fooled_where_the_interleaved_one_is_not():
    # a burst over the first half of the run: timed case after case, the first case would look slow
    calls, rounds = 2, 6
    m = FakeMachine(calls, load={0: 3.0, 1: 3.0, 2: 3.0})
    loops = {("sdpa causal", "fwd+bwd"): m.case("sdpa causal", 1e-6), ("x", "fwd+bwd"): m.case("x", 1.5e-6)}
    rows = {r["case"]: r for r in H.summarise(H.interleaved(loops, rounds, calls, clock=m.clock, warmup=0))}
    assert rows["x"]["ratio_median"] == pytest.approx(1.5)
    assert rows["x"]["ratio_p90"] == pytest.approx(1.5)


def test_orders_change_between_rounds_and_every_loop_is_followed_by_a_sync():
    seen, syncs = [], []
    loops = {(f"c{i}", "fwd"): (lambda i=i: seen.append(i)) for i in range(5)}
    H.interleaved(loops, rounds=4, calls=1, sync=lambda: syncs.append(len(seen)), warmup=0, seed=1)
    orders = [tuple(seen[r * 5:(r + 1) * 5]) for r in range(4)]
    assert all(sorted(o) == list(range(5)) for o in orders)
    assert len(set(orders)) > 1
    # one sync before the rounds (after the warm-up) and one after each loop, none inside
    assert syncs == [0, *range(1, 21)]


def test_percentile_interpolates():
    assert H.percentile([1, 2, 3, 4, 5], 50) == 3
    assert H.percentile([4, 1, 3, 2], 10) == pytest.approx(1.3)
    assert H.percentile([7], 90) == 7


def test_the_tool_writes_json_rows_on_the_cpu(tmp_path, capsys):
    path = tmp_path / "host.json"
    H.main(["--rounds", "2", "--calls", "2", "--cases", "compiled causal", "--json", str(path)])
    rows = json.loads(path.read_text())
    assert {(r["case"], r["pass"]) for r in rows} == {
        (c, p) for c in ("sdpa causal", "compiled causal", "compiled causal indices=top32 (fast mode)")
        for p in ("fwd", "fwd+bwd")}
    keys = {"case", "pass", "median_us", "sdpa_median_us", "ratio_median", "ratio_p10", "ratio_p90", "ratio_min",
            "rounds", "gpu", "torch", "triton", "commit"}
    for r in rows:
        assert keys <= set(r)
        assert r["rounds"] == 2 and r["gpu"].startswith("cpu")
        assert r["median_us"] > 0 and math.isfinite(r["ratio_median"])
        assert r["ratio_p10"] <= r["ratio_median"] <= r["ratio_p90"]
    assert "compiled causal" in capsys.readouterr().out

"""bench/common.py's interleaved timer: inner counts, rotation, per-round ratios (fake clock), and real sleeps."""
import json
import os
import sys
import time

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
import common  # noqa: E402


class FakeClock:
    """A clock that only moves when a fake candidate 'runs'; ``load`` multiplies every duration."""

    def __init__(self):
        self.now, self.load, self.calls = 0.0, 1.0, []

    def __call__(self):
        return self.now

    def task(self, name, seconds):
        def run():
            self.calls.append(name)
            self.now += seconds * self.load
        return run


def test_inner_counts_reach_min_time_and_times_are_exact():
    clk = FakeClock()
    res = common.compare({"base": clk.task("base", 2e-3), "fast": clk.task("fast", 1e-3)}, "base", rounds=4,
                         warmup=2, min_time=0.05, clock=clk)
    assert res.inner == {"base": 25, "fast": 50}
    assert res.rounds == 4 and all(len(v) == 4 for v in res.samples.values())
    assert res.stats("base")["median"] == pytest.approx(2e-3)
    assert res.stats("fast", 1e3)["max"] == pytest.approx(1.0)
    r = res.ratio("fast")
    assert r["median"] == pytest.approx(2.0) and r["min"] == pytest.approx(2.0) and r["max"] == pytest.approx(2.0)
    assert res.ratio("base", over="fast")["median"] == pytest.approx(0.5)
    # warm-up calls: 2 each; then 4 rounds of 25 and 50 calls
    assert clk.calls.count("base") == 2 + 4 * 25 and clk.calls.count("fast") == 2 + 4 * 50


def test_min_inner_and_fixed_inner():
    clk = FakeClock()
    res = common.compare({"slow": clk.task("slow", 1.0), "b": clk.task("b", 1e-3)}, rounds=3, warmup=1,
                         min_inner=3, inner={"b": 7}, clock=clk)
    assert res.inner == {"slow": 3, "b": 7}


def test_order_rotates_so_every_candidate_takes_every_position():
    clk = FakeClock()
    names = ["a", "b", "c"]
    res = common.compare({n: clk.task(n, 0.1) for n in names}, "a", rounds=6, warmup=1, clock=clk, seed=3)
    for pos in range(3):
        assert sorted(o[pos] for o in res.order[:3]) == names
    assert res.order[:3] == res.order[3:]
    again = common.compare({n: clk.task(n, 0.1) for n in names}, "a", rounds=6, warmup=1, clock=clk, seed=3)
    assert again.order == res.order  # seeded


def test_ratio_is_taken_per_round_not_from_the_medians():
    # the load changes between rounds: per-round ratios stay exactly 2 while the raw times spread 4x
    clk = FakeClock()
    loads = iter([4.0, 2.0, 1.0])  # set after rounds 1, 2, 3
    res = common.compare({"base": clk.task("base", 2e-3), "ours": clk.task("ours", 1e-3)}, "base", rounds=3,
                         warmup=1, clock=clk, log=lambda _msg: setattr(clk, "load", next(loads)))
    s = res.stats("ours")
    assert s["max"] / s["min"] == pytest.approx(4.0)
    assert res.ratio("ours")["samples"] == pytest.approx([2.0] * 3)
    # a hand-made case where the median of ratios differs from the ratio of medians
    c = common.Comparison(samples={"b": [1.0, 3.0, 10.0], "o": [0.5, 2.0, 2.0]}, inner={"b": 1, "o": 1},
                          order=[["b", "o"]] * 3, baseline="b")
    assert c.ratio("o")["median"] == pytest.approx(2.0)  # ratios 2, 1.5, 5
    assert c.ratio("o")["min"] == pytest.approx(1.5) and c.ratio("o")["max"] == pytest.approx(5.0)


def test_bad_arguments():
    with pytest.raises(ValueError, match="baseline 'x'"):
        common.compare({"a": lambda: None}, "x")
    with pytest.raises(ValueError, match="no candidates"):
        common.compare({})


def test_real_sleeps_of_known_length():
    # sleeps only ever overshoot (by the scheduler's latency, large on a busy machine): bounds allow for that
    res = common.compare({"ten": lambda: time.sleep(0.01), "twenty": lambda: time.sleep(0.02)}, "twenty",
                         rounds=3, warmup=1, min_time=0.04)
    assert res.inner["twenty"] <= 2 and res.inner["twenty"] <= res.inner["ten"] <= 4
    assert res.stats("twenty")["min"] >= 0.02 and res.stats("ten")["min"] >= 0.01
    assert 1.2 < res.ratio("ten")["median"] < 2.5


def test_summarise_ratios_sets_apart_a_single_outlier():
    s = common.summarise_ratios({"a": 2.4, "b": 3.1, "c": 2.6, "d": 36.8})
    assert (s["min"], s["max"]) == (2.4, 3.1) and s["outliers"] == {"d": 36.8}
    assert "d 36.8x" in s["sentence"] and "over 3 rows" in s["sentence"]
    assert common.summarise_ratios({"a": 2.0, "b": 3.0, "c": 5.0, "d": 4.0})["outliers"] == {}
    assert common.summarise_ratios({"a": 0.4, "b": 3.0, "c": 5.0, "d": 4.0})["outliers"] == {"a": 0.4}
    assert common.summarise_ratios({"a": 1.0, "b": 30.0, "c": 5.0})["outliers"] == {}  # too few rows to judge


def test_write_results_prints_spreads(tmp_path):
    row = {"name": "x", "ratio": {"median": 1.234, "min": 1.1, "max": 1.3, "samples": [1.1, 1.234, 1.3]}}
    path = common.write_results("t", [row], ["name", "ratio"], str(tmp_path), note="n",
                                extra={"load_before": "0.10 0.20 0.30", "timings": {"a": [1]}})
    text = open(path).read()
    assert "| x | 1.234 (1.1-1.3) |" in text and "load_before 0.10 0.20 0.30" in text
    data = json.load(open(tmp_path / "t.json"))
    assert data["timings"] == {"a": [1]} and data["rows"][0]["ratio"]["samples"] == [1.1, 1.234, 1.3]

"""bench/timing.py: the block protocol of the step benchmarks, on a fake clock (each fake step
advances it by a known cost), so that every statistic has an exact expected value."""

from __future__ import annotations

import statistics

import pytest
import timing  # bench/timing.py: tests/bench/conftest.py puts bench/ on sys.path


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch):
    fake = FakeClock()
    monkeypatch.setitem(timing.CLOCKS, "fake", fake)
    return fake


def recording_steps(clock, costs, calls, fail_at=None):
    """``name -> step(k)``: appends ``(name, k)`` to ``calls`` and advances the clock by
    ``costs[name](k)``; raises at ``fail_at = (name, k)``."""

    def make(name):
        def step(k):
            if fail_at == (name, k):
                raise RuntimeError("peer broke")
            calls.append((name, k))
            clock.now += costs[name](k)

        return step

    return {name: make(name) for name in costs}


def test_blocks_are_consecutive_and_rounds_shuffled(clock):
    costs = {"sgd": lambda k: 1.0, "a": lambda k: 2.0, "b": lambda k: 3.0}
    calls: list[tuple[str, int]] = []
    times = timing.time_blocks(
        recording_steps(clock, costs, calls), block=4, rounds=6, warmup=2, seed=3, clock="fake"
    )
    # Every round runs one block of 4 consecutive steps of each entry, counters continuing.
    assert len(calls) == 8 * 3 * 4
    for start in range(0, len(calls), 4):
        names = {name for name, _ in calls[start : start + 4]}
        assert len(names) == 1
        ks = [k for _, k in calls[start : start + 4]]
        assert ks == list(range(ks[0], ks[0] + 4))
    orders = [[calls[r * 12 + 4 * i][0] for i in range(3)] for r in range(8)]
    assert orders == times.orders
    assert all(sorted(order) == ["a", "b", "sgd"] for order in orders)
    assert len({tuple(order) for order in orders}) > 1  # shuffled, not rotated or fixed
    # Warm-up rounds are not recorded.
    assert {name: len(blocks) for name, blocks in times.blocks.items()} == dict.fromkeys(costs, 6)
    assert all(len(steps) == 24 for steps in times.steps.values())
    assert times.protocol()["block"] == 4 and times.protocol()["rounds"] == 6
    again = timing.time_blocks(
        recording_steps(clock, costs, []), block=4, rounds=6, warmup=2, seed=3, clock="fake"
    )
    assert again.orders == times.orders  # the seed fixes the orders


def test_summary_statistics(clock):
    # Entry "r" refreshes on every 5th of its steps (cost 10 instead of 2): blocks of 5 hold one
    # refresh each; SGD costs 1, but 3 in its second timed round (a slow stretch).
    def sgd_cost(k):
        return 3.0 if 5 <= k < 10 else 1.0

    costs = {"sgd": sgd_cost, "r": lambda k: 10.0 if k % 5 == 0 else 2.0}
    times = timing.time_blocks(
        recording_steps(clock, costs, []), block=5, rounds=4, warmup=0, clock="fake"
    )
    assert times.blocks["sgd"] == [1.0, 3.0, 1.0, 1.0]
    assert times.blocks["r"] == pytest.approx([18 / 5] * 4)
    entry = timing.summarise(times, "r", "sgd")
    assert entry["median_ms"] == pytest.approx(3600.0)
    assert entry["q1_ms"] == entry["q3_ms"] == pytest.approx(3600.0)
    assert entry["ratio"] == pytest.approx(3.6)  # block medians: 3.6 / 1
    per_round = [3.6, 1.2, 3.6, 3.6]
    assert entry["round_ratio"]["median"] == pytest.approx(statistics.median(per_round))
    assert entry["round_ratio"]["q1"] == pytest.approx(3.0)  # 1.2, 3.6, 3.6, 3.6: linear
    assert entry["mean_ratio"] == pytest.approx(72 / 30)  # totals: 4·18 over 5+15+5+5
    assert entry["step_median_ms"] == pytest.approx(2000.0)  # the median step skips refreshes
    assert entry["step_ratio"] == pytest.approx(2.0)
    assert entry["p10_ratio"] == pytest.approx(3.6)
    assert entry["block_s"] == times.blocks["r"]
    baseline = timing.summarise(times, "sgd", "sgd")
    assert baseline["ratio"] == baseline["round_ratio"]["median"] == 1.0
    line = timing.table_row({**entry, "peer": True})
    assert line.startswith("r (peer)") and "3.60" in line


def test_fallible_entry_is_dropped_others_raise(clock):
    costs = {"sgd": lambda k: 1.0, "peer": lambda k: 1.0, "ours": lambda k: 1.0}
    times = timing.time_blocks(
        recording_steps(clock, costs, [], fail_at=("peer", 7)),
        block=3,
        rounds=4,
        warmup=1,
        clock="fake",
        fallible=["peer"],
    )
    assert times.names == ["sgd", "ours"]
    assert "raised at its step 7" in times.failed["peer"] and "peer broke" in times.failed["peer"]
    assert all("peer" not in order for order in times.orders[3:])
    assert len(times.blocks["ours"]) == 4
    with pytest.raises(RuntimeError, match="peer broke"):
        timing.time_blocks(
            recording_steps(clock, costs, [], fail_at=("ours", 2)),
            block=3,
            rounds=2,
            clock="fake",
            fallible=["peer"],
        )
    with pytest.raises(ValueError, match="block"):
        timing.time_blocks(costs, block=0, rounds=1)
    assert timing.percentile([1.0, 2.0, 3.0, 4.0, 5.0], 10) == pytest.approx(1.4)

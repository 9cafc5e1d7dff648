"""The timing protocol of the step benchmarks (``bench_torch_step.py``,
``bench_torch_natural_gradient.py``, ``bench_torch_conv_step.py``).

Each entry (an optimizer on its own copy of the model) is timed over **blocks of consecutive
steps**, as it runs in training: a block is ``block`` steps of that entry, one after the other,
each step timed and the block timed as a whole. A **round** times one block of every entry, in
an order shuffled afresh each round (seeded), so that a slow stretch of a shared machine hits
entries alike and no entry always follows the same other one. ``warmup`` untimed rounds come
first.

Why blocks: interleaving single steps of every entry (the protocol before) ran every step
right after another optimizer's step on another model, with that model's weights and buffers
in the caches; SGD's steps, the shortest, suffered most (18–20 ms interleaved against
16.2–16.5 ms consecutive on the project's machine), which flattered every ratio to SGD by about
10 %. Within a block only the first step follows a foreign entry.

Statistics (:func:`summarise`), per entry, with ``baseline`` (SGD) timed in the same rounds:

* ``median_ms`` [``q1_ms``, ``q3_ms``]: median and quartiles over the timed blocks of the
  block's time per step (block seconds / ``block``). A block of a multiple of an entry's
  refresh period holds the same number of refresh steps every time, so this is the amortised
  step cost;
* ``ratio``: ``median_ms`` over the baseline's;
* ``round_ratio``: median and quartiles of the per-round ratios (the entry's block over the
  baseline's block of the same round), robust to load that changes between rounds;
* ``mean_ratio``: total time over the baseline's total time (every refresh included, also the
  rare ones, e.g. inverses every 100 steps, that the median of blocks mostly skips);
* ``p10_ratio``: 10th percentile of the blocks over the baseline's;
* ``step_median_ms`` [``step_q1_ms``, ``step_q3_ms``], ``step_ratio``: the same for single
  steps (timed inside the blocks); the median step skips refresh steps that come one in
  several.

Only the standard library is imported, so that a script can call :func:`pin_threads` before
NumPy and PyTorch are loaded.
"""

from __future__ import annotations

import os
import random
import statistics
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

THREAD_VARIABLES = (
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "BLIS_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
    "NUMEXPR_NUM_THREADS",
)


def pin_threads(threads: int) -> None:
    """Use ``threads`` BLAS/OpenMP threads: the environment variables (call before NumPy or
    PyTorch are imported for them to take effect) and ``torch.set_num_threads``."""
    if threads < 1:
        raise ValueError(f"threads must be a positive integer; got {threads!r}")
    for name in THREAD_VARIABLES:
        os.environ[name] = str(threads)
    import torch

    torch.set_num_threads(threads)


@dataclass
class BlockTimes:
    """What :func:`time_blocks` measured. ``blocks[name][r]``: seconds per step of the entry's
    block in timed round ``r``; ``steps[name]``: every timed single step, in order;
    ``orders[r]``: the order of the entries in round ``r`` (warm-up rounds included);
    ``failed``: entries dropped because their step raised (their times are discarded)."""

    block: int
    rounds: int
    warmup: int
    seed: int
    clock: str
    blocks: dict[str, list[float]] = field(default_factory=dict)
    steps: dict[str, list[float]] = field(default_factory=dict)
    orders: list[list[str]] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        """The entries that completed every round, in the order they were given."""
        return [name for name in self.blocks if name not in self.failed]

    def protocol(self) -> dict[str, Any]:
        """The protocol's parameters, for a JSON record."""
        return {
            "protocol": "blocks of consecutive steps, rounds in shuffled order (bench/timing.py)",
            "block": self.block,
            "rounds": self.rounds,
            "warmup_rounds": self.warmup,
            "seed": self.seed,
            "clock": self.clock,
            "orders": self.orders,
        }


CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}


def time_blocks(
    steps: Mapping[str, Callable[[int], object]],
    *,
    block: int,
    rounds: int,
    warmup: int = 1,
    seed: int = 0,
    clock: str = "wall",
    fallible: Iterable[str] = (),
) -> BlockTimes:
    """Time every ``steps[name](k)`` (one training step; ``k`` counts that entry's steps from
    0, e.g. to pick its batch) over blocks of ``block`` consecutive steps: ``warmup`` untimed
    rounds, then ``rounds`` timed ones, each round one block per entry in a shuffled order.

    An entry in ``fallible`` (a peer library) whose step raises is dropped and reported in
    ``failed``; any other error propagates."""
    if block < 1 or rounds < 1 or warmup < 0:
        raise ValueError(f"need block ≥ 1, rounds ≥ 1, warmup ≥ 0; got {block}, {rounds}, {warmup}")
    timer = CLOCKS[clock]
    allowed = set(fallible)
    names = list(steps)
    result = BlockTimes(block, rounds, warmup, seed, clock)
    result.blocks = {name: [] for name in names}
    result.steps = {name: [] for name in names}
    counters = dict.fromkeys(names, 0)
    shuffle = random.Random(seed)
    for round_index in range(warmup + rounds):
        order = [name for name in names if name not in result.failed]
        shuffle.shuffle(order)
        result.orders.append(order)
        timed = round_index >= warmup
        for name in order:
            step = steps[name]
            singles = []
            try:
                block_start = timer()
                for _ in range(block):
                    start = timer()
                    step(counters[name])
                    singles.append(timer() - start)
                    counters[name] += 1
                elapsed = timer() - block_start
            except Exception as error:
                if name not in allowed:
                    raise
                result.failed[name] = (
                    f"raised at its step {counters[name]} (round {round_index}, "
                    f"{warmup} warm-up): {type(error).__name__}: {error}"
                )
                continue
            if timed:
                result.blocks[name].append(elapsed / block)
                result.steps[name].extend(singles)
    return result


def quartiles(values: list[float]) -> tuple[float, float, float]:
    """(25th, 50th, 75th) percentiles, linear interpolation (NumPy's default)."""
    if len(values) < 2:
        return values[0], values[0], values[0]
    q1, median, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, median, q3


def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile (0–100), linear interpolation between order statistics."""
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def summarise(times: BlockTimes, name: str, baseline: str) -> dict[str, Any]:
    """The statistics of the module docstring for entry ``name`` against ``baseline``."""
    blocks, base = times.blocks[name], times.blocks[baseline]
    singles, base_singles = times.steps[name], times.steps[baseline]
    q1, median, q3 = quartiles(blocks)
    s1, smedian, s3 = quartiles(singles)
    r1, rmedian, r3 = quartiles([t / b for t, b in zip(blocks, base)])
    return {
        "name": name,
        "median_ms": 1e3 * median,
        "q1_ms": 1e3 * q1,
        "q3_ms": 1e3 * q3,
        "ratio": median / statistics.median(base),
        "round_ratio": {"median": rmedian, "q1": r1, "q3": r3},
        "mean_ratio": sum(singles) / sum(base_singles),
        "p10_ratio": percentile(blocks, 10) / percentile(base, 10),
        "step_median_ms": 1e3 * smedian,
        "step_q1_ms": 1e3 * s1,
        "step_q3_ms": 1e3 * s3,
        "step_ratio": smedian / statistics.median(base_singles),
        "block_s": blocks,
    }


TABLE_HEADER = (
    f"{'entry':<34}{'ms/step':>9}{'IQR':>18}{'ratio':>7}{'round ratio [IQR]':>21}"
    f"{'mean':>6}{'p10':>6}{'step ms':>9}{'ratio':>7}"
)


def table_row(entry: Mapping[str, Any]) -> str:
    """One printed line of :data:`TABLE_HEADER` for a :func:`summarise` entry (or a failed
    one: ``{"name", "failed"}``)."""
    name = entry["name"] + (" (peer)" if entry.get("peer") else "")
    if "failed" in entry:
        return f"{name:<34}failed, dropped: {entry['failed']}"
    rr = entry["round_ratio"]
    iqr = f"[{entry['q1_ms']:.2f}, {entry['q3_ms']:.2f}]"
    rounds = f"{rr['median']:.2f} [{rr['q1']:.2f}, {rr['q3']:.2f}]"
    return (
        f"{name:<34}{entry['median_ms']:>9.2f}{iqr:>18}{entry['ratio']:>7.2f}{rounds:>21}"
        f"{entry['mean_ratio']:>6.2f}{entry['p10_ratio']:>6.2f}"
        f"{entry['step_median_ms']:>9.2f}{entry['step_ratio']:>7.2f}"
    )


def describe(times: BlockTimes) -> str:
    """A one-line statement of the protocol, for the printed header."""
    return (
        f"protocol: {times.rounds} rounds (+{times.warmup} warm-up) of one block of "
        f"{times.block} consecutive steps per entry, order shuffled per round (seed "
        f"{times.seed}), {times.clock} clock; ms/step = block time / {times.block}, median "
        "[IQR] over blocks; round ratio = per-round block ratio to SGD; mean = total-time "
        "ratio; step ms = median single step"
    )


def load_average() -> list[float] | None:
    """The 1, 5 and 15-minute load averages, where the OS has them."""
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None

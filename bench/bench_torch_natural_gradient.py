r"""Benchmark of ``curvlinalg_torch.NaturalGradient`` against ``torch.optim.SGD``: time per
training step (zero_grad, forward, cross-entropy, backward, step) on one model and batch.

Setup: MLP 784-1000-1000-1000-10 (ReLU, ``nn.Linear`` with bias), batch ``B = 100``, float32,
CPU, ``torch.set_num_threads(2)``. Inputs are MNIST images (``../shared/data/mnist.npz`` when
present, scaled to [0, 1] and normalised) or standard-normal stand-ins; every timed operation
is dense work whose cost does not depend on the values.

Contenders (same initial weights, each its own model copy):

* ``SGD`` — ``torch.optim.SGD(lr, momentum=0.9)``: the reference.
* ``NG mc/independent/T=10`` — ``NaturalGradient(fisher="mc", fisher_batch="independent",
  refresh_every=10, structure="full", momentum=0.9)``: the target configuration (median step
  ≤ 1.5× SGD). Nine steps in ten only apply the kept factorisation; every tenth also
  back-propagates sampled labels and factorises.
* without ``--quick`` also: ``NG empirical/same`` (Fisher of the step's own batch: Gram and
  Cholesky every step, ``solve_span``), ``NG mc/same`` (extra backward every step),
  ``NG mc/independent/T=10 layerwise``.

Timing is interleaved step by step: the k-th step of every contender runs right after the
others' k-th step (same batch), so that bursts of load from neighbours on the shared machine
hit them alike. A round is one refresh period (10 steps). Two statistics:

* ``step``: median and interquartile range of single steps (the refresh steps are one in ten,
  so the median is that of the nine cheap steps);
* ``period/10``: median and IQR of the time of whole 10-step periods divided by 10 — the
  amortised cost *including* the refresh steps.

Ratios: ``/SGD`` divides the contender's median by SGD's median in the same run; ``paired``
is the median of the per-step (per-period) ratios to the SGD step (period) run alongside,
the statistic least disturbed by a loaded machine. The load average is printed at the end.

Usage::

    .venv/bin/python bench/bench_torch_natural_gradient.py            # 30 rounds, 5 contenders
    .venv/bin/python bench/bench_torch_natural_gradient.py --quick    # 8 rounds, SGD vs target
    .venv/bin/python bench/bench_torch_natural_gradient.py --json PATH  # also the numbers as JSON
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import pathlib
import platform
import statistics
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from curvlinalg_torch.natural_gradient import NaturalGradient
from torch import nn

PERIOD = 10
MNIST = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist.npz"


def make_model(bias: bool) -> nn.Module:
    return nn.Sequential(
        nn.Linear(784, 1000, bias=bias),
        nn.ReLU(),
        nn.Linear(1000, 1000, bias=bias),
        nn.ReLU(),
        nn.Linear(1000, 1000, bias=bias),
        nn.ReLU(),
        nn.Linear(1000, 10, bias=bias),
    )


def load_data(batch: int, count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    path = MNIST
    generator = torch.Generator().manual_seed(0)
    if path.exists():
        with np.load(path, allow_pickle=False) as data:
            images, labels = data["x_train"], data["y_train"]
        x = torch.from_numpy(images[: batch * count].reshape(-1, 784).astype(np.float32) / 255.0)
        x = (x - 0.1307) / 0.3081
        y = torch.from_numpy(labels[: batch * count].astype(np.int64))
        source = f"MNIST ({path})"
    else:
        x = torch.randn(batch * count, 784, generator=generator)
        y = torch.randint(0, 10, (batch * count,), generator=generator)
        source = "standard-normal stand-ins"
    print(f"data: {source}")
    return [(x[i * batch : (i + 1) * batch], y[i * batch : (i + 1) * batch]) for i in range(count)]


def contenders(quick: bool, bias: bool) -> dict[str, tuple[nn.Module, torch.optim.Optimizer]]:
    torch.manual_seed(0)
    base = make_model(bias)
    out: dict[str, tuple[nn.Module, torch.optim.Optimizer]] = {}

    def add(name: str, factory) -> None:
        model = copy.deepcopy(base)
        out[name] = (model, factory(model))

    add("SGD", lambda m: torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9))
    common = {"lr": 0.01, "damping": 1.0, "momentum": 0.9, "seed": 0}
    add(
        "NG mc/independent/T=10",
        lambda m: NaturalGradient(
            m, fisher="mc", fisher_batch="independent", refresh_every=PERIOD, **common
        ),
    )
    if not quick:
        add(
            "NG mc/independent/T=10 layerwise",
            lambda m: NaturalGradient(
                m,
                fisher="mc",
                fisher_batch="independent",
                refresh_every=PERIOD,
                structure="layerwise",
                **common,
            ),
        )
        add("NG empirical/same", lambda m: NaturalGradient(m, fisher="empirical", **common))
        add("NG mc/same", lambda m: NaturalGradient(m, fisher="mc", **common))
    return out


def run_step(
    model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, clock
) -> float:
    start = clock()
    opt.zero_grad()
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    return clock() - start


def quartiles(values: list[float]) -> tuple[float, float, float]:
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], statistics.median(values), q[2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="8 rounds, SGD and the target")
    parser.add_argument("--rounds", type=int, default=None, help="rounds (default 30; quick 8)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--no-bias", action="store_true", help="nn.Linear(bias=False)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--cpu-time",
        action="store_true",
        help="time with the process CPU clock instead of the wall clock (with --threads 1 "
        "it is insensitive to other processes' load)",
    )
    parser.add_argument(
        "--json", metavar="PATH", help="also write the table's numbers as JSON to PATH"
    )
    args = parser.parse_args()
    clock = time.process_time if args.cpu_time else time.perf_counter
    torch.set_num_threads(args.threads)
    rounds = args.rounds or (8 if args.quick else 30)
    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, {platform.processor()}, "
        f"batch {args.batch}, float32, bias {not args.no_bias}, rounds {rounds} × {PERIOD} steps, "
        f"{'process CPU' if args.cpu_time else 'wall'} clock"
    )
    data = load_data(args.batch, PERIOD * 6)
    runs = contenders(args.quick, not args.no_bias)
    steps: dict[str, list[float]] = {name: [] for name in runs}
    for index in range(args.warmup + rounds):
        chunk = data[(index % 6) * PERIOD : (index % 6 + 1) * PERIOD]
        for x, y in chunk:
            # Step-by-step interleaving: each contender's k-th step runs right after the
            # others', so bursts of load from neighbours hit the pair alike.
            for name, (model, opt) in runs.items():
                elapsed = run_step(model, opt, x, y, clock)
                if index >= args.warmup:
                    steps[name].append(elapsed)
    periods = {
        name: [sum(times[i : i + PERIOD]) / PERIOD for i in range(0, len(times), PERIOD)]
        for name, times in steps.items()
    }
    reference_step = statistics.median(steps["SGD"])
    reference_period = statistics.median(periods["SGD"])
    print(
        f"\n{'contender':34s} {'step median ms':>14s} {'IQR ms':>17s} {'/SGD':>5s} "
        f"{'paired':>6s}   {'period/10 ms':>12s} {'IQR ms':>17s} {'/SGD':>5s} {'paired':>6s}"
    )
    entries: list[dict[str, object]] = []  # for --json: the same numbers as the table
    for name in runs:
        s_lo, s_med, s_hi = quartiles(steps[name])
        p_lo, p_med, p_hi = quartiles(periods[name])
        # Median over steps (periods) of the ratio to SGD's step (period) taken alongside.
        paired_step = statistics.median(t / r for t, r in zip(steps[name], steps["SGD"]))
        paired_period = statistics.median(t / r for t, r in zip(periods[name], periods["SGD"]))
        print(
            f"{name:34s} {1e3 * s_med:14.2f} [{1e3 * s_lo:6.2f}, {1e3 * s_hi:6.2f}] "
            f"{s_med / reference_step:5.2f} {paired_step:6.2f}   {1e3 * p_med:12.2f} "
            f"[{1e3 * p_lo:6.2f}, {1e3 * p_hi:6.2f}] {p_med / reference_period:5.2f} "
            f"{paired_period:6.2f}"
        )
        entries.append(
            {
                "name": name,
                "step_median_ms": 1e3 * s_med,
                "step_q1_ms": 1e3 * s_lo,
                "step_q3_ms": 1e3 * s_hi,
                "step_ratio": s_med / reference_step,
                "step_paired": paired_step,
                "period_median_ms": 1e3 * p_med,
                "period_q1_ms": 1e3 * p_lo,
                "period_q3_ms": 1e3 * p_hi,
                "period_ratio": p_med / reference_period,
                "period_paired": paired_period,
                "steps_s": steps[name],
            }
        )
    load = os.getloadavg()
    print(
        f"\nload average during the run (1, 5, 15 min): {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
    )
    for name, (_, opt) in runs.items():
        skipped = getattr(opt, "skipped_steps", 0)
        if skipped:
            print(f"warning: {name} skipped {skipped} steps")
    if args.json:
        meta = {
            "script": "bench_torch_natural_gradient.py",
            "command": sys.argv,
            "args": vars(args),
            "rounds": rounds,
            "period": PERIOD,
            "model": "MLP 784-1000-1000-1000-10",
            "dtype": "float32",
            "data": "MNIST" if MNIST.exists() else "standard-normal stand-ins",
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "clock": "process CPU" if args.cpu_time else "wall",
            "loadavg_end": list(load),
            "skipped_steps": {
                name: getattr(opt, "skipped_steps", 0) for name, (_, opt) in runs.items()
            },
        }
        with open(args.json, "w") as file:
            json.dump({"meta": meta, "entries": entries}, file, indent=2)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()

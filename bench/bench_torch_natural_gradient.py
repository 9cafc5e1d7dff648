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

Timing (``bench/timing.py``, shared with ``bench_torch_step.py``): every contender runs
blocks of ``--block`` (20, two refresh periods) consecutive steps, as in training; a round
times one block of every contender in an order shuffled per round; every contender's k-th step
uses the k-th batch. Reported: the block's time per step, median [IQR] over the blocks (a
block holds whole refresh periods, so this is amortised *including* the refresh), its ratio to
SGD's, the per-round ratio (median [IQR]), the total-time and p10 ratios, and the median single
step (the refresh steps are one in ten, so that is the nine cheap steps') with its ratio. The
load average is printed at the end.

Usage::

    .venv/bin/python bench/bench_torch_natural_gradient.py            # 15 rounds, 5 contenders
    .venv/bin/python bench/bench_torch_natural_gradient.py --quick    # 3 rounds, SGD vs target
    .venv/bin/python bench/bench_torch_natural_gradient.py --json PATH  # also the numbers as JSON
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import pathlib
import platform
import sys

import numpy as np
import torch
import torch.nn.functional as F
from curvlinalg_torch.natural_gradient import NaturalGradient
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import timing  # noqa: E402  (bench/timing.py: the shared timing protocol)

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="3 rounds of 10-step blocks, SGD and the target"
    )
    parser.add_argument(
        "--rounds", type=int, default=None, help="timed rounds of blocks (default 15; quick 3)"
    )
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    parser.add_argument(
        "--block",
        type=int,
        default=None,
        help=f"consecutive steps per contender and round (default {2 * PERIOD}, quick "
        f"{PERIOD}; whole refresh periods of {PERIOD} keep every block alike)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the round orders")
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
    timing.pin_threads(args.threads)
    rounds = args.rounds or (3 if args.quick else 15)
    block = args.block or (PERIOD if args.quick else 2 * PERIOD)
    clock = "cpu" if args.cpu_time else "wall"
    data = load_data(args.batch, PERIOD * 6)
    runs = contenders(args.quick, not args.no_bias)

    def step_of(model: nn.Module, opt: torch.optim.Optimizer):
        def step(k: int) -> None:
            x, y = data[k % len(data)]
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()

        return step

    times = timing.time_blocks(
        {name: step_of(model, opt) for name, (model, opt) in runs.items()},
        block=block,
        rounds=rounds,
        warmup=args.warmup,
        seed=args.seed,
        clock=clock,
    )
    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, {platform.processor()}, "
        f"batch {args.batch}, float32, bias {not args.no_bias}, refresh period {PERIOD}"
    )
    print(timing.describe(times))
    print(f"\n{timing.TABLE_HEADER}")
    entries = [timing.summarise(times, name, "SGD") for name in runs]
    for entry in entries:
        print(timing.table_row(entry))
    load = timing.load_average() or [float("nan")] * 3
    print(f"\nload average at the end (1, 5, 15 min): {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    for name, (_, opt) in runs.items():
        skipped = getattr(opt, "skipped_steps", 0)
        if skipped:
            print(f"warning: {name} skipped {skipped} steps")
    if args.json:
        meta = {
            "script": "bench_torch_natural_gradient.py",
            "command": sys.argv,
            "args": vars(args),
            "period": PERIOD,
            "model": "MLP 784-1000-1000-1000-10",
            "dtype": "float32",
            "data": "MNIST" if MNIST.exists() else "standard-normal stand-ins",
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            **times.protocol(),
            "loadavg_end": load,
            "skipped_steps": {
                name: getattr(opt, "skipped_steps", 0) for name, (_, opt) in runs.items()
            },
        }
        with open(args.json, "w") as file:
            json.dump({"meta": meta, "entries": entries}, file, indent=2)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()

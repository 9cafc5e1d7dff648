"""Step time of the curvlinalg_torch optimizers relative to ``torch.optim.SGD(momentum=0.9)``.

Model: MLP 784-1000-1000-1000-10 (ReLU), batch 100, float32, CPU, threads pinned
(``--threads``, default 2). One *step* = ``zero_grad`` + forward + cross-entropy +
``backward`` + ``step``, timed with ``time.perf_counter``. Entries (all with momentum 0.9,
inverses refreshed every ``--inverse-every`` = 100 steps):

* ``sgd``: ``torch.optim.SGD(lr, momentum=0.9)``, the baseline;
* ``foof u=1`` / ``foof u=10``: :class:`curvlinalg_torch.FOOF`, factors refreshed every step /
  every 10 steps;
* ``kfac-mc u=1`` / ``kfac-mc u=10``: :class:`curvlinalg_torch.KFAC` with the MC Fisher (one
  extra backward at each factor refresh), π-damped.

Each entry has its own copy of the same initial model and cycles through the same pool of
random batches. Rounds are **interleaved**: every round times one step of every entry (in a
rotated order), so drifts of the shared machine hit all entries alike. Reported per entry:

* median step time and its IQR (ms);
* ``ratio``: median step time / SGD's median step time;
* ``round ratio``: median and IQR of the per-round ratios (entry step / SGD step of the same
  round) — robust to load that changes between rounds;
* ``mean ratio``: mean step time / SGD's mean, i.e. amortised *including* the steps that
  refresh factors and inverses (which the median, by design, mostly skips);
* ``p10 ratio``: 10th percentile over SGD's 10th percentile: on a shared, loaded machine the
  fast tail approximates the unloaded speed.

Optional **peers** (``--peers``, the default; ``--no-peers`` skips them), run only if their
packages import (see ``bench/peers.py`` for the install commands and what each computes):
ASDL's K-FAC (MC Fisher; factors and inverses every step, and with our refresh periods) and
SMW empirical-Fisher natural gradient, and BackPACK's K-FAC factors with a minimal K-FAC
update. A peer that does not import is skipped with a printed reason. Before timing, each peer
trains a separate copy of the model for 20 steps on the benchmark batches and its loss on
them must decrease (printed).

``--quick`` runs a few rounds (seconds), for a smoke test; it includes the installed peers.
``--json PATH`` also writes the table's numbers (and every timed step) as JSON to ``PATH``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable


def _pin_threads(threads: int) -> None:
    for name in (
        "OMP_NUM_THREADS",
        "MKL_NUM_THREADS",
        "OPENBLAS_NUM_THREADS",
        "BLIS_NUM_THREADS",
        "VECLIB_MAXIMUM_THREADS",
        "NUMEXPR_NUM_THREADS",
    ):
        os.environ[name] = str(threads)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=400, help="timed rounds")
    parser.add_argument("--warmup", type=int, default=20, help="untimed rounds first")
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--inverse-every", type=int, default=100)
    parser.add_argument("--quick", action="store_true", help="30 rounds, 5 warm-up")
    parser.add_argument("--only", default="", help="comma-separated entry names to run")
    parser.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="wall: time.perf_counter; cpu: time.process_time (CPU seconds of all threads, "
        "less sensitive to other processes on a shared machine; run it with "
        "OMP_WAIT_POLICY=PASSIVE so that idle OpenMP threads do not spin)",
    )
    parser.add_argument(
        "--peers",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="add the ASDL / BackPACK entries of bench/peers.py when they import "
        "(default: on; --no-peers skips them)",
    )
    parser.add_argument("--damping", type=float, default=1.0, help="λ of every entry")
    parser.add_argument(
        "--check-steps", type=int, default=20, help="training steps of the peers' loss check"
    )
    parser.add_argument(
        "--json", metavar="PATH", help="also write the table's numbers as JSON to PATH"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.warmup = 30, 5
    _pin_threads(args.threads)

    import time

    import numpy as np
    import torch
    import torch.nn.functional as F
    from curvlinalg_torch import FOOF, KFAC
    from torch import nn

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    widths = [784, 1000, 1000, 1000, 10]

    def mlp() -> nn.Module:
        layers: list[nn.Module] = []
        for index, (d_in, d_out) in enumerate(zip(widths[:-1], widths[1:])):
            layers.append(nn.Linear(d_in, d_out))
            if index < len(widths) - 2:
                layers.append(nn.ReLU())
        return nn.Sequential(*layers)

    initial = mlp().state_dict()
    pool = [
        (torch.randn(args.batch, widths[0]), torch.randint(0, widths[-1], (args.batch,)))
        for _ in range(8)
    ]

    def fresh_model() -> nn.Module:
        model = mlp()
        model.load_state_dict(initial)
        return model

    def make(name: str) -> tuple[nn.Module, torch.optim.Optimizer]:
        model = fresh_model()
        common = {"momentum": 0.9, "inverse_every": args.inverse_every}
        if name == "sgd":
            return model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        every = int(name.split("u=")[1])
        damping = args.damping
        if name.startswith("foof"):
            return model, FOOF(model, lr=0.1, damping=damping, update_every=every, **common)
        kfac = KFAC(
            model, lr=0.1, damping=damping, fisher="mc", update_every=every, seed=0, **common
        )
        return model, kfac

    names = ["sgd", "foof u=1", "foof u=10", "kfac-mc u=1", "kfac-mc u=10"]
    peer_notes: list[str] = []  # for --json: skipped peers and the peers' loss checks
    peers: dict[str, Callable[[nn.Module], Callable[[torch.Tensor, torch.Tensor], object]]] = {}
    if args.peers:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from peers import check_decreases, peer_builders

        peers, skipped = peer_builders(args.batch, args.damping, args.inverse_every)
        for line in skipped:
            print(f"# peer {line}")
            peer_notes.append(line)
        names += list(peers)
    if args.only:
        wanted = {name.strip() for name in args.only.split(",")}
        names = ["sgd"] + [name for name in names[1:] if name in wanted]

    # One full training step per entry: zero_grad + forward + loss + backward + step.
    steps: dict[str, Callable[[torch.Tensor, torch.Tensor], object]] = {}
    for name in names:
        if name in peers:
            try:
                before, after = check_decreases(
                    name, peers[name], fresh_model(), pool, args.check_steps
                )
            except AssertionError:  # the peer runs but does not train: a real failure
                raise
            except Exception as error:  # the peer imports but does not run on this torch
                print(f"# peer {name}: skipped ({type(error).__name__}: {error})")
                peer_notes.append(f"{name}: skipped ({type(error).__name__}: {error})")
                continue
            print(
                f"# peer {name}: pool loss {before:.4f} -> {after:.4f} "
                f"after {args.check_steps} training steps (check passed)"
            )
            peer_notes.append(
                f"{name}: pool loss {before:.4f} -> {after:.4f} "
                f"after {args.check_steps} training steps (check passed)"
            )
            steps[name] = peers[name](fresh_model())
            continue
        model, optimizer = make(name)

        def ours(
            x: torch.Tensor,
            y: torch.Tensor,
            model: nn.Module = model,
            optimizer: torch.optim.Optimizer = optimizer,
        ) -> None:
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()

        steps[name] = ours
    names = [name for name in names if name in steps]

    counters = dict.fromkeys(names, 0)
    clock = time.perf_counter if args.clock == "wall" else time.process_time

    def one_step(name: str) -> float:
        x, y = pool[counters[name] % len(pool)]
        counters[name] += 1
        step = steps[name]
        start = clock()
        step(x, y)
        return clock() - start

    times: dict[str, list[float]] = {name: [] for name in names}
    failed: dict[str, str] = {}  # peers whose step raised during the run: dropped, reported
    for round_index in range(args.warmup + args.rounds):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            if name in failed:
                continue
            try:
                elapsed = one_step(name)
            except Exception as error:
                if name not in peers:
                    raise
                failed[name] = (
                    f"raised at its step {counters[name] - 1} (round {round_index}, "
                    f"warm-up {args.warmup}): {type(error).__name__}: {error}"
                )
                continue
            if round_index >= args.warmup:
                times[name].append(elapsed)

    print(
        f"# bench_torch_step: MLP {'-'.join(map(str, widths))}, batch {args.batch}, float32, "
        f"threads {args.threads}, torch {torch.__version__}, rounds {args.rounds} "
        f"(+{args.warmup} warm-up), inverse every {args.inverse_every}, momentum 0.9, "
        f"damping {args.damping}, "
        f"clock {args.clock}, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}"
    )
    print(f"# python {sys.version.split()[0]}, command: {' '.join(sys.argv)}")
    base = np.asarray(times["sgd"])
    header = (
        f"{'entry':<24}{'median ms':>10}{'IQR ms':>16}{'ratio':>8}"
        f"{'round ratio [IQR]':>24}{'mean ratio':>12}{'p10 ratio':>11}"
    )
    print(header)
    entries: list[dict[str, object]] = []  # for --json: the same numbers as the table
    for name in names:
        if name in failed:
            print(f"{name:<24}failed, dropped: {failed[name]}")
            entries.append({"name": name, "peer": True, "failed": failed[name]})
            continue
        sample = np.asarray(times[name])
        q1, median, q3 = np.percentile(sample, [25, 50, 75]) * 1e3
        per_round = sample / base
        r1, rm, r3 = np.percentile(per_round, [25, 50, 75])
        print(
            f"{name:<24}{median:>10.2f}{f'[{q1:.2f}, {q3:.2f}]':>16}"
            f"{np.median(sample) / np.median(base):>8.2f}"
            f"{f'{rm:.2f} [{r1:.2f}, {r3:.2f}]':>24}"
            f"{sample.mean() / base.mean():>12.2f}"
            f"{np.percentile(sample, 10) / np.percentile(base, 10):>11.2f}"
        )
        entries.append(
            {
                "name": name,
                "peer": name in peers,
                "median_ms": float(median),
                "q1_ms": float(q1),
                "q3_ms": float(q3),
                "ratio": float(np.median(sample) / np.median(base)),
                "round_ratio": {"median": float(rm), "q1": float(r1), "q3": float(r3)},
                "mean_ratio": float(sample.mean() / base.mean()),
                "p10_ratio": float(np.percentile(sample, 10) / np.percentile(base, 10)),
                "times_s": [float(t) for t in sample],
            }
        )
    if args.json:
        meta = {
            "script": "bench_torch_step.py",
            "command": sys.argv,
            "args": vars(args),
            "model": f"MLP {'-'.join(map(str, widths))}",
            "dtype": "float32",
            "torch": torch.__version__,
            "python": sys.version.split()[0],
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
            "peers": peer_notes,
        }
        if hasattr(os, "getloadavg"):
            meta["loadavg_end"] = list(os.getloadavg())
        with open(args.json, "w") as file:
            json.dump({"meta": meta, "entries": entries}, file, indent=2)
        print(f"# wrote {args.json}")


if __name__ == "__main__":
    main()

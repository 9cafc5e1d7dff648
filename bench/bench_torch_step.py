"""Step time of the curvlinalg_torch optimizers relative to ``torch.optim.SGD(momentum=0.9)``.

Model: MLP 784-1000-1000-1000-10 (ReLU), batch 100, float32, CPU, threads pinned
(``--threads``, default 2). One *step* = ``zero_grad`` + forward + cross-entropy +
``backward`` + ``step``, timed with ``time.perf_counter``. Entries (all with momentum 0.9,
inverses refreshed every ``--inverse-every`` = 100 steps):

* ``sgd``: ``torch.optim.SGD(lr, momentum=0.9)``, the baseline;
* ``foof u=1`` / ``foof u=10``: :class:`curvlinalg_torch.FOOF`, factors refreshed every step /
  every 10 steps;
* ``kfac-mc u=1`` / ``kfac-mc u=10``: :class:`curvlinalg_torch.KFAC` with the MC Fisher (one
  extra backward at each factor refresh), π-damped;
* ``kfac-emp u=1`` / ``kfac-emp u=10``: the same with the empirical Fisher (no extra
  backward), the Fisher that the kfac-pytorch peer uses;
* ``ekfac-mc u=1`` / ``ekfac-mc u=10``: :class:`curvlinalg_torch.EKFAC` (MC Fisher): factors
  and eigenvalue correction folded every step / every 10 steps, eigenbases recomputed every
  ``--inverse-every`` steps, ``λ`` added to the corrected eigenvalues.

Each entry has its own copy of the same initial model and cycles through the same pool of
random batches. Timing (``bench/timing.py``): every entry runs **blocks of** ``--block`` (20)
**consecutive steps**, as in training; a round times one block of every entry in an order
shuffled per round; ``--rounds`` (15) timed rounds after ``--warmup`` (1). Reported per entry
(see ``timing.py`` for the definitions): the block's time per step, median and IQR over the
blocks (ms; a block holds whole factor periods, so this is amortised over the factor refresh);
``ratio`` to SGD's; the per-round ratio (median [IQR]); ``mean`` ratio (total time, inverse
refreshes included); ``p10`` ratio; the median single step and its ratio.

Optional **peers** (``--peers``, the default; ``--no-peers`` skips them), run only if their
packages import (see ``bench/peers.py`` for the install commands — a separate virtualenv — and
what each computes): kfac-pytorch's ``KFACPreconditioner`` (empirical Fisher) and ASDL's K-FAC
(MC Fisher) at our refresh periods, ASDL's K-FAC with factors and inverses every step, ASDL's
SMW empirical-Fisher natural gradient, and BackPACK's K-FAC factors with a minimal K-FAC
update. A peer that does not import is skipped with a printed reason. Before timing, each peer
trains a separate copy of the model for 20 steps on the benchmark batches and its loss on
them must decrease (printed).

``--quick`` runs 3 rounds of 5-step blocks (seconds), for a smoke test; it includes the
installed peers.
``--json PATH`` also writes the table's numbers (and every timed step) as JSON to ``PATH``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import timing  # noqa: E402  (bench/timing.py: the shared timing protocol)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=15, help="timed rounds of blocks")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    parser.add_argument(
        "--block", type=int, default=20, help="consecutive steps per entry and round"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the round orders")
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--inverse-every", type=int, default=100)
    parser.add_argument(
        "--quick", action="store_true", help="3 rounds of 5-step blocks, 1 warm-up round"
    )
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
    parser.add_argument(
        "--every-step-peers",
        action="store_true",
        help="also ASDL's K-FAC with factors and inverses every step (10-15× SGD)",
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
        args.rounds, args.warmup, args.block = 3, 1, 5
    timing.pin_threads(args.threads)

    import torch
    import torch.nn.functional as F
    from curvlinalg_torch import EKFAC, FOOF, KFAC
    from torch import nn

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
        if name.startswith("ekfac"):
            ekfac = EKFAC(model, lr=0.1, damping=damping, update_every=every, seed=0, **common)
            return model, ekfac
        fisher = "empirical" if name.startswith("kfac-emp") else "mc"
        kfac = KFAC(
            model, lr=0.1, damping=damping, fisher=fisher, update_every=every, seed=0, **common
        )
        return model, kfac

    names = [
        "sgd",
        "foof u=1",
        "foof u=10",
        "kfac-mc u=1",
        "kfac-mc u=10",
        "kfac-emp u=1",
        "kfac-emp u=10",
        "ekfac-mc u=1",
        "ekfac-mc u=10",
    ]
    peer_notes: list[str] = []  # for --json: skipped peers and the peers' loss checks
    peers: dict[str, Callable[[nn.Module], Callable[[torch.Tensor, torch.Tensor], object]]] = {}
    if args.peers:
        from peers import check_decreases, peer_builders

        peers, skipped = peer_builders(
            args.batch, args.damping, args.inverse_every, args.every_step_peers
        )
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

    def timed(step: Callable[[torch.Tensor, torch.Tensor], object]) -> Callable[[int], object]:
        return lambda k: step(*pool[k % len(pool)])

    times = timing.time_blocks(
        {name: timed(steps[name]) for name in names},
        block=args.block,
        rounds=args.rounds,
        warmup=args.warmup,
        seed=args.seed,
        clock=args.clock,
        fallible=peers,
    )

    print(
        f"# bench_torch_step: MLP {'-'.join(map(str, widths))}, batch {args.batch}, float32, "
        f"threads {args.threads}, torch {torch.__version__}, inverse every "
        f"{args.inverse_every}, momentum 0.9, damping {args.damping}, "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}"
    )
    print(f"# {timing.describe(times)}")
    print(f"# python {sys.version.split()[0]}, command: {' '.join(sys.argv)}")
    print(timing.TABLE_HEADER)
    entries: list[dict[str, object]] = []  # for --json: the same numbers as the table
    for name in names:
        if name in times.failed:
            entry: dict[str, object] = {"name": name, "peer": True, "failed": times.failed[name]}
        else:
            entry = {**timing.summarise(times, name, "sgd"), "peer": name in peers}
        print(timing.table_row(entry))
        entries.append(entry)
    load = timing.load_average()
    if load:
        print(
            f"# load average at the end (1, 5, 15 min): {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
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
            **times.protocol(),
            "loadavg_end": load,
        }
        with open(args.json, "w") as file:
            json.dump({"meta": meta, "entries": entries}, file, indent=2)
        print(f"# wrote {args.json}")


if __name__ == "__main__":
    main()

"""Step time of the curvlinalg_torch optimizers on a small CNN, relative to ``torch.optim.SGD``.

Model: Puiu's MNIST CNN (4,712 parameters: two 5×5 convolutions with max-pooling, two linear
layers, dropout; ``reproduce_puiu.puiu_cnn``), batch ``--batch`` 512 of random 28×28 images,
float32, CPU, threads pinned (``--threads``, default 2). One *step* = ``zero_grad`` + forward
+ cross-entropy + ``backward`` + ``step``. Entries, all without momentum, empirical Fisher,
factor statistics and inverses every ``u`` steps (``update_every = inverse_every = u``, Puiu's
Ts = Tf = 30):

* ``sgd``: ``torch.optim.SGD(lr=0.01)``, the baseline;
* ``kfac u=30`` (product damping in the eigenbasis, as Puiu's K-FAC), ``kfac u=1``;
* ``foof u=30``;
* ``kldwrm-so u=30``, ``kldwrm-q u=30`` (exact ``F̄ + B/λ`` solve).

Timing (``bench/timing.py``, shared with ``bench_torch_step.py``): every entry runs blocks of
``--block`` (30, one refresh period) consecutive steps; a round times one block of every entry
in an order shuffled per round. Reported: the block's time per step, median [IQR] over the
blocks (amortised over the refresh), its ratio to SGD's, the per-round ratio (median [IQR]),
the total-time and p10 ratios, and the median single step with its ratio.
On this model most of a curvature step's extra cost used to be the unfolding (im2col) of the
convolutions' inputs on every step; the optimizers now unfold only on the steps that fold a
factor (see ``curvlinalg_torch.capture``), which this benchmark measures: run it on a commit
before that change for the comparison in ``bench/README.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import timing  # noqa: E402  (bench/timing.py: the shared timing protocol)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=8, help="timed rounds of blocks")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    parser.add_argument(
        "--block", type=int, default=30, help="consecutive steps per entry and round"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the round orders")
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument(
        "--quick", action="store_true", help="2 rounds of 3-step blocks, 1 warm-up round"
    )
    parser.add_argument("--json", metavar="PATH", help="also write the numbers as JSON")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.warmup, args.block = 2, 1, 3
    timing.pin_threads(args.threads)
    import reproduce_puiu
    import torch
    import torch.nn.functional as F
    from curvlinalg_torch import FOOF, KFAC, KLDWRM

    generator = torch.Generator().manual_seed(0)
    pool = [
        (
            torch.randn(args.batch, 784, generator=generator),
            torch.randint(0, 10, (args.batch,), generator=generator),
        )
        for _ in range(4)
    ]
    common = {"fisher": "empirical"}

    def periods(u: int) -> dict[str, int]:
        return {"update_every": u, "inverse_every": u}

    makers = {
        "sgd": lambda m: torch.optim.SGD(m.parameters(), lr=0.01),
        "kfac u=30": lambda m: KFAC(
            m, 0.01, 0.01, damping_rule="exact", ema_decay=0.95, **common, **periods(30)
        ),
        "kfac u=1": lambda m: KFAC(
            m, 0.01, 0.01, damping_rule="exact", ema_decay=0.95, **common, **periods(1)
        ),
        "foof u=30": lambda m: FOOF(m, 0.01, 0.01, ema_decay=0.95, **periods(30)),
        "kldwrm-so u=30": lambda m: KLDWRM(
            m, 0.01, "so", rho=0.33, damping=0.01, damping_rule="exact", **common, **periods(30)
        ),
        "kldwrm-q u=30": lambda m: KLDWRM(
            m, 0.01, "q", rho=0.5, damping=0.01, **common, **periods(30)
        ),
    }
    names = list(makers)
    models = {name: reproduce_puiu.puiu_cnn(0) for name in names}
    optimizers = {name: make(models[name]) for name, make in makers.items()}

    def step_of(name: str):
        model, optimizer = models[name], optimizers[name]

        def step(k: int) -> None:
            x, y = pool[k % len(pool)]
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()

        return step

    times = timing.time_blocks(
        {name: step_of(name) for name in names},
        block=args.block,
        rounds=args.rounds,
        warmup=args.warmup,
        seed=args.seed,
    )
    print(
        f"# bench_torch_conv_step: Puiu CNN (4712 parameters), batch {args.batch}, float32, "
        f"threads {args.threads}, torch {torch.__version__}; command: {' '.join(sys.argv)}"
    )
    print(f"# {timing.describe(times)}")
    print(timing.TABLE_HEADER)
    rows = [timing.summarise(times, name, "sgd") for name in names]
    for row in rows:
        print(timing.table_row(row))
    load = timing.load_average()
    if load:
        print(
            f"# load average at the end (1, 5, 15 min): {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
        )
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        meta = {
            "script": "bench_torch_conv_step.py",
            "command": sys.argv,
            "args": vars(args),
            "model": "Puiu CNN (4712 parameters)",
            "dtype": "float32",
            "torch": torch.__version__,
            **times.protocol(),
            "loadavg_end": load,
        }
        Path(args.json).write_text(json.dumps({"meta": meta, "entries": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

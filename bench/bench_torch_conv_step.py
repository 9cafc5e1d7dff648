"""Step time of the curvlinalg_torch optimizers on a small CNN, relative to ``torch.optim.SGD``.

Model: Puiu's MNIST CNN (4,712 parameters: two 5×5 convolutions with max-pooling, two linear
layers, dropout; ``reproduce_puiu.puiu_cnn``), batch ``--batch`` 512 of random 28×28 images,
float32, CPU, threads pinned (``--threads``, default 1). One *step* = ``zero_grad`` + forward
+ cross-entropy + ``backward`` + ``step``. Entries, all without momentum, empirical Fisher,
factor statistics and inverses every ``u`` steps (``update_every = inverse_every = u``, Puiu's
Ts = Tf = 30):

* ``sgd``: ``torch.optim.SGD(lr=0.01)``, the baseline;
* ``kfac u=30`` (product damping in the eigenbasis, as Puiu's K-FAC), ``kfac u=1``;
* ``foof u=30``;
* ``kldwrm-so u=30``, ``kldwrm-q u=30`` (exact ``F̄ + B/λ`` solve).

Rounds are interleaved (each round times one step of every entry, in rotated order); reported:
median step time [IQR], ratio of medians to SGD's, and median [IQR] of the per-round ratios.
On this model most of a curvature step's extra cost used to be the unfolding (im2col) of the
convolutions' inputs on every step; the optimizers now unfold only on the steps that fold a
factor (see ``curvlinalg_torch.capture``), which this benchmark measures: run it on a commit
before that change for the comparison in ``bench/README.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import training  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--quick", action="store_true", help="12 rounds, 2 warm-up")
    parser.add_argument("--json", metavar="PATH", help="also write the numbers as JSON")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.warmup = 12, 2
    training.limit_threads(args.threads)
    import numpy as np
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
    counters = dict.fromkeys(names, 0)
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(args.warmup + args.rounds):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            x, y = pool[counters[name] % len(pool)]
            counters[name] += 1
            model, optimizer = models[name], optimizers[name]
            start = time.perf_counter()
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
            if round_index >= args.warmup:
                times[name].append(time.perf_counter() - start)

    print(
        f"# bench_torch_conv_step: Puiu CNN (4712 parameters), batch {args.batch}, float32, "
        f"threads {args.threads}, torch {torch.__version__}, {args.rounds} rounds "
        f"(+{args.warmup} warm-up), wall clock; command: {' '.join(sys.argv)}"
    )
    print(f"{'entry':<16}{'median ms':>10}{'IQR ms':>18}{'× SGD':>7}{'round ratio [IQR]':>22}")
    base = np.asarray(times["sgd"])
    rows = []
    for name in names:
        sample = np.asarray(times[name])
        q1, median, q3 = np.percentile(sample, [25, 50, 75]) * 1e3
        r1, rm, r3 = np.percentile(sample / base, [25, 50, 75])
        ratio = float(np.median(sample) / np.median(base))
        print(
            f"{name:<16}{median:>10.2f}{f'[{q1:.2f}, {q3:.2f}]':>18}{ratio:>7.2f}"
            f"{f'{rm:.2f} [{r1:.2f}, {r3:.2f}]':>22}"
        )
        rows.append(
            {
                "name": name,
                "median_ms": median,
                "iqr_ms": [q1, q3],
                "ratio": ratio,
                "round_ratio": [r1, rm, r3],
            }
        )
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(
            json.dumps(
                {"args": vars(args), "torch": torch.__version__, "rows": rows},
                indent=1,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

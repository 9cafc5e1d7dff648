"""EK-FAC's training curve next to K-FAC's on Fashion-MNIST, in Benzing's setting.

The setting is ``reproduce_benzing.py``'s main run: MLP 784-1000-1000-1000-10 (ReLU, no
biases, Kaiming-normal, ``training.benzing_mlp``), all 60,000 training images standardised,
batch 100, constant lr and damping, seed s for the initialisation, the batch order and the MC
labels; every method of a seed starts from the same weights and sees the same batches. K-FAC is
``reproduce_benzing``'s: ``curvlinalg_torch.KFAC(lr 0.003, λ 0.01, fisher="mc",
ema_decay=0.95, update_every=1, inverse_every=T)`` (Benzing's (0.3, 1) in the mean-factor
convention). EK-FAC takes the same lr, damping, Fisher, EMA and periods:
``curvlinalg_torch.EKFAC(lr 0.003, λ 0.01, fisher="mc", ema_decay=0.95, update_every=1,
inverse_every=T)`` — factors and the eigenvalue correction folded every step, eigenbases
recomputed every T steps. The damping means different things: K-FAC splits λ between the
factors by the π rule, ``(A + π√λ I)⊗(G + √λ/π I)``; EK-FAC adds λ to the corrected
eigenvalues, ``Q diag(S̄) Qᵀ + λI`` (no cross terms, so it is the weaker damping of the two).

Methods (``--methods``, names ``KFAC T=<T>`` / ``EKFAC T=<T>``; default ``KFAC T=100,EKFAC
T=100``). ``T = 1`` (the paper's K-FAC) is accepted but expensive for EK-FAC: every step
recomputes seven eigendecompositions (six of 1000×1000).

Logged per method: the mini-batch loss of every update, the wall time of every epoch (sum of
the step times), the whole-training-set loss, test loss and accuracy at the end. Output:
``--out``/``ekfac_fashion-mnist.json`` and ``ekfac_fashion-mnist_loss.png`` (default
``bench/results/ekfac``). ``--quick``: a 784-50-50-10 MLP on 200 images of the shipped MNIST
subset, 4 updates per method, ``KFAC T=2,EKFAC T=2`` (refresh and in-between steps) — a
smoke test (seconds).

Usage::

    python bench/ekfac_fashion_mnist.py --epochs 1                     # defaults: T = 100
    python bench/ekfac_fashion_mnist.py --epochs 1 --methods "KFAC T=1,EKFAC T=10"
    python bench/ekfac_fashion_mnist.py --quick
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import training  # noqa: E402

BATCH = 100
QUICK_WIDTHS = (784, 50, 50, 10)
METHOD = re.compile(r"^(KFAC|EKFAC) T=(\d+)$")


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--methods", default="KFAC T=100,EKFAC T=100")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None, help="default bench/results/ekfac")
    parser.add_argument("--quick", action="store_true", help="smoke run (seconds)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.methods = "KFAC T=2,EKFAC T=2"
    if args.out is None:
        args.out = str(training.RESULTS / ("tmp/ekfac" if args.quick else "ekfac"))
    return args


def methods(text: str) -> list[tuple[str, str, int]]:
    """``[(name, "KFAC" | "EKFAC", T), ...]`` from ``"KFAC T=1,EKFAC T=100"``."""
    parsed = []
    for name in (item.strip() for item in text.split(",")):
        match = METHOD.match(name)
        if match is None or int(match.group(2)) < 1:
            raise SystemExit(f"--methods: {name!r} is not 'KFAC T=<T>' or 'EKFAC T=<T>' (T ≥ 1)")
        parsed.append((name, match.group(1), int(match.group(2))))
    return parsed


def hyperparameters() -> dict[str, float]:
    """K-FAC's (lr, λ) of ``reproduce_benzing.py`` (mean-factor convention), for both."""
    import reproduce_benzing

    return dict(reproduce_benzing.hyperparameters()["minibatch"]["KFAC"])


def make_optimizer(kind: str, period: int, model: Any, seed: int, hp: dict[str, float]) -> Any:
    from curvlinalg_torch import EKFAC, KFAC

    cls = KFAC if kind == "KFAC" else EKFAC
    return cls(
        model,
        hp["lr"],
        hp["damping"],
        fisher="mc",
        ema_decay=0.95,
        update_every=1,
        inverse_every=period,
        seed=seed,
    )


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    chosen = methods(args.methods)
    training.limit_threads(args.threads)
    import data
    import torch
    from torch import nn

    if args.quick:
        arrays = data.load("mnist-subset", train_size=200, test_size=200)
        widths = QUICK_WIDTHS
        steps = 4
    else:
        arrays = data.load("fashion-mnist")
        widths = (784, 1000, 1000, 1000, 10)
        steps = args.epochs * (len(arrays[0]) // BATCH)
    x_train, y_train, x_test, y_test = (torch.from_numpy(a) for a in arrays)
    steps_per_epoch = len(x_train) // BATCH
    hp = hyperparameters()
    batches = training.batch_order(len(x_train), BATCH, steps, args.seed)
    loss_function = nn.CrossEntropyLoss()
    runs: dict[str, dict[str, Any]] = {}
    for name, kind, period in chosen:
        model = training.benzing_mlp(args.seed, widths)
        run = training.train(
            model,
            make_optimizer(kind, period, model, args.seed, hp),
            x_train,
            y_train,
            batches,
            loss_function,
            name=name,
            show_progress=not args.no_progress,
            steps_per_epoch=steps_per_epoch,
        )
        run["train_loss"], run["train_accuracy"] = training.evaluate(
            model, x_train, y_train, loss_function
        )
        run["test_loss"], run["test_accuracy"] = training.evaluate(
            model, x_test, y_test, loss_function
        )
        run["optimizer"] = {"kind": kind, "inverse_every": period, "update_every": 1, **hp}
        runs[name] = run

    dataset = "mnist-subset" if args.quick else "fashion-mnist"
    print(
        f"\n{dataset}: MLP {'-'.join(map(str, widths))}, batch {BATCH}, {steps} updates, "
        f"seed {args.seed}, lr {hp['lr']:g}, λ {hp['damping']:g}, MC Fisher, {args.threads} threads"
    )
    print(
        f"{'method':<14}{'train loss':>12}{'last 100 mb':>13}{'test acc %':>12}{'test loss':>11}"
        f"{'s/epoch':>9}{'ms/step':>9}  diverged"
    )
    summary: dict[str, dict[str, Any]] = {}
    for name, run in runs.items():
        last = run["losses"][-100:]
        entry = {
            "train_loss": run["train_loss"],
            "last100_minibatch_loss": sum(last) / len(last) if last else float("nan"),
            "test_accuracy": run["test_accuracy"],
            "test_loss": run["test_loss"],
            "epoch_seconds": run["epoch_seconds"],
            "step_seconds_median": run["step_seconds_median"],
            "diverged_at": run["diverged_at"],
        }
        summary[name] = entry
        seconds = sum(run["epoch_seconds"]) / max(1, len(run["epoch_seconds"]))
        print(
            f"{name:<14}{entry['train_loss']:>12.4g}{entry['last100_minibatch_loss']:>13.4g}"
            f"{100 * entry['test_accuracy']:>12.2f}{entry['test_loss']:>11.4g}"
            f"{seconds:>9.1f}{1e3 * entry['step_seconds_median']:>9.1f}  {entry['diverged_at']}"
        )
        del run["step_seconds"]
    out = Path(args.out)
    stem = f"ekfac_{dataset}"
    training.write_json(
        out / f"{stem}.json",
        {
            "experiment": "EK-FAC vs K-FAC, Benzing's Fashion-MNIST setting",
            "dataset": dataset,
            "widths": list(widths),
            "batch": BATCH,
            "steps": steps,
            "steps_per_epoch": steps_per_epoch,
            "seed": args.seed,
            "threads": args.threads,
            "args": vars(args),
            "hyperparameters": hp,
            "torch": torch.__version__,
            "runs": runs,
            "summary": summary,
        },
    )
    plt = training.pyplot()
    if plt is not None:
        figure, axis = plt.subplots(figsize=(7, 4.5))
        window = 50 if steps >= 500 else 1
        for name, run in runs.items():
            training.plot_mean_std(axis, [run["losses"]], name, window)
        axis.set_yscale("log")
        axis.set_xlabel("update")
        smoothing = f" (moving mean of {window})" if window > 1 else ""
        axis.set_ylabel(f"training mini-batch loss{smoothing}")
        axis.set_title(f"EK-FAC vs K-FAC, MLP on {dataset}, batch {BATCH}, seed {args.seed}")
        axis.legend()
        figure.tight_layout()
        figure.savefig(out / f"{stem}_loss.png", dpi=120)
        plt.close(figure)
    print(f"wrote {out / stem}.json" + (f" and {stem}_loss.png" if plt is not None else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())

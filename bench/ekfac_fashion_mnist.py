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

Hyperparameters. ``--kfac-lr``/``--kfac-damping`` and ``--ekfac-lr``/``--ekfac-damping`` set
each method's (lr, λ); unset, they are K-FAC's values above (the defaults of the original run,
at which EK-FAC diverges). A method name may also carry its own, ``"EKFAC T=100 lr=0.01
damping=0.3"`` (that order, either optional), so that one call runs a small grid from the same
weights, batches and MC labels. ``--max-updates N`` stops every method after ``N`` updates
(tuning runs); ``--stem`` names the output files (default ``ekfac_<dataset>``), ``--no-plot``
skips the figure; ``--collect A.json B.json …`` trains nothing and writes the tuning table
of those runs (``collect``) to ``--out``/``ekfac_tuning.json``. The JSON records every
method's (lr, λ) (``runs[name]["optimizer"]`` and ``hyperparameters[name]``).

Logged per method: the mini-batch loss of every update, the wall time of every epoch (sum of
the step times), the whole-training-set loss, test loss and accuracy at the end. Output:
``--out``/``ekfac_fashion-mnist.json`` and ``ekfac_fashion-mnist_loss.png`` (default
``bench/results/ekfac``). ``--quick``: a 784-50-50-10 MLP on 200 images of the shipped MNIST
subset, 4 updates per method, ``KFAC T=2,EKFAC T=2`` unless ``--methods`` (refresh and
in-between steps) — a smoke test (seconds).

Usage::

    python bench/ekfac_fashion_mnist.py --epochs 1                     # defaults: T = 100
    python bench/ekfac_fashion_mnist.py --epochs 1 --methods "KFAC T=1,EKFAC T=10"
    python bench/ekfac_fashion_mnist.py --quick
    # a tuning grid: 150 updates, three EK-FAC (lr, λ) from the same start
    python bench/ekfac_fashion_mnist.py --seed 1 --max-updates 150 --stem ekfac_tuning_x \
        --no-plot --methods "EKFAC T=100 lr=0.01 damping=0.1,EKFAC T=100 lr=0.01 damping=0.3"
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import training  # noqa: E402

BATCH = 100
QUICK_WIDTHS = (784, 50, 50, 10)
NUMBER = r"([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)"
METHOD = re.compile(rf"^(KFAC|EKFAC) T=(\d+)(?: lr={NUMBER})?(?: damping={NUMBER})?$")


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--methods", default=None, help="default 'KFAC T=100,EKFAC T=100' (--quick: T=2)"
    )
    parser.add_argument("--threads", type=int, default=2)
    for kind in ("kfac", "ekfac"):
        label = "K-FAC" if kind == "kfac" else "EK-FAC"
        parser.add_argument(
            f"--{kind}-lr", type=float, default=None, help=f"{label}'s lr (default 0.003)"
        )
        parser.add_argument(
            f"--{kind}-damping", type=float, default=None, help=f"{label}'s λ (default 0.01)"
        )
    parser.add_argument(
        "--max-updates", type=int, default=None, help="stop every method after this many updates"
    )
    parser.add_argument("--stem", default=None, help="output file names (default ekfac_<dataset>)")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument(
        "--collect",
        nargs="+",
        default=None,
        metavar="JSON",
        help="no training: gather these runs' JSONs into --out/<--stem or ekfac_tuning>.json",
    )
    parser.add_argument("--out", default=None, help="default bench/results/ekfac")
    parser.add_argument("--quick", action="store_true", help="smoke run (seconds)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    for option in ("kfac_lr", "kfac_damping", "ekfac_lr", "ekfac_damping"):
        value = getattr(args, option)
        if value is not None and not value > 0:
            parser.error(f"--{option.replace('_', '-')} must be positive, got {value}")
    if args.max_updates is not None and args.max_updates < 1:
        parser.error(f"--max-updates must be at least 1, got {args.max_updates}")
    if args.methods is None:
        args.methods = "KFAC T=2,EKFAC T=2" if args.quick else "KFAC T=100,EKFAC T=100"
    if args.out is None:
        args.out = str(training.RESULTS / ("tmp/ekfac" if args.quick else "ekfac"))
    return args


def methods(text: str) -> list[tuple[str, str, int, dict[str, float]]]:
    """``[(name, "KFAC" | "EKFAC", T, overrides), ...]`` from ``"KFAC T=1,EKFAC T=100 lr=0.01
    damping=0.3"``; ``overrides`` holds the name's own ``lr``/``damping`` (none: ``{}``)."""
    parsed = []
    for name in (item.strip() for item in text.split(",")):
        match = METHOD.match(name)
        if match is None or int(match.group(2)) < 1:
            raise SystemExit(
                f"--methods: {name!r} is not 'KFAC T=<T>' or 'EKFAC T=<T>' (T ≥ 1), optionally "
                "followed by ' lr=<lr>' and/or ' damping=<λ>'"
            )
        overrides = {
            key: float(value)
            for key, value in (("lr", match.group(3)), ("damping", match.group(4)))
            if value is not None
        }
        if any(not value > 0 for value in overrides.values()):
            raise SystemExit(f"--methods: {name!r}: lr and damping must be positive")
        if any(name == other[0] for other in parsed):
            raise SystemExit(f"--methods: {name!r} is listed twice")
        parsed.append((name, match.group(1), int(match.group(2)), overrides))
    return parsed


def hyperparameters() -> dict[str, float]:
    """K-FAC's (lr, λ) of ``reproduce_benzing.py`` (mean-factor convention), for both."""
    import reproduce_benzing

    return dict(reproduce_benzing.hyperparameters()["minibatch"]["KFAC"])


def method_hyperparameters(
    kind: str, overrides: dict[str, float], args: argparse.Namespace, default: dict[str, float]
) -> dict[str, float]:
    """One method's ``{"lr", "damping"}``: its name's own values, else ``--kfac-*`` /
    ``--ekfac-*`` for its kind, else ``default`` (K-FAC's values of ``hyperparameters()``)."""
    prefix = kind.lower()
    chosen = {}
    for key in ("lr", "damping"):
        flag = getattr(args, f"{prefix}_{key}")
        chosen[key] = overrides.get(key, default[key] if flag is None else flag)
    return chosen


class StopOnOverflow:
    """``optimizer`` whose ``step`` reports the core's refusal of a non-finite eigenvalue
    correction as ``curvlinalg.NotPositiveDefiniteError``, which ``training.train`` records as a
    divergence (``diverged_at``) and goes on with the next method.

    Why: in a diverging EK-FAC run the captures can stay finite while the correction (their
    projected squares) overflows; ``kron.ema`` then raises ``ValueError("… contains NaN or
    infinite values")``, which would end the whole tuning grid. Any other error propagates.
    """

    def __init__(self, optimizer: Any) -> None:
        self.optimizer = optimizer

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def step(self, *args: Any) -> Any:
        from curvlinalg import NotPositiveDefiniteError

        try:
            return self.optimizer.step(*args)
        except NotPositiveDefiniteError:
            raise
        except ValueError as error:
            if "NaN or infinite" not in str(error):
                raise
            raise NotPositiveDefiniteError(f"non-finite curvature ({error})") from error


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


DIVERGED_LOSS = 10.0  # a final train loss above this (4× the initial ≈ 2.3) counts as diverged


def collect(paths: list[str]) -> dict[str, Any]:
    """The tuning table of several runs' JSONs (e.g. grids with ``--max-updates``): one row per
    method (kind, lr, λ, losses, test accuracy, ``diverged``: stopped on a non-finite loss or
    curvature, or whole-set train loss above ``DIVERGED_LOSS`` or NaN) and ``best[kind]``, the
    row of lowest whole-set train loss among each kind's non-diverged rows. Every file must
    have the same dataset, seed and number of updates (one grid)."""
    rows: list[dict[str, Any]] = []
    parts: dict[str, dict[str, Any]] = {}
    for path in paths:
        payload = json.loads(Path(path).read_text())
        parts[Path(path).name] = {
            key: payload.get(key)
            for key in ("dataset", "seed", "steps", "threads", "library")
            + ("load_average_before", "load_average_after")
        }
        for name, entry in payload["summary"].items():
            loss = entry["train_loss"]  # None: NaN (write_json stores non-finite as null)
            diverged = entry["diverged_at"] is not None or loss is None or loss > DIVERGED_LOSS
            rows.append(
                {
                    "file": Path(path).name,
                    "name": name,
                    "kind": payload["runs"][name]["optimizer"]["kind"],
                    "lr": entry["lr"],
                    "damping": entry["damping"],
                    "train_loss": loss,
                    "last100_minibatch_loss": entry["last100_minibatch_loss"],
                    "test_accuracy": entry["test_accuracy"],
                    "diverged_at": entry["diverged_at"],
                    "diverged": diverged,
                }
            )
    settings = {(part["dataset"], part["seed"], part["steps"]) for part in parts.values()}
    if len(settings) != 1:
        raise SystemExit(f"--collect: the files mix (dataset, seed, updates) {sorted(settings)}")
    best = {}
    for kind in sorted({row["kind"] for row in rows}):
        stable = [row for row in rows if row["kind"] == kind and not row["diverged"]]
        if stable:
            best[kind] = min(stable, key=lambda row: row["train_loss"])
    return {
        "rule": (
            "per kind: lowest whole-training-set loss after the grid's updates, among the runs "
            f"that did not diverge (non-finite loss or curvature, or train loss > {DIVERGED_LOSS})"
        ),
        "parts": parts,
        "rows": rows,
        "best": best,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.collect is not None:
        table = collect(args.collect)
        path = Path(args.out) / f"{args.stem or 'ekfac_tuning'}.json"
        training.write_json(path, {"experiment": "(lr, λ) grids", **table})
        for kind, row in table["best"].items():
            print(f"{kind}: best lr {row['lr']:g}, λ {row['damping']:g} ({row['train_loss']:.4g})")
        print(f"wrote {path}")
        return 0
    chosen = methods(args.methods)
    training.limit_threads(args.threads)
    import curvlinalg_torch
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
    if args.max_updates is not None:
        steps = min(steps, args.max_updates)
    x_train, y_train, x_test, y_test = (torch.from_numpy(a) for a in arrays)
    steps_per_epoch = len(x_train) // BATCH
    default_hp = hyperparameters()
    chosen_hp = {
        name: method_hyperparameters(kind, overrides, args, default_hp)
        for name, kind, _, overrides in chosen
    }
    batches = training.batch_order(len(x_train), BATCH, steps, args.seed)
    loss_function = nn.CrossEntropyLoss()
    load_before = os.getloadavg()
    runs: dict[str, dict[str, Any]] = {}
    for name, kind, period, _ in chosen:
        hp = chosen_hp[name]
        model = training.benzing_mlp(args.seed, widths)
        run = training.train(
            model,
            StopOnOverflow(make_optimizer(kind, period, model, args.seed, hp)),
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
        f"seed {args.seed}, MC Fisher, {args.threads} threads"
    )
    width = max(14, *(len(name) + 2 for name in runs))
    print(
        f"{'method':<{width}}{'lr':>8}{'λ':>8}{'train loss':>12}{'last 100 mb':>13}"
        f"{'test acc %':>12}{'test loss':>11}"
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
            **chosen_hp[name],
        }
        summary[name] = entry
        seconds = sum(run["epoch_seconds"]) / max(1, len(run["epoch_seconds"]))
        print(
            f"{name:<{width}}{entry['lr']:>8g}{entry['damping']:>8g}"
            f"{entry['train_loss']:>12.4g}{entry['last100_minibatch_loss']:>13.4g}"
            f"{100 * entry['test_accuracy']:>12.2f}{entry['test_loss']:>11.4g}"
            f"{seconds:>9.1f}{1e3 * entry['step_seconds_median']:>9.1f}  {entry['diverged_at']}"
        )
        del run["step_seconds"]
    out = Path(args.out)
    stem = args.stem or f"ekfac_{dataset}"
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
            "default_hyperparameters": default_hp,
            "hyperparameters": chosen_hp,
            "torch": torch.__version__,
            "library": str(Path(curvlinalg_torch.__file__).parent),
            "load_average_before": list(load_before),
            "load_average_after": list(os.getloadavg()),
            "runs": runs,
            "summary": summary,
        },
    )
    plt = None if args.no_plot else training.pyplot()
    if plt is not None:
        figure, axis = plt.subplots(figsize=(7, 4.5))
        window = 50 if steps >= 500 else 1
        for name, run in runs.items():
            hp = chosen_hp[name]
            label = name if "lr=" in name else f"{name} lr={hp['lr']:g} damping={hp['damping']:g}"
            if run["diverged_at"] is None:
                training.plot_mean_std(axis, [run["losses"]], label, window)
            else:  # its few raw losses, marked; the axis is cut at 10 below
                label += f" (diverged at update {run['diverged_at'] + 1})"
                updates = range(1, len(run["losses"]) + 1)
                axis.plot(updates, run["losses"], "x--", label=label)
        axis.set_yscale("log")
        if any(run["diverged_at"] is not None for run in runs.values()):
            axis.set_ylim(top=10.0)
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

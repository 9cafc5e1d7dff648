"""Reproduce Benzing (ICML 2022) Figs 1A/4B, 4A and 1D with curvlinalg_torch.

Protocol (NOTES.md §4.1). MLP 784-1000-1000-1000-10, ReLU, no biases, Kaiming-normal
initialisation, softmax cross-entropy; MNIST and/or Fashion-MNIST (all 60,000 training images,
flattened), batch 100, ``--epochs`` 10 (6,000 updates), constant lr and damping, ``--seeds`` 3
(seed s: initialisation ``torch.manual_seed(s)``, batch order and MC labels seeded with s;
every method of a seed starts from the same weights and sees the same batches).

* Main run (Figs 1A and 4B): SGD+momentum, Adam, K-FAC (MC Fisher, π-damped factors,
  T = 1), FOOF with T = 1 and T = 100, and the exact subsampled natural gradient (MC Fisher,
  Woodbury, the Fisher of the previous batch as in Benzing's code, refreshed every step).
  Logged per seed and method: the mini-batch training loss of every update, the wall time of
  every epoch, and at the end the loss over the whole training set and the test loss and
  accuracy. Figure: training loss per update (moving mean of 50), log scale, mean ± std.
* ``--timing`` (Fig 4A): seconds per epoch of SGD+momentum, FOOF and K-FAC at T = 1, 10, 100
  (``--timing-epochs`` epochs, one seed, on Fashion-MNIST when it is requested), with the
  ratios to SGD measured in the same run (the paper's are GPU numbers).
* ``--full-batch`` (Fig 1D): 1,000 training images (a permutation seeded with 42), full batch,
  100 updates: SGD+momentum, K-FAC without averaging (``ema_decay = 0``, T = 1), natural
  gradient with the MC and with the exact Fisher (all classes weighted by √p, C backwards),
  each Fisher taken on the batch at the current parameters (``fisher_batch="same"``) — in the
  full-batch setting that is what Benzing's code computes.

T is Benzing's inversion period: the preconditioner is recomputed every T steps, while the
factor averages take every batch (his default: no ``kf_n_update_steps``, i.e. S = T) —
``inverse_every=T, update_every=1`` here. Factor averages use m = 0.95.

Hyperparameters: Benzing's Table 1 (NOTES.md §4.1) in curvlinalg's mean-factor convention.
His code sums the linear layers' input factor over the batch (A = Σ_i a_i a_iᵀ); curvlinalg
averages it, so his FOOF and K-FAC ``(lr, λ)`` become ``(lr/B, λ/B)`` (NOTES.md §1, §2.4, §6.8):
K-FAC (0.3, 1) → (0.003, 0.01) at B = 100; FOOF (30, 100) → (0.3, 1); full-batch K-FAC
(0.1, 1e-4) → (1e-4, 1e-7) at B = 1000. His natural gradient already uses the mean Fisher
``F = (1/B) Σ_i g_i g_iᵀ`` of the mean-loss gradient, as ``NaturalGradient`` does, so its
values are unchanged: MC (1e-5, 1e-4), full batch MC (0.1, 1) and exact (100, 100). SGD
(momentum 0.9) and Adam (default betas) need no translation: lr 0.01 / 1e-4, full batch 0.03.

Deviations from the paper: inputs are standardised with each dataset's own training mean and
standard deviation (Benzing used MNIST's for both, an admitted oversight); the factor average
is curvlinalg's (first estimate taken as is) instead of Benzing's bias-corrected EMA, with no
11-batch warm-up, and a refresh step inverts factors that include its own batch (Benzing
inverts after the step); the natural gradient's Fisher is taken at the parameters of the
batch's own forward (his code re-runs the forward after the update); the 1,000-image subset
is not his ``random_split`` subset; the exact-Fisher values (100, 100) may assume a different
scale (App. D.4 says the paper's code scaled MC and exact Fisher differently). No
hyperparameter search was re-run.

Usage::

    python bench/reproduce_benzing.py --quick --all        # smoke run, bench/results/tmp/benzing
    python bench/reproduce_benzing.py --dataset both       # Figs 1A/4B: hours on a CPU
    python bench/reproduce_benzing.py --timing             # Fig 4A
    python bench/reproduce_benzing.py --full-batch --dataset both   # Fig 1D
    # one seed per process (in parallel, or on several machines), then one table and figure:
    python bench/reproduce_benzing.py --first-seed 1 --seeds 1 --out DIR1
    python bench/reproduce_benzing.py --merge DIR0/benzing_mnist.json DIR1/benzing_mnist.json
    # redraw the figures of written JSON files (any of the three experiments), running nothing:
    python bench/reproduce_benzing.py --plot-only bench/results/benzing/*.json
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import training  # noqa: E402

BATCH = 100
FULL_BATCH = 1000
FULL_BATCH_UPDATES = 100
SUBSET_SEED = 42

# Benzing's published hyperparameters, ICML 2022 Table 1 (NOTES.md §4.1), in his code's
# conventions: (lr, damping) with FOOF/K-FAC factors summed over the batch, natural gradient
# with the mean Fisher; SGD and Adam: lr.
PUBLISHED: dict[str, dict[str, Any]] = {
    "minibatch": {  # Figs 1A and 4B, batch 100
        "SGD+momentum": 0.01,
        "Adam": 1e-4,
        "KFAC": (0.3, 1.0),
        "FOOF": (30.0, 100.0),
        "Natural (MC)": (1e-5, 1e-4),
    },
    "full_batch": {  # Fig 1D, batch 1000
        "SGD+momentum": 0.03,
        "KFAC": (0.1, 1e-4),
        "Natural (MC)": (0.1, 1.0),
        "Natural (exact)": (100.0, 100.0),
    },
}
# Values read off the paper's figures (NOTES.md §4.1), for the printed tables. The main paper's
# Figs 1 and 4 are on Fashion-MNIST; their MNIST versions (Figs J.8, J.11) were not read off.
PAPER_DATASET = "fashion-mnist"
PAPER_FINAL_LOSS = {
    "SGD+momentum": "≈0.12–0.15",
    "Adam": "≈0.12–0.15",
    "KFAC T=1": "≈7e-3",
    "FOOF T=1": "≈2e-3",
    "FOOF T=100": "≈2e-3",
    "Natural (MC)": "≈0.15",
}
PAPER_FULL_BATCH_LOSS = {
    "SGD+momentum": "≈1e-2",
    "KFAC (no EMA)": "≈5e-7",
    "Natural (MC)": "≈4e-2",
    "Natural (exact)": "≈3e-3",
}
PAPER_SECONDS_PER_EPOCH = {  # Fig 4A, Fashion-MNIST, GPU
    "SGD+momentum": 1.6,
    "FOOF T=1": 14.0,
    "FOOF T=10": 3.2,
    "FOOF T=100": 2.1,
    "KFAC T=1": 25.0,
    "KFAC T=10": 5.0,
    "KFAC T=100": 3.0,
}


def translate(published: Any, method: str, batch: int) -> dict[str, float]:
    """One method's published value(s) in this library's convention (see the docstring):
    FOOF and K-FAC ``(lr, λ) → (lr/B, λ/B)``; natural gradient unchanged; SGD/Adam lr."""
    if not isinstance(published, tuple):
        return {"lr": float(published)}
    lr, damping = published
    if method.startswith(("FOOF", "KFAC")):
        lr, damping = training.sum_to_mean(lr, damping, batch)
    return {"lr": lr, "damping": damping}


def hyperparameters(batch: int = BATCH, full_batch: int = FULL_BATCH) -> dict[str, Any]:
    """``{"minibatch": {method: {"lr", "damping"}}, "full_batch": {...}}`` as used here."""
    return {
        "minibatch": {
            method: translate(value, method, batch)
            for method, value in PUBLISHED["minibatch"].items()
        },
        "full_batch": {
            method: translate(value, method, full_batch)
            for method, value in PUBLISHED["full_batch"].items()
        },
    }


MAIN_EXPERIMENT = "Benzing ICML 2022 Figs 1A/4B"


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="mnist", choices=["mnist", "fashion-mnist", "both"])
    parser.add_argument("--epochs", type=int, default=10)
    training.add_seed_arguments(parser, 3, "main-run JSON")
    parser.add_argument("--timing", action="store_true", help="Fig 4A: seconds per epoch")
    parser.add_argument("--timing-epochs", type=int, default=1)
    parser.add_argument("--full-batch", action="store_true", help="Fig 1D: 1000 images")
    parser.add_argument("--all", action="store_true", help="main run, --timing and --full-batch")
    parser.add_argument("--only", default="", help="comma-separated subset of the methods")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None, help="default bench/results/benzing")
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: 400 images, 4 steps per method, 1 seed"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument(
        "--plot-only",
        nargs="+",
        metavar="JSON",
        help="run nothing: redraw the figure of each written JSON file (main run, --timing or "
        "--full-batch) into --out (default: the JSON's own folder)",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.epochs, args.seeds, args.timing_epochs = 1, 1, 1
    if args.out is None and not args.plot_only:
        args.out = str(training.RESULTS / ("tmp" if args.quick else "") / "benzing")
    return args


def seed_count(runs: dict[str, list[dict[str, Any]]]) -> int:
    """How many distinct seeds the per-method runs hold (the figures' titles say it)."""
    return len({run["seed"] for per_seed in runs.values() for run in per_seed})


def _seeds_text(runs: dict[str, list[dict[str, Any]]]) -> str:
    count = seed_count(runs)
    return f"{count} seed" + ("" if count == 1 else "s")


def _optimizers(kind: str, hp: dict[str, Any]) -> dict[str, Callable[[Any, int], Any]]:
    """Name → ``make(model, seed)`` for one experiment (``"main"``, ``"timing"``, ``"full"``)."""
    import torch
    from curvlinalg_torch import FOOF, KFAC, NaturalGradient

    def sgd(lr: float) -> Callable[[Any, int], Any]:
        return lambda m, s: torch.optim.SGD(m.parameters(), lr=lr, momentum=0.9)

    def foof(T: int) -> Callable[[Any, int], Any]:
        h = hp["minibatch"]["FOOF"]
        return lambda m, s: FOOF(m, h["lr"], h["damping"], ema_decay=0.95, inverse_every=T)

    def kfac(T: int, h: dict[str, float], ema: float = 0.95) -> Callable[[Any, int], Any]:
        return lambda m, s: KFAC(
            m, h["lr"], h["damping"], fisher="mc", ema_decay=ema, inverse_every=T, seed=s
        )

    def natural(h: dict[str, float], fisher: str, batch: str) -> Callable[[Any, int], Any]:
        return lambda m, s: NaturalGradient(
            m, h["lr"], h["damping"], fisher=fisher, fisher_batch=batch, seed=s
        )

    mini, full = hp["minibatch"], hp["full_batch"]
    if kind == "main":
        return {
            "SGD+momentum": sgd(mini["SGD+momentum"]["lr"]),
            "Adam": lambda m, s: torch.optim.Adam(m.parameters(), lr=mini["Adam"]["lr"]),
            "KFAC T=1": kfac(1, mini["KFAC"]),
            "FOOF T=1": foof(1),
            "FOOF T=100": foof(100),
            "Natural (MC)": natural(mini["Natural (MC)"], "mc", "independent"),
        }
    if kind == "timing":
        made = {"SGD+momentum": sgd(mini["SGD+momentum"]["lr"])}
        for T in (1, 10, 100):
            made[f"FOOF T={T}"] = foof(T)
        for T in (1, 10, 100):
            made[f"KFAC T={T}"] = kfac(T, mini["KFAC"])
        return made
    return {
        "SGD+momentum": sgd(full["SGD+momentum"]["lr"]),
        "KFAC (no EMA)": kfac(1, full["KFAC"], ema=0.0),
        "Natural (MC)": natural(full["Natural (MC)"], "mc", "same"),
        "Natural (exact)": natural(full["Natural (exact)"], "exact", "same"),
    }


def _select(made: dict[str, Any], only: str) -> dict[str, Any]:
    if not only:
        return made
    wanted = [name.strip() for name in only.split(",")]
    return {name: make for name, make in made.items() if name in wanted}


def print_header(hp: dict[str, Any]) -> None:
    print("Benzing (ICML 2022) reproduction — MLP 784-1000-1000-1000-10, ReLU, no biases")
    print("hyperparameters: published (Table 1, sum-over-batch factors) → used (mean factors)")
    for part, batch in (("minibatch", BATCH), ("full_batch", FULL_BATCH)):
        print(f"  {part} (B = {batch}):")
        for method, value in PUBLISHED[part].items():
            used = hp[part][method]
            rule = (
                "lr/B, λ/B"
                if method.startswith(("FOOF", "KFAC"))
                else ("unchanged (mean Fisher)" if "damping" in used else "lr")
            )
            shown = ", ".join(f"{key} {number:g}" for key, number in used.items())
            print(f"    {method:<16} {value!s:<14} → {shown:<28} [{rule}]")


@functools.lru_cache(maxsize=2)
def _data(dataset: str, quick: bool) -> tuple[Any, ...]:
    import data
    import torch

    sizes = {"train_size": 400, "test_size": 500} if quick else {}
    # The smoke run uses the subset shipped in the repository (no download, works in CI).
    name = "mnist-subset" if quick and dataset == "mnist" else dataset
    return tuple(torch.from_numpy(array) for array in data.load(name, **sizes))


def _run_methods(
    made: dict[str, Callable[[Any, int], Any]],
    arrays: tuple[Any, ...],
    batch: int,
    steps: int,
    seeds: list[int],
    args: argparse.Namespace,
    *,
    evaluate_train: bool = True,
) -> dict[str, list[dict[str, Any]]]:
    from torch import nn

    x_train, y_train, x_test, y_test = arrays
    loss_function = nn.CrossEntropyLoss()
    steps_per_epoch = len(x_train) // batch
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in made}
    for seed in seeds:
        batches = training.batch_order(len(x_train), batch, steps, seed)
        for name, make in made.items():
            model = training.benzing_mlp(seed)
            run = training.train(
                model,
                make(model, seed),
                x_train,
                y_train,
                batches,
                loss_function,
                name=f"{name} s{seed}",
                show_progress=not args.no_progress,
                steps_per_epoch=steps_per_epoch,
            )
            del run["step_seconds"]
            if evaluate_train:
                run["train_loss"], run["train_accuracy"] = training.evaluate(
                    model, x_train, y_train, loss_function
                )
            run["test_loss"], run["test_accuracy"] = training.evaluate(
                model, x_test, y_test, loss_function
            )
            run["seed"] = seed
            runs[name].append(run)
    return runs


def _summary(runs: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, float]]:
    summary = {}
    for name, per_seed in runs.items():
        entry = {}
        for key in ("train_loss", "test_loss", "test_accuracy"):
            if all(key in run for run in per_seed):
                entry[f"{key}_mean"], entry[f"{key}_std"] = training.mean_std(
                    [run[key] for run in per_seed]
                )
        last = [sum(run["losses"][-100:]) / len(run["losses"][-100:]) for run in per_seed]
        entry["last100_minibatch_loss_mean"], entry["last100_minibatch_loss_std"] = (
            training.mean_std(last)
        )
        epochs = [seconds for run in per_seed for seconds in run["epoch_seconds"]]
        entry["epoch_seconds_mean"], entry["epoch_seconds_std"] = training.mean_std(epochs)
        summary[name] = entry
    return summary


def _loss_figure(path: Path, runs: dict[str, Any], title: str, window: int) -> None:
    plt = training.pyplot()
    if plt is None:
        return
    figure, axis = plt.subplots(figsize=(7, 4.5))
    for name, per_seed in runs.items():
        training.plot_mean_std(axis, [run["losses"] for run in per_seed], name, window)
    axis.set_yscale("log")
    axis.set_xlabel("update")
    smoothing = f" (moving mean of {window})" if window > 1 else ""
    axis.set_ylabel(f"training mini-batch loss{smoothing}")
    axis.set_title(title)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main_run(args: argparse.Namespace, hp: dict[str, Any], dataset: str, out: Path) -> None:
    arrays = _data(dataset, args.quick)
    steps_per_epoch = len(arrays[0]) // BATCH
    steps = args.epochs * steps_per_epoch
    made = _select(_optimizers("main", hp), args.only)
    seeds = training.seed_range(args.first_seed, args.seeds)
    runs = _run_methods(made, arrays, BATCH, steps, seeds, args)
    main_report(runs, dataset, steps_per_epoch, hp, out, {"args": vars(args)})


def main_report(
    runs: dict[str, list[dict[str, Any]]],
    dataset: str,
    steps_per_epoch: int,
    hp: dict[str, Any],
    out: Path,
    provenance: dict[str, Any],
) -> None:
    """Table, ``benzing_<dataset>.json`` and the loss figure of a main run's ``runs``."""
    summary = _summary(runs)
    steps = max(len(run["losses"]) for per_seed in runs.values() for run in per_seed)
    seeds = sorted({run["seed"] for per_seed in runs.values() for run in per_seed})
    print(f"\n{dataset}: batch {BATCH}, {steps} updates, seeds {seeds}, mean ± std")
    print(
        f"{'method':<14}{'train loss':>22}{'last 100 mb':>12}{'test acc %':>16}"
        f"{'test loss':>10}{'s/epoch':>9}  paper (train loss, {PAPER_DATASET})"
    )
    for name, entry in summary.items():
        print(
            f"{name:<14}{entry['train_loss_mean']:>12.3g} ± {entry['train_loss_std']:<7.2g}"
            f"{entry['last100_minibatch_loss_mean']:>12.3g}"
            f"{100 * entry['test_accuracy_mean']:>9.2f} ± {100 * entry['test_accuracy_std']:<4.2f}"
            f"{entry['test_loss_mean']:>10.3g}{entry['epoch_seconds_mean']:>9.2f}"
            f"  {PAPER_FINAL_LOSS.get(name, '')}"
        )
    stem = f"benzing_{dataset}"
    training.write_json(
        out / f"{stem}.json",
        {
            "experiment": MAIN_EXPERIMENT,
            "dataset": dataset,
            "batch": BATCH,
            "steps_per_epoch": steps_per_epoch,
            **provenance,
            "seeds": seeds,
            "hyperparameters": hp["minibatch"],
            "published": PUBLISHED["minibatch"],
            "runs": runs,
            "summary": summary,
            "paper_final_train_loss": PAPER_FINAL_LOSS,
            "paper_dataset": PAPER_DATASET,
        },
    )
    main_figure(out, dataset, runs)
    print(f"wrote {out / stem}.json and {stem}_loss.png")


def main_figure(out: Path, dataset: str, runs: dict[str, list[dict[str, Any]]]) -> Path:
    """The main run's loss figure, ``benzing_<dataset>_loss.png``."""
    steps = max(len(run["losses"]) for per_seed in runs.values() for run in per_seed)
    path = out / f"benzing_{dataset}_loss.png"
    _loss_figure(
        path,
        runs,
        f"MLP on {dataset}, batch {BATCH} (mean ± std, {_seeds_text(runs)})",
        50 if steps >= 500 else 1,
    )
    return path


def timing_run(args: argparse.Namespace, hp: dict[str, Any], dataset: str, out: Path) -> None:
    arrays = _data(dataset, args.quick)
    steps_per_epoch = len(arrays[0]) // BATCH
    steps = args.timing_epochs * steps_per_epoch
    made = _select(_optimizers("timing", hp), args.only)
    runs = _run_methods(made, arrays, BATCH, steps, [0], args, evaluate_train=False)
    seconds = {name: training.mean_std(r[0]["epoch_seconds"])[0] for name, r in runs.items()}
    reference = seconds.get("SGD+momentum", next(iter(seconds.values())))
    paper_sgd = PAPER_SECONDS_PER_EPOCH["SGD+momentum"]
    print(
        f"\nwall-clock per epoch ({steps_per_epoch} updates of {BATCH}), {dataset}, "
        f"{args.threads} CPU threads; paper: Fig 4A (GPU)"
    )
    print(f"{'method':<14}{'s/epoch':>9}{'× SGD':>8}{'paper s/epoch':>15}{'paper × SGD':>13}")
    for name, value in seconds.items():
        paper = PAPER_SECONDS_PER_EPOCH.get(name)
        paper_text = f"{paper:>15.1f}{paper / paper_sgd:>13.2f}" if paper else ""
        print(f"{name:<14}{value:>9.2f}{value / reference:>8.2f}{paper_text}")
    stem = f"benzing_timing_{dataset}"
    training.write_json(
        out / f"{stem}.json",
        {
            "experiment": "Benzing ICML 2022 Fig 4A",
            "dataset": dataset,
            "batch": BATCH,
            "steps_per_epoch": steps_per_epoch,
            "threads": args.threads,
            "args": vars(args),
            "runs": runs,
            "seconds_per_epoch": seconds,
            "ratio_to_sgd": {name: value / reference for name, value in seconds.items()},
            "paper_seconds_per_epoch_gpu": PAPER_SECONDS_PER_EPOCH,
        },
    )
    timing_figure(out, dataset, seconds, args.threads)
    print(f"wrote {out / stem}.json and {stem}.png")


def timing_figure(out: Path, dataset: str, seconds: dict[str, float], threads: int) -> Path:
    """Fig 4A's bars, ``benzing_timing_<dataset>.png``."""
    path = out / f"benzing_timing_{dataset}.png"
    plt = training.pyplot()
    if plt is None:
        return path
    figure, axis = plt.subplots(figsize=(6, 4))
    periods = [1, 10, 100]
    width = 0.38
    for offset, method in ((-width / 2, "FOOF"), (width / 2, "KFAC")):
        values = [seconds.get(f"{method} T={T}", float("nan")) for T in periods]
        axis.bar([i + offset for i in range(len(periods))], values, width, label=method)
    if "SGD+momentum" in seconds:
        axis.axhline(seconds["SGD+momentum"], color="k", linestyle="--", label="SGD+momentum")
    axis.set_xticks(range(len(periods)), [f"T = {T}" for T in periods])
    axis.set_ylabel(f"seconds per epoch ({threads} CPU threads)")
    axis.set_title(f"Wall-clock per epoch, MLP on {dataset}")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def full_batch_run(args: argparse.Namespace, hp: dict[str, Any], dataset: str, out: Path) -> None:
    import torch

    x_train, y_train, x_test, y_test = _data(dataset, args.quick)
    size, updates = (100, 3) if args.quick else (FULL_BATCH, FULL_BATCH_UPDATES)
    subset = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(SUBSET_SEED))
    subset = subset[:size]
    arrays = (x_train[subset], y_train[subset], x_test, y_test)
    made = _select(_optimizers("full", hp), args.only)
    runs = _run_methods(made, arrays, size, updates, list(range(args.seeds)), args)
    summary = _summary(runs)
    print(f"\n{dataset}: {size} images, full batch, {updates} updates, mean ± std")
    print(
        f"{'method':<16}{'final loss':>22}{'test acc %':>16}{'s/update':>10}  "
        f"paper ({PAPER_DATASET})"
    )
    for name, entry in summary.items():
        print(
            f"{name:<16}{entry['train_loss_mean']:>12.3g} ± {entry['train_loss_std']:<7.2g}"
            f"{100 * entry['test_accuracy_mean']:>9.2f} ± {100 * entry['test_accuracy_std']:<4.2f}"
            f"{entry['epoch_seconds_mean']:>10.3f}  {PAPER_FULL_BATCH_LOSS.get(name, '')}"
        )
    stem = f"benzing_fullbatch_{dataset}"
    training.write_json(
        out / f"{stem}.json",
        {
            "experiment": "Benzing ICML 2022 Fig 1D",
            "dataset": dataset,
            "batch": size,
            "subset_seed": SUBSET_SEED,
            "args": vars(args),
            "hyperparameters": hp["full_batch"],
            "published": PUBLISHED["full_batch"],
            "runs": runs,
            "summary": summary,
            "paper_final_train_loss": PAPER_FULL_BATCH_LOSS,
            "paper_dataset": PAPER_DATASET,
        },
    )
    full_batch_figure(out, dataset, size, runs)
    print(f"wrote {out / stem}.json and {stem}_loss.png")


def full_batch_figure(
    out: Path, dataset: str, size: int, runs: dict[str, list[dict[str, Any]]]
) -> Path:
    """Fig 1D's loss figure, ``benzing_fullbatch_<dataset>_loss.png``."""
    path = out / f"benzing_fullbatch_{dataset}_loss.png"
    _loss_figure(
        path,
        runs,
        f"MLP on {size} {dataset} images, full batch (mean ± std, {_seeds_text(runs)})",
        1,
    )
    return path


def plot_only(paths: list[str], out: str | None) -> list[Path]:
    """Redraw the figure of each JSON file that this script wrote; return the figures."""
    written = []
    for name in paths:
        path = Path(name)
        payload = json.loads(path.read_text())
        folder = Path(out) if out else path.parent
        folder.mkdir(parents=True, exist_ok=True)
        experiment = payload.get("experiment")
        if experiment == MAIN_EXPERIMENT:
            figure = main_figure(folder, payload["dataset"], payload["runs"])
        elif experiment == "Benzing ICML 2022 Fig 1D":
            figure = full_batch_figure(
                folder, payload["dataset"], payload["batch"], payload["runs"]
            )
        elif experiment == "Benzing ICML 2022 Fig 4A":
            figure = timing_figure(
                folder, payload["dataset"], payload["seconds_per_epoch"], payload["threads"]
            )
        else:
            raise SystemExit(f"--plot-only: {path} is not a run of this script ({experiment!r})")
        print(f"{path} -> {figure}")
        written.append(figure)
    return written


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.plot_only:
        plot_only(args.plot_only, args.out)
        return 0
    training.limit_threads(args.threads)
    hp = hyperparameters()
    print_header(hp)
    datasets = ["mnist", "fashion-mnist"] if args.dataset == "both" else [args.dataset]
    out = Path(args.out)
    if args.merge:
        parts = training.read_parts(args.merge, MAIN_EXPERIMENT)
        datasets = {part["dataset"] for part in parts}
        if len(datasets) != 1:
            raise SystemExit(f"--merge: the files hold different datasets {sorted(datasets)}")
        runs = training.merge_runs([part["runs"] for part in parts])
        main_report(
            runs,
            parts[0]["dataset"],
            parts[0]["steps_per_epoch"],
            hp,
            out,
            {"merged_from": [part.get("args", part.get("merged_from")) for part in parts]},
        )
        return 0
    main_part = args.all or not (args.timing or args.full_batch)
    if main_part:
        for dataset in datasets:
            main_run(args, hp, dataset, out)
    if args.timing or args.all:
        timing_run(args, hp, "fashion-mnist" if "fashion-mnist" in datasets else datasets[0], out)
    if args.full_batch or args.all:
        for dataset in datasets:
            full_batch_run(args, hp, dataset, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

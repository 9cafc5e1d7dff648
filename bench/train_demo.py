"""Train the MLP 784-1000-1000-1000-10 on the embedded MNIST subset with five optimizers.

SGD with momentum, Adam, and curvlinalg's FOOF, K-FAC (MC Fisher) and exact subsampled natural
gradient (MC Fisher from an independent batch), each for a few epochs at batch 100, from the
same initialisation and the same batch order. Prints a table (final training loss over the
whole training subset, test accuracy, median time per step as a ratio to SGD measured in this
run) and writes the loss curves to ``demo_loss.png`` and the numbers to ``demo.json`` in
``bench/results/tmp/`` (ignored by git); ``--out bench/results`` replaces the committed
results.

The network is Benzing's (ICML 2022): ReLU, no biases, Kaiming-normal initialisation, softmax
cross-entropy. Hyperparameters (mean-factor convention, see README) are Benzing's Table 1 values
translated where they exist (FOOF lr 30, λ 100 summed over the batch → 0.3, 1.0) and otherwise
picked by a one-epoch check; they are not the result of a full search.

Usage::

    python bench/train_demo.py                      # 5 epochs, ~2 min on 2 quiet CPU cores
    python bench/train_demo.py --out bench/results  # the same, writing the committed results
    python bench/train_demo.py --quick              # a few steps per optimizer (smoke test)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--dataset", default="mnist-subset", help="mnist-subset, mnist, fashion-mnist"
    )
    parser.add_argument("--only", default="", help="comma-separated subset of the optimizers")
    parser.add_argument(
        "--out",
        default=str(HERE / "results" / "tmp"),
        help="where to write demo.json and demo_loss.png (default bench/results/tmp, ignored "
        "by git; bench/results holds the committed ones)",
    )
    parser.add_argument("--quick", action="store_true", help="10 steps each, no figure")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser.parse_args()


def main() -> int:
    args = parse()
    sys.path.insert(0, str(HERE))
    import training

    training.limit_threads(args.threads)
    import data
    import torch
    from curvlinalg_torch import FOOF, KFAC, NaturalGradient
    from torch import nn

    x_train, y_train, x_test, y_test = data.load(args.dataset)
    x_train, y_train = torch.from_numpy(x_train), torch.from_numpy(y_train)
    x_test, y_test = torch.from_numpy(x_test), torch.from_numpy(y_test)

    def network() -> nn.Module:
        return training.benzing_mlp(args.seed)

    optimizers = {
        "SGD+momentum": lambda m: torch.optim.SGD(m.parameters(), lr=0.03, momentum=0.9),
        "Adam": lambda m: torch.optim.Adam(m.parameters(), lr=3e-4),
        "FOOF": lambda m: FOOF(m, lr=0.3, damping=1.0, inverse_every=100, update_every=10),
        "KFAC": lambda m: KFAC(
            m, lr=0.3, damping=1.0, fisher="mc", inverse_every=100, update_every=10, seed=0
        ),
        "NaturalGradient": lambda m: NaturalGradient(
            m,
            lr=0.1,
            damping=1.0,
            fisher="mc",
            fisher_batch="independent",
            refresh_every=10,
            seed=0,
        ),
    }
    if args.only:
        wanted = [name.strip() for name in args.only.split(",")]
        unknown = [name for name in wanted if name not in optimizers]
        if unknown:
            raise SystemExit(f"unknown optimizer(s) {unknown}; choose from {list(optimizers)}")
        optimizers = {name: optimizers[name] for name in wanted}

    steps_per_epoch = len(x_train) // args.batch
    total_steps = 10 if args.quick else args.epochs * steps_per_epoch
    batches = training.batch_order(len(x_train), args.batch, total_steps, args.seed)
    loss_function = nn.CrossEntropyLoss()

    results = {}
    for name, make in optimizers.items():
        model = network()
        optimizer = make(model)
        run = training.train(
            model,
            optimizer,
            x_train,
            y_train,
            batches,
            loss_function,
            name=name,
            label_width=15,
            show_progress=not args.no_progress,
        )
        train_loss, _ = training.evaluate(model, x_train, y_train, loss_function)
        _, accuracy = training.evaluate(model, x_test, y_test, loss_function, chunk=len(x_test))
        results[name] = {
            "losses": run["losses"],
            "step_seconds_median": run["step_seconds_median"],
            "final_train_loss": train_loss,
            "test_accuracy": accuracy,
        }

    reference = results.get("SGD+momentum", next(iter(results.values())))["step_seconds_median"]
    print(
        f"\n{args.dataset}, MLP 784-1000-1000-1000-10, batch {args.batch}, {total_steps} steps, "
        f"{args.threads} threads"
    )
    print(f"{'optimizer':<16}{'train loss':>12}{'test acc':>10}{'ms/step':>10}{'× SGD':>8}")
    for name, result in results.items():
        milliseconds = 1e3 * result["step_seconds_median"]
        print(
            f"{name:<16}{result['final_train_loss']:>12.4g}{100 * result['test_accuracy']:>9.2f}%"
            f"{milliseconds:>10.1f}{result['step_seconds_median'] / reference:>8.2f}"
        )

    if args.quick:
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "demo.json").write_text(json.dumps({"args": vars(args), "results": results}))
    plt = training.pyplot()
    if plt is None:
        return 0
    figure, axis = plt.subplots(figsize=(7, 4.5))
    window = 20
    for name, result in results.items():
        if len(result["losses"]) >= window:
            training.plot_mean_std(axis, [result["losses"]], name, window)
    axis.set_yscale("log")
    axis.set_xlabel("update")
    axis.set_ylabel(f"training mini-batch loss (mean of {window})")
    axis.set_title(f"MLP 784-1000-1000-1000-10 on {args.dataset}, batch {args.batch}")
    axis.legend()
    figure.tight_layout()
    figure.savefig(out / "demo_loss.png", dpi=120)
    print(f"wrote {out / 'demo_loss.png'} and {out / 'demo.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

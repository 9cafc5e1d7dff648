"""A small decoder-only transformer language model trained with AdamW, K-FAC, FOOF and the
natural gradient (issue 12, "A real transformer, end to end").

Data (no download): byte-level language modelling of **CPython's standard-library source**,
the top-level modules ``<stdlib>/*.py`` of the running interpreter (``sysconfig.get_paths()
["stdlib"]``) whose names do not start with ``_``, in sorted order; licence: the Python
Software Foundation License (PSF-2.0), which ships with every CPython. Each file is split
into **documents** at its top-level statements (``def``, ``class``, decorators, ``if``): one
document per definition, of very different lengths. A document is cut into windows of
``context + 1`` bytes; the last (or only) window of every document is **padded** to the
context (input byte ``0``, which source files never contain, and target ``-100`` =
``ignore_index``), so most batches hold padding and the loss is the mean over real tokens
only. Every 10th file (index ``5 mod 10``) is held out for validation. The sha256 of the
corpus is recorded with the results (it differs between CPython patch releases).

Model (nanoGPT-style plain modules, so that the curvature optimizers capture the
projections): token embedding (256 bytes) tied to the output head, learned positions,
``--layers`` pre-LayerNorm blocks of causal self-attention (fused ``qkv`` ``nn.Linear``,
``F.scaled_dot_product_attention(is_causal=True)``, output ``proj``) and a GELU MLP
(``fc`` 4× wide, ``fc2``), a final LayerNorm. Every ``nn.Linear`` of the blocks is
captured by K-FAC/FOOF/the natural gradient; the embeddings (the head is tied to the token
embedding) and the LayerNorms go to the fallback, ``torch.optim.AdamW`` at the best AdamW
learning rate.

Optimizers, all from the same initial weights and the same batch order, linear warm-up
(``--warmup-steps``) then cosine decay to 10 % of every learning rate (LambdaLR on every
param group, so it also scales the fallback's):

* ``adamw lr=…``: ``torch.optim.AdamW`` (β = (0.9, 0.95), weight decay 0.1 on the matrices
  only), one run per learning rate of ``--adamw-lrs``; the best final validation loss is the
  baseline;
* ``kfac``: :class:`curvlinalg_torch.KFAC`, ``fisher=--kfac-fisher`` (``"empirical"``: the
  data labels, works on ``(B, T, C)`` logits with padding), π-damped, momentum 0.9, factors
  every ``--update-every`` (10), inverses every ``--inverse-every`` (100);
* ``foof``: :class:`curvlinalg_torch.FOOF`, same periods;
* ``ng``: :class:`curvlinalg_torch.NaturalGradient`, empirical Fisher of the step's own batch
  (``fisher_batch="same"``), every layer jointly (``structure="full"``).

Two measurements:

1. **Step time** (bench/timing.py's protocol): each optimizer on its own copy of the model
   times ``--timing-rounds`` rounds of one block of ``--timing-block`` (default 100 = one
   inverse period) consecutive training steps, the entries of a round in shuffled order; the
   ratio to AdamW's (median of the blocks, per-round, total time).
2. **Training curves**: each optimizer trains ``--steps`` steps (one after the other); the
   validation loss (mean over the real tokens of the first ``--val-sequences`` validation
   windows) is evaluated every ``--eval-every`` steps, outside the clock; wall-clock = the
   sum of the timed training steps. ``time_to_target``: the first evaluation at which an
   optimizer's validation loss is at or below the best AdamW run's final one, and its
   fraction of that AdamW run's training time (issue 12's goal: ≤ 0.7).

``--quick``: a one-block model of width 32, context 32, 40 steps, 2 timing rounds of 5-step
blocks, for the smoke test (seconds). ``--json``/``--figure`` set the outputs (defaults
``bench/results/transformer.json`` / ``transformer_loss.png``; ``--quick``:
``bench/results/tmp/``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import sys
import sysconfig
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import timing  # noqa: E402  (bench/timing.py: the shared timing protocol)

HERE = Path(__file__).resolve().parent
PAD_INPUT = 0  # byte 0 never occurs in the source files (checked when the corpus is read)
IGNORE = -100  # F.cross_entropy's default ignore_index
VOCAB = 256

#: top-level statements that start a new document
_DOCUMENT_START = re.compile(r"\n(?=(?:def |class |async def |@|if ))")


# --------------------------------------------------------------------------------------
# Corpus (standard library only: the JAX script imports this module without torch)
# --------------------------------------------------------------------------------------


def stdlib_files(limit: int | None = None) -> list[Path]:
    """The sorted top-level ``*.py`` modules of the running interpreter's standard library
    whose names do not start with ``_`` (the first ``limit`` of them)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.glob("*.py") if not p.name.startswith("_"))
    if not files:
        raise FileNotFoundError(f"no standard-library sources under {root}")
    return files[:limit] if limit else files


def documents(text: bytes) -> list[bytes]:
    """A source file split into documents at its top-level ``def``/``class``/decorator/``if``
    lines (each document keeps its leading statement); empty pieces dropped."""
    pieces = _DOCUMENT_START.split(text.decode("utf-8", errors="replace"))
    return [piece.strip("\n").encode("utf-8") for piece in pieces if piece.strip()]


def windows(document: bytes, context: int) -> list[list[int]]:
    """``document`` cut into windows of at most ``context + 1`` bytes, consecutive windows
    overlapping by one byte (so every byte after the first is a target once); the last window
    is shorter unless the length fits."""
    out = []
    for start in range(0, max(len(document) - 1, 1), context):
        piece = document[start : start + context + 1]
        if len(piece) >= 2:
            out.append(list(piece))
    return out


def corpus(context: int, file_limit: int | None = None) -> dict[str, Any]:
    """Training and validation windows (lists of byte lists, unpadded) and a description."""
    files = stdlib_files(file_limit)
    digest = hashlib.sha256()
    train: list[list[int]] = []
    val: list[list[int]] = []
    n_docs = [0, 0]
    n_bytes = 0
    for index, path in enumerate(files):
        data = path.read_bytes()
        if b"\x00" in data:
            raise ValueError(f"{path} holds a NUL byte, the padding input")
        digest.update(path.name.encode() + b"\x00" + data)
        n_bytes += len(data)
        held_out = index % 10 == 5
        for document in documents(data):
            n_docs[held_out] += 1
            (val if held_out else train).extend(windows(document, context))
    return {
        "train": train,
        "val": val,
        "meta": {
            "source": "CPython standard library, top-level modules <stdlib>/*.py not starting "
            "with '_', sorted; validation: file index 5 mod 10",
            "licence": "Python Software Foundation License (PSF-2.0)",
            "stdlib": sysconfig.get_paths()["stdlib"],
            "python": sys.version.split()[0],
            "files": len(files),
            "bytes": n_bytes,
            "sha256": digest.hexdigest(),
            "documents": {"train": n_docs[0], "val": n_docs[1]},
            "windows": {"train": len(train), "val": len(val)},
            "padding_fraction_train": 1
            - sum(len(w) - 1 for w in train) / (context * max(len(train), 1)),
        },
    }


def pad(batch: list[list[int]], context: int) -> tuple[list[list[int]], list[list[int]]]:
    """Inputs (padded with :data:`PAD_INPUT`) and targets (padded with :data:`IGNORE`), each
    ``len(batch)`` rows of ``context`` tokens: the target of position ``t`` is byte ``t+1``."""
    inputs, targets = [], []
    for window in batch:
        n = len(window) - 1
        inputs.append(window[:-1] + [PAD_INPUT] * (context - n))
        targets.append(window[1:] + [IGNORE] * (context - n))
    return inputs, targets


# --------------------------------------------------------------------------------------
# Training curves and their summary (framework-free: the JAX script uses them too)
# --------------------------------------------------------------------------------------


def train_curve(
    name: str,
    step: Callable[[int], float],
    validation_loss: Callable[[], float],
    steps: int,
    eval_every: int,
) -> dict[str, Any]:
    """``steps`` calls of ``step(k)`` (one training step, returning its loss as a float), each
    timed (``time.perf_counter``); ``validation_loss()`` at step 0, every ``eval_every`` steps
    and at the end, outside the clock. A step that raises or returns a non-finite loss stops
    the run and is recorded (``error``, ``diverged_at_step``), not raised."""
    curve: dict[str, Any] = {
        "step": [0],
        "seconds": [0.0],
        "val_loss": [validation_loss()],
        "train_loss": [],
        "diverged_at_step": None,
        "error": None,
    }
    elapsed = 0.0
    for k in range(steps):
        start = time.perf_counter()
        try:
            loss = step(k)
        except Exception as error:  # a failing optimizer is a result, not a crash
            curve["error"] = f"step {k + 1}: {type(error).__name__}: {error}"
            print(f"{name}: {curve['error']}; stopped", flush=True)
            break
        elapsed += time.perf_counter() - start
        curve["train_loss"].append(loss)
        if not math.isfinite(loss):
            curve["diverged_at_step"] = k + 1
            print(f"{name}: non-finite training loss at step {k + 1}; stopped", flush=True)
            break
        if (k + 1) % eval_every == 0 or k + 1 == steps:
            curve["step"].append(k + 1)
            curve["seconds"].append(elapsed)
            curve["val_loss"].append(validation_loss())
            print(
                f"{name:>16} step {k + 1:5d}  {elapsed:7.1f} s  train {loss:.4f}  "
                f"val {curve['val_loss'][-1]:.4f}  load {os.getloadavg()[0]:.2f}",
                flush=True,
            )
    curve["load_end"] = list(os.getloadavg())
    return curve


def best_adamw(runs: dict[str, dict[str, Any]], steps: int) -> str:
    """The ``adamw …`` run with the lowest final validation loss among those that trained all
    ``steps`` steps with a finite loss."""
    return min(
        (n for n in runs if n.startswith("adamw")),
        key=lambda n: (
            runs[n]["val_loss"][-1]
            if math.isfinite(runs[n]["val_loss"][-1]) and len(runs[n]["train_loss"]) == steps
            else math.inf
        ),
    )


def add_time_to_target(runs: dict[str, dict[str, Any]], best: str) -> float:
    """Set every curve's ``time_to_target`` (the first evaluation at or below run ``best``'s
    final validation loss: step, seconds, fraction of ``best``'s training time; ``None`` if
    never) and return that target loss."""
    target = runs[best]["val_loss"][-1]
    adamw_seconds = runs[best]["seconds"][-1]
    for curve in runs.values():
        reached = [i for i, v in enumerate(curve["val_loss"]) if v <= target]
        if reached:
            i = reached[0]
            curve["time_to_target"] = {
                "step": curve["step"][i],
                "seconds": curve["seconds"][i],
                "fraction_of_adamw_time": curve["seconds"][i] / adamw_seconds,
            }
        else:
            curve["time_to_target"] = None
    return target


def summarise_runs(runs: dict[str, dict[str, Any]], target: float) -> dict[str, Any]:
    """One summary row per run (final validation loss, training seconds, time to target,
    steps, failure), printed as it is built."""
    summary = {
        name: {
            "final_val_loss": curve["val_loss"][-1],
            "train_seconds": curve["seconds"][-1],
            "time_to_target": curve["time_to_target"],
            "steps_trained": len(curve["train_loss"]),
            "diverged_at_step": curve["diverged_at_step"],
            "error": curve["error"],
        }
        for name, curve in runs.items()
    }
    for name, row in summary.items():
        reach = row["time_to_target"]
        reach_text = (
            f"reaches {target:.4f} at step {reach['step']} "
            f"({reach['fraction_of_adamw_time']:.2f}× AdamW's time)"
            if reach
            else f"does not reach {target:.4f}"
        )
        print(
            f"{name:>16}: final val {row['final_val_loss']:.4f}, "
            f"{row['train_seconds']:.1f} s; {reach_text}"
            + (f"; FAILED {row['error']}" if row["error"] else "")
            + (f"; diverged at step {row['diverged_at_step']}" if row["diverged_at_step"] else "")
        )
    return summary


# --------------------------------------------------------------------------------------
# Model and training (torch)
# --------------------------------------------------------------------------------------


def build_model(layers: int, width: int, heads: int, context: int, seed: int):
    """The decoder-only transformer of the module docstring, initialised from ``seed``
    (GPT-2's init: N(0, 0.02), residual projections scaled by 1/√(2·layers))."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.ln1 = nn.LayerNorm(width)
            self.qkv = nn.Linear(width, 3 * width)
            self.proj = nn.Linear(width, width)
            self.ln2 = nn.LayerNorm(width)
            self.fc = nn.Linear(width, 4 * width)
            self.fc2 = nn.Linear(4 * width, width)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            b, t, d = x.shape
            q, k, v = self.qkv(self.ln1(x)).split(d, dim=2)
            q, k, v = (z.view(b, t, heads, d // heads).transpose(1, 2) for z in (q, k, v))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + self.proj(y.transpose(1, 2).reshape(b, t, d))
            return x + self.fc2(F.gelu(self.fc(self.ln2(x))))

    class TransformerLM(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(VOCAB, width)
            self.position = nn.Embedding(context, width)
            self.blocks = nn.ModuleList(Block() for _ in range(layers))
            self.ln_f = nn.LayerNorm(width)
            self.head = nn.Linear(width, VOCAB, bias=False)
            self.head.weight = self.embed.weight  # tied: the fallback moves it

        def forward(self, tokens: torch.Tensor) -> torch.Tensor:
            positions = torch.arange(tokens.shape[1], device=tokens.device)
            x = self.embed(tokens) + self.position(positions)
            for block in self.blocks:
                x = block(x)
            return self.head(self.ln_f(x))  # (B, T, 256) logits

    if width % heads:
        raise ValueError(f"width {width} must be a multiple of heads {heads}")
    torch.manual_seed(seed)
    model = TransformerLM()
    for name, parameter in model.named_parameters():
        if name.endswith("bias"):
            nn.init.zeros_(parameter)
        elif parameter.dim() == 2:
            std = (
                0.02 / math.sqrt(2 * layers)
                if name.endswith(("proj.weight", "fc2.weight"))
                else 0.02
            )
            nn.init.normal_(parameter, std=std)
    return model


def lm_loss(logits, targets):
    """Mean cross-entropy over the real (non-padded) tokens."""
    import torch.nn.functional as F

    return F.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1), ignore_index=IGNORE)


def make_optimizer(name: str, model, args, adamw_lr: float):
    """The optimizer of entry ``name`` (``adamw lr=…``, ``kfac``, ``foof``, ``ng``)."""
    import torch
    from curvlinalg_torch import FOOF, KFAC, NaturalGradient

    if name.startswith("adamw"):
        lr = float(name.split("lr=")[1])
        matrices = [p for n, p in model.named_parameters() if p.dim() == 2]
        others = [p for n, p in model.named_parameters() if p.dim() != 2]
        return torch.optim.AdamW(
            [{"params": matrices, "weight_decay": 0.1}, {"params": others, "weight_decay": 0.0}],
            lr=lr,
            betas=(0.9, 0.95),
        )
    fallback = {
        "other_optimizer": torch.optim.AdamW,
        "other_optimizer_kwargs": {"betas": (0.9, 0.95), "weight_decay": 0.0},
        "other_lr": adamw_lr,
    }
    if name == "kfac":
        return KFAC(
            model,
            lr=args.kfac_lr,
            damping=args.kfac_damping,
            fisher=args.kfac_fisher,
            momentum=0.9,
            update_every=args.update_every,
            inverse_every=args.inverse_every,
            seed=0,
            **fallback,
        )
    if name == "foof":
        return FOOF(
            model,
            lr=args.foof_lr,
            damping=args.foof_damping,
            momentum=0.9,
            update_every=args.update_every,
            inverse_every=args.inverse_every,
            **fallback,
        )
    if name == "ng":
        return NaturalGradient(
            model,
            lr=args.ng_lr,
            damping=args.ng_damping,
            fisher="empirical",
            structure="full",
            fisher_batch="same",
            momentum=0.9,
            **fallback,
        )
    raise ValueError(f"unknown optimizer entry {name!r}")


def schedule(warmup: int, total: int):
    """Linear warm-up over ``warmup`` steps, then cosine decay to 10 % at ``total``."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min((step - warmup) / max(total - warmup, 1), 1.0)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def time_steps(
    names: list[str],
    runs: dict[str, dict[str, Any]],
    best: str,
    args: argparse.Namespace,
    make_step: Any,
    note: str = "",
) -> dict[str, Any]:
    """Step time of the best AdamW run and of every curvature optimizer that trained without
    error: blocks of ``args.timing_block`` consecutive steps, ``args.timing_rounds`` rounds
    (+1 warm-up) in shuffled order (``bench/timing.py``); ``make_step(name, total_steps)``
    gives a fresh ``step(k)``. Prints the table; returns the JSON's ``step_time``."""
    timed_names = [best] + [
        n for n in names if not n.startswith("adamw") and runs[n]["error"] is None
    ]
    total = args.timing_block * (args.timing_rounds + 1)
    steps = {n: make_step(n, total) for n in timed_names}
    times = timing.time_blocks(
        steps, block=args.timing_block, rounds=args.timing_rounds, warmup=1, seed=args.seed
    )
    step_entries = [timing.summarise(times, n, best) for n in timed_names]
    print(f"# {timing.describe(times)} (baseline: {best}{note})")
    print(timing.TABLE_HEADER)
    for entry in step_entries:
        print(timing.table_row(entry))
    return {"protocol": times.protocol(), "baseline": best, "entries": step_entries}


def parse_arguments(
    argv: list[str] | None, stem: str, description: str, *, kfac_fisher: bool = True
) -> argparse.Namespace:
    """The command line shared with ``transformer_lm_jax.py`` (``stem``: the default output
    names ``results/<stem>.json`` and ``<stem>_loss.png``; ``kfac_fisher``: offer
    ``--kfac-fisher``)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--warmup-steps", type=int, default=50)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--val-sequences", type=int, default=256)
    parser.add_argument("--files", type=int, default=0, help="first N stdlib files (0: all)")
    parser.add_argument("--adamw-lrs", default="1e-3,3e-3,1e-2")
    parser.add_argument("--kfac-lr", type=float, default=0.03)
    parser.add_argument("--kfac-damping", type=float, default=0.03)
    if kfac_fisher:
        parser.add_argument("--kfac-fisher", default="empirical")
    parser.add_argument("--foof-lr", type=float, default=0.03)
    parser.add_argument("--foof-damping", type=float, default=0.3)
    parser.add_argument("--ng-lr", type=float, default=0.03)
    parser.add_argument("--ng-damping", type=float, default=0.1)
    parser.add_argument("--update-every", type=int, default=10)
    parser.add_argument("--inverse-every", type=int, default=100)
    parser.add_argument("--timing-rounds", type=int, default=3)
    parser.add_argument("--timing-block", type=int, default=100)
    parser.add_argument("--only", default="", help="comma-separated entries (adamw always)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", default=None)
    parser.add_argument("--figure", default=None)
    args = parser.parse_args(argv)
    if args.quick:
        args.layers, args.width, args.heads, args.context, args.batch = 1, 32, 2, 32, 8
        args.steps, args.warmup_steps, args.eval_every, args.val_sequences = 40, 5, 10, 16
        args.files = args.files or 6
        args.adamw_lrs = "3e-3"
        args.timing_rounds, args.timing_block = 2, 5
        args.update_every, args.inverse_every = 2, 5
    out_dir = HERE / "results" / ("tmp" if args.quick else "")
    args.json = args.json or str(out_dir / f"{stem}.json")
    args.figure = args.figure or str(out_dir / f"{stem}_loss.png")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_arguments(argv, "transformer", __doc__.split("\n")[0])
    timing.pin_threads(args.threads)

    import torch

    data = corpus(args.context, args.files or None)
    print(f"# corpus: {json.dumps(data['meta'])}")
    train_inputs, train_targets = (torch.tensor(z) for z in pad(data["train"], args.context))
    val_inputs, val_targets = (
        torch.tensor(z)
        for z in pad(
            data["val"][:: max(len(data["val"]) // args.val_sequences, 1)][: args.val_sequences],
            args.context,
        )
    )
    order = torch.randperm(len(train_inputs), generator=torch.Generator().manual_seed(args.seed))

    def batch(k: int) -> tuple[torch.Tensor, torch.Tensor]:
        start = (k * args.batch) % (len(order) - args.batch)
        rows = order[start : start + args.batch]
        return train_inputs[rows], train_targets[rows]

    adamw_lrs = [float(v) for v in args.adamw_lrs.split(",")]
    names = [f"adamw lr={lr:g}" for lr in adamw_lrs] + ["kfac", "foof", "ng"]
    if args.only:
        wanted = {v.strip() for v in args.only.split(",")}
        names = [n for n in names if n.startswith("adamw") or n in wanted]
    initial = build_model(args.layers, args.width, args.heads, args.context, args.seed).state_dict()
    n_params = sum(v.numel() for k, v in initial.items() if k != "head.weight")

    def fresh(name: str, adamw_lr: float, total: int):
        model = build_model(args.layers, args.width, args.heads, args.context, args.seed)
        model.load_state_dict(initial)
        optimizer = make_optimizer(name, model, args, adamw_lr)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule(args.warmup_steps, total))

        def step(k: int) -> float:
            x, y = batch(k)
            optimizer.zero_grad()
            if hasattr(optimizer, "set_mask"):
                # The curvature optimizers' factors over the real tokens only (padding out).
                optimizer.set_mask(y != IGNORE)
            loss = lm_loss(model(x), y)
            loss.backward()
            optimizer.step()
            scheduler.step()
            return loss.item()

        return model, optimizer, step

    def validation_loss(model) -> float:
        model.eval()
        with torch.no_grad():
            total, count = 0.0, 0
            for start in range(0, len(val_inputs), 64):
                x, y = val_inputs[start : start + 64], val_targets[start : start + 64]
                n = int((y != IGNORE).sum())
                total += lm_loss(model(x), y).item() * n
                count += n
        model.train()
        return total / count

    # ---- training curves: AdamW grid first (its best lr is the fallback's lr)
    runs: dict[str, dict[str, Any]] = {}

    def train(name: str, adamw_lr: float) -> None:
        model, optimizer, step = fresh(name, adamw_lr, args.steps)
        curve = train_curve(name, step, lambda: validation_loss(model), args.steps, args.eval_every)
        if hasattr(optimizer, "layers"):
            curve["captured_layers"] = [layer.name for layer in optimizer.layers]
            curve["skipped_steps"] = optimizer.skipped_steps
        runs[name] = curve

    for name in names:
        if name.startswith("adamw"):
            train(name, 0.0)
    best = best_adamw(runs, args.steps)
    best_lr = float(best.split("lr=")[1])
    for name in names:
        if not name.startswith("adamw"):
            train(name, best_lr)

    target = add_time_to_target(runs, best)

    step_time = time_steps(
        names, runs, best, args, lambda name, total: fresh(name, best_lr, total)[2]
    )

    load = timing.load_average()
    print(f"# load average at the end (1, 5, 15 min): {load}")
    summary = summarise_runs(runs, target)
    result = {
        "meta": {
            "script": "transformer_lm.py",
            "command": sys.argv if argv is None else ["transformer_lm.py", *argv],
            "args": vars(args),
            "model": f"decoder-only transformer, {args.layers} layers, width {args.width}, "
            f"{args.heads} heads, context {args.context}, byte vocabulary, tied head",
            "parameters": n_params,
            "torch": torch.__version__,
            "python": sys.version.split()[0],
            "corpus": data["meta"],
            "val_windows_used": len(val_inputs),
            "loadavg_end": load,
            "best_adamw": best,
            "target_val_loss": target,
        },
        "summary": summary,
        "curves": runs,
        "step_time": step_time,
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    with open(args.json, "w") as file:
        json.dump(result, file, indent=1)
    print(f"# wrote {args.json}")
    figure(runs, target, args.figure, result["meta"]["model"])
    print(f"# wrote {args.figure}")
    return result


def figure(runs: dict[str, dict[str, Any]], target: float, path: str, title: str) -> None:
    """Validation loss against steps and against training seconds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for name, curve in runs.items():
        for axis, x in zip(axes, ("step", "seconds")):
            axis.plot(curve[x], curve["val_loss"], label=name)
    for axis, label in zip(axes, ("training steps", "training wall-clock (s)")):
        axis.axhline(target, color="grey", linestyle=":", linewidth=1)
        axis.set_xlabel(label)
        axis.grid(alpha=0.3)
    finite = [v for c in runs.values() for v in c["val_loss"] if math.isfinite(v)]
    axes[0].set_ylim(min(finite) - 0.05, min(max(finite), min(finite) + 2.5))
    axes[0].set_ylabel("validation loss (nats / byte)")
    axes[0].legend()
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()

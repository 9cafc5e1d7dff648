"""The JAX counterpart of ``transformer_lm.py`` (issue 15): the same small decoder-only
transformer language model, trained under ``jax.jit`` with optax AdamW and with the
``curvlinalg_jax`` K-FAC, FOOF and natural-gradient preconditioners.

Data, split, padding, the learning-rate schedule, the training loop, time-to-target and the
figure come from ``transformer_lm.py`` (imported; its data part imports no torch): byte-level
modelling of CPython's standard-library source, documents cut into windows of
``context + 1`` bytes, the last window of a document padded (input ``0``, target ``-100``),
every 10th file held out. The training order is a NumPy permutation of the windows
(``default_rng(seed)``), not torch's ``randperm``: the batches are drawn like the torch
script's but are not the same ones.

Model (Flax linen, ``curvlinalg_jax``'s captured layers): token embedding (256 bytes) tied to
the output head (``nn.Embed.attend``), learned positions, ``--layers`` pre-LayerNorm blocks of
causal self-attention (fused ``qkv`` :class:`curvlinalg_jax.Dense`,
``jax.nn.dot_product_attention(is_causal=True)``, output ``proj``) and a GELU MLP (``fc`` 4×
wide, exact-erf GELU as torch's ``F.gelu``, ``fc2``), a final LayerNorm (ε = 1e-5 as torch's);
GPT-2 init (N(0, 0.02), ``proj``/``fc2`` kernels scaled by 1/√(2·layers), zero biases). The
four ``cj.Dense`` of every block are captured; the embeddings and LayerNorms pass through the
preconditioner untouched and go, through ``optax.multi_transform``, to AdamW at the best
AdamW learning rate (β = (0.9, 0.95), no weight decay), as ``other_optimizer`` in the torch
script.

Loss: the mean cross-entropy over the real tokens of the batch, as torch's
``F.cross_entropy(ignore_index=-100)``. ``cj.capture_linen`` needs per-sequence losses whose
mean over the ``B`` sequences is that loss: sequence ``i``'s summed token losses times
``B / N_real``; then its captured ``e`` (the gradient of example ``i``'s loss) is the
``grad_output · B`` of ``curvlinalg_torch``'s captures for the same loss, so the factors, and
so the damping, are on the torch script's scale. ``position_mask`` (the real tokens) leaves the
padded positions out of the factors (the torch script does not call ``set_mask``: there they
enter ``A``; 1.8 % of the positions at context 64).

Optimizers, all from the same initial weights and batch order; linear warm-up then cosine
decay to 10 % (``transformer_lm.schedule``), applied as one factor on the whole update (every
transformation here ends in its learning rate, so this is each learning rate scheduled):

* ``adamw lr=…``: ``optax.adamw(lr, b1=0.9, b2=0.95, weight_decay=0.1)`` with the decay on
  the matrices only (kernels, embeddings), one run per ``--adamw-lrs``; plain
  ``jax.value_and_grad``, no captures;
* ``kfac``: ``chain(cj.kfac(--kfac-damping, decay=0.95, period=--inverse-every,
  window=W), optax.sgd(--kfac-lr, momentum=0.9))``, the empirical Fisher (data labels);
* ``foof``: the same with ``cj.foof(--foof-damping, …)``;
* ``ng``: ``chain(cj.natural_gradient(--ng-damping), optax.sgd(--ng-lr, momentum=0.9))``:
  the empirical Fisher of the step's own batch, every captured layer jointly.

Schedule of the factors: ``curvlinalg_jax`` has one ``period`` (inverses every
``--inverse-every`` steps) and a ``window`` (the factor averages take the captures of the
``window`` steps that end at each refresh), not torch's ``update_every``. ``W =
round(inverse_every / update_every)`` gives the same number of factor updates per inverse
(10 per 100 steps for 10/100) at the same exponential decay, but consecutive (steps 91–100 of
each period) rather than every 10th step.

Measurements, as the torch script's: (1) step time, bench/timing.py's protocol (blocks of
``--timing-block`` consecutive steps, ``--timing-rounds`` rounds in shuffled order after a
warm-up round; medians + IQR, per-round and total-time ratios to AdamW), every step ending in
``jax.block_until_ready``; (2) training curves, the validation loss every ``--eval-every``
steps outside the clock, and the time to the best AdamW run's final validation loss. Every
entry's step is compiled ahead of time (``jit(...).lower(...).compile()``) once, used for both;
the compile seconds are reported separately and never enter a clock. The process CPU seconds
of each training run are recorded next to its wall-clock (``cpu_seconds``: at most ≈ the wall
clock when XLA ran on one thread).

``--threads 1`` sets ``XLA_FLAGS=--xla_cpu_multi_thread_eigen=false
intra_op_parallelism_threads=1`` and the BLAS/OpenMP thread variables before JAX is
imported; other values leave XLA's threading as it is (all cores). ``--quick``: the torch
script's smoke size (one block, width 32, 40 steps, 2 rounds of 5-step blocks).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import timing  # noqa: E402  (bench/timing.py: the shared timing protocol)
import transformer_lm as lm  # noqa: E402  (data, schedule, training loop, figure: no torch)

SINGLE_THREAD_XLA_FLAGS = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
BLOCK_LAYERS = ("qkv", "proj", "fc", "fc2")


def set_threads(threads: int) -> None:
    """Before JAX is imported: one XLA CPU thread for ``threads == 1`` (``XLA_FLAGS``), and
    ``threads`` for the BLAS/OpenMP variables of bench/timing.py."""
    if threads < 1:
        raise ValueError(f"--threads must be a positive integer; got {threads!r}")
    if "jax" in sys.modules:
        raise RuntimeError("set_threads must run before jax is imported")
    for name in timing.THREAD_VARIABLES:
        os.environ[name] = str(threads)
    if threads == 1:
        flags = os.environ.get("XLA_FLAGS", "")
        os.environ["XLA_FLAGS"] = f"{flags} {SINGLE_THREAD_XLA_FLAGS}".strip()


# --------------------------------------------------------------------------------------
# Model and losses
# --------------------------------------------------------------------------------------


def build_model(layers: int, width: int, heads: int, context: int):
    """The decoder-only transformer of the module docstring (a Flax linen module; initialise
    it with ``model.init(key, tokens)``). Parameter paths: ``embed``, ``position``,
    ``blocks_{i}/{ln1,qkv,proj,ln2,fc,fc2}``, ``ln_f``."""
    import curvlinalg_jax as cj
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    if width % heads:
        raise ValueError(f"--width {width} must be a multiple of --heads {heads}")
    normal = nn.initializers.normal(0.02)
    residual = nn.initializers.normal(0.02 / math.sqrt(2 * layers))

    class Block(nn.Module):
        @nn.compact
        def __call__(self, x):
            b, t, d = x.shape
            h = nn.LayerNorm(epsilon=1e-5, name="ln1")(x)
            qkv = cj.Dense(3 * width, kernel_init=normal, name="qkv")(h)
            q, k, v = (z.reshape(b, t, heads, d // heads) for z in jnp.split(qkv, 3, axis=-1))
            y = jax.nn.dot_product_attention(q, k, v, is_causal=True)  # (B, T, H, d/H)
            x = x + cj.Dense(width, kernel_init=residual, name="proj")(y.reshape(b, t, d))
            h = cj.Dense(4 * width, kernel_init=normal, name="fc")(
                nn.LayerNorm(epsilon=1e-5, name="ln2")(x)
            )
            return x + cj.Dense(width, kernel_init=residual, name="fc2")(
                nn.gelu(h, approximate=False)
            )

    class TransformerLM(nn.Module):
        @nn.compact
        def __call__(self, tokens):
            embed = nn.Embed(lm.VOCAB, width, embedding_init=normal, name="embed")
            position = nn.Embed(context, width, embedding_init=normal, name="position")
            x = embed(tokens) + position(jnp.arange(tokens.shape[1]))
            for i in range(layers):
                x = Block(name=f"blocks_{i}")(x)
            return embed.attend(nn.LayerNorm(epsilon=1e-5, name="ln_f")(x))  # (B, T, 256)

    return TransformerLM()


def token_losses(logits, labels):
    """Per-position cross-entropies ``(B, T)`` and the real-token mask (labels ≠ -100)."""
    import jax.numpy as jnp
    import optax

    mask = labels != lm.IGNORE
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.where(mask, labels, 0))
    return jnp.where(mask, losses, 0.0), mask


def lm_loss(logits, labels):
    """Mean cross-entropy over the real tokens (torch's ``ignore_index`` mean)."""
    import jax.numpy as jnp

    losses, mask = token_losses(logits, labels)
    return jnp.sum(losses) / jnp.maximum(jnp.sum(mask), 1)


def sequence_losses(logits, labels):
    """Per-sequence losses ``(B,)`` for ``cj.capture_linen``: sequence ``i``'s summed token
    losses times ``B / N_real``, so that their mean is :func:`lm_loss` (module docstring)."""
    import jax.numpy as jnp

    losses, mask = token_losses(logits, labels)
    return jnp.sum(losses, axis=1) * (labels.shape[0] / jnp.maximum(jnp.sum(mask), 1))


# --------------------------------------------------------------------------------------
# Optimizers
# --------------------------------------------------------------------------------------


def captured_paths(params) -> list[str]:
    """The layer paths ``cj`` captures (every ``cj.Dense``), in ``find_layers`` order."""
    import curvlinalg_jax as cj

    return [info.path for info in cj.layout.find_layers(params)]


def factor_window(args) -> int:
    """The ``window`` of ``cj.kfac``/``cj.foof``: ``round(inverse_every / update_every)``
    steps of factor updates per inverse period (module docstring), in ``[1, inverse_every]``."""
    return max(1, min(args.inverse_every, round(args.inverse_every / args.update_every)))


def make_optimizer(name: str, params, args, adamw_lr: float):
    """The optax transformation of entry ``name`` (``adamw lr=…``, ``kfac``, ``foof``,
    ``ng``) with constant learning rates (the schedule scales the update, see the module
    docstring)."""
    import curvlinalg_jax as cj
    import jax
    import optax

    if name.startswith("adamw"):
        matrices = jax.tree.map(lambda p: p.ndim == 2, params)
        return optax.adamw(
            float(name.split("lr=")[1]), b1=0.9, b2=0.95, weight_decay=0.1, mask=matrices
        )
    window = factor_window(args)
    if name == "kfac":
        preconditioner = cj.kfac(
            args.kfac_damping, decay=0.95, period=args.inverse_every, window=window
        )
        lr = args.kfac_lr
    elif name == "foof":
        preconditioner = cj.foof(
            args.foof_damping, decay=0.95, period=args.inverse_every, window=window
        )
        lr = args.foof_lr
    elif name == "ng":
        preconditioner, lr = cj.natural_gradient(args.ng_damping), args.ng_lr
    else:
        raise ValueError(f"unknown optimizer entry {name!r}")
    layers = captured_paths(params)

    def label(path, _):
        name = cj.layout.path_name(path)
        return "curvature" if any(name.startswith(layer + "/") for layer in layers) else "other"

    return optax.multi_transform(
        {
            "curvature": optax.chain(preconditioner, optax.sgd(lr, momentum=0.9)),
            "other": optax.adamw(adamw_lr, b1=0.9, b2=0.95, weight_decay=0.0),
        },
        jax.tree_util.tree_map_with_path(label, params),
    )


def preconditioner_count(state) -> int | None:
    """``count`` (completed, not skipped, steps) of the curvature state inside ``state``."""
    import curvlinalg_jax as cj
    import jax

    kinds = (cj.transforms.KfacState, cj.transforms.FoofState, cj.transforms.NaturalGradientState)
    found = [
        leaf
        for leaf in jax.tree.leaves(state, is_leaf=lambda s: isinstance(s, kinds))
        if isinstance(leaf, kinds)
    ]
    return int(found[0].count) if found else None


def make_step(name: str, model, tx, batch: int):
    """``step(params, state, k, factor, inputs, targets, order) -> (params, state, loss)``:
    batch ``k`` of the training ``order`` (rows ``(k·batch) mod (N − batch)`` on, as in the
    torch script; picked on the device), the update of ``tx`` times the schedule's ``factor``.
    AdamW: ``value_and_grad``; the others: ``cj.capture_linen`` with the empirical Fisher and
    the real-token ``position_mask``."""
    import curvlinalg_jax as cj
    import jax
    import optax

    def step(params, state, k, factor, inputs, targets, order):
        start = (k * batch) % (order.shape[0] - batch)
        rows = jax.lax.dynamic_slice(order, (start,), (batch,))
        x, y = inputs[rows], targets[rows]
        if name.startswith("adamw"):
            loss, grads = jax.value_and_grad(lambda p: lm_loss(model.apply({"params": p}, x), y))(
                params
            )
            updates, state = tx.update(grads, state, params)
        else:
            loss, grads, captures = cj.capture_linen(
                model,
                params,
                x,
                y,
                sequence_losses,
                fisher="empirical",
                position_mask=y != lm.IGNORE,
            )
            updates, state = tx.update(grads, state, params, captures=captures)
        updates = jax.tree.map(lambda u: (factor * u).astype(u.dtype), updates)
        return optax.apply_updates(params, updates), state, loss

    return step


# --------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------


def parse(argv: list[str] | None) -> argparse.Namespace:
    # transformer_lm.py's command line without --kfac-fisher (see the module docstring).
    return lm.parse_arguments(argv, "transformer_jax", __doc__.split("\n")[0], kfac_fisher=False)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse(argv)
    set_threads(args.threads)

    import flax
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    data = lm.corpus(args.context, args.files or None)
    print(f"# corpus: {json.dumps(data['meta'])}")
    train_inputs, train_targets = (
        jnp.asarray(z, jnp.int32) for z in lm.pad(data["train"], args.context)
    )
    val_windows = data["val"][:: max(len(data["val"]) // args.val_sequences, 1)]
    val_inputs, val_targets = (
        jnp.asarray(z, jnp.int32) for z in lm.pad(val_windows[: args.val_sequences], args.context)
    )
    order = jnp.asarray(
        np.random.default_rng(args.seed).permutation(train_inputs.shape[0]), jnp.int32
    )
    train_data = (train_inputs, train_targets, order)

    model = build_model(args.layers, args.width, args.heads, args.context)
    initial = jax.jit(model.init)(jax.random.key(args.seed), train_inputs[:1])["params"]
    n_params = sum(int(p.size) for p in jax.tree.leaves(initial))

    @jax.jit
    def validation(params, inputs, targets):
        losses, mask = token_losses(model.apply({"params": params}, inputs), targets)
        return jnp.sum(losses), jnp.sum(mask)

    def validation_loss(params) -> float:
        total, count = validation(params, val_inputs, val_targets)
        return float(total) / int(count)

    initial_val_loss = validation_loss(initial)  # compiles the evaluation outside any run
    adamw_lrs = [float(v) for v in args.adamw_lrs.split(",")]
    names = [f"adamw lr={lr:g}" for lr in adamw_lrs] + ["kfac", "foof", "ng"]
    if args.only:
        wanted = {v.strip() for v in args.only.split(",")}
        names = [n for n in names if n.startswith("adamw") or n in wanted]

    compiled: dict[str, Any] = {}
    compile_seconds: dict[str, float] = {}

    def fresh(name: str, adamw_lr: float, total: int) -> tuple[dict, Callable[[int], float]]:
        """The entry's training step ``step(k) -> loss`` on its own copy of the initial
        weights and a fresh optimizer state (compiled once per entry, the compile timed)."""
        tx = make_optimizer(name, initial, args, adamw_lr)
        holder = {"params": jax.tree.map(jnp.copy, initial), "state": tx.init(initial)}
        factor = lm.schedule(args.warmup_steps, total)
        if name not in compiled:
            fn = jax.jit(make_step(name, model, tx, args.batch))
            start = time.perf_counter()
            compiled[name] = fn.lower(
                holder["params"], holder["state"], np.int32(0), np.float32(1.0), *train_data
            ).compile()
            compile_seconds[name] = time.perf_counter() - start
            print(f"# {name}: compiled in {compile_seconds[name]:.1f} s", flush=True)
        run = compiled[name]

        def step(k: int) -> float:
            out = run(
                holder["params"], holder["state"], np.int32(k), np.float32(factor(k)), *train_data
            )
            out = jax.block_until_ready(out)
            holder["params"], holder["state"] = out[0], out[1]
            return float(out[2])

        return holder, step

    # ---- training curves: AdamW grid first (its best lr is the fallback's lr)
    runs: dict[str, dict[str, Any]] = {}

    def train(name: str, adamw_lr: float) -> None:
        holder, step = fresh(name, adamw_lr, args.steps)
        cpu = time.process_time()
        curve = lm.train_curve(
            name, step, lambda: validation_loss(holder["params"]), args.steps, args.eval_every
        )
        curve["cpu_seconds"] = time.process_time() - cpu  # evaluations included
        if not name.startswith("adamw"):
            curve["captured_layers"] = captured_paths(initial)
            count = preconditioner_count(holder["state"])
            curve["skipped_steps"] = len(curve["train_loss"]) - count
        runs[name] = curve

    for name in names:
        if name.startswith("adamw"):
            train(name, 0.0)
    best = lm.best_adamw(runs, args.steps)
    best_lr = float(best.split("lr=")[1])
    for name in names:
        if not name.startswith("adamw"):
            train(name, best_lr)
    target = lm.add_time_to_target(runs, best)

    step_time = lm.time_steps(
        names,
        runs,
        best,
        args,
        lambda name, total: fresh(name, best_lr, total)[1],
        "; compile excluded",
    )
    for name, seconds in compile_seconds.items():
        print(f"# compile (lower + compile) {name}: {seconds:.2f} s")

    load = timing.load_average()
    print(f"# load average at the end (1, 5, 15 min): {load}")
    summary = lm.summarise_runs(runs, target)
    result = {
        "meta": {
            "script": "transformer_lm_jax.py",
            "command": sys.argv if argv is None else ["transformer_lm_jax.py", *argv],
            "args": vars(args),
            "model": f"decoder-only transformer (Flax), {args.layers} layers, width "
            f"{args.width}, {args.heads} heads, context {args.context}, byte vocabulary, "
            "tied head",
            "parameters": n_params,
            "jax": jax.__version__,
            "flax": flax.__version__,
            "optax": optax.__version__,
            "backend": jax.default_backend(),
            "xla_flags": os.environ.get("XLA_FLAGS", ""),
            "python": sys.version.split()[0],
            "corpus": data["meta"],
            "val_windows_used": int(val_inputs.shape[0]),
            "loadavg_end": load,
            "best_adamw": best,
            "target_val_loss": target,
            "initial_val_loss": initial_val_loss,
            "factor_window": factor_window(args),
        },
        "summary": summary,
        "curves": runs,
        "step_time": step_time,
        "compile_seconds": compile_seconds,
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    with open(args.json, "w") as file:
        json.dump(result, file, indent=1)
    print(f"# wrote {args.json}")
    lm.figure(runs, target, args.figure, result["meta"]["model"])
    print(f"# wrote {args.figure}")
    return result


if __name__ == "__main__":
    main()

r"""Benchmark of curvlinalg's Woodbury natural gradient and Laplace sampling: the implicit
per-example-gradient contractions against materialising the per-example gradients.

Captures (DESIGN.md): per layer ``(a, e)``, ``a`` ``(B, d_in)`` or ``(B, T, d_in)`` layer
inputs, ``e`` ``(B, d_out)`` or ``(B, T, d_out)`` output gradients; the per-example gradient
is ``g_i = Σ_t e_itᵀ a_it``. The captures are synthetic standard-normal arrays of the right
shapes: every operation timed here is dense BLAS/elementwise work whose cost does not depend
on the values (the finiteness checks pass either way and read every element).

1. MLP 784-1000-1000-1000-10 (no bias, 2.79 M parameters), ``B = 100``, float32.

   * ``gram`` — implicit: ``woodbury.gram(captures)`` (``method="auto"``, which is the
     implicit ``Σ_layers (a aᵀ) ⊙ (e eᵀ)`` for ``(B, d)`` captures). Materialised: what a
     per-example-gradient implementation does, written here with plain backend ops: the
     per-example gradients ``P_l`` ``(B, d_out·d_in)`` of every layer (all held, as such a
     library returns them), then ``Σ_l P_l P_lᵀ``.
   * ``solve`` — the damped natural gradient ``(λI + (1/B)·G Gᵀ)⁻¹ u`` from the captures
     and the gradients ``u``. Implicit:
     ``woodbury.solve(woodbury.factorize(captures, λ, 1/B), u)``.
     Materialised: ``P_l`` as above, ``K = Σ P_l P_lᵀ``, Cholesky of ``I + (s/λ)K``,
     ``r = Σ P_l vec(u_l)``, ``w = (LLᵀ)⁻¹ r``, ``u_l/λ − (s/λ²)·Pᵀ_l w`` (Woodbury with
     the explicit ``P``).
   * ``solve implicit, in-place*`` — not a curvlinalg function: the same solve assembled
     from public pieces (``factorize``, ``rmatvec``, a Cholesky solve, ``matvec``) with the
     scalars folded into the ``B``-vector and ``u/λ − (s/λ²)·Gw`` computed in place. It
     measures what the library's solve loses to temporaries.
   * FLOP ratio: materialised over implicit FLOPs (Gram: ``B·D + 2B²D`` over
     ``2B²·Σ(d_in + d_out)``; the solves add ``4·B·D`` to both for ``Gᵀu`` and ``Gw``), the
     speed-up that equal FLOP rates would give.
   * A breakdown of the implicit solve (profiling): ``gram`` with and without
     ``check_finite``, the finiteness checks alone (of the captures, and of the ``B×B``
     Gram as an alternative), ``factorize``, ``rmatvec``, ``matvec``, ``solve`` with and
     without ``check_finite``, the raw GEMMs of ``Gᵀu`` and ``Gw`` written with backend ops,
     the elementwise ``u/λ − (s/λ²)·c``, and the in-place solve.

2. A small CNN on 28×28 inputs with ``(B, T, ·)`` captures: conv 1→16 k5 (``T = 576``
   positions, ``a`` ``(B, 576, 25)``, ``e`` ``(B, 576, 16)``), 2×2 pooling, conv 16→32 k5
   (``T = 64``, ``a`` ``(B, 64, 400)``), 2×2 pooling, linear head 512→10. Per layer and for the
   whole network: ``gram`` with ``method="implicit"``, ``"materialize"`` and ``"auto"`` and
   the plain-ops materialised reference; then the solve as in 1, and ``Gᵀu + Gw`` contracted
   over the ``B·T`` capture rows (``woodbury.rmatvec`` + ``matvec``) against the same products
   with stored per-example gradients ``P``. An implicit layer Gram with positions forms
   ``(B·T)×(B·T)`` products; one whose predicted size exceeds ``--max-gib`` is skipped and
   reported with the size it would need.

3. Laplace sampling: ``laplace.sample`` for the MLP at ``B = 100`` (``S`` samples per call,
   including the factorisation; the caller's standard-normal noise ``y`` ``(S, d_out, d_in)``
   and ``z`` ``(S, B)`` is drawn outside the timing and its size reported), and
   ``laplace.kron_sample`` for one 1000×1000 layer (with the two ``kron.eigh`` it performs
   inside every call, and its GEMM chain with the eigendecompositions precomputed, timed on
   their own too). ``in-place sample*``: ``laplace.sample``'s maths from public pieces with
   the combination in place (numpy, torch), as for the solve.

Memory — peak *above the baseline* during one call, inputs excluded (allocated before the
measurement), the returned result included (its size is reported separately):

* numpy: ``tracemalloc`` (NumPy reports its data buffers to it). Not included: OpenBLAS /
  LAPACK internal work buffers (allocated outside NumPy).
* torch: the profiler's allocator events (``profile_memory=True``): the running sum of
  every CPU tensor allocation and free, in time order; its maximum. Not included: buffers
  that MKL/oneDNN/OpenBLAS allocate internally.
* jax (jitted): XLA's buffer assignment, ``compiled.memory_analysis()`` — temporaries plus
  outputs of each jitted stage, plus the outputs of earlier stages held by the path.
  XLA CPU's library fusions (its ``ynn`` dot fusions) allocate their scratch outside that
  plan: an implicit conv Gram's ``(B·T)²`` products do not appear in it.
* MLP and CNN entries, as a cross-check (``RSS Δ``): the process's resident-set high-water
  mark (``VmHWM``, reset through ``/proc/self/clear_refs``) after ``malloc_trim``, minus the
  RSS right after the reset. Page-granular and coarse: it also sees library work buffers,
  and it misses memory an allocator reuses without returning it to the system — for jax,
  whose allocator keeps freed buffers resident, it can read far below the real peak.
* ``faults``: minor page faults of the process per timed call (median) — fresh pages the
  kernel had to map and zero, a cost of allocating large temporaries anew on every call.

Timing: medians and interquartile ranges; fast and slow entries of a group are interleaved
round by round (every round runs each slow entry once and each fast entry several times),
so that load from neighbours hits both paths alike. ``jax`` is benchmarked jitted; with
``--backend all`` its ``kron_sample`` part is left out to keep the full run near five
minutes (``--backend jax`` runs it).

Usage::

    python bench/bench_woodbury.py                     # full run, all installed backends
    python bench/bench_woodbury.py --backend numpy
    python bench/bench_woodbury.py --quick             # CI smoke run (tiny shapes, seconds)
    python bench/bench_woodbury.py --json results.json
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import importlib.util
import json
import math
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

BACKENDS = ("numpy", "torch", "jax")
SPEED_GOAL = 300.0  # implicit ≥ 300× faster than materialised
MEMORY_GOAL = 0.01  # implicit ≤ 1 % of the materialised path's memory
DAMPING = 1e-3
PRIOR_PRECISION = 1.0
N_DATA = 60_000


# --------------------------------------------------------------------------------------
# Command line and thread pinning (before numpy/torch/jax are imported)
# --------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--backend",
        choices=(*BACKENDS, "all"),
        default="all",
        help="array library to benchmark (default: all installed)",
    )
    parser.add_argument("--batch", type=int, default=None, help="B (default 100)")
    parser.add_argument(
        "--repeats", type=int, default=None, help="timed repeats of the fast entries (default 20)"
    )
    parser.add_argument(
        "--slow-repeats",
        type=int,
        default=None,
        help="timed repeats of the slow (materialised, sampling) entries (5)",
    )
    parser.add_argument(
        "--samples",
        type=str,
        default=None,
        help="comma-separated S for laplace.sample (default 1,10,100)",
    )
    parser.add_argument(
        "--kron-samples",
        type=str,
        default=None,
        help="comma-separated S for laplace.kron_sample (default 1,10)",
    )
    parser.add_argument(
        "--sample-repeats",
        type=int,
        default=None,
        help="timed repeats of the sampling entries (default 3)",
    )
    parser.add_argument(
        "--max-gib",
        type=float,
        default=4.0,
        help="skip an implicit Gram with positions whose predicted "
        "(B·T)² products exceed this many GiB (default 4)",
    )
    parser.add_argument(
        "--skip", default="", help="comma-separated parts to skip: mlp, cnn, laplace, kron"
    )
    parser.add_argument("--no-rss", action="store_true", help="skip the RSS cross-check")
    parser.add_argument("--threads", type=int, default=2, help="threads for BLAS/OpenMP/XLA")
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON to PATH")
    parser.add_argument(
        "--quick", action="store_true", help="tiny shapes and few repeats: a smoke run of seconds"
    )
    args = parser.parse_args(argv)
    defaults = (
        dict(
            batch=8, repeats=3, slow_repeats=2, samples="1,4", kron_samples="1,4", sample_repeats=2
        )
        if args.quick
        else dict(
            batch=100,
            repeats=20,
            slow_repeats=5,
            samples="1,10,100",
            kron_samples="1,10",
            sample_repeats=3,
        )
    )
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.samples = [int(s) for s in str(args.samples).split(",") if s]
    args.kron_samples = [int(s) for s in str(args.kron_samples).split(",") if s]
    args.skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    if args.quick:
        args.mlp_dims = (64, 128, 128, 10)
        args.cnn = dict(side=12, kernel=3, channels=(1, 4, 8), classes=10)
        args.kron_size = 64
    else:
        args.mlp_dims = (784, 1000, 1000, 1000, 10)
        args.cnn = dict(side=28, kernel=5, channels=(1, 16, 32), classes=10)
        args.kron_size = 1000
    if (
        min(
            args.threads,
            args.batch,
            args.repeats,
            args.slow_repeats,
            args.sample_repeats,
            *args.samples,
            *args.kron_samples,
        )
        < 1
    ):
        parser.error("--threads, --batch, the repeats and the sample counts must be positive")
    return args


def pin_threads(threads: int) -> dict[str, Any]:
    """Limit every array library to ``threads`` threads; must run before they are imported
    (as in bench_kron.py)."""
    for library in ("numpy", "scipy", "torch", "jax"):
        if library in sys.modules:
            raise RuntimeError(f"{library} was imported before the thread settings")
    for variable in (
        "OMP_NUM_THREADS",
        "MKL_NUM_THREADS",
        "OPENBLAS_NUM_THREADS",
        "BLIS_NUM_THREADS",
        "VECLIB_MAXIMUM_THREADS",
        "NUMEXPR_NUM_THREADS",
    ):
        os.environ[variable] = str(threads)
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if cpus and threads < len(cpus):
        os.sched_setaffinity(0, cpus[:threads])  # XLA sizes its pool from the affinity mask
    if threads == 1:
        flags = os.environ.get("XLA_FLAGS", "")
        os.environ["XLA_FLAGS"] = (
            f"{flags} --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
        ).strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    return {
        "threads": threads,
        "cpus_available": len(cpus) or os.cpu_count(),
        "affinity": sorted(os.sched_getaffinity(0)) if cpus else None,
        "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""),
    }


def installed_backends() -> list[str]:
    return [name for name in BACKENDS if importlib.util.find_spec(name) is not None]


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for module in ("numpy", "scipy", "torch", "jax", "jaxlib", "array_api_compat", "curvlinalg"):
        if module in sys.modules:
            found[module] = getattr(sys.modules[module], "__version__", "?")
    return found


def machine() -> dict[str, Any]:
    model = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as file:
            for line in file:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info: dict[str, Any] = {"cpu": model, "nproc": os.cpu_count(), "platform": platform.platform()}
    try:
        info["loadavg_start"] = os.getloadavg()
    except OSError:
        pass
    try:
        with open("/proc/meminfo") as file:
            info["mem_total_kib"] = int(file.readline().split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return info


# --------------------------------------------------------------------------------------
# Backends: conversion, synchronisation, jit, and the plain ops of the materialised path
# --------------------------------------------------------------------------------------


class Backend:
    def __init__(self, name: str, threads: int) -> None:
        self.name = name
        if name == "numpy":
            import numpy as np
            import scipy.linalg

            self.asarray = lambda x: np.ascontiguousarray(x, dtype=np.float32)
            self.sync = lambda out: out
            self.compile = lambda fn: fn
            self.cholesky = np.linalg.cholesky
            self.cho_solve = lambda lower, r: scipy.linalg.cho_solve(
                (lower, True), r, check_finite=False
            )
            self.eye = lambda n: np.eye(n, dtype=np.float32)
            self.swap = lambda x: np.swapaxes(x, -1, -2)
            self.to_numpy = lambda x: np.asarray(x, dtype=np.float64)
        elif name == "torch":
            import numpy as np
            import torch

            torch.set_num_threads(threads)
            self.asarray = lambda x: torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
            self.sync = lambda out: out
            self.compile = lambda fn: fn
            self.cholesky = torch.linalg.cholesky
            self.cho_solve = lambda lower, r: (
                torch.cholesky_solve(r[:, None], lower)[:, 0]
                if r.ndim == 1
                else torch.cholesky_solve(r, lower)
            )
            self.eye = lambda n: torch.eye(n, dtype=torch.float32)
            self.swap = lambda x: x.mT
            self.to_numpy = lambda x: x.double().numpy()
        else:
            import jax
            import jax.numpy as jnp
            import jax.scipy.linalg
            import numpy as np

            self._jax = jax
            self.asarray = lambda x: jax.device_put(jnp.asarray(np.asarray(x, dtype=np.float32)))
            self.sync = jax.block_until_ready
            self.compile = jax.jit
            self.cholesky = jnp.linalg.cholesky
            self.cho_solve = lambda lower, r: jax.scipy.linalg.cho_solve((lower, True), r)
            self.eye = lambda n: jnp.eye(n, dtype=jnp.float32)
            self.swap = lambda x: jnp.swapaxes(x, -1, -2)
            self.to_numpy = lambda x: np.asarray(x, dtype=np.float64)


# --- the materialised reference path, plain backend ops ------------------------------


def ref_per_example(bk: Backend, captures) -> list:
    """Per-example gradients ``(B, d_out·d_in)`` per layer, the way a per-example-gradient
    implementation forms them: an outer product per example for ``(B, d)`` captures (the
    fastest plain op for it), ``e3ᵀ @ a3`` batched over examples for ``(B, T, d)``."""
    out = []
    for a, e in captures:
        batch = int(a.shape[0])
        if a.ndim == 2:
            g = e[:, :, None] * a[:, None, :]
        else:
            g = bk.swap(e) @ a
        out.append(g.reshape(batch, -1))
    return out


def ref_gram(bk: Backend, per_example: list):
    total = None
    for p in per_example:
        k = p @ bk.swap(p)
        total = k if total is None else total + k
    return total


def ref_solve(bk: Backend, per_example: list, grads: list, damping: float, scale: float) -> list:
    kernel = ref_gram(bk, per_example)
    batch = int(kernel.shape[0])
    lower = bk.cholesky(bk.eye(batch) + kernel * (scale / damping))
    projected = None
    for p, u in zip(per_example, grads):
        r = p @ u.reshape(-1)
        projected = r if projected is None else projected + r
    weights = bk.cho_solve(lower, projected)
    factor = scale / damping**2
    return [
        u / damping - factor * (bk.swap(p) @ weights).reshape(u.shape)
        for p, u in zip(per_example, grads)
    ]


def ref_span_solve(bk: Backend, per_example: list, captures, damping: float, scale: float):
    """The batch's natural gradient with explicit ``P``: ``Pᵀ (λI + s·K)⁻¹ (1/B)``, the
    push-through form (the general Woodbury formula applied to ``u = mean P`` cancels
    ``u/λ`` against a correction of nearly the same size and loses most digits in float32)."""
    kernel = ref_gram(bk, per_example)
    batch = int(kernel.shape[0])
    lower = bk.cholesky(bk.eye(batch) + kernel * (scale / damping))
    weights = bk.cho_solve(lower, bk.eye(batch).sum(0) / batch) / damping
    return [
        (bk.swap(p) @ weights).reshape(e.shape[-1], a.shape[-1])
        for p, (a, e) in zip(per_example, captures)
    ]


# --------------------------------------------------------------------------------------
# Memory measurement
# --------------------------------------------------------------------------------------


def nbytes(tree: Any) -> int:
    if isinstance(tree, (list, tuple)):
        return sum(nbytes(x) for x in tree)
    if hasattr(tree, "nbytes"):
        return int(tree.nbytes)
    if hasattr(tree, "element_size"):  # torch
        return int(tree.element_size() * tree.numel())
    return 0


class Path:
    """A computation as a chain of stages: ``stage0(*inputs)``, then ``stage_k(prev, *inputs)``.
    Stages are jitted for jax; the chain mirrors how the work is dispatched."""

    def __init__(self, bk: Backend, stages: Sequence[Callable], inputs: tuple) -> None:
        self.bk = bk
        self.stages = [bk.compile(stage) for stage in stages]
        self.inputs = inputs

    def __call__(self) -> Any:
        out = self.stages[0](*self.inputs)
        for stage in self.stages[1:]:
            out = stage(out, *self.inputs)
        return self.bk.sync(out)


def allocator_peak(path: Path) -> tuple[int | None, str]:
    """Peak bytes above the baseline during one call of ``path`` (inputs excluded)."""
    name = path.bk.name
    if name == "numpy":
        import tracemalloc

        gc.collect()
        tracemalloc.start()
        try:
            base = tracemalloc.get_traced_memory()[0]
            tracemalloc.reset_peak()
            out = path()
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        del out
        return peak - base, "tracemalloc"
    if name == "torch":
        # The autograd profiler records the same allocator events as torch.profiler without
        # importing torch._dynamo (seconds) on first use.
        from torch.autograd.profiler import profile

        gc.collect()
        with profile(use_cpu=True, profile_memory=True) as prof:
            out = path()
        del out
        events = [ev for ev in prof.kineto_results.events() if ev.name() == "[memory]"]
        running = peak = 0
        for ev in sorted(events, key=lambda ev: ev.start_ns()):
            running += ev.nbytes()
            peak = max(peak, running)
        return peak, "torch.profiler allocator events"
    # jax: XLA's buffer assignment per jitted stage; outputs of earlier stages stay held.
    jax = path.bk._jax
    held = peak = 0
    args: tuple = path.inputs
    for index, stage in enumerate(path.stages):
        call_args = args if index == 0 else (args[0], *path.inputs)
        compiled = stage.lower(*call_args).compile()
        stats = compiled.memory_analysis()
        if stats is None:
            return None, "unavailable"
        peak = max(peak, held + stats.temp_size_in_bytes + stats.output_size_in_bytes)
        held += stats.output_size_in_bytes
        args = (jax.eval_shape(stage, *call_args),)
    return peak, "XLA memory_analysis (temp + outputs)"


_LIBC = None


def rss_peak(path: Path) -> int | None:
    """Resident-set high-water mark during one call minus the RSS before it (Linux only)."""
    global _LIBC
    try:
        if _LIBC is None:
            _LIBC = ctypes.CDLL("libc.so.6")
        gc.collect()
        _LIBC.malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as file:
            file.write("5")  # reset VmHWM to the current RSS
        base = _status_kib("VmRSS")  # read after the reset: the peak cannot lie below it
        out = path()
        peak = _status_kib("VmHWM")
        del out
        return (peak - base) * 1024
    except OSError:
        return None


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as file:
        for line in file:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"{field} not in /proc/self/status")


# --------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------


class Entry:
    def __init__(
        self,
        name: str,
        path: Path,
        *,
        slow: bool = False,
        memory: bool = False,
        rss: bool = True,
        **info: Any,
    ) -> None:
        self.name = name
        self.path = path
        self.slow = slow
        self.memory = memory
        self.rss = rss and memory
        self.info = info
        self.times: list[float] = []
        self.faults: list[int] = []  # minor page faults of the process during each timed call
        self.measured: dict[str, Any] = {}


def run_group(entries: list[Entry], args: argparse.Namespace, rounds: int | None = None) -> None:
    """Memory passes (which double as warm-up), then ``rounds`` interleaved timing rounds:
    each runs every slow entry once and every fast entry ``repeats / rounds`` times."""
    for entry in entries:
        rss = entry.rss and not args.no_rss
        if entry.memory:
            # numpy/torch: a real call (the warm-up); jax: compiles without running.
            peak, method = allocator_peak(entry.path)
            entry.measured.update(peak_bytes=peak, memory_method=method)
        if rss:
            entry.measured["rss_delta_bytes"] = rss_peak(entry.path)  # a call: warm-up too
        elif not entry.memory or entry.path.bk.name == "jax":
            entry.path()  # warm-up
    rounds = rounds or args.slow_repeats
    fast_per_round = max(1, math.ceil(args.repeats / rounds))
    gc.collect()
    enabled = gc.isenabled()
    gc.disable()
    try:
        for _ in range(rounds):
            for entry in entries:
                for _ in range(1 if entry.slow else fast_per_round):
                    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                    start = time.perf_counter()
                    entry.path()
                    entry.times.append(time.perf_counter() - start)
                    entry.faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults)
    finally:
        if enabled:
            gc.enable()


def summary(entry: Entry, **extra: Any) -> dict[str, Any]:
    times = sorted(entry.times)
    if len(times) >= 2:
        q1, _, q3 = statistics.quantiles(times, n=4, method="inclusive")
    else:
        q1 = q3 = times[0]
    result = {
        "name": entry.name,
        "backend": entry.path.bk.name,
        "median_s": statistics.median(times),
        "q1_s": q1,
        "q3_s": q3,
        "min_s": times[0],
        "max_s": times[-1],
        "repeats": len(times),
        "minor_faults_per_call": statistics.median(entry.faults) if entry.faults else None,
    }
    result.update(entry.info)
    result.update(entry.measured)
    result.update(extra)
    if result.get("peak_bytes") is not None and result.get("result_bytes") is not None:
        result["work_bytes"] = result["peak_bytes"] - result["result_bytes"]
    return result


# --------------------------------------------------------------------------------------
# Problems (NumPy float32; converted per backend)
# --------------------------------------------------------------------------------------


def mlp_problem(dims: Sequence[int], batch: int, seed: int = 0) -> dict[str, Any]:
    import numpy as np

    rng = np.random.default_rng(seed)
    layers = list(zip(dims[:-1], dims[1:]))
    return {
        "captures": [
            (
                rng.standard_normal((batch, i), dtype=np.float32),
                rng.standard_normal((batch, o), dtype=np.float32),
            )
            for i, o in layers
        ],
        "grads": [rng.standard_normal((o, i), dtype=np.float32) for i, o in layers],
        "layers": layers,
    }


def cnn_shapes(side: int, kernel: int, channels: Sequence[int], classes: int):
    """``[(name, T, d_in, d_out)]`` of conv-pool-conv-pool-linear (valid convolutions)."""
    c0, c1, c2 = channels
    s1 = side - kernel + 1
    p1 = s1 // 2
    s2 = p1 - kernel + 1
    p2 = s2 // 2
    return [
        (f"conv {c0}→{c1} k{kernel}", s1 * s1, c0 * kernel * kernel, c1),
        (f"conv {c1}→{c2} k{kernel}", s2 * s2, c1 * kernel * kernel, c2),
        (f"linear {c2 * p2 * p2}→{classes}", 1, c2 * p2 * p2, classes),
    ]


def cnn_problem(shapes, batch: int, seed: int = 1) -> dict[str, Any]:
    import numpy as np

    rng = np.random.default_rng(seed)
    captures, grads = [], []
    for _, positions, d_in, d_out in shapes:
        lead = (batch,) if positions == 1 else (batch, positions)
        captures.append(
            (
                rng.standard_normal(lead + (d_in,), dtype=np.float32),
                rng.standard_normal(lead + (d_out,), dtype=np.float32),
            )
        )
        grads.append(rng.standard_normal((d_out, d_in), dtype=np.float32))
    return {"captures": captures, "grads": grads}


# --------------------------------------------------------------------------------------
# 1. MLP: Gram and damped solve, implicit vs materialised
# --------------------------------------------------------------------------------------


def convert(bk: Backend, problem: dict[str, Any]) -> tuple[list, list]:
    captures = [(bk.asarray(a), bk.asarray(e)) for a, e in problem["captures"]]
    grads = [bk.asarray(u) for u in problem["grads"]]
    return captures, grads


def relative_difference(bk: Backend, x: Any, y: Any) -> float:
    import numpy as np

    xs = x if isinstance(x, (list, tuple)) else [x]
    ys = y if isinstance(y, (list, tuple)) else [y]
    num = sum(float(np.sum((bk.to_numpy(p) - bk.to_numpy(q)) ** 2)) for p, q in zip(xs, ys))
    den = sum(float(np.sum(bk.to_numpy(q) ** 2)) for q in ys)
    return math.sqrt(num / den)


def in_place_solve(bk: Backend, factorized: Any, vectors: list) -> list:
    """The damped solve from public pieces, with the scalars folded into the ``B``-vector and
    the ``d_out×d_in`` combination done in place: ``c = G(−(s/λ)·w)``, ``c += u``, ``c /= λ``
    (for jax the ``+=`` rebinds; XLA fuses it). A measured alternative to ``woodbury.solve``'s
    ``u/λ − (s/λ²)·G w``, which allocates three ``d_out×d_in`` temporaries per layer."""
    from curvlinalg import woodbury

    projected = woodbury.rmatvec(factorized.captures, vectors, check_finite=False)
    weights = bk.cho_solve(factorized.lower, projected)
    out = woodbury.matvec(
        factorized.captures, weights * (-factorized.scale / factorized.damping), check_finite=False
    )
    result = []
    for c, u in zip(out, vectors):
        c += u
        c /= factorized.damping
        result.append(c)
    return result


def bench_mlp(bk: Backend, problem: dict[str, Any], args: argparse.Namespace) -> list[dict]:
    from curvlinalg import _backend, _checks, woodbury

    captures, grads = convert(bk, problem)
    batch = args.batch
    scale = 1.0 / batch
    params = sum(i * o for i, o in problem["layers"])
    widths = sum(i + o for i, o in problem["layers"])
    gram_bytes, solve_bytes = batch * batch * 4, params * 4
    # FLOPs (multiply-adds ×2): implicit Gram Σ_l 2B²(d_in+d_out); materialised B·D products
    # to form P and 2B²·D for Σ P Pᵀ; each of Gᵀu and Gw costs 2·B·D either way.
    flops = {
        "gram implicit": 2.0 * batch**2 * widths,
        "gram materialised": batch * params + 2.0 * batch**2 * params,
    }
    flops["solve implicit"] = flops["gram implicit"] + 4.0 * batch * params
    flops["solve materialised"] = flops["gram materialised"] + 4.0 * batch * params
    # The batch's own mean gradient u = G·(1/B): implicit is the Gram, a B×B solve and one Gw
    # (woodbury.solve_span); materialised forms P, then K and the same push-through solve.
    flops["batch natgrad implicit"] = flops["gram implicit"] + 2.0 * batch * params
    flops["batch natgrad materialised"] = flops["gram materialised"] + 2.0 * batch * params
    info = dict(part="mlp", params=params)

    # Main comparison.
    gram_imp = Path(bk, [lambda c: woodbury.gram(c)], (captures,))
    gram_mat = Path(
        bk, [lambda c: ref_per_example(bk, c), lambda p, c: ref_gram(bk, p)], (captures,)
    )
    solve_imp = Path(
        bk,
        [lambda c, u: woodbury.solve(woodbury.factorize(c, DAMPING, scale), u)],
        (captures, grads),
    )
    solve_fold = Path(
        bk,
        [lambda c, u: in_place_solve(bk, woodbury.factorize(c, DAMPING, scale), u)],
        (captures, grads),
    )
    solve_mat = Path(
        bk,
        [lambda c, u: ref_per_example(bk, c), lambda p, c, u: ref_solve(bk, p, u, DAMPING, scale)],
        (captures, grads),
    )
    per_example_only = Path(bk, [lambda c: ref_per_example(bk, c)], (captures,))
    import numpy as np

    mean_coefficients = bk.asarray(np.full((batch,), 1.0 / batch, dtype=np.float32))
    span_imp = Path(
        bk,
        [lambda c, w: woodbury.solve_span(woodbury.factorize(c, DAMPING, scale), w)],
        (captures, mean_coefficients),
    )
    span_mat = Path(
        bk,
        [
            lambda c: ref_per_example(bk, c),
            lambda p, c: ref_span_solve(bk, p, c, DAMPING, scale),
        ],
        (captures,),
    )

    # Correctness: both paths give the same Gram and the same natural gradient.
    gram_diff = relative_difference(bk, gram_imp(), gram_mat())
    solve_reference = solve_mat()
    solve_diff = relative_difference(bk, solve_imp(), solve_reference)
    fold_diff = relative_difference(bk, solve_fold(), solve_reference)
    del solve_reference
    span_diff = relative_difference(bk, span_imp(), span_mat())
    library_pe = woodbury.per_example(captures) if bk.name != "jax" else None
    pe_diff = (
        relative_difference(bk, [g.reshape(batch, -1) for g in library_pe], per_example_only())
        if library_pe is not None
        else None
    )
    del library_pe
    if not (gram_diff < 1e-3 and solve_diff < 1e-3 and fold_diff < 1e-3 and span_diff < 1e-3):
        raise AssertionError(
            f"{bk.name}: implicit and materialised paths differ: "
            f"gram {gram_diff:.1e}, solve {solve_diff:.1e}, "
            f"in-place solve {fold_diff:.1e}, batch natural gradient {span_diff:.1e}"
        )

    main = [
        Entry(
            "gram implicit",
            gram_imp,
            memory=True,
            op="gram",
            variant="implicit",
            call="woodbury.gram(captures)",
            flops=flops["gram implicit"],
            result_bytes=gram_bytes,
            **info,
        ),
        Entry(
            "gram materialised",
            gram_mat,
            slow=True,
            memory=True,
            op="gram",
            variant="materialised",
            call="P_l per layer; Σ P_l P_lᵀ",
            flops=flops["gram materialised"],
            result_bytes=gram_bytes,
            **info,
        ),
        Entry(
            "solve implicit",
            solve_imp,
            memory=True,
            op="solve",
            variant="implicit",
            call="woodbury.solve(woodbury.factorize(captures, λ, 1/B), u)",
            flops=flops["solve implicit"],
            result_bytes=solve_bytes,
            **info,
        ),
        Entry(
            "solve implicit, in-place*",
            solve_fold,
            memory=True,
            op="solve",
            variant="implicit-in-place",
            call="factorize; rmatvec; cho_solve; matvec(−s/λ·w); c += u; c /= λ",
            flops=flops["solve implicit"],
            result_bytes=solve_bytes,
            **info,
        ),
        Entry(
            "solve materialised",
            solve_mat,
            slow=True,
            memory=True,
            op="solve",
            variant="materialised",
            call="P_l; K=ΣPPᵀ; chol; Σ P_l u_l; u/λ − s/λ²·Pᵀw",
            flops=flops["solve materialised"],
            result_bytes=solve_bytes,
            **info,
        ),
        Entry(
            "batch natgrad implicit",
            span_imp,
            memory=True,
            op="batch natgrad",
            variant="implicit",
            call="woodbury.solve_span(woodbury.factorize(captures, λ, 1/B), 1/B)",
            flops=flops["batch natgrad implicit"],
            result_bytes=solve_bytes,
            **info,
        ),
        Entry(
            "batch natgrad materialised",
            span_mat,
            slow=True,
            memory=True,
            op="batch natgrad",
            variant="materialised",
            call="P_l; K=ΣPPᵀ; chol; Pᵀ(LLᵀ)⁻¹(1/B)/λ",
            flops=flops["batch natgrad materialised"],
            result_bytes=solve_bytes,
            **info,
        ),
        Entry(
            "per-example grads only",
            per_example_only,
            slow=True,
            op="per_example",
            variant="materialised",
            call="P_l per layer",
            flops=batch * params,
            result_bytes=batch * params * 4,
            **info,
        ),
    ]
    run_group(main, args)

    # Breakdown of the implicit solve (profiling).
    factorized = woodbury.factorize(captures, DAMPING, scale)
    weights = woodbury.rmatvec(captures, grads)
    correction = woodbury.matvec(captures, weights)
    kernel = woodbury.gram(captures)
    factor = scale / DAMPING**2

    def raw_rmatvec(c, u):
        total = None
        for (a, e), v in zip(c, u):
            r = ((e @ v) * a).sum(-1)
            total = r if total is None else total + r
        return total

    def raw_matvec(c, w):
        return [bk.swap(e * w[:, None]) @ a for a, e in c]

    def raw_combine(u, c):
        return [v / DAMPING - factor * x for v, x in zip(u, c)]

    def raw_gram(c):
        total = None
        for a, e in c:
            k = (a @ bk.swap(a)) * (e @ bk.swap(e))
            total = k if total is None else total + k
        return total

    breakdown = [
        Entry("woodbury.gram", gram_imp),
        Entry(
            "woodbury.gram [no check]",
            Path(bk, [lambda c: woodbury.gram(c, check_finite=False)], (captures,)),
            check=False,
        ),
        Entry("raw (a aᵀ)⊙(e eᵀ) summed", Path(bk, [raw_gram], (captures,))),
        Entry(
            "woodbury.factorize",
            Path(bk, [lambda c: woodbury.factorize(c, DAMPING, scale)], (captures,)),
        ),
        Entry(
            "woodbury.rmatvec  Gᵀu",
            Path(bk, [lambda c, u: woodbury.rmatvec(c, u)], (captures, grads)),
        ),
        Entry("raw Σ((e@u)⊙a)  Gᵀu", Path(bk, [raw_rmatvec], (captures, grads))),
        Entry(
            "woodbury.matvec  Gw",
            Path(bk, [lambda c, w: woodbury.matvec(c, w)], (captures, weights)),
        ),
        Entry("raw (e⊙w)ᵀ@a  Gw", Path(bk, [raw_matvec], (captures, weights))),
        Entry("raw u/λ − s/λ²·c", Path(bk, [raw_combine], (grads, correction))),
        Entry(
            "woodbury.solve [check_finite]",
            Path(bk, [lambda f, u: woodbury.solve(f, u)], (factorized, grads)),
            memory=True,
            result_bytes=solve_bytes,
        ),
        Entry(
            "woodbury.solve [no check]",
            Path(bk, [lambda f, u: woodbury.solve(f, u, check_finite=False)], (factorized, grads)),
            memory=True,
            result_bytes=solve_bytes,
            check=False,
        ),
        Entry(
            "in-place solve (public ops)*",
            Path(bk, [lambda f, u: in_place_solve(bk, f, u)], (factorized, grads)),
            memory=True,
            result_bytes=solve_bytes,
        ),
    ]
    if bk.name != "jax":  # value checks are skipped under jit
        xp = _backend.namespace(("captures", captures[0][0]))

        def check_captures(c):
            for index, (a, e) in enumerate(c):
                _checks.finite(xp, f"a{index}", a)
                _checks.finite(xp, f"e{index}", e)

        breakdown.insert(
            2,
            Entry(
                "check_finite of the captures", Path(bk, [check_captures], (captures,)), check=True
            ),
        )
        breakdown.insert(
            3,
            Entry(
                "alt: check_finite of the B×B Gram",
                Path(bk, [lambda k: _checks.finite(xp, "gram", k)], (kernel,)),
                check=True,
            ),
        )
    else:
        breakdown = [e for e in breakdown if e.info.get("check") is not False]
        if args.quick:  # every entry is an XLA compilation: keep the smoke run short
            breakdown = []
    for entry in breakdown:
        entry.info.update(part="mlp-breakdown")
    run_group(breakdown, args)

    results = [summary(e) for e in main + breakdown]
    by = {r["name"]: r for r in results if r["part"] == "mlp"}
    for name in (
        "gram implicit",
        "solve implicit",
        "solve implicit, in-place*",
        "batch natgrad implicit",
    ):
        imp = by[name]
        mat = by[f"{imp['op']} materialised"]
        imp["speedup"] = mat["median_s"] / imp["median_s"]
        imp["speedup_min"] = mat["min_s"] / imp["min_s"]
        imp["flop_ratio"] = mat["flops"] / imp["flops"]
        for key, ratio in (
            ("peak_bytes", "memory_ratio"),
            ("work_bytes", "work_ratio"),
            ("rss_delta_bytes", "rss_ratio"),
        ):
            if imp.get(key) is not None and mat.get(key):
                imp[ratio] = imp[key] / mat[key]
    results.append(
        {
            "name": "mlp checks",
            "part": "check",
            "backend": bk.name,
            "gram_relative_difference": gram_diff,
            "solve_relative_difference": solve_diff,
            "in_place_solve_relative_difference": fold_diff,
            "batch_natgrad_relative_difference": span_diff,
            "per_example_vs_library_difference": pe_diff,
            "per_example_bytes": batch * params * 4,
            "params": params,
        }
    )
    return results


# --------------------------------------------------------------------------------------
# 2. CNN with (B, T, ·) captures
# --------------------------------------------------------------------------------------


def bench_cnn(bk: Backend, args: argparse.Namespace) -> list[dict]:
    import numpy as np

    from curvlinalg import woodbury

    shapes = cnn_shapes(**args.cnn)
    problem = cnn_problem(shapes, args.batch)
    captures, grads = convert(bk, problem)
    batch = args.batch
    scale = 1.0 / batch
    limit = args.max_gib * 2**30
    entries: list[Entry] = []
    skipped: list[dict] = []

    def implicit_bytes(positions: int) -> int:  # a aᵀ, e eᵀ and their product, (B·T)² each
        return 3 * (batch * positions) ** 2 * 4

    for index, (name, positions, d_in, d_out) in enumerate(shapes):
        pair = [captures[index]]
        implicit_cost = positions * positions * (d_in + d_out)
        auto = "implicit" if implicit_cost <= d_in * d_out else "materialize"
        info = dict(
            part="cnn-layer",
            layer=name,
            T=positions,
            d_in=d_in,
            d_out=d_out,
            auto_picks=auto,
            cost_implicit=implicit_cost,
            cost_materialize=d_in * d_out,
        )
        for method in ("implicit", "materialize", "auto"):
            chosen = auto if method == "auto" else method
            if chosen == "implicit" and implicit_bytes(positions) > limit:
                skipped.append(
                    dict(
                        name=f"gram {method}",
                        backend=bk.name,
                        skipped=True,
                        predicted_bytes=implicit_bytes(positions),
                        **info,
                    )
                )
                continue
            entries.append(
                Entry(
                    f"gram {method}",
                    Path(bk, [lambda c, m=method: woodbury.gram(c, method=m)], (pair,)),
                    memory=True,
                    slow=positions > 1 and chosen == "implicit",
                    method=method,
                    **info,
                )
            )
        entries.append(
            Entry(
                "gram reference",
                Path(bk, [lambda c: ref_per_example(bk, c), lambda p, c: ref_gram(bk, p)], (pair,)),
                memory=True,
                method="reference (plain ops)",
                **info,
            )
        )

    net = dict(part="cnn-net", layer="whole network")
    whole = max(implicit_bytes(t) for _, t, _, _ in shapes)
    if whole > limit:
        skipped.append(
            dict(
                name="gram implicit",
                backend=bk.name,
                skipped=True,
                predicted_bytes=whole,
                method="implicit",
                **net,
            )
        )
    else:
        entries.append(
            Entry(
                "gram implicit",
                Path(bk, [lambda c: woodbury.gram(c, method="implicit")], (captures,)),
                memory=True,
                slow=True,
                method="implicit",
                **net,
            )
        )
    stored = ref_per_example(bk, captures)  # P per layer, for the Gᵀu + Gw comparison
    weights = bk.asarray(np.ones(batch, dtype=np.float32))
    entries += [
        Entry(
            "gram materialize",
            Path(bk, [lambda c: woodbury.gram(c, method="materialize")], (captures,)),
            memory=True,
            method="materialize",
            **net,
        ),
        Entry(
            "gram auto",
            Path(bk, [lambda c: woodbury.gram(c)], (captures,)),
            memory=True,
            method="auto",
            **net,
        ),
        Entry(
            "gram reference",
            Path(bk, [lambda c: ref_per_example(bk, c), lambda p, c: ref_gram(bk, p)], (captures,)),
            memory=True,
            method="reference (plain ops)",
            **net,
        ),
        Entry(
            "solve implicit",
            Path(
                bk,
                [lambda c, u: woodbury.solve(woodbury.factorize(c, DAMPING, scale), u)],
                (captures, grads),
            ),
            memory=True,
            method="factorize(auto) + solve",
            **net,
        ),
        Entry(
            "solve reference",
            Path(
                bk,
                [
                    lambda c, u: ref_per_example(bk, c),
                    lambda p, c, u: ref_solve(bk, p, u, DAMPING, scale),
                ],
                (captures, grads),
            ),
            memory=True,
            method="reference (plain ops)",
            **net,
        ),
        Entry(
            "Gᵀu+Gw over B·T rows",
            Path(
                bk,
                [
                    lambda c, u, w: (
                        woodbury.rmatvec(c, u, check_finite=False),
                        woodbury.matvec(c, w, check_finite=False),
                    )
                ],
                (captures, grads, weights),
            ),
            method="woodbury.rmatvec + matvec",
            **net,
        ),
        Entry(
            "Gᵀu+Gw with stored P",
            Path(
                bk,
                [
                    lambda p, u, w: (
                        sum(q @ v.reshape(-1) for q, v in zip(p, u)),
                        [(bk.swap(q) @ w).reshape(v.shape) for q, v in zip(p, u)],
                    )
                ],
                (stored, grads, weights),
            ),
            method="P vec(u), Pᵀw (P precomputed)",
            **net,
        ),
    ]
    if bk.name != "jax":
        entries.insert(
            len(entries) - 5,
            Entry(
                "gram auto [no check]",
                Path(bk, [lambda c: woodbury.gram(c, check_finite=False)], (captures,)),
                memory=True,
                method="auto, check_finite=False",
                **net,
            ),
        )
    # Correctness of the whole-network paths.
    by_name = {(e.info["part"], e.name): e for e in entries}
    gram_diff = relative_difference(
        bk, by_name[("cnn-net", "gram auto")].path(), by_name[("cnn-net", "gram reference")].path()
    )
    solve_diff = relative_difference(
        bk,
        by_name[("cnn-net", "solve implicit")].path(),
        by_name[("cnn-net", "solve reference")].path(),
    )
    if not (gram_diff < 1e-3 and solve_diff < 1e-3):
        raise AssertionError(
            f"{bk.name}: CNN paths differ: gram {gram_diff:.1e}, solve {solve_diff:.1e}"
        )
    run_group(entries, args)
    results = [summary(e) for e in entries] + skipped
    results.append(
        {
            "name": "cnn checks",
            "part": "check",
            "backend": bk.name,
            "gram_relative_difference": gram_diff,
            "solve_relative_difference": solve_diff,
            "params": sum(d_in * d_out for _, _, d_in, d_out in shapes),
        }
    )
    return results


# --------------------------------------------------------------------------------------
# 3. Laplace sampling
# --------------------------------------------------------------------------------------


def in_place_sample(bk: Backend, captures: list, y: list, z: Any) -> list:
    """``laplace.sample`` from public pieces with the scalars folded into the ``(S, B)``
    weights and the ``(S, d_out, d_in)`` combination done in place (see in_place_solve)."""
    from curvlinalg import woodbury

    batch = int(captures[0][0].shape[0])
    factorized = woodbury.factorize(captures, PRIOR_PRECISION, N_DATA / batch)
    root = (N_DATA / (batch * PRIOR_PRECISION)) ** 0.5
    projected = root * woodbury.rmatvec(captures, y, check_finite=False) + z  # (S, B)
    weights = bk.swap(bk.cho_solve(factorized.lower, bk.swap(projected)))
    out = woodbury.matvec(captures, weights * (-root), check_finite=False)
    result = []
    for c, noise in zip(out, y):
        c += noise
        c *= PRIOR_PRECISION**-0.5
        result.append(c)
    return result


def bench_laplace(bk: Backend, problem: dict[str, Any], args: argparse.Namespace) -> list[dict]:
    import numpy as np

    from curvlinalg import laplace

    captures, _ = convert(bk, problem)
    rng = np.random.default_rng(2)
    most = max(args.samples)
    start = time.perf_counter()
    y_all = [rng.standard_normal((most, o, i), dtype=np.float32) for i, o in problem["layers"]]
    z_all = rng.standard_normal((most, args.batch), dtype=np.float32)
    draw_s = time.perf_counter() - start
    entries: list[Entry] = []
    for count in args.samples:
        y = [bk.asarray(x[:count]) for x in y_all]
        z = bk.asarray(z_all[:count])
        entries.append(
            Entry(
                f"laplace.sample S={count}",
                Path(
                    bk,
                    [lambda c, y_, z_: laplace.sample(c, PRIOR_PRECISION, N_DATA, y_, z_)],
                    (captures, y, z),
                ),
                slow=True,
                memory=True,
                rss=False,
                part="laplace",
                samples=count,
                noise_bytes=nbytes(y) + nbytes(z),
                result_bytes=nbytes(y),
            )
        )
        if count == most and bk.name != "jax":  # XLA fuses the combination already
            fold = Path(bk, [lambda c, y_, z_: in_place_sample(bk, c, y_, z_)], (captures, y, z))
            difference = relative_difference(bk, fold(), entries[-1].path())
            if not difference < 1e-3:
                raise AssertionError(f"{bk.name}: in-place sample differs by {difference:.1e}")
            entries.append(
                Entry(
                    f"in-place sample* S={count}",
                    fold,
                    slow=True,
                    memory=True,
                    rss=False,
                    part="laplace",
                    samples=count,
                    noise_bytes=nbytes(y) + nbytes(z),
                    result_bytes=nbytes(y),
                    relative_difference=difference,
                )
            )
    run_group(entries, args, rounds=args.sample_repeats)
    del y_all, z_all
    results = []
    for entry in entries:
        r = summary(entry, numpy_rng_draw_s_for_max_S=draw_s)
        r["samples_per_s"] = r["samples"] / r["median_s"]
        results.append(r)
    return results


def bench_kron_sample(bk: Backend, args: argparse.Namespace) -> list[dict]:
    import numpy as np

    from curvlinalg import kron, laplace

    size = args.kron_size
    rng = np.random.default_rng(3)

    def spd(width: int) -> np.ndarray:
        x = rng.standard_normal((2 * width, width), dtype=np.float32)
        return (x.T @ x) / (2 * width) + np.float32(0.1) * np.eye(width, dtype=np.float32)

    a, g = bk.asarray(spd(size)), bk.asarray(spd(size))
    most = max(args.kron_samples)
    y_all = rng.standard_normal((most, size, size), dtype=np.float32)
    a_eigh, g_eigh = kron.eigh(a), kron.eigh(g)
    precision = N_DATA * (g_eigh.values[:, None] * a_eigh.values[None, :]) + PRIOR_PRECISION
    root = precision**0.5

    def raw_chain(ua, ug, r, y):  # the GEMM chain of kron_sample with the eigh precomputed
        return ug @ (y / r) @ bk.swap(ua)

    entries = [
        Entry(
            "kron.eigh(A) + kron.eigh(G)",
            Path(bk, [lambda a_, g_: (kron.eigh(a_), kron.eigh(g_))], (a, g)),
            slow=True,
            part="kron-sample",
            samples=0,
        )
    ]
    for count in args.kron_samples:
        y = bk.asarray(y_all[:count])
        entries.append(
            Entry(
                f"kron_sample S={count}",
                Path(
                    bk,
                    [lambda a_, g_, y_: laplace.kron_sample(a_, g_, PRIOR_PRECISION, N_DATA, y_)],
                    (a, g, y),
                ),
                slow=True,
                memory=True,
                rss=False,
                part="kron-sample",
                samples=count,
                noise_bytes=nbytes(y),
                result_bytes=nbytes(y),
            )
        )
        entries.append(
            Entry(
                f"raw chain U_G(Y⊘√p)U_Aᵀ S={count}",
                Path(bk, [raw_chain], (a_eigh.vectors, g_eigh.vectors, root, y)),
                slow=True,
                part="kron-sample",
                samples=count,
                noise_bytes=nbytes(y),
            )
        )
    run_group(entries, args, rounds=args.sample_repeats)
    results = []
    for entry in entries:
        r = summary(entry, size=size)
        if r["samples"]:
            r["samples_per_s"] = r["samples"] / r["median_s"]
        results.append(r)
    return results


# --------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------


def fmt_time(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:7.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:6.1f} ms"
    return f"{seconds * 1e6:6.0f} µs"


def fmt_bytes(count: float | None) -> str:
    if count is None:
        return "-"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(count) >= size:
            return f"{count / size:.2f} {unit}"
    return f"{int(count)} B"


def faults(r: dict) -> str:
    count = r.get("minor_faults_per_call")
    return "-" if count is None else f"{count:.0f}"


def spread(r: dict) -> str:
    return f"[{fmt_time(r['q1_s']).strip()}, {fmt_time(r['q3_s']).strip()}]"


def print_tables(results: list[dict], header: str, quick: bool = False) -> None:
    print(header)
    for backend in dict.fromkeys(r["backend"] for r in results):
        rows = [r for r in results if r["backend"] == backend]
        print(f"\n================ {backend} ================")
        mlp = [r for r in rows if r.get("part") == "mlp"]
        if mlp:
            check = next(r for r in rows if r["name"] == "mlp checks")
            print(
                f"\n-- MLP: {check['params'] / 1e6:.2f} M parameters, per-example gradients "
                f"{fmt_bytes(check['per_example_bytes'])} --"
            )
            print(
                f"  {'entry':<27}{'median':>10} {'IQR':<21}{'n':>3}{'speed-up':>9}{'FLOPs':>7}"
                f"{'peak mem':>11}{'ratio':>8}{'excl. result':>13}{'ratio':>8}{'RSS Δ':>11}"
                f"{'faults':>8}"
            )
            for r in mlp:
                speed = f"{r['speedup']:8.0f}x" if "speedup" in r else ""
                flop = f"{r['flop_ratio']:6.0f}x" if "flop_ratio" in r else ""
                ratio = f"{r['memory_ratio']:8.2%}" if "memory_ratio" in r else ""
                work = f"{r['work_ratio']:8.3%}" if "work_ratio" in r else ""
                print(
                    f"  {r['name']:<27}{fmt_time(r['median_s']):>10} {spread(r):<21}"
                    f"{r['repeats']:>3}{speed:>9}{flop:>7}{fmt_bytes(r.get('peak_bytes')):>11}"
                    f"{ratio:>8}{fmt_bytes(r.get('work_bytes')):>13}{work:>8}"
                    f"{fmt_bytes(r.get('rss_delta_bytes')):>11}{faults(r):>8}"
                )
            for r in mlp:
                if "speedup" not in r:
                    continue
                fast = "met" if r["speedup"] >= SPEED_GOAL else "MISSED"
                mem = (
                    "-"
                    if "memory_ratio" not in r
                    else "met"
                    if r["memory_ratio"] <= MEMORY_GOAL
                    else "MISSED"
                )
                if quick:  # the goals are for the full-size MLP
                    fast = mem = "n/a (--quick)"
                memory = r.get("memory_ratio", float("nan"))
                print(
                    f"  goal {r['name']}: {r['speedup']:.0f}x (min-time ratio "
                    f"{r['speedup_min']:.0f}x, FLOP ratio {r['flop_ratio']:.0f}x) vs "
                    f"≥{SPEED_GOAL:.0f}x: {fast}; memory {memory:.2%} vs ≤{MEMORY_GOAL:.0%}: "
                    f"{mem}"
                )
            print(
                "  * not curvlinalg's solve: the same maths from public pieces, scalars folded "
                "into w and the combination in place"
            )
            sizes = {r["op"]: fmt_bytes(r["result_bytes"]) for r in mlp}
            print(
                f"  result: Gram {sizes['gram']}, natural gradient {sizes['solve']}"
                f"; relative differences to the materialised path: gram "
                f"{check['gram_relative_difference']:.1e}, solve "
                f"{check['solve_relative_difference']:.1e}, in-place "
                f"{check['in_place_solve_relative_difference']:.1e}, batch natural gradient "
                f"{check['batch_natgrad_relative_difference']:.1e}"
            )
        breakdown = [r for r in rows if r.get("part") == "mlp-breakdown"]
        if breakdown:
            print(
                f"\n  {'implicit solve breakdown':<36}{'median':>10} {'IQR':<21}{'n':>3}"
                f"{'peak mem':>11}{'faults':>8}"
            )
            for r in breakdown:
                print(
                    f"  {r['name']:<36}{fmt_time(r['median_s']):>10} {spread(r):<21}"
                    f"{r['repeats']:>3}{fmt_bytes(r.get('peak_bytes')):>11}{faults(r):>8}"
                )
        cnn = [r for r in rows if r.get("part") in ("cnn-layer", "cnn-net")]
        if cnn:
            check = next(r for r in rows if r["name"] == "cnn checks")
            print(f"\n-- CNN with (B, T, ·) captures: {check['params']} parameters --")
            print(
                f"  {'layer':<18}{'T':>5}{'d_in':>5}{'d_out':>6}{'auto→':>12}  {'entry':<22}"
                f"{'median':>10} {'IQR':<21}{'n':>3}{'peak mem':>11}{'RSS Δ':>11}{'faults':>8}"
            )
            order = {"cnn-layer": 0, "cnn-net": 1}
            for r in sorted(
                cnn,
                key=lambda r: (order[r["part"]], r["layer"] if r["part"] == "cnn-layer" else ""),
            ):
                lead = (
                    f"  {r['layer']:<18}{r.get('T', ''):>5}{r.get('d_in', ''):>5}"
                    f"{r.get('d_out', ''):>6}{r.get('auto_picks', ''):>12}  {r['name']:<22}"
                )
                if r.get("skipped"):
                    print(
                        f"{lead}  skipped: the (B·T)² products need "
                        f"≈ {fmt_bytes(r['predicted_bytes'])}"
                    )
                    continue
                print(
                    f"{lead}{fmt_time(r['median_s']):>10} {spread(r):<21}{r['repeats']:>3}"
                    f"{fmt_bytes(r.get('peak_bytes')):>11}"
                    f"{fmt_bytes(r.get('rss_delta_bytes')):>11}{faults(r):>8}"
                )
            print(
                f"  auto/implicit vs reference: relative difference gram "
                f"{check['gram_relative_difference']:.1e}, solve "
                f"{check['solve_relative_difference']:.1e}"
            )
        lap = [r for r in rows if r.get("part") in ("laplace", "kron-sample")]
        if lap:
            print("\n-- Laplace sampling --")
            print(
                f"  {'entry':<32}{'median/call':>12} {'IQR':<21}{'n':>3}{'samples/s':>10}"
                f"{'noise':>11}{'peak mem':>11}{'faults':>8}"
            )
            for r in lap:
                rate = f"{r['samples_per_s']:9.1f}" if r.get("samples_per_s") else ""
                print(
                    f"  {r['name']:<32}{fmt_time(r['median_s']):>12} {spread(r):<21}"
                    f"{r['repeats']:>3}{rate:>10}{fmt_bytes(r.get('noise_bytes')):>11}"
                    f"{fmt_bytes(r.get('peak_bytes')):>11}{faults(r):>8}"
                )
            if any(r["name"].startswith("in-place") for r in lap):
                print(
                    "  * laplace.sample's maths from public pieces, scalars folded into the "
                    "weights and the combination in place"
                )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    threading = pin_threads(args.threads)
    started = time.perf_counter()
    host = machine()

    import numpy  # noqa: F401  (after pinning)

    import curvlinalg  # noqa: F401

    available = installed_backends()
    wanted = available if args.backend == "all" else [args.backend]
    missing = [name for name in wanted if name not in available]
    if missing:
        print(f"backend(s) not installed: {', '.join(missing)}", file=sys.stderr)
        return 2
    problem = mlp_problem(args.mlp_dims, args.batch)
    results: list[dict] = []
    for name in wanted:
        bk = Backend(name, args.threads)
        # Objects alive now (library modules) are exempt from collection: the gc.collect()
        # before every measurement then costs milliseconds instead of a fraction of a second.
        gc.collect()
        gc.freeze()
        for part, run in (
            ("mlp", lambda bk=bk: bench_mlp(bk, problem, args)),
            ("cnn", lambda bk=bk: bench_cnn(bk, args)),
            ("laplace", lambda bk=bk: bench_laplace(bk, problem, args)),
            ("kron", lambda bk=bk: bench_kron_sample(bk, args)),
        ):
            if part in args.skip:
                continue
            if (
                name == "jax"
                and args.backend == "all"
                and (part == "kron" or (args.quick and part == "cnn"))
            ):
                # Keeps the full run near five minutes (jax's kron_sample is two eigh and a
                # GEMM chain, as for the others) and the smoke run compile-light; the code
                # paths are backend-generic. ``--backend jax`` runs every part.
                continue
            t0 = time.perf_counter()
            load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
            part_results = run()
            for r in part_results:
                r["loadavg_at_start"] = load
            results.extend(part_results)
            gc.collect()
            print(
                f"[{name} {part} done in {time.perf_counter() - t0:.1f} s; 1-min load average "
                f"at its start {load}]",
                file=sys.stderr,
            )

    meta = {
        "args": {k: (sorted(v) if isinstance(v, set) else v) for k, v in vars(args).items()},
        "machine": host,
        "versions": versions(),
        "threading": threading,
        "constants": {
            "damping": DAMPING,
            "prior_precision": PRIOR_PRECISION,
            "n_data": N_DATA,
            "dtype": "float32",
        },
        "goals": {"speedup": SPEED_GOAL, "memory_ratio": MEMORY_GOAL},
        "wall_s": time.perf_counter() - started,
    }
    try:
        meta["machine"]["loadavg_end"] = os.getloadavg()
    except OSError:
        pass
    dims = "-".join(str(d) for d in args.mlp_dims)
    header = (
        f"curvlinalg woodbury/laplace benchmark  MLP {dims}  B={args.batch}  float32  "
        f"threads={args.threads}  repeats={args.repeats} (slow {args.slow_repeats})\n"
        f"{meta['machine']['cpu']} ({meta['machine']['nproc']} CPUs, load avg "
        f"{meta['machine'].get('loadavg_start', ('?',))[0]:.2f} at start)  "
        + "  ".join(f"{k} {v}" for k, v in meta["versions"].items())
        + "\nmedian and interquartile range; peak mem = allocator peak above baseline incl. "
        "the result (numpy: tracemalloc, torch: profiler, jax: XLA memory_analysis); "
        "RSS Δ = resident-set high-water mark minus RSS before; faults = minor page faults of "
        "the process per timed call (median)"
    )
    print_tables(results, header, quick=args.quick)
    print(f"\ntotal {meta['wall_s']:.1f} s")
    if args.json:
        with open(args.json, "w") as file:
            json.dump({"meta": meta, "results": results}, file, indent=2, default=str)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

r"""Micro-benchmark of curvlinalg's Kronecker-factored solves against a plain GEMM.

What is timed (``d_in = d_out = d = --size``, ``B = --batch``), per backend:

GEMM-bound group — achieved GFLOP/s and its ratio to a plain GEMM ``x @ y`` of ``(d×d)(d×d)``
measured in the same run, interleaved round by round with the ops so that clock or
neighbour noise hits every entry alike:

* ``gemm``                 ``x @ y``                                     2·d³
* ``chain: g@(v@a)``       the two GEMMs of K-FAC, raw backend ops
                                                                   2·d_out·d_in² + 2·d_out²·d_in
* ``precondition``         ``kron.precondition(grad, a_inv, g_inv)``     same as above
* ``chain: v@a``           the one GEMM of FOOF, raw                     2·d_out·d_in²
* ``precondition FOOF``    ``kron.precondition(grad, a_inv)``            same as above
* ``chain: eigenbasis``    ``U_G ((U_Gᵀ V U_A) / D) U_Aᵀ``, raw, ``D`` precomputed
                                                                         4 GEMMs = 4·2·d³
* ``eigen_solve``          ``kron.eigen_solve(grad, eigh(A), eigh(G), λ)``  4·2·d³
* ``sum_eigen_solve``      ``kron.sum_eigen_solve(grad, geigh_A, geigh_G)`` 4·2·d³

The elementwise work (the ``d_out×d_in`` denominator, the division, the finiteness and
positivity checks) is not counted as FLOPs: it is the overhead the ratio exposes. Every
library op is run with ``check_finite=True`` (the default) and ``check_finite=False``.

Factored vs dense (``B`` outer products, ``grad = eᵀa / B``) — time and speed-up:

* dense:     ``kron.precondition(e.T @ a / B, a_inv, g_inv)`` *including* forming the gradient,
             which is what an optimizer pays: 2·B·d_out·d_in + the precondition FLOPs above;
* factored:  ``kron.precondition_factored(a, e, a_inv, g_inv)``:
             2·B·(d_in² + d_out² + d_out·d_in) (K-FAC), 2·B·(d_in² + d_out·d_in) (FOOF);
* ``chain: factored …``: the factored path's GEMMs as raw backend ops, same FLOPs.

Validation overheads (eager backends) — time per call of the value checks on their own:
``check_finite`` of ``grad`` and of ``a``, ``e``; the ``eigen_solve`` denominator and its
positivity check; a one-pass alternative ``isfinite(sum(grad))``; ``grad / 2`` for scale.

Decompositions — time per call (GFLOP/s is not meaningful for an eigensolver):
``kron.eigh``, the backend's own ``eigh``, ``kron.generalized_eigh`` and ``kron.sum_solve``
(two generalised eigendecompositions + ``sum_eigen_solve``).

Backends: ``numpy`` (SciPy/OpenBLAS), ``torch`` (CPU), and JAX twice: ``jax-jit`` (every call
wrapped in ``jax.jit``; curvlinalg's value checks — finiteness, positivity — are skipped on
traced values, so ``check_finite`` makes no difference there) and ``jax-eager`` (op-by-op
dispatch with the Python-level validation, as a user calling the function directly sees it).

Threads are pinned before any array library is imported (``--threads``): the BLAS/OpenMP
environment variables, the CPU affinity mask when fewer threads than available CPUs are asked
for (XLA sizes its pool from it), XLA's single-thread flags for ``--threads 1``, and
``torch.set_num_threads``.

Usage::

    python bench/bench_kron.py                       # all installed backends, float32, d=1000
    python bench/bench_kron.py --dtype float64 --backend numpy
    python bench/bench_kron.py --quick               # CI smoke run (seconds)
    python bench/bench_kron.py --json results.json
    python bench/bench_kron.py --backend numpy --openblas-thread-timeout 4

See bench/README.md for the measured results and what they mean.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

BACKENDS = ("numpy", "torch", "jax")
GOAL = 0.85  # target: an op reaches ≥ 85 % of the plain GEMM rate


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
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    parser.add_argument("--size", type=int, default=None, help="d_in = d_out (default 1000)")
    parser.add_argument("--batch", type=int, default=None, help="B of the factored gradient (100)")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per entry (30)")
    parser.add_argument(
        "--decomposition-repeats",
        type=int,
        default=None,
        help="timed repeats of the eigh/sum_solve entries (default 5)",
    )
    parser.add_argument("--warmup", type=int, default=None, help="untimed calls per entry (3)")
    parser.add_argument("--threads", type=int, default=2, help="threads for BLAS/OpenMP/XLA")
    parser.add_argument(
        "--openblas-thread-timeout",
        type=int,
        default=None,
        metavar="N",
        help="set OPENBLAS_THREAD_TIMEOUT=N (idle OpenBLAS workers spin 2**N cycles; "
        "OpenBLAS default 28). NumPy and SciPy each bundle their own OpenBLAS, see README",
    )
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON to PATH")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="small size and few repeats: a smoke run of a few seconds",
    )
    args = parser.parse_args(argv)
    defaults = (
        dict(size=200, batch=20, repeats=5, decomposition_repeats=2, warmup=1)
        if args.quick
        else dict(size=1000, batch=100, repeats=30, decomposition_repeats=5, warmup=3)
    )
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.threads < 1 or args.size < 1 or args.batch < 1 or args.repeats < 1:
        parser.error("--threads, --size, --batch and --repeats must be positive")
    return args


def pin_threads(threads: int, openblas_thread_timeout: int | None = None) -> dict[str, Any]:
    """Limit every array library to ``threads`` threads; must run before they are imported."""
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
        # XLA's CPU client sizes its thread pool from the schedulable CPUs.
        os.sched_setaffinity(0, cpus[:threads])
    if threads == 1:
        flags = os.environ.get("XLA_FLAGS", "")
        os.environ["XLA_FLAGS"] = (
            f"{flags} --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
        ).strip()
    if openblas_thread_timeout is not None:
        os.environ["OPENBLAS_THREAD_TIMEOUT"] = str(openblas_thread_timeout)
    # Keep JAX on the CPU and quiet about the absence of accelerators.
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    return {
        "threads": threads,
        "cpus_available": len(cpus) or os.cpu_count(),
        "affinity": sorted(os.sched_getaffinity(0)) if cpus else None,
        "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""),
        "OPENBLAS_THREAD_TIMEOUT": os.environ.get("OPENBLAS_THREAD_TIMEOUT"),
    }


# --------------------------------------------------------------------------------------
# Backends
# --------------------------------------------------------------------------------------


class Backend:
    """How to move data to a library, wait for a result and (for JAX) compile a call."""

    def __init__(self, name: str, dtype: str, threads: int) -> None:
        self.name = name
        self.jit = name == "jax-jit"
        self.library = name.split("-")[0]
        if self.library == "numpy":
            import numpy as np

            self._convert = lambda x: np.ascontiguousarray(x.astype(dtype))
            self._sync = lambda out: out
            self.transpose = lambda x: x.T
        elif self.library == "torch":
            import torch

            torch.set_num_threads(threads)
            self._convert = lambda x: torch.from_numpy(x.astype(dtype)).contiguous()
            self._sync = lambda out: out
            self.transpose = lambda x: x.mT
        else:
            import jax
            import jax.numpy as jnp

            if dtype == "float64":
                jax.config.update("jax_enable_x64", True)
            self._jax = jax
            self._convert = lambda x: jax.device_put(jnp.asarray(x.astype(dtype)))
            self._sync = jax.block_until_ready
            self.transpose = lambda x: x.T

    def asarray(self, x: Any) -> Any:
        return self._convert(x)

    def sync(self, out: Any) -> Any:
        return self._sync(out)

    def compile(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """``jax.jit`` for ``jax-jit``; the function itself otherwise."""
        return self._jax.jit(fn) if self.jit else fn


def installed_backends() -> list[str]:
    return [name for name in BACKENDS if importlib.util.find_spec(name) is not None]


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for module in ("numpy", "scipy", "torch", "jax", "jaxlib", "array_api_compat", "curvlinalg"):
        if module in sys.modules:
            found[module] = getattr(sys.modules[module], "__version__", "?")
    return found


def machine() -> dict[str, Any]:
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as file:
            for line in file:
                if not line.strip():
                    break  # the first processor's block is enough
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    fields.setdefault("model name", platform.processor() or "?")
    flags = set(fields.get("flags", "").split())
    simd = [flag for flag in ("avx2", "fma", "avx512f") if flag in flags]
    return {
        "cpu": fields["model name"],
        "cpu_family_model": f"{fields.get('cpu family', '?')}/{fields.get('model', '?')}",
        "simd": simd,
        "nproc": os.cpu_count(),
        "platform": platform.platform(),
    }


def blas_info() -> dict[str, str]:
    info = {}
    for module in ("numpy", "scipy"):
        try:
            blas = sys.modules[module].show_config(mode="dicts")["Build Dependencies"]["blas"]
            info[module] = f"{blas.get('name', '?')} {blas.get('version', '')}".strip()
        except Exception:  # noqa: BLE001 - informational only
            pass
    if "torch" in sys.modules:
        torch = sys.modules["torch"]
        info["torch"] = "mkl" if torch.backends.mkl.is_available() else "?"
        info["torch_threads"] = str(torch.get_num_threads())
    return info


# --------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------


class Entry:
    """One timed call: ``fn()`` returns the array(s) to wait for."""

    def __init__(self, name: str, fn: Callable[[], Any], flops: float | None, **info: Any):
        self.name = name
        self.fn = fn
        self.flops = flops
        self.info = info
        self.times: list[float] = []


def run_interleaved(
    entries: list[Entry], backend: Backend, repeats: int, warmup: int, bracket: bool = False
) -> None:
    """Warm every entry up, then time one call of each entry per round, ``repeats`` rounds.

    With ``bracket`` the first entry (the baseline) is timed at the start *and* at the end of
    every round, and both samples are pooled, so that its median is not biased by its position.
    """
    for entry in entries:
        for _ in range(warmup):
            backend.sync(entry.fn())
    order = entries + entries[:1] if bracket else entries
    gc.collect()
    enabled = gc.isenabled()
    gc.disable()
    try:
        for _ in range(repeats):
            for entry in order:
                start = time.perf_counter()
                backend.sync(entry.fn())
                entry.times.append(time.perf_counter() - start)
    finally:
        if enabled:
            gc.enable()


def summary(entry: Entry) -> dict[str, Any]:
    times = sorted(entry.times)
    if len(times) >= 2:
        q1, _, q3 = statistics.quantiles(times, n=4, method="inclusive")
    else:
        q1 = q3 = times[0]
    median = statistics.median(times)
    result = {
        "name": entry.name,
        "median_s": median,
        "q1_s": q1,
        "q3_s": q3,
        "min_s": times[0],
        "max_s": times[-1],
        "repeats": len(times),
        "flops": entry.flops,
        "gflops": entry.flops / median / 1e9 if entry.flops else None,
    }
    result.update(entry.info)
    return result


# --------------------------------------------------------------------------------------
# Problem data (NumPy, float64; converted per backend)
# --------------------------------------------------------------------------------------


def make_problem(size: int, batch: int, seed: int = 0) -> dict[str, Any]:
    import numpy as np

    from curvlinalg import kron

    rng = np.random.default_rng(seed)
    d_in = d_out = size

    def spd(width: int) -> np.ndarray:
        samples = rng.standard_normal((2 * width, width))
        return kron.factor(samples) + 0.1 * np.eye(width)

    a, g = spd(d_in), spd(d_out)
    a2, g2 = spd(d_in), spd(d_out)
    return {
        "grad": rng.standard_normal((d_out, d_in)),
        "x": rng.standard_normal((size, size)),
        "y": rng.standard_normal((size, size)),
        "a_inv": kron.inverse(a, 1e-2),
        "g_inv": kron.inverse(g, 1e-2),
        "a": a,
        "g": g,
        "a2": a2,
        "g2": g2,
        "acts": rng.standard_normal((batch, d_in)),
        "errs": rng.standard_normal((batch, d_out)),
    }


# --------------------------------------------------------------------------------------
# The benchmark of one backend
# --------------------------------------------------------------------------------------


def bench_backend(
    backend: Backend, problem: dict[str, Any], args: argparse.Namespace
) -> list[dict[str, Any]]:
    from curvlinalg import kron

    data = {key: backend.asarray(value) for key, value in problem.items()}
    d_out, d_in = (int(n) for n in problem["grad"].shape)
    batch = int(problem["acts"].shape[0])
    damping = 1e-2
    T = backend.transpose
    jit = backend.compile
    grad, x, y = data["grad"], data["x"], data["y"]
    a_inv, g_inv, acts, errs = data["a_inv"], data["g_inv"], data["acts"], data["errs"]

    # Decompositions the solves reuse (computed once, outside the timing).
    a_eigh, g_eigh = kron.eigh(data["a"]), kron.eigh(data["g"])
    a_geigh = kron.generalized_eigh(data["a2"], data["a"])
    g_geigh = kron.generalized_eigh(data["g2"], data["g"])
    # Raw-chain denominators, precomputed: the chains are the GEMMs and the division only.
    eigen_den = g_eigh.values[:, None] * a_eigh.values[None, :] + damping

    gemm_flops = 2.0 * d_out * d_in * d_in  # (d×d)(d×d) at d_in = d_out
    kfac_flops = 2.0 * d_out * d_in * d_in + 2.0 * d_out * d_out * d_in
    foof_flops = 2.0 * d_out * d_in * d_in
    eigen_flops = 2.0 * (2.0 * d_out * d_out * d_in + 2.0 * d_out * d_in * d_in)  # 4 GEMMs
    form_flops = 2.0 * batch * d_out * d_in  # eᵀa
    factored_kfac_flops = 2.0 * batch * (d_in * d_in + d_out * d_out + d_out * d_in)
    factored_foof_flops = 2.0 * batch * (d_in * d_in + d_out * d_in)

    def chain_eigen(v, ua, ug, den):
        return ug @ ((T(ug) @ v @ ua) / den) @ T(ua)

    gemm_group: list[Entry] = [
        Entry("gemm", jit(lambda p, q: p @ q), gemm_flops, kind="baseline"),
        Entry("chain: g@(v@a)", jit(lambda v, a, g: g @ (v @ a)), kfac_flops, kind="chain"),
        Entry("chain: v@a", jit(lambda v, a: v @ a), foof_flops, kind="chain"),
        Entry("chain: eigenbasis", jit(chain_eigen), eigen_flops, kind="chain"),
    ]
    calls = {
        "gemm": lambda f: f(x, y),
        "chain: g@(v@a)": lambda f: f(grad, a_inv, g_inv),
        "chain: v@a": lambda f: f(grad, a_inv),
        "chain: eigenbasis": lambda f: f(grad, a_eigh.vectors, g_eigh.vectors, eigen_den),
    }
    chain_of = {
        "precondition": "chain: g@(v@a)",
        "precondition FOOF": "chain: v@a",
        "eigen_solve": "chain: eigenbasis",
        "sum_eigen_solve": "chain: eigenbasis",
    }
    finite_modes = (True,) if backend.jit else (True, False)
    for check in finite_modes:
        label = "" if backend.jit else (" [check_finite]" if check else " [no check]")
        ops = {
            "precondition": (
                jit(lambda v, a, g, c=check: kron.precondition(v, a, g, check_finite=c)),
                lambda f: f(grad, a_inv, g_inv),
                kfac_flops,
            ),
            "precondition FOOF": (
                jit(lambda v, a, c=check: kron.precondition(v, a, check_finite=c)),
                lambda f: f(grad, a_inv),
                foof_flops,
            ),
            "eigen_solve": (
                jit(
                    lambda v, ea, eg, c=check: kron.eigen_solve(v, ea, eg, damping, check_finite=c)
                ),
                lambda f: f(grad, a_eigh, g_eigh),
                eigen_flops,
            ),
            "sum_eigen_solve": (
                jit(lambda v, ea, eg, c=check: kron.sum_eigen_solve(v, ea, eg, check_finite=c)),
                lambda f: f(grad, a_geigh, g_geigh),
                eigen_flops,
            ),
        }
        for op, (fn, call, flops) in ops.items():
            name = op + label
            calls[name] = call
            gemm_group.append(
                Entry(
                    name,
                    fn,
                    flops,
                    kind="op",
                    check_finite=None if backend.jit else check,
                    chain=chain_of[op],
                )
            )
    for entry in gemm_group:
        entry.fn = (lambda f, call: lambda: call(f))(entry.fn, calls[entry.name])

    # Factored vs dense at batch B (the dense path pays for forming eᵀa/B).
    factored_group: list[Entry] = []
    for check in finite_modes:
        label = "" if backend.jit else (" [check_finite]" if check else " [no check]")
        for kind, g_arg, dense_flops, factored_flops in (
            ("K-FAC", g_inv, kfac_flops + form_flops, factored_kfac_flops),
            ("FOOF", None, foof_flops + form_flops, factored_foof_flops),
        ):
            dense = jit(
                lambda a, e, ai, gi, c=check: kron.precondition(
                    T(e) @ a / batch, ai, gi, check_finite=c
                )
            )
            factored = jit(
                lambda a, e, ai, gi, c=check: kron.precondition_factored(
                    a, e, ai, gi, check_finite=c
                )
            )
            info = dict(
                kind="factored-vs-dense", method=kind, check_finite=None if backend.jit else check
            )
            factored_group.append(
                Entry(
                    f"dense {kind}{label}",
                    (lambda f, gi: lambda: f(acts, errs, a_inv, gi))(dense, g_arg),
                    dense_flops,
                    path="dense",
                    **info,
                )
            )
            factored_group.append(
                Entry(
                    f"factored {kind}{label}",
                    (lambda f, gi: lambda: f(acts, errs, a_inv, gi))(factored, g_arg),
                    factored_flops,
                    path="factored",
                    **info,
                )
            )

    # The factored path's GEMMs as raw backend ops: what the shapes allow without the library.
    for kind, g_arg, flops in (
        ("K-FAC", g_inv, factored_kfac_flops),
        ("FOOF", None, factored_foof_flops),
    ):
        if g_arg is None:
            raw = jit(lambda a, e, ai: T(e / batch) @ (a @ ai))
            call = (lambda f: lambda: f(acts, errs, a_inv))(raw)
        else:
            raw = jit(lambda a, e, ai, gi: T((e / batch) @ gi) @ (a @ ai))
            call = (lambda f: lambda: f(acts, errs, a_inv, g_inv))(raw)
        factored_group.append(
            Entry(
                f"chain: factored {kind}",
                call,
                flops,
                kind="factored-vs-dense",
                method=kind,
                path="chain",
                check_finite=None,
            )
        )

    # Decompositions and sum_solve: time per call.
    if backend.library == "numpy":
        import scipy.linalg

        raw_eigh = lambda m: scipy.linalg.eigh(m, driver="evd", check_finite=False)  # noqa: E731
        raw_geigh = lambda m, b: scipy.linalg.eigh(  # noqa: E731
            m, b, driver="gvd", check_finite=False
        )
    elif backend.library == "torch":
        import torch

        raw_eigh, raw_geigh = torch.linalg.eigh, None
    else:
        import jax.numpy as jnp

        raw_eigh, raw_geigh = jit(jnp.linalg.eigh), None
    a, a2, g, g2 = data["a"], data["a2"], data["g"], data["g2"]
    k_eigh = jit(lambda m: kron.eigh(m))
    k_geigh = jit(lambda m, b: kron.generalized_eigh(m, b))
    k_sum = jit(lambda v, a1, g1, a2_, g2_: kron.sum_solve(v, a1, g1, a2_, g2_))
    decomposition_group = [
        Entry("backend eigh", lambda: raw_eigh(a), None, kind="decomposition"),
        Entry("eigh", lambda: k_eigh(a), None, kind="decomposition"),
        Entry("generalized_eigh", lambda: k_geigh(a2, a), None, kind="decomposition"),
        Entry("sum_solve", lambda: k_sum(grad, a, g, a2, g2), None, kind="decomposition"),
    ]
    if raw_geigh is not None:
        decomposition_group.insert(
            2,
            Entry("backend generalized eigh", lambda: raw_geigh(a2, a), None, kind="decomposition"),
        )
    if not backend.jit:
        k_sum_nc = lambda: kron.sum_solve(  # noqa: E731
            grad, a, g, a2, g2, check_finite=False
        )
        decomposition_group.append(
            Entry("sum_solve [no check]", k_sum_nc, None, kind="decomposition")
        )

    # Validation overheads on their own (skipped under jit, where values are not known).
    overhead_group: list[Entry] = []
    if not backend.jit:
        from curvlinalg import _backend, _checks

        xp = _backend.namespace(("grad", grad))

        def denominator_and_check():
            den = g_eigh.values[:, None] * a_eigh.values[None, :] + damping
            kron._positive_denominator(xp, den, "A⊗G + damping·I")
            return den

        overhead_group = [
            Entry(
                "check_finite(grad) [d_out×d_in]",
                lambda: _checks.finite(xp, "grad", grad),
                None,
                kind="overhead",
            ),
            Entry(
                "check_finite(a), (e) [B×d]",
                lambda: (_checks.finite(xp, "a", acts), _checks.finite(xp, "e", errs)),
                None,
                kind="overhead",
            ),
            Entry("eigen_solve denominator + check", denominator_and_check, None, kind="overhead"),
            Entry(
                "alt: isfinite(sum(grad))",
                lambda: bool(xp.isfinite(xp.sum(grad))),
                None,
                kind="overhead",
            ),
            Entry("ref: grad / 2 [d_out×d_in]", lambda: grad / 2, None, kind="overhead"),
        ]

    # Correctness sanity check: the factored and dense paths agree.
    import numpy as np

    def to_numpy(z: Any) -> np.ndarray:
        return np.asarray(z.numpy() if backend.library == "torch" else z, dtype=np.float64)

    reference = to_numpy(factored_group[0].fn())
    factored = to_numpy(factored_group[1].fn())
    mismatch = float(np.linalg.norm(reference - factored) / np.linalg.norm(reference))
    tolerance = 1e-3 if args.dtype == "float32" else 1e-10
    if not mismatch < tolerance:
        raise AssertionError(f"{backend.name}: factored and dense paths differ by {mismatch}")

    run_interleaved(gemm_group, backend, args.repeats, args.warmup, bracket=True)
    run_interleaved(factored_group, backend, args.repeats, args.warmup)
    run_interleaved(overhead_group, backend, args.repeats, args.warmup)
    run_interleaved(decomposition_group, backend, args.decomposition_repeats, 1)

    groups = gemm_group + factored_group + overhead_group + decomposition_group
    results = [summary(entry) for entry in groups]
    by_name = {result["name"]: result for result in results}
    gemm_rate = by_name["gemm"]["gflops"]
    for result in results:
        result["backend"] = backend.name
        result["dtype"] = args.dtype
        if result["kind"] in ("chain", "op"):
            result["ratio_to_gemm"] = result["gflops"] / gemm_rate
        if result["kind"] == "op":
            result["time_over_chain"] = result["median_s"] / by_name[result["chain"]]["median_s"]
    for result in results:
        if result["kind"] == "factored-vs-dense" and result["path"] == "factored":
            dense = by_name[result["name"].replace("factored", "dense", 1)]
            result["speedup_over_dense"] = dense["median_s"] / result["median_s"]
            result["flop_ratio"] = dense["flops"] / result["flops"]
            chain = by_name[f"chain: factored {result['method']}"]
            result["time_over_chain"] = result["median_s"] / chain["median_s"]
    results.append(
        {
            "name": "factored-vs-dense mismatch",
            "kind": "check",
            "backend": backend.name,
            "relative_difference": mismatch,
        }
    )
    return results


# --------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:9.2f}"


def print_tables(results: list[dict[str, Any]], header: str) -> None:
    print(header)
    backends = list(dict.fromkeys(r["backend"] for r in results))
    for backend in backends:
        rows = [r for r in results if r["backend"] == backend]
        print(f"\n== {backend} ==")
        print(
            f"  {'GEMM-bound op':<34}{'median ms':>10}{'IQR ms':>17}{'GFLOP/s':>9}"
            f"{'/GEMM':>8}{'/chain':>8}"
        )
        for r in rows:
            if r["kind"] not in ("baseline", "chain", "op"):
                continue
            ratio = f"{r['ratio_to_gemm']:7.0%}" if "ratio_to_gemm" in r else "      -"
            chain = f"{r['time_over_chain']:7.2f}x" if "time_over_chain" in r else "       -"
            flag = " <85%" if r["kind"] == "op" and r["ratio_to_gemm"] < GOAL else ""
            print(
                f"  {r['name']:<34}{ms(r['median_s']):>10} [{ms(r['q1_s'])},{ms(r['q3_s'])}]"
                f"{r['gflops']:9.1f} {ratio}{chain}{flag}"
            )
        print(
            f"\n  {'factored vs dense (B outer products)':<34}{'median ms':>10}{'IQR ms':>17}"
            f"{'GFLOP/s':>9}{'speed-up':>10}{'FLOP ratio':>11}{'/chain':>8}"
        )
        for r in rows:
            if r["kind"] != "factored-vs-dense":
                continue
            speedup = f"{r['speedup_over_dense']:9.2f}x" if "speedup_over_dense" in r else ""
            flops = f"{r['flop_ratio']:10.2f}x" if "flop_ratio" in r else ""
            chain = f"{r['time_over_chain']:7.2f}x" if "time_over_chain" in r else ""
            print(
                f"  {r['name']:<34}{ms(r['median_s']):>10} [{ms(r['q1_s'])},{ms(r['q3_s'])}]"
                f"{r['gflops']:9.1f}{speedup:>10}{flops:>11}{chain:>8}"
            )
        overheads = [r for r in rows if r["kind"] == "overhead"]
        if overheads:
            print(f"\n  {'validation overheads (per call)':<34}{'median ms':>10}{'IQR ms':>17}")
        for r in overheads:
            print(f"  {r['name']:<34}{ms(r['median_s']):>10} [{ms(r['q1_s'])},{ms(r['q3_s'])}]")
        print(f"\n  {'decompositions (time per call)':<34}{'median ms':>10}{'min–max ms':>21}")
        for r in rows:
            if r["kind"] != "decomposition":
                continue
            print(
                f"  {r['name']:<34}{ms(r['median_s']):>10} [{ms(r['min_s'])},"
                f"{ms(r['max_s'])}]  n={r['repeats']}"
            )
        gemm = next(r for r in rows if r["name"] == "gemm")
        spread = (gemm["q3_s"] - gemm["q1_s"]) / gemm["median_s"]
        note = "" if spread <= 0.15 else "  (noisy machine: compare ratios, not absolute rates)"
        print(f"\n  GEMM spread: IQR / median = {spread:.0%}{note}")
        for r in rows:
            if r["kind"] == "check":
                print(
                    f"\n  factored vs dense result: relative difference "
                    f"{r['relative_difference']:.1e}"
                )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    threading = pin_threads(args.threads, args.openblas_thread_timeout)
    started = time.perf_counter()

    import numpy  # noqa: F401  (after pinning)
    import scipy  # noqa: F401

    import curvlinalg  # noqa: F401

    available = installed_backends()
    wanted = available if args.backend == "all" else [args.backend]
    missing = [name for name in wanted if name not in available]
    if missing:
        print(f"backend(s) not installed: {', '.join(missing)}", file=sys.stderr)
        return 2
    names = [v for name in wanted for v in ((name,) if name != "jax" else ("jax-jit", "jax-eager"))]

    problem = make_problem(args.size, args.batch)
    results: list[dict[str, Any]] = []
    for name in names:
        backend = Backend(name, args.dtype, args.threads)
        t0 = time.perf_counter()
        results.extend(bench_backend(backend, problem, args))
        print(f"[{name} done in {time.perf_counter() - t0:.1f} s]", file=sys.stderr)

    meta = {
        "args": vars(args),
        "machine": machine(),
        "versions": versions(),
        "blas": blas_info(),
        "threading": threading,
        "flop_counts": {
            "gemm": "2·d_out·d_in² (x @ y, (d×d)(d×d))",
            "precondition": "2·d_out·d_in² + 2·d_out²·d_in",
            "precondition FOOF": "2·d_out·d_in²",
            "eigen_solve / sum_eigen_solve": "4 GEMMs: 2·(2·d_out²·d_in + 2·d_out·d_in²)",
            "dense (incl. eᵀa/B)": "2·B·d_out·d_in + precondition",
            "factored K-FAC": "2·B·(d_in² + d_out² + d_out·d_in)",
            "factored FOOF": "2·B·(d_in² + d_out·d_in)",
        },
        "wall_s": time.perf_counter() - started,
    }
    header = (
        f"curvlinalg kron micro-benchmark  d_in=d_out={args.size}  B={args.batch}  "
        f"{args.dtype}  threads={args.threads}  repeats={args.repeats}"
        + (
            f"  OPENBLAS_THREAD_TIMEOUT={args.openblas_thread_timeout}"
            if args.openblas_thread_timeout is not None
            else ""
        )
        + "\n"
        f"{meta['machine']['cpu']} ({meta['machine']['nproc']} CPUs)  "
        + "  ".join(f"{k} {v}" for k, v in meta["versions"].items())
        + "\nmedian and interquartile range; /GEMM = achieved GFLOP/s over the plain GEMM's "
        f"(goal ≥ {GOAL:.0%}); /chain = time over the same GEMMs as raw backend ops"
    )
    print_tables(results, header)
    print(f"\ntotal {meta['wall_s']:.1f} s")
    if args.json:
        with open(args.json, "w") as file:
            json.dump({"meta": meta, "results": results}, file, indent=2)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

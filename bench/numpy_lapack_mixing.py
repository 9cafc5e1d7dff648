"""Why NumPy-backend decompositions are slow on few cores: two OpenBLAS thread pools.

NumPy's and SciPy's wheels each bundle their own OpenBLAS (``scipy-openblas64`` and
``scipy-openblas32``). After a call, an OpenBLAS worker thread busy-waits for
``2**OPENBLAS_THREAD_TIMEOUT`` cycles (default 2**28, about 0.1 s) before sleeping. On a
2-core machine a SciPy LAPACK call that follows a NumPy GEMM (or the other way round) shares
the cores with the other library's spinning worker.

This script times curvlinalg's NumPy ``generalized_eigh``/``eigh``/``sum_solve`` and two
single-library alternatives, each right after a NumPy GEMM and right after a SciPy BLAS call.
Compare ``python bench/numpy_lapack_mixing.py`` with
``OPENBLAS_THREAD_TIMEOUT=4 python bench/numpy_lapack_mixing.py``.
"""

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "2")

import statistics  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import scipy.linalg  # noqa: E402

from curvlinalg import kron  # noqa: E402

dt = np.float32
rng = np.random.default_rng(0)
d = 1000


def spd():
    s = rng.standard_normal((2 * d, d))
    return (s.T @ s / (2 * d) + 0.1 * np.eye(d)).astype(dt)


m, b, m2, b2 = spd(), spd(), spd(), spd()
grad = rng.standard_normal((d, d)).astype(dt)


def sym(x):
    return (x + x.T) / 2


def geigh_lib():  # curvlinalg: NumPy Cholesky, then SciPy trsm/syevd
    return kron.generalized_eigh(m, b)


def geigh_scipy_only():  # same algorithm, Cholesky from SciPy's LAPACK instead of NumPy's
    lower = scipy.linalg.cholesky(sym(b), lower=True, check_finite=False)
    half = scipy.linalg.solve_triangular(lower, sym(m), lower=True, check_finite=False)
    w = scipy.linalg.solve_triangular(lower, half.T, lower=True, check_finite=False)
    vals, rot = scipy.linalg.eigh(sym(w), driver="evd", check_finite=False)
    vecs = scipy.linalg.solve_triangular(lower, rot, lower=True, trans=1, check_finite=False)
    return vals, vecs


def geigh_gvd():  # LAPACK's own generalised driver (sygvd)
    return scipy.linalg.eigh(sym(m), sym(b), driver="gvd", check_finite=False)


def eigh_lib():
    return kron.eigh(m)


def sum_solve():
    return kron.sum_solve(grad, b, b2, m, m2)


def sum_solve_gvd():
    ea = kron.Eigh(*scipy.linalg.eigh(sym(m), sym(b), driver="gvd", check_finite=False))
    eg = kron.Eigh(*scipy.linalg.eigh(sym(m2), sym(b2), driver="gvd", check_finite=False))
    return kron.sum_eigen_solve(grad, ea, eg)


def numpy_gemm():  # NumPy's OpenBLAS
    return m @ b


def scipy_call():  # SciPy's OpenBLAS
    return scipy.linalg.blas.sgemm(1.0, m, b)


fns = [geigh_lib, geigh_scipy_only, geigh_gvd, eigh_lib, sum_solve, sum_solve_gvd]
n = int(os.environ.get("N", "7"))
times = {(f.__name__, p): [] for f in fns for p in ("after numpy", "after scipy")}
for f in fns:
    f()
for _ in range(n):
    for f in fns:
        for p, pre in (("after numpy", numpy_gemm), ("after scipy", scipy_call)):
            pre()
            t = time.perf_counter()
            f()
            times[(f.__name__, p)].append(time.perf_counter() - t)
print("OPENBLAS_THREAD_TIMEOUT =", os.environ.get("OPENBLAS_THREAD_TIMEOUT", "default"))
for (k, p), v in times.items():
    q = statistics.quantiles(v, n=4, method="inclusive")
    print(
        f"  {k:<18} {p:<12} median {statistics.median(v) * 1e3:7.1f} ms  "
        f"IQR [{q[0] * 1e3:6.1f},{q[2] * 1e3:6.1f}]"
    )

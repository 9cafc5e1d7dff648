"""The one place where curvlinalg knows about concrete array libraries.

Everything else in the package is written against the array API standard. This module


* resolves the namespace of a call's inputs (mixed namespaces are a ``ValueError``),
* tells whether an array's values are available (a JAX tracer's are not), so that value
  checks run eagerly and are skipped under ``jax.jit``,
* provides the linear-algebra operations the standard lacks or leaves slow: Cholesky with a
  failure flag, triangular solves and a fast symmetric eigensolver. Each has a fast path for
  NumPy/SciPy, CuPy, PyTorch and JAX and a portable fallback for any other namespace
  (array-api-strict among them).

Frameworks are never imported here: a fast path is taken only when the input already is an
array of that framework, and the framework module is then looked up in ``sys.modules``.
"""

from __future__ import annotations

import sys
from types import ModuleType
from typing import Any

import array_api_compat

Array = Any

__all__ = [
    "namespace",
    "device",
    "is_traced",
    "cholesky",
    "solve_triangular",
    "cholesky_inverse",
    "eigh",
    "eye_like",
]


def namespace(*named: tuple[str, Any]) -> ModuleType:
    """Array namespace shared by the arrays among ``(name, value)`` pairs.

    Values that are ``None`` or Python scalars are ignored. Raises ``ValueError`` naming the
    arguments when they come from different array libraries, and when no argument is an array.
    """
    arrays = [(name, value) for name, value in named if _is_array(name, value)]
    if not arrays:
        names = ", ".join(name for name, _ in named)
        raise ValueError(f"expected at least one array among ({names}); got none")
    spaces: dict[int, tuple[ModuleType, str]] = {}
    for name, value in arrays:
        xp = array_api_compat.array_namespace(value)
        spaces.setdefault(id(xp), (xp, name))
    if len(spaces) > 1:
        described = ", ".join(f"{name} is {_library(xp)}" for xp, name in spaces.values())
        raise ValueError(f"arrays from different libraries in one call: {described}")
    return next(iter(spaces.values()))[0]


def _is_array(name: str, value: Any) -> bool:
    """Arrays take part in namespace resolution; ``None`` and Python numbers do not."""
    if value is None or isinstance(value, (bool, int, float)):
        return False
    if array_api_compat.is_array_api_obj(value):
        return True
    raise ValueError(f"{name} must be an array; got {type(value).__name__}")


def _library(xp: ModuleType) -> str:
    name = xp.__name__
    return name.removeprefix("array_api_compat.")


def device(x: Array) -> Any:
    """The device of ``x`` in the array API sense (``array_api_compat.device``)."""
    return array_api_compat.device(x)


def is_traced(x: Any) -> bool:
    """True when ``x`` is an abstract JAX value (inside ``jit``/``vmap``/``grad``), whose
    values cannot be inspected from Python."""
    jax = sys.modules.get("jax")
    if jax is None:
        return False
    return isinstance(x, jax.core.Tracer)


def is_weakly_typed(x: Any) -> bool:
    """True for a weakly typed JAX value (a Python number passed through ``jax.jit``, or
    ``jnp.asarray(1.0)``): like a Python number it takes the dtype of what it combines with,
    so it promotes nothing and its dtype says nothing about the caller's precision."""
    if sys.modules.get("jax") is None:
        return False
    return bool(getattr(getattr(x, "aval", None), "weak_type", False))


def default_integer(xp: ModuleType, like: Array) -> Any:
    """The namespace's default integer dtype on ``like``'s device: int64, except int32 on JAX
    without ``jax_enable_x64`` (asking JAX for int64 there only warns and truncates)."""
    info = getattr(xp, "__array_namespace_info__", None)
    if info is None:
        return xp.int64
    return info().default_dtypes(device=device(like))["integral"]


def scalar_like(xp: ModuleType, value: Any, like: Array) -> Any:
    """A scalar parameter (damping, decay, ρ, λ, τ) ready to combine with ``like``.

    Python numbers are weakly typed and stay as they are. NumPy scalars and 0-d arrays are cast
    to ``like``'s dtype and device: left alone, a ``np.float64`` or a float64 0-d array would
    promote a float32 computation to float64 (NumPy 2, JAX) or fail to combine
    (array-api-strict).
    """
    if type(value) in (int, float):
        return value
    return xp.asarray(value, dtype=like.dtype, device=device(like))


def all_finite(xp: ModuleType, x: Array) -> bool:
    """Whether ``x`` has no NaN or infinity; ``True`` when that cannot be known (under
    ``jax.jit``).

    torch's CPU ``isfinite`` is composite (four kernels and three temporaries; 1.26 ms per
    10⁶ floats against 0.10 ms for a sum, bench/README.md finding 2), and each eager JAX
    check is a device→host sync on a full-size temporary. There one pass of ``sum`` decides:
    a NaN or ±inf anywhere makes the sum non-finite; only then does the elementwise test
    run, to tell a real NaN/inf from the overflow of large finite values. NumPy's own
    ``isfinite`` is already the cheaper pass and its reductions warn on overflow.
    """
    if array_api_compat.is_torch_namespace(xp) or array_api_compat.is_jax_namespace(xp):
        summed = xp.isfinite(xp.sum(x))
        if is_traced(summed):
            # A concrete array closed over by a jitted function still yields traced results;
            # its values cannot be inspected there either.
            return True
        if bool(summed):
            return True
    return bool(xp.all(xp.isfinite(x)))


def eye_like(xp: ModuleType, n: int, like: Array) -> Array:
    """``n×n`` identity with the dtype and device of ``like``."""
    return xp.eye(n, dtype=like.dtype, device=device(like))


# --------------------------------------------------------------------------------------
# Cholesky with a failure flag
# --------------------------------------------------------------------------------------


def cholesky(xp: ModuleType, m: Array) -> tuple[Array, bool | None]:
    """Lower Cholesky factor ``L`` (``m = L Lᵀ``) of a symmetric matrix or stack of matrices.

    Returns ``(L, ok)``. ``ok`` is ``True``/``False`` when the factorisation's success is
    known from Python, and ``None`` when it is not (traced JAX values): then ``L`` holds NaN
    where the factorisation failed, which is how JAX reports it.
    """
    if array_api_compat.is_numpy_namespace(xp):
        import numpy as np

        if m.ndim == 2:
            import scipy.linalg

            # SciPy's LAPACK, like the triangular solves and eigensolvers that follow a
            # Cholesky here: NumPy and SciPy bundle separate OpenBLAS builds whose idle
            # workers spin, and alternating between them halves the speed of a
            # factorisation pipeline on few cores (bench/README.md, finding 4).
            try:
                return scipy.linalg.cholesky(m, lower=True, check_finite=False), True
            except np.linalg.LinAlgError:
                return m, False
        try:
            factor = np.linalg.cholesky(m)
        except np.linalg.LinAlgError:
            return m, False
        return factor, True
    if array_api_compat.is_torch_namespace(xp):
        torch = sys.modules["torch"]
        factor, info = torch.linalg.cholesky_ex(m)
        return factor, not bool(torch.any(info != 0))
    try:
        factor = xp.linalg.cholesky(m)
    except Exception as exc:  # array-api-strict and others raise their library's LinAlgError
        if type(exc).__name__ == "LinAlgError":
            return m, False
        raise
    if is_traced(factor):
        return factor, None
    # CuPy and JAX signal failure with NaN rather than an exception.
    return factor, bool(xp.all(xp.isfinite(factor)))


# --------------------------------------------------------------------------------------
# Triangular solve
# --------------------------------------------------------------------------------------


def solve_triangular(
    xp: ModuleType, triangle: Array, rhs: Array, *, lower: bool, transpose: bool = False
) -> Array:
    """Solve ``T X = rhs`` (or ``Tᵀ X = rhs`` with ``transpose=True``) for a triangular ``T``.

    ``T`` is ``(n, n)``; ``rhs`` is ``(n, k)``.
    """
    if array_api_compat.is_numpy_namespace(xp):
        import scipy.linalg

        return scipy.linalg.solve_triangular(
            triangle, rhs, lower=lower, trans=1 if transpose else 0, check_finite=False
        )
    if array_api_compat.is_torch_namespace(xp):
        torch = sys.modules["torch"]
        if transpose:
            return torch.linalg.solve_triangular(triangle.mT, rhs, upper=lower)
        return torch.linalg.solve_triangular(triangle, rhs, upper=not lower)
    if array_api_compat.is_jax_namespace(xp):
        jax_scipy_linalg = _import("jax.scipy.linalg")
        return jax_scipy_linalg.solve_triangular(
            triangle, rhs, lower=lower, trans=1 if transpose else 0
        )
    if array_api_compat.is_cupy_namespace(xp):
        cupyx_linalg = _import("cupyx.scipy.linalg")
        return cupyx_linalg.solve_triangular(
            triangle, rhs, lower=lower, trans=1 if transpose else 0
        )
    # Portable fallback: a general solve of the triangular system (LU on a triangular
    # matrix needs no pivoting, so it is as accurate; it costs a small constant more).
    if transpose:
        triangle = xp.matrix_transpose(triangle)
    return xp.linalg.solve(triangle, rhs)


def cholesky_inverse(xp: ModuleType, lower: Array) -> Array:
    """``(L Lᵀ)⁻¹`` from the lower Cholesky factor ``L`` (symmetric result)."""
    if array_api_compat.is_numpy_namespace(xp):
        import numpy as np
        import scipy.linalg.lapack as lapack

        if lower.shape[0] == 0:  # LAPACK rejects an empty matrix; its inverse is empty
            return np.zeros_like(lower)
        potri = lapack.dpotri if lower.dtype == np.float64 else lapack.spotri
        packed, info = potri(lower, lower=True)
        if info != 0:  # only for a singular factor, which cholesky() already ruled out
            raise np.linalg.LinAlgError(f"potri failed with info={info}")
        # potri fills one triangle; mirror it.
        return np.tril(packed) + np.tril(packed, -1).T
    if array_api_compat.is_torch_namespace(xp):
        torch = sys.modules["torch"]
        return torch.cholesky_inverse(lower)
    inverse_factor = solve_triangular(xp, lower, eye_like(xp, lower.shape[0], lower), lower=True)
    return xp.matrix_transpose(inverse_factor) @ inverse_factor


# --------------------------------------------------------------------------------------
# Symmetric eigendecomposition
# --------------------------------------------------------------------------------------


def eigh(xp: ModuleType, m: Array) -> tuple[Array, Array]:
    """Eigenvalues (ascending) and eigenvectors of a symmetric matrix."""
    if array_api_compat.is_numpy_namespace(xp):
        import scipy.linalg

        # The divide-and-conquer driver is several times faster than NumPy's default
        # (``syevd`` vs ``syev``-based) for the sizes of layer factors.
        return scipy.linalg.eigh(m, driver="evd", check_finite=False)
    values, vectors = xp.linalg.eigh(m)
    return values, vectors


# --------------------------------------------------------------------------------------
# Weighted counts (scatter-add)
# --------------------------------------------------------------------------------------

# The portable fallback compares a chunk of indices with every bin at once; this bounds the
# elements of that (chunk, length) comparison.
_BINCOUNT_ELEMENTS = 2**22


def bincount(xp: ModuleType, indices: Array, weights: Array, length: int) -> Array:
    """``out[v] = Σ_n weights[n]·[indices[n] = v]`` for ``v < length``: a ``(length,)`` array
    of ``weights``' dtype and device.

    ``indices``: ``(N,)`` integers in ``[0, length)`` (the caller validates them);
    ``weights``: ``(N,)`` real floating. A scatter-add where the library has one (NumPy's
    and CuPy's ``bincount``, torch's ``index_add``, JAX's ``.at[].add``, which jits); the
    standard has none, so other namespaces compare chunks of indices with every bin."""
    if array_api_compat.is_numpy_namespace(xp) or array_api_compat.is_cupy_namespace(xp):
        library = _import("cupy" if array_api_compat.is_cupy_namespace(xp) else "numpy")
        counts = library.bincount(indices, weights=weights, minlength=length)
        return counts.astype(weights.dtype, copy=False)
    if array_api_compat.is_torch_namespace(xp):
        zeros = xp.zeros((length,), dtype=weights.dtype, device=device(weights))
        return zeros.index_add(0, indices, weights)
    if array_api_compat.is_jax_namespace(xp):
        zeros = xp.zeros((length,), dtype=weights.dtype, device=device(weights))
        return zeros.at[indices].add(weights)
    total = xp.zeros((length,), dtype=weights.dtype, device=device(weights))
    bins = xp.arange(length, dtype=indices.dtype, device=device(indices))
    count = int(indices.shape[0])
    chunk = max(1, _BINCOUNT_ELEMENTS // max(length, 1))
    for start in range(0, count, chunk):
        stop = min(start + chunk, count)
        hits = indices[start:stop, None] == bins[None, :]
        part = xp.where(hits, weights[start:stop, None], xp.zeros_like(weights[start:stop, None]))
        total = total + xp.sum(part, axis=0)
    return total


def _import(name: str) -> ModuleType:
    module = sys.modules.get(name)
    if module is None:
        import importlib

        module = importlib.import_module(name)
    return module

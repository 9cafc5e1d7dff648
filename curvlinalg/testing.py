"""Hypothesis strategies and backend helpers for testing curvature code.

Used by curvlinalg's own suite and meant for yours (needs ``hypothesis``, which comes with
the ``test`` extra: ``pip install "curvlinalg[test]"``). Strategies draw NumPy arrays — the
reference values — and :class:`Backend` converts them to every array library installed::

    import numpy as np
    from hypothesis import given
    from curvlinalg import kron, testing

    @given(m=testing.spd_matrices(4, max_condition=100.0), backend=testing.backends())
    def test_inverse(m, backend):
        result = backend.to_numpy(kron.inverse(backend.asarray(m)))
        np.testing.assert_allclose(result @ m, np.eye(4), atol=1e-10)

Arrays are built from a drawn seed with NumPy's generator, so examples are well conditioned
(no pathological all-zero or huge entries unless asked for) and shrink towards small sizes.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any, NamedTuple

import numpy as np

try:
    from hypothesis import strategies as st
except ImportError as error:  # hypothesis is not a core dependency
    raise ImportError(
        'curvlinalg.testing needs hypothesis: pip install "curvlinalg[test]"', name=error.name
    ) from error

__all__ = [
    "Backend",
    "available_backends",
    "backends",
    "dtypes",
    "arrays",
    "spd_matrices",
    "psd_matrices",
    "captures",
]


class Backend(NamedTuple):
    """An installed array library, with conversions from and to NumPy.

    ``name``: ``"numpy"``, ``"array_api_strict"``, ``"torch"``, ``"jax"`` or ``"cupy"``.
    ``xp``: its array-API namespace. ``asarray(np_array)`` converts a NumPy array keeping its
    dtype (raising if the library would silently change it, e.g. JAX without x64);
    ``to_numpy(array)`` converts back. ``jit`` is ``jax.jit`` for JAX and ``None`` otherwise.
    """

    name: str
    xp: ModuleType
    asarray: Callable[[np.ndarray], Any]
    to_numpy: Callable[[Any], np.ndarray]
    jit: Callable[..., Any] | None = None


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _checked(convert: Callable[[np.ndarray], Any], name: str) -> Callable[[np.ndarray], Any]:
    def asarray(value: np.ndarray) -> Any:
        value = np.asarray(value)
        result = convert(value)
        if str(result.dtype).rsplit(".", 1)[-1] != str(value.dtype):
            raise ValueError(
                f"{name} turned a {value.dtype} array into {result.dtype}"
                + (" (enable jax_enable_x64)" if name == "jax" else "")
            )
        return result

    return asarray


def available_backends(*, gpu: bool = True) -> list[Backend]:
    """The array libraries installed here, NumPy first.

    CuPy is included only when a CUDA device is present (and ``gpu`` is true); PyTorch
    tensors are on the CPU. JAX float64 needs ``jax.config.update("jax_enable_x64", True)``.
    """
    import importlib

    compat_numpy = importlib.import_module("array_api_compat.numpy")
    found = [Backend("numpy", compat_numpy, _checked(np.asarray, "numpy"), np.asarray)]
    if _installed("array_api_strict"):
        import array_api_strict

        found.append(
            Backend(
                "array_api_strict",
                array_api_strict,
                _checked(array_api_strict.asarray, "array_api_strict"),
                lambda x: np.from_dlpack(x).copy(),
            )
        )
    if _installed("torch"):
        import torch

        found.append(
            Backend(
                "torch",
                importlib.import_module("array_api_compat.torch"),
                _checked(torch.asarray, "torch"),
                lambda x: x.detach().cpu().numpy().copy(),
            )
        )
    if _installed("jax"):
        import jax
        import jax.numpy as jnp

        found.append(
            Backend("jax", jnp, _checked(jnp.asarray, "jax"), lambda x: np.asarray(x), jax.jit)
        )
    if gpu and _installed("cupy"):
        try:
            import cupy

            present = cupy.cuda.runtime.getDeviceCount() > 0
        except Exception:  # no driver, no device: CuPy is importable but unusable
            present = False
        if present:
            found.append(
                Backend(
                    "cupy",
                    importlib.import_module("array_api_compat.cupy"),
                    _checked(cupy.asarray, "cupy"),
                    lambda x: cupy.asnumpy(x),
                )
            )
    return found


def backends(*, gpu: bool = True) -> st.SearchStrategy[Backend]:
    """Strategy over :func:`available_backends`."""
    return st.sampled_from(available_backends(gpu=gpu))


def dtypes() -> st.SearchStrategy[np.dtype]:
    """float32 or float64."""
    return st.sampled_from([np.dtype(np.float32), np.dtype(np.float64)])


def _draw_size(draw: Callable[[Any], Any], size: Any) -> int:
    return int(draw(size)) if isinstance(size, st.SearchStrategy) else int(size)


def _generator(draw: Callable[[Any], Any]) -> np.random.Generator:
    return np.random.default_rng(draw(st.integers(0, 2**32 - 1)))


@st.composite
def arrays(
    draw: Callable[[Any], Any], shape: Sequence[Any], *, dtype: Any = np.float64, scale: float = 1.0
) -> np.ndarray:
    """Standard normal entries times ``scale``; ``shape`` entries are ints or strategies."""
    concrete = tuple(_draw_size(draw, size) for size in shape)
    return (scale * _generator(draw).standard_normal(concrete)).astype(dtype)


def _orthogonal(rng: np.random.Generator, size: int) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((size, size)))
    return q * np.sign(np.diag(r))


@st.composite
def spd_matrices(
    draw: Callable[[Any], Any],
    size: Any,
    *,
    max_condition: float = 100.0,
    scales: Sequence[float] = (1e-2, 1.0, 1e2),
    dtype: Any = np.float64,
) -> np.ndarray:
    """Symmetric positive definite ``size×size`` matrices with condition number at most
    ``max_condition``: a random orthogonal basis and eigenvalues log-spaced at random in
    ``[scale, scale·κ]`` with ``κ ≤ max_condition`` drawn and ``scale`` from ``scales``."""
    if max_condition < 1:
        raise ValueError(f"max_condition must be >= 1; got {max_condition}")
    n = _draw_size(draw, size)
    condition = draw(st.floats(1.0, max_condition))
    scale = draw(st.sampled_from(list(scales)))
    rng = _generator(draw)
    exponents = rng.uniform(0.0, 1.0, n)
    if n > 1:
        exponents[0], exponents[-1] = 0.0, 1.0
    values = scale * condition**exponents
    basis = _orthogonal(rng, n)
    matrix = (basis * values) @ basis.T
    return ((matrix + matrix.T) / 2).astype(dtype)


@st.composite
def psd_matrices(
    draw: Callable[[Any], Any],
    size: Any,
    *,
    rank: Any = None,
    dtype: Any = np.float64,
) -> np.ndarray:
    """Symmetric positive semidefinite matrices ``xᵀx / r`` of rank ``r`` (drawn from
    ``0..size`` unless given), like a Kronecker factor of a batch smaller than the width."""
    n = _draw_size(draw, size)
    r = draw(st.integers(0, n)) if rank is None else _draw_size(draw, rank)
    rows = _generator(draw).standard_normal((r, n))
    matrix = rows.T @ rows / max(r, 1)
    return ((matrix + matrix.T) / 2).astype(dtype)


@st.composite
def captures(
    draw: Callable[[Any], Any],
    *,
    num_layers: Any = st.integers(1, 3),
    batch_size: Any = st.integers(1, 5),
    width: Any = st.integers(1, 5),
    positions: Any = None,
    bias: bool = False,
    dtype: Any = np.float64,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per-layer captures ``[(a, e), ...]`` of a chain of layers, as defined in DESIGN.md.

    Layer ``l`` maps width ``d_l`` to ``d_{l+1}``; ``a`` is ``(B, d_l)`` and ``e`` is
    ``(B, d_{l+1})``, or ``(B, T, ·)`` when ``positions`` (an int or strategy) is given.
    With ``bias=True`` every ``a`` ends with a column of ones.
    """
    layers = _draw_size(draw, num_layers)
    batch = _draw_size(draw, batch_size)
    widths = [_draw_size(draw, width) for _ in range(layers + 1)]
    count = None if positions is None else _draw_size(draw, positions)
    rng = _generator(draw)
    lead = (batch,) if count is None else (batch, count)
    result = []
    for layer in range(layers):
        a = rng.standard_normal(lead + (widths[layer],))
        if bias:
            a = np.concatenate([a, np.ones(lead + (1,))], axis=-1)
        e = rng.standard_normal(lead + (widths[layer + 1],)) / math.sqrt(widths[layer + 1])
        result.append((a.astype(dtype), e.astype(dtype)))
    return result

r"""Dense references and the hypothesis test decorator shared by the core's test modules.

Nothing here calls curvlinalg: the references are textbook NumPy in float64 (``np.einsum``
per-example gradients, column-major ``vec``), so that a test compares the library with an
independent computation.

Conventions (those of the library, README "Conventions"): a layer's gradient matrix is
``(d_out, d_in)``; ``vec`` is column-major, so ``(A⊗G) vec(V) = vec(G V A)``; captures are
``a``: ``(B, d_in)`` or ``(B, T, d_in)`` and ``e``: ``(B, d_out)`` or ``(B, T, d_out)``, and
the per-example gradient is ``g_i = Σ_t e_itᵀ a_it``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from curvlinalg import testing

__all__ = [
    "property_tests",
    "quarter_on_jax",
    "half_three_on_jax",
    "f64",
    "to_np",
    "vec",
    "mat",
    "with_positions",
    "per_example_gradients",
]

#: ``examples(backend_name, profile_count)``: how many hypothesis examples a backend runs.
ExampleRule = Callable[[str, int], int]


def quarter_on_jax(backend_name: str, count: int) -> int:
    """The profile's count; a quarter (at least 3) on JAX, whose eager mode compiles each
    operation once per new shape, so that its examples cost seconds each."""
    return max(3, count // 4) if backend_name == "jax" else count


def half_three_on_jax(backend_name: str, count: int) -> int:
    """Half the profile's count (at least 5); three on JAX (which draws fixed shapes)."""
    return 3 if backend_name == "jax" else max(5, count // 2)


def property_tests(examples: ExampleRule) -> Callable[..., Callable[[Callable], Callable]]:
    """A decorator factory ``property_test(**strategies)``: it makes a check
    ``check(backend, dtype, **drawn)`` into a test over the ``backend`` and ``dtype`` fixtures
    of tests/conftest.py, run by ``@given`` with ``examples(backend.name, profile count)``
    examples and keeping the check's name and docstring."""

    def property_test(**strategies: st.SearchStrategy) -> Callable[[Callable], Callable]:
        def decorate(check: Callable) -> Callable:
            def test(backend: testing.Backend, dtype: np.dtype) -> None:
                count = examples(backend.name, settings.default.max_examples)
                run = given(backend=st.just(backend), dtype=st.just(dtype), **strategies)(check)
                settings(max_examples=count)(run)()

            test.__name__, test.__qualname__ = check.__name__, check.__qualname__
            test.__doc__ = check.__doc__
            return test

        return decorate

    return property_test


def f64(x: Any) -> np.ndarray:
    return np.asarray(x, dtype=np.float64)


def to_np(backend: testing.Backend, x: Any) -> np.ndarray:
    """A backend's array as a float64 NumPy array."""
    return f64(backend.to_numpy(x))


def vec(m: np.ndarray) -> np.ndarray:
    """Column-major vec."""
    return np.asarray(m).reshape(-1, order="F")


def mat(v: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Inverse of :func:`vec`."""
    return np.asarray(v).reshape(shape, order="F")


def unvec_layers(v: np.ndarray, shapes: Sequence[tuple[int, int]]) -> list[np.ndarray]:
    """``(..., D)`` → per-layer ``(..., d_out, d_in)`` for layer shapes ``(d_out, d_in)``:
    the inverse of stacking the layers' column-major vecs."""
    out, start = [], 0
    for d_out, d_in in shapes:
        block = v[..., start : start + d_out * d_in]
        out.append(np.swapaxes(block.reshape(v.shape[:-1] + (d_in, d_out)), -1, -2))
        start += d_out * d_in
    return out


def with_positions(x: np.ndarray) -> np.ndarray:
    """``(B, d)`` → ``(B, 1, d)``; ``(B, T, d)`` unchanged (float64)."""
    x = f64(x)
    return x[:, None, :] if x.ndim == 2 else x


def per_example_gradients(a: np.ndarray, e: np.ndarray) -> np.ndarray:
    """``g_i = Σ_t e_itᵀ a_it`` of one layer, ``(B, d_out, d_in)``, by ``np.einsum``."""
    return np.einsum("bto,bti->boi", with_positions(e), with_positions(a))

"""Input validation shared by the public functions.

Every check names the offending argument. Checks on *values* (finiteness, signs of array
scalars) run only when the values are available from Python: under ``jax.jit`` they are
skipped, and invalid input shows up as NaN in the output, as is usual for JAX (wrap the call
in ``jax.experimental.checkify`` to turn it into an error).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from types import ModuleType
from typing import Any

from ._backend import all_finite, is_traced

Array = Any


class NotPositiveDefiniteError(ValueError):
    """A matrix that must be positive definite (after damping) is not."""


def floating(xp: ModuleType, name: str, x: Array) -> None:
    """``x`` must have a real floating dtype."""
    if not xp.isdtype(x.dtype, "real floating"):
        raise ValueError(f"{name} must have a real floating dtype; got {x.dtype}")


def linalg_dtype(xp: ModuleType, name: str, x: Array) -> None:
    """Factorisations need float32 or float64."""
    floating(xp, name, x)
    if x.dtype not in (xp.float32, xp.float64):
        raise ValueError(
            f"{name} has dtype {x.dtype}; factorisations need float32 or float64 "
            "(cast half-precision factors up before inverting them)"
        )


def same_dtype(named: Sequence[tuple[str, Array]]) -> None:
    """All arrays share one dtype (no silent promotion of float32 work to float64)."""
    present = [(name, x) for name, x in named if x is not None]
    first_name, first = present[0]
    for name, x in present[1:]:
        if x.dtype != first.dtype:
            raise ValueError(
                f"dtype mismatch: {first_name} is {first.dtype} but {name} is {x.dtype}"
            )


def ndim_at_least(name: str, x: Array, ndim: int) -> None:
    if x.ndim < ndim:
        raise ValueError(f"{name} must have at least {ndim} dimensions; got shape {tuple(x.shape)}")


def square(name: str, x: Array) -> int:
    """``x`` is a single square matrix; returns its size."""
    if x.ndim != 2 or x.shape[0] != x.shape[1]:
        raise ValueError(f"{name} must be a square matrix; got shape {tuple(x.shape)}")
    return int(x.shape[0])


def matching(name: str, size: int, other_name: str, other_size: int, what: str) -> None:
    if size != other_size:
        raise ValueError(
            f"shape mismatch: {what} of {name} is {size} but {other_name} needs {other_size}"
        )


def finite(xp: ModuleType, name: str, x: Array) -> None:
    """``x`` has no NaN or infinity (skipped for traced values)."""
    if is_traced(x):
        return
    if not all_finite(xp, x):
        raise ValueError(f"{name} contains NaN or infinite values")


def scalar(
    name: str,
    value: Any,
    *,
    minimum: float | None = 0.0,
    maximum: float | None = None,
    strict: bool = False,
) -> None:
    """A Python number or 0-d array in ``[minimum, maximum]`` (``(minimum, ...]`` when
    ``strict``), finite. Array values are checked when they are concrete."""
    if value is None:
        raise ValueError(f"{name} must be a number; got None")
    if is_traced(value):
        return
    shape = getattr(value, "shape", ())
    if tuple(shape) != ():
        raise ValueError(f"{name} must be a scalar; got shape {tuple(shape)}")
    try:
        number = float(value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be a real number; got {value!r}") from exc
    if not math.isfinite(number):
        raise ValueError(f"{name} must be finite; got {number}")
    if minimum is not None:
        if strict and not number > minimum:
            raise ValueError(f"{name} must be > {minimum}; got {number}")
        if not strict and not number >= minimum:
            raise ValueError(f"{name} must be >= {minimum}; got {number}")
    if maximum is not None and not number <= maximum:
        raise ValueError(f"{name} must be <= {maximum}; got {number}")

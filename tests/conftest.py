"""Shared fixtures: backends, dtypes, tolerances, the hypothesis profile.

Tolerances are norm-wise relative errors: ``‖actual − expected‖ / ‖expected‖ ≤
32 · condition · eps(dtype)``, where ``condition`` bounds the condition number of the
problem solved (for ``A⊗G`` it is ``κ(A)·κ(G)``) and ``eps`` is the machine epsilon of the
dtype (2.2e-16 for float64, 1.2e-7 for float32). Tests state the condition they pass.
"""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

if importlib.util.find_spec("jax") is not None:
    import jax

    # float64 results on JAX need x64; float32 inputs stay float32.
    jax.config.update("jax_enable_x64", True)

from curvlinalg import testing  # noqa: E402

settings.register_profile(
    "ci",
    derandomize=True,
    max_examples=20,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile("dev", max_examples=60, deadline=None)
settings.register_profile("thorough", max_examples=500, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

BACKENDS = testing.available_backends()
DTYPES = [np.dtype(np.float32), np.dtype(np.float64)]


@pytest.fixture(scope="session", params=BACKENDS, ids=[b.name for b in BACKENDS])
def backend(request: pytest.FixtureRequest) -> testing.Backend:
    """Every array library installed here (CuPy only with a GPU)."""
    return request.param


@pytest.fixture(scope="session", params=DTYPES, ids=[d.name for d in DTYPES])
def dtype(request: pytest.FixtureRequest) -> np.dtype:
    return request.param


def rtol(dtype: np.dtype, condition: float = 1.0) -> float:
    """Norm-wise relative tolerance for a problem of the given condition number."""
    return 32.0 * max(condition, 1.0) * float(np.finfo(dtype).eps)


def assert_close(
    actual: np.ndarray, expected: np.ndarray, dtype: np.dtype, condition: float = 1.0
) -> None:
    """Norm-wise relative comparison with :func:`rtol` (absolute when ``expected`` is 0)."""
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert np.all(np.isfinite(actual)), "result has non-finite entries"
    error = np.linalg.norm(actual - expected)
    scale = max(np.linalg.norm(expected), np.finfo(dtype).tiny)
    limit = rtol(dtype, condition)
    assert error <= limit * scale, f"relative error {error / scale:.3e} > {limit:.3e}"


def assert_backend_array(result: object, backend: testing.Backend, dtype: np.dtype) -> None:
    """``result`` belongs to ``backend``'s namespace and has ``dtype``."""
    import array_api_compat

    assert array_api_compat.array_namespace(result) is backend.xp or backend.name == "numpy"
    assert backend.to_numpy(result).dtype == dtype, (result.dtype, dtype)

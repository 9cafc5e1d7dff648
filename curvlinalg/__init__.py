"""curvlinalg: the linear algebra of curvature-based training on any array-API backend.

Modules:

* :mod:`curvlinalg.kron` — Kronecker factors, damping rules, damped inverses, eigenbasis and
  sum-of-Kronecker solves (K-FAC, FOOF).
* :mod:`curvlinalg.wake` — exponential-average recursions of the KLD-WRM family (Puiu 2022).
* :mod:`curvlinalg.schedule` — when to refresh factors and inverses (amortisation).
* :mod:`curvlinalg.testing` — hypothesis strategies and backend helpers (needs hypothesis).

Every function takes NumPy, CuPy, PyTorch, JAX or any other array-API arrays and returns arrays
of the same namespace, dtype and device.
"""

from . import kron, schedule, wake
from ._checks import NotPositiveDefiniteError
from .kron import Eigh

__version__ = "0.1.0"

__all__ = ["Eigh", "NotPositiveDefiniteError", "kron", "schedule", "wake", "__version__"]

"""curvlinalg: the linear algebra of curvature-based training on any array-API backend.

Modules:

* :mod:`curvlinalg.kron` — Kronecker factors, damping rules, damped inverses, eigenbasis and
  sum-of-Kronecker solves (K-FAC, FOOF).
* :mod:`curvlinalg.wake` — exponential-average recursions of the KLD-WRM family (Puiu 2022).
* :mod:`curvlinalg.woodbury` — exact subsampled natural gradients through the Woodbury
  identity, from per-layer captures, without forming per-example gradients (Benzing 2022).
* :mod:`curvlinalg.fisher` — softmax output errors for the empirical, MC and exact Fisher.
* :mod:`curvlinalg.influence` — influence scores between examples with K-FAC and EK-FAC
  curvature, from captures, without per-example gradients.
* :mod:`curvlinalg.laplace` — Laplace posterior samples, log-determinants and log evidence
  with a subsampled or Kronecker-factored Fisher.
* :mod:`curvlinalg.schedule` — when to refresh factors and inverses (amortisation).
* :mod:`curvlinalg.testing` — hypothesis strategies and backend helpers (needs hypothesis).

Every function takes NumPy, CuPy, PyTorch, JAX or any other array-API arrays and returns arrays
of the same namespace, dtype and device.
"""

from . import fisher, influence, kron, laplace, schedule, wake, woodbury
from ._checks import NotPositiveDefiniteError
from .kron import Eigh
from .woodbury import Woodbury

__version__ = "0.1.0"

__all__ = [
    "Eigh",
    "NotPositiveDefiniteError",
    "Woodbury",
    "fisher",
    "influence",
    "kron",
    "laplace",
    "schedule",
    "wake",
    "woodbury",
    "__version__",
]

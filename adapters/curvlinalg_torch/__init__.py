"""curvlinalg_torch: PyTorch optimizers and Laplace approximations built on the curvlinalg core.

* :mod:`curvlinalg_torch.capture` — per-layer captures ``(a, e)`` of ``nn.Linear`` and
  ``nn.Conv2d`` (forward hooks and a re-rooted autograd node), and the map between a layer's
  parameters and its ``(d_out, d_in[+1])`` gradient block.
* :class:`FOOF` — Benzing's first-order optimisation on neurons: ``∇W (Ā + λI)⁻¹``.
* :class:`KFAC` — K-FAC with MC or empirical Fisher, factored (π) or exact (eigenbasis)
  damping.
* :class:`EKFAC` — eigenvalue-corrected K-FAC (George et al. 2018): K-FAC's eigenbasis with
  the Fisher's own second moments in it (``curvlinalg.kron.eigen_correction``).
* :class:`Influence` — training-data attribution: K-FAC / EK-FAC influence scores of query
  examples against a training loader, self-influence and top-k (``curvlinalg.influence``).
* :class:`NaturalGradient` — the exact subsampled natural gradient through the Woodbury
  identity (MC, empirical or exact Fisher; whole network or layer-wise).
* :class:`KLDWRM` — Puiu's SO-, Q- and QE-KLD-WRM with Kronecker-factored Fisher blocks.
* :class:`Laplace` — post-hoc Laplace approximation (subsampled-Fisher Woodbury or
  Kronecker-factored), sampling, predictive and evidence.

The optimizers are ``torch.optim.Optimizer`` subclasses that replace ``torch.optim.SGD`` in an
ordinary loop (``zero_grad``, forward, ``loss.backward()``, ``step()``); under
``torch.distributed`` pass ``distributed=True`` or the ``DistributedDataParallel`` wrapper
(:func:`ddp_ignore_captured` keeps DDP from reducing the captured layers' empty gradients).
"""

from . import capture
from ._optimizer import CurvatureOptimizer, ddp_ignore_captured
from .capture import Capture, LayerCapture
from .ekfac import EKFAC
from .foof import FOOF
from .influence import Influence
from .kfac import KFAC
from .kldwrm import KLDWRM
from .laplace import Laplace
from .natural_gradient import NaturalGradient

__all__ = [
    "EKFAC",
    "FOOF",
    "Influence",
    "KFAC",
    "KLDWRM",
    "Capture",
    "CurvatureOptimizer",
    "LayerCapture",
    "Laplace",
    "NaturalGradient",
    "capture",
    "ddp_ignore_captured",
]

"""fastattr: fast training-data attribution for diffusion models.

Compiled kernels (C++/OpenMP, CUDA, Triton) for the hot paths of attribution -- random
projection, fused per-sample gradients, curvature -- behind a thin Python API.
"""

from . import curvature, diffusion, models
from .backends import backends
from .capture import Capture, Coverage, coverage
from .curvature import Factors, fit_factors
from .grads import per_sample_grads, projected_grads
from .kronecker import KroneckerProjector
from .projection import Projector

__version__ = "0.1.0"
__all__ = [
    "Factors",
    "fit_factors",
    "curvature",
    "diffusion",
    "models",
    "KroneckerProjector",
    "Projector",
    "Capture",
    "Coverage",
    "coverage",
    "projected_grads",
    "per_sample_grads",
    "backends",
    "__version__",
]

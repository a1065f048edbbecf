"""Attribution methods for diffusion models, one class each with the same shape:
construct with a ``fastattr.diffusion.DiffusionTask`` and options, ``fit(train_data)``,
``score(test_data) -> Tensor[n_test, n_train]`` (> 0: proponent), ``top_k(test_data, k)``.
"""

from .base import AttributionMethod, Kernel, TopK
from .das import DAS
from .influence import KFACInfluence
from .journey import JourneyTRAK
from .tracin import ReTrac, TracIn
from .trak import DTRAK, TRAK

__all__ = ["AttributionMethod", "Kernel", "TopK", "TRAK", "DTRAK", "DAS", "KFACInfluence", "JourneyTRAK", "TracIn",
           "ReTrac"]

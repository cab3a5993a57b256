"""Inverse strategies: how each method applies the inverse of its curvature."""

from .base import InverseStrategy
from .eigen import EigenInverse
from .eigen_corrected import EigenCorrectedInverse
from .factored import FactoredInverse, trace_pi, unit_pi
from .low_rank import LowRankFactoredInverse
from .low_rank_eigen_corrected import LowRankEigenCorrectedInverse
from .sherman_morrison import ShermanMorrisonInverse
from .woodbury import WoodburyInverse

__all__ = ["InverseStrategy", "FactoredInverse", "EigenInverse", "trace_pi", "unit_pi"]
__all__ += ["EigenCorrectedInverse", "LowRankFactoredInverse", "LowRankEigenCorrectedInverse"]
__all__ += ["WoodburyInverse", "ShermanMorrisonInverse"]

"""Curvature estimates: what each method keeps about a layer's Fisher block."""

from .base import Curvature, NonFiniteStatistics
from .batch_matrices import BatchMatrices
from .diagonal_switch import DiagonalSwitchFactors
from .kronecker import KroneckerFactors, ThinnedKroneckerFactors, kronecker_factors
from .trace_restricted import TraceRestrictedFactors

__all__ = ["Curvature", "NonFiniteStatistics", "KroneckerFactors", "ThinnedKroneckerFactors",
           "TraceRestrictedFactors"]
__all__ += ["BatchMatrices", "DiagonalSwitchFactors", "kronecker_factors"]

"""Curvature estimates: what each method keeps about a layer's Fisher block."""

from .base import Curvature, NonFiniteStatistics
from .kronecker import KroneckerFactors

__all__ = ["Curvature", "NonFiniteStatistics", "KroneckerFactors"]

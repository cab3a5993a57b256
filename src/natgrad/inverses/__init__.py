"""Inverse strategies: how each method applies the inverse of its curvature."""

from .base import InverseStrategy
from .eigen import EigenInverse
from .factored import FactoredInverse, trace_pi, unit_pi

__all__ = ["InverseStrategy", "FactoredInverse", "EigenInverse", "trace_pi", "unit_pi"]

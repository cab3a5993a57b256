"""The named methods: each a config plus one curvature and one inverse strategy."""

from .kfac import KFAC, KFACConfig

__all__ = ["KFAC", "KFACConfig"]

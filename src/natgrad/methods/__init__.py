"""The named methods: each a config plus one curvature and one inverse strategy."""

from .kfac import KFAC, KFACConfig
from .ekfac import EKFAC, EKFACConfig
from .tkfac import TKFAC, TKFACConfig
from .tekfac import TEKFAC, TEKFACConfig
from .skfac import SKFAC, SKFACConfig
from .smkfac import SMKFAC, SMKFACConfig

__all__ = ["KFAC", "KFACConfig"]
__all__ += ["EKFAC", "EKFACConfig", "TKFAC", "TKFACConfig", "TEKFAC", "TEKFACConfig"]
__all__ += ["SKFAC", "SKFACConfig", "SMKFAC", "SMKFACConfig"]

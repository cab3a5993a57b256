"""The named methods: each a config plus one curvature and one inverse strategy."""

from .ekfac import EKFAC, EKFACConfig
from .kfac import KFAC, KFACConfig
from .skfac import SKFAC, SKFACConfig
from .smkfac import SMKFAC, SMKFACConfig
from .tekfac import TEKFAC, TEKFACConfig
from .tkfac import TKFAC, TKFACConfig

__all__ = ["KFAC", "KFACConfig"]
__all__ += ["EKFAC", "EKFACConfig", "TKFAC", "TKFACConfig", "TEKFAC", "TEKFACConfig"]
__all__ += ["SKFAC", "SKFACConfig", "SMKFAC", "SMKFACConfig"]

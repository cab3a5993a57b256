"""natgrad: Kronecker-factored natural-gradient preconditioners for any torch.optim optimizer.

A method is a curvature estimate × a way to apply its inverse, exposed as a gradient
preconditioner that runs before your optimizer::

    pre = natgrad.KFAC(model, optimizer)
    ...
    loss.backward()
    pre.step()
    optimizer.step()
"""

from .capture import LayerStats
from .compose import UPDATE_RULES, build, parse_spec
from .config import PreconditionerConfig
from .layers import LAYER_HANDLERS
from .linalg import DecompositionError
from .methods import (
    EKFAC,
    KFAC,
    SKFAC,
    SMKFAC,
    TEKFAC,
    TKFAC,
    EKFACConfig,
    KFACConfig,
    SKFACConfig,
    SMKFACConfig,
    TEKFACConfig,
    TKFACConfig,
)
from .preconditioner import (
    ClippingWarning,
    NumericalWarning,
    Preconditioner,
    UnsupportedLayerWarning,
)
from .registry import METHODS

__version__ = "0.1.0"

__all__ = [
    "ClippingWarning",
    "KFAC",
    "KFACConfig",
    "EKFAC",
    "EKFACConfig",
    "TKFAC",
    "TKFACConfig",
    "TEKFAC",
    "TEKFACConfig",
    "SKFAC",
    "SKFACConfig",
    "SMKFAC",
    "SMKFACConfig",
    "LAYER_HANDLERS",
    "METHODS",
    "DecompositionError",
    "LayerStats",
    "NumericalWarning",
    "Preconditioner",
    "PreconditionerConfig",
    "UnsupportedLayerWarning",
    "UPDATE_RULES",
    "build",
    "parse_spec",
]

"""Pair a method with an update rule by name: ``"ekfac+adam"`` = Adam behind EKFAC.

A spec is ``"<method>+<rule>"``, ``"<method>"`` (the rule defaults to SGD with momentum)
or ``"<rule>"`` alone (no preconditioner: a first-order baseline). Methods come from
:data:`natgrad.METHODS`, rules from :data:`UPDATE_RULES`.

With no learning rate, :func:`build` returns the recommended pairing (docs/defaults.md):
a bare method name gets :data:`RECOMMENDED` (the quadratic-model step with
Levenberg–Marquardt damping and a warm start, behind plain SGD at lr 1); a
``"method+rule"`` or a rule alone gets :data:`DEFAULT_LR` for its rule, and a method behind
momentum SGD also :data:`MOMENTUM_SETTINGS`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from .preconditioner import Preconditioner
from .registry import METHODS

__all__ = ["UPDATE_RULES", "DEFAULT_LR", "RECOMMENDED", "MOMENTUM_SETTINGS", "parse_spec",
           "build"]

#: Update rule name → factory ``(params, lr, weight_decay) → optimizer``. ``sgd`` is
#: SGD with momentum 0.9 (the papers' SGDM); ``nag`` the same with Nesterov momentum.
UPDATE_RULES: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "sgd": lambda params, lr, weight_decay=0.0: torch.optim.SGD(
        params, lr=lr, momentum=0.9, weight_decay=weight_decay
    ),
    "nag": lambda params, lr, weight_decay=0.0: torch.optim.SGD(
        params, lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay
    ),
    "adam": lambda params, lr, weight_decay=0.0: torch.optim.Adam(
        params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=weight_decay
    ),
    "radam": lambda params, lr, weight_decay=0.0: torch.optim.RAdam(
        params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=weight_decay
    ),
    "plain": lambda params, lr, weight_decay=0.0: torch.optim.SGD(
        params, lr=lr, weight_decay=weight_decay
    ),
}

#: Learning rate :func:`build` uses when given none, by update rule (``plain`` behind the
#: quadratic-model step: 1.0 applies the model's step exactly).
DEFAULT_LR: dict[str, float] = {"sgd": 0.05, "nag": 0.05, "adam": 1e-3, "radam": 1e-3,
                                "plain": 1.0}

#: Extra inverse refreshes in the first ``T_inv = 100`` steps (docs/defaults.md).
WARM_START = tuple(range(10, 100, 10))

#: What ``build(method, model)`` sets for every method (any of them trains with it on
#: the digits MLP and the Fashion-MNIST CNN without tuning; docs/defaults.md), behind
#: ``plain`` SGD at lr 1. ``kl_clip`` only bounds a step the model cannot size.
RECOMMENDED: dict[str, Any] = {
    # LM's starting λ for every method (the papers' 1e-3; K-FAC's class default 0.1 is
    # for the momentum pairing, and LM needs ~90 steps to walk it down: docs/defaults.md).
    "damping": 1e-3,
    "step_size": "quadratic",
    "step_momentum": True,
    "curvature_samples": 32,
    "lm_damping": True,
    "T_lm": 5,
    "warm_start": WARM_START,
    "kl_clip": 1e-3,
}

#: Settings a method gets from ``build`` behind SGD(-Nesterov) momentum when no lr is
#: given: the papers' damping 1e-3 diverges there at lr 0.05 for several methods;
#: ``λ = 0.1`` with ``κ = 1e-3`` trains (docs/defaults.md).
MOMENTUM_SETTINGS: dict[str, Any] = {"damping": 0.1, "kl_clip": 1e-3, "warm_start": WARM_START}


def parse_spec(spec: str) -> tuple[str | None, str]:
    """``"ekfac+adam"`` → ``("ekfac", "adam")``; ``"kfac"`` → ``("kfac", "sgd")``;
    ``"adam"`` → ``(None, "adam")``.

    Raises:
        ValueError: an unknown method or update rule, naming the known ones.
    """
    parts = spec.strip().lower().split("+")
    if len(parts) == 1:
        (name,) = parts
        if name in UPDATE_RULES:
            return None, name
        method, rule = name, "sgd"
    elif len(parts) == 2:
        method, rule = parts
    else:
        raise ValueError(f"spec must be 'method', 'rule' or 'method+rule', got {spec!r}")
    if method not in METHODS:
        raise ValueError(
            f"unknown method {method!r} in {spec!r}; known methods: {', '.join(sorted(METHODS))}"
            f"; known update rules: {', '.join(sorted(UPDATE_RULES))}"
        )
    if rule not in UPDATE_RULES:
        raise ValueError(
            f"unknown update rule {rule!r} in {spec!r}; known: {', '.join(sorted(UPDATE_RULES))}"
        )
    return method, rule


def build(
    spec: str,
    model: nn.Module,
    *,
    lr: float | None = None,
    weight_decay: float = 0.0,
    params: Iterable[torch.nn.Parameter] | None = None,
    **method_kwargs: Any,
) -> tuple[Preconditioner | None, torch.optim.Optimizer]:
    """Build ``(preconditioner or None, optimizer)`` for a spec.

    ``method_kwargs`` go to the method's constructor (its config fields, ``exclude``,
    ``fisher``...) and win over any recommended setting. The preconditioner is attached to
    the optimizer. With ``lr=None``: a bare method name gets the recommended pairing
    (:data:`RECOMMENDED` behind ``plain`` SGD at lr 1); otherwise the rule's
    :data:`DEFAULT_LR`, plus :data:`MOMENTUM_SETTINGS` for a method behind momentum SGD;
    with any rule, the method's own ``recommended`` settings on top.
    With an ``lr``, a bare method name is ``"<method>+sgd"`` and only ``method_kwargs``
    apply, as before.
    """
    method, rule = parse_spec(spec)
    settings: dict[str, Any] = {}
    if lr is None:
        bare = method is not None and "+" not in spec
        if bare or (method is not None and rule == "plain"):
            rule, settings = "plain", dict(RECOMMENDED)
        elif method is not None and rule in ("sgd", "nag"):
            settings = dict(MOMENTUM_SETTINGS)
        if method is not None:
            settings.update(METHODS[method].recommended)
        lr = DEFAULT_LR[rule]
    optimizer = UPDATE_RULES[rule](
        list(model.parameters() if params is None else params), lr=lr, weight_decay=weight_decay
    )
    if method is None:
        if method_kwargs:
            raise ValueError(
                f"{spec!r} has no method; got method arguments {sorted(method_kwargs)}"
            )
        return None, optimizer
    return METHODS[method](model, optimizer, **{**settings, **method_kwargs}), optimizer

"""Pair a method with an update rule by name: ``"ekfac+adam"`` = Adam behind EKFAC.

A spec is ``"<method>+<rule>"``, ``"<method>"`` (the rule defaults to SGD with momentum)
or ``"<rule>"`` alone (no preconditioner: a first-order baseline). Methods come from
:data:`natgrad.METHODS`, rules from :data:`UPDATE_RULES`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from .preconditioner import Preconditioner
from .registry import METHODS

__all__ = ["UPDATE_RULES", "parse_spec", "build"]

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
}


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
    lr: float,
    weight_decay: float = 0.0,
    params: Iterable[torch.nn.Parameter] | None = None,
    **method_kwargs: Any,
) -> tuple[Preconditioner | None, torch.optim.Optimizer]:
    """Build ``(preconditioner or None, optimizer)`` for a spec.

    ``method_kwargs`` go to the method's constructor (its config fields, ``exclude``,
    ``fisher``...). The preconditioner is attached to the optimizer for KL clipping.
    """
    method, rule = parse_spec(spec)
    optimizer = UPDATE_RULES[rule](
        list(model.parameters() if params is None else params), lr=lr, weight_decay=weight_decay
    )
    if method is None:
        if method_kwargs:
            raise ValueError(
                f"{spec!r} has no method; got method arguments {sorted(method_kwargs)}"
            )
        return None, optimizer
    return METHODS[method](model, optimizer, **method_kwargs), optimizer

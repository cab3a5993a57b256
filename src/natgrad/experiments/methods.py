"""What ``natgrad bench`` compares: method specs and their hyperparameters.

A spec is what :func:`natgrad.parse_spec` reads (``sgd``, ``adam``, ``kfac``,
``ekfac+adam``...) or a heavyball peer (``soap``, ``shampoo``). The default list is
SGD-momentum, Adam, every name in :data:`natgrad.METHODS` at run time (each in front of
SGD-momentum), then the peers when heavyball is installed.

Hyperparameters of one spec are a flat dict: ``lr``, ``weight_decay`` and any field of the
method's config (``damping``, ``T_inv``, ...) or keyword of the peer's optimizer. Layers,
lowest first: defaults → ``--preset`` → ``--settings`` file → command-line overrides.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from torch import nn

import natgrad

from .peers import PEERS, build_peer, missing_reason, peer_fields

__all__ = [
    "FIRST_ORDER_LR",
    "PRECONDITIONED_LR",
    "MethodSpec",
    "resolve",
    "default_specs",
    "select",
    "parse_overrides",
    "parse_value",
    "merge_hyperparameters",
]

#: Default learning rate of a first-order baseline, by update rule.
FIRST_ORDER_LR: dict[str, float] = {"sgd": 0.05, "nag": 0.05, "adam": 1e-3, "radam": 1e-3,
                                    "plain": 0.05}
#: Default learning rate of a K-FAC-family method, by the update rule behind it.
PRECONDITIONED_LR: dict[str, float] = {"sgd": 0.05, "nag": 0.05, "adam": 1e-3, "radam": 1e-3,
                                       "plain": 1.0}
_COMMON = ("lr", "weight_decay")
#: Settings every K-FAC-family method gets in ``bench`` behind SGD(-Nesterov) momentum:
#: the papers' damping of 1e-3 diverges there at lr 0.05; λ = 0.1 with κ = 1e-3 trains
#: for every method (docs/defaults.md). Presets, settings files and overrides win.
MOMENTUM_DEFAULTS: dict[str, float] = {"damping": 0.1, "kl_clip": 1e-3}


@dataclass(frozen=True)
class MethodSpec:
    """One compared method.

    Attributes:
        name: canonical spec: ``"sgd"``, ``"kfac"`` (= ``kfac+sgd``), ``"ekfac+adam"``,
            ``"soap"``.
        method: key of :data:`natgrad.METHODS`, or ``None`` for a baseline.
        rule: key of :data:`natgrad.UPDATE_RULES`, or ``None`` for a peer.
    """

    name: str
    method: str | None
    rule: str | None

    @property
    def peer(self) -> bool:
        return self.rule is None

    @property
    def first_order(self) -> bool:
        """A plain ``torch.optim`` baseline (SGD-momentum, Adam, ...)."""
        return self.method is None and not self.peer

    def default_lr(self) -> float:
        if self.peer:
            return PEERS[self.name][1]
        table = FIRST_ORDER_LR if self.first_order else PRECONDITIONED_LR
        return table[self.rule]

    def bench_defaults(self) -> dict[str, Any]:
        """The lowest layer of this spec's hyperparameters in ``bench``."""
        hp: dict[str, Any] = {"lr": self.default_lr(), "weight_decay": 0.0}
        if self.method is not None and self.rule in ("sgd", "nag"):
            hp.update(MOMENTUM_DEFAULTS)
        if self.method is not None and self.rule == "plain":
            hp.update(natgrad.compose.RECOMMENDED)  # what natgrad.build(method, model) sets
        return hp

    def fields(self) -> set[str]:
        """Hyperparameter names this spec accepts."""
        if self.peer:
            return set(_COMMON) | peer_fields(self.name)
        if self.method is None:
            return set(_COMMON)
        config = natgrad.METHODS[self.method].config_class
        return set(_COMMON) | {f.name for f in dataclasses.fields(config)}

    def resolved(self, hyperparameters: Mapping[str, Any]) -> dict[str, Any]:
        """Every hyperparameter a run of this spec uses: ``hyperparameters`` over the
        method's config defaults (``T_cov``, ``T_inv``, ...), for display."""
        if self.method is None:
            return dict(hyperparameters)
        config = natgrad.METHODS[self.method].config_class
        known = {f.name for f in dataclasses.fields(config)}
        defaults = dataclasses.asdict(config(**{k: v for k, v in hyperparameters.items()
                                                if k in known}))
        return {**dict(hyperparameters), **{k: v for k, v in defaults.items()
                                            if k not in hyperparameters}}

    def check(self, hyperparameters: Mapping[str, Any]) -> None:
        """The common hyperparameters' ranges (the method's config checks its own fields
        when built).

        Raises:
            ValueError: naming the spec, the hyperparameter and the value.
        """
        lr = hyperparameters.get("lr", self.default_lr())
        wd = hyperparameters.get("weight_decay", 0.0)
        if not _number(lr) or not lr > 0:
            raise ValueError(f"{self.name}: lr must be a finite number > 0, got {lr!r}")
        if not _number(wd) or wd < 0:
            raise ValueError(f"{self.name}: weight_decay must be a finite number >= 0, "
                             f"got {wd!r}")

    def build(self, model: nn.Module, hyperparameters: Mapping[str, Any], seed: int = 0,
              distributed: Any = None):
        """``(preconditioner or None, optimizer)`` for ``model``.

        ``distributed`` (a :class:`natgrad.distributed.DataParallel` or ``None``) goes to
        the preconditioner; baselines and peers need nothing beyond DDP.
        """
        hp = dict(hyperparameters)
        lr = float(hp.pop("lr", self.default_lr()))
        weight_decay = float(hp.pop("weight_decay", 0.0))
        if self.peer:
            return None, build_peer(self.name, model.parameters(), lr=lr,
                                    weight_decay=weight_decay, **hp)
        if self.method is not None:
            hp["seed"] = seed
            if distributed is not None:
                hp["distributed"] = distributed
        return natgrad.build(self.name, model, lr=lr, weight_decay=weight_decay, **hp)


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def resolve(spec: str) -> MethodSpec:
    """Spec string → :class:`MethodSpec` (canonical name: ``kfac+sgd`` → ``kfac``).

    Raises:
        ValueError: unknown method or update rule (naming the known ones).
    """
    key = spec.strip().lower()
    if key in PEERS:
        return MethodSpec(key, None, None)
    try:
        method, rule = natgrad.parse_spec(key)
    except ValueError as e:
        raise ValueError(f"{e}; peers (heavyball): {', '.join(PEERS)}") from None
    if method is None:
        return MethodSpec(rule, None, rule)
    return MethodSpec(method if rule == "sgd" else f"{method}+{rule}", method, rule)


def default_specs() -> list[str]:
    """SGD-momentum, Adam, every registered method, then the heavyball peers."""
    return ["sgd", "adam", *natgrad.METHODS, *PEERS]


def select(specs: Iterable[str]) -> tuple[list[MethodSpec], list[str]]:
    """Resolve specs, dropping duplicates and peers that cannot be built.

    Returns:
        ``(methods, skip messages)``.
    """
    methods: list[MethodSpec] = []
    skipped: list[str] = []
    for spec in specs:
        if not spec.strip():
            continue
        m = resolve(spec)
        if m in methods:
            continue
        reason = missing_reason(m.name) if m.peer else None
        if reason is not None:
            skipped.append(f"skipping {reason}")
            continue
        methods.append(m)
    return methods, skipped


def parse_value(text: str) -> Any:
    """``"0.05"`` → 0.05, ``"100"`` → 100, ``"none"`` → None, ``"true"`` → True, else str."""
    low = text.strip().lower()
    if low in ("none", "null"):
        return None
    if low in ("true", "false"):
        return low == "true"
    for cast in (int, float):
        try:
            value = cast(text)
        except ValueError:
            continue
        if isinstance(value, float) and not math.isfinite(value):
            break
        return value
    return text.strip()


def parse_overrides(option: str, key: str, values: Iterable[str]) -> dict[str | None, dict]:
    """Parse ``--lr 0.01`` / ``--lr kfac=0.05,adam=1e-3`` (repeatable) into
    ``{spec or None (= every spec): {key: value}}``; specs are canonicalised.

    ``key`` is the hyperparameter; ``--set`` passes ``key=None`` and takes
    ``[spec:]name=value`` items instead.

    Raises:
        ValueError: a malformed item, naming the option and the item.
    """
    out: dict[str | None, dict] = {}
    for value in values:
        for item in value.split(","):
            item = item.strip()
            if not item:
                continue
            if key is None:
                target, _, assignment = item.rpartition(":")
                name, eq, text = assignment.partition("=")
                if not eq or not name:
                    raise ValueError(
                        f"{option} expects [SPEC:]NAME=VALUE items, got {item!r}"
                    )
                field = name.strip()
            else:
                target, eq, text = item.rpartition("=")
                if eq and not target:
                    raise ValueError(f"{option} expects VALUE or SPEC=VALUE, got {item!r}")
                field = key
            spec = resolve(target).name if target else None
            parsed = parse_value(text)
            if key is not None and not isinstance(parsed, (int, float)):
                raise ValueError(f"{option} expects a number, got {text!r} in {item!r}")
            out.setdefault(spec, {})[field] = parsed
    return out


def merge_hyperparameters(
    methods: list[MethodSpec],
    *,
    preset: Mapping[str, Mapping[str, Any]] | None = None,
    settings: Mapping[str, Mapping[str, Any]] | None = None,
    overrides: Mapping[str | None, Mapping[str, Any]] | None = None,
) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """Each spec's hyperparameters, lowest layer first: ``lr`` default → ``preset`` →
    ``settings`` → ``overrides`` (``None`` key = every spec that has the field).

    Preset and settings entries a spec does not accept are dropped with a note (a paper's
    setting for a knob this method lacks); an override naming a spec that lacks the field
    is an error.

    Returns:
        ``({spec: hyperparameters}, notes)``.

    Raises:
        ValueError: an override for a spec not in the run, or a field the spec lacks.
    """
    names = {m.name for m in methods}
    notes: list[str] = []
    overrides = overrides or {}
    for target in overrides:
        if target is not None and target not in names:
            raise ValueError(
                f"override for {target!r}, which is not among the methods run: "
                f"{', '.join(sorted(names))}"
            )
    result: dict[str, dict[str, Any]] = {}
    for m in methods:
        fields = m.fields()
        hp = m.bench_defaults()
        for label, layer in (("preset", preset), ("settings", settings)):
            for field, value in (layer or {}).get(m.name, {}).items():
                if field in fields:
                    hp[field] = value
                else:
                    notes.append(f"{m.name}: {label} value {field}={value!r} ignored "
                                 "(no such hyperparameter)")
        for field, value in overrides.get(None, {}).items():
            if field in fields:
                hp[field] = value
        for field, value in overrides.get(m.name, {}).items():
            if field not in fields:
                raise ValueError(
                    f"{m.name} has no hyperparameter {field!r}; it accepts: "
                    f"{', '.join(sorted(fields))}"
                )
            hp[field] = value
        result[m.name] = hp
    for field in overrides.get(None, {}):
        if not any(field in m.fields() for m in methods):
            raise ValueError(f"no method in this run has a hyperparameter {field!r}")
    return result, notes

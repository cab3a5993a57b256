"""Each paper's experimental settings as a ``--preset``, named after its method; they
apply to any dataset and model.

A preset sets the batch size, the learning-rate schedule, the methods the paper compared
and their hyperparameters (learning rate, weight decay, damping, ``T_cov``/``T_inv``...),
and the ``natgrad tune`` grid where the paper gives one. Hyperparameters a method does not
have are skipped with a note. Command-line options override a preset.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .schedule import LRSchedule

__all__ = ["Preset", "PRESETS", "get_preset"]

#: Key of :attr:`Preset.hyperparameters` whose values apply to every K-FAC-family spec.
EVERY_METHOD = "*"


@dataclass(frozen=True)
class Preset:
    """Attributes:
        name: the ``--preset`` name (a method's name).
        source: the paper and section the numbers come from.
        methods: specs the paper compared (used when ``--methods`` is not given; specs
            whose method is not installed are dropped).
        batch_size: training batch size.
        schedule: learning-rate schedule; ``schedule_by_dataset`` overrides it per dataset.
        hyperparameters: spec → settings; ``"*"`` → settings for every K-FAC-family spec
            (a spec's own entry wins).
        grid: ``natgrad tune`` grid ``{"lr" | "damping" | "weight_decay": values}``;
            ``"lr_first_order"`` is the learning-rate grid for first-order baselines.
        notes: choices made where the paper is silent.
    """

    name: str
    source: str
    methods: tuple[str, ...]
    batch_size: int
    schedule: LRSchedule = LRSchedule()
    schedule_by_dataset: dict[str, LRSchedule] = field(default_factory=dict)
    hyperparameters: dict[str, dict[str, Any]] = field(default_factory=dict)
    grid: dict[str, tuple[float, ...]] = field(default_factory=dict)
    notes: str = ""

    def schedule_for(self, dataset: str) -> LRSchedule:
        return self.schedule_by_dataset.get(dataset, self.schedule)

    def settings_for(self, spec: str, preconditioned: bool) -> dict[str, Any]:
        base = dict(self.hyperparameters.get(EVERY_METHOD, {})) if preconditioned else {}
        base.update(self.hyperparameters.get(spec, {}))
        return base


_SMKFAC = Preset(
    name="smkfac",
    source="000_… §4 (ResNet-20, CIFAR-10/100): batch 128, momentum 0.9, SGDM lr 0.03, "
    "K-FAC and SM-K-FAC lr 1e-3, lr × 0.1 every 16,000 iterations, T_FIM = 10, "
    "T_inv = 100, damping 1e-3, α = β = 0.1, no weight decay",
    methods=("sgd", "kfac", "smkfac"),
    batch_size=128,
    schedule=LRSchedule("step", gamma=0.1, every_steps=16_000),
    hyperparameters={
        "sgd": {"lr": 0.03},
        EVERY_METHOD: {"lr": 1e-3, "damping": 1e-3, "T_cov": 10, "T_inv": 100},
        "smkfac": {"alpha": 0.1, "beta": 0.1, "k": 10},
    },
    notes="000_ uses no KL clipping statement; the library default is kept.",
)

_KFAC = Preset(
    name="kfac",
    source="000_… §4, its K-FAC (100:100) column: as the smkfac preset without SM-K-FAC",
    methods=("sgd", "kfac"),
    batch_size=128,
    schedule=_SMKFAC.schedule,
    hyperparameters={k: v for k, v in _SMKFAC.hyperparameters.items() if k != "smkfac"},
)

_EKFAC = Preset(
    name="ekfac",
    source="001_… §3–4 and Table 1 (ResNet-50, CIFAR-10): batch 64, ε = 0.95, T_c = 10, "
    "T_s = 10, T_inv = 100, KL clip 1e-2, Adam ρ1 = 0.9, ρ2 = 0.999; grid-searched "
    "(lr, weight decay, damping) per method",
    methods=("sgd", "kfac", "ekfac", "ekfac+nag", "ekfac+adam", "ekfac+radam"),
    batch_size=64,
    hyperparameters={
        EVERY_METHOD: {"decay": 0.95, "T_cov": 10, "T_s": 10, "T_inv": 100, "kl_clip": 1e-2},
        "sgd": {"lr": 0.03, "weight_decay": 1e-4},
        "kfac": {"lr": 0.01, "weight_decay": 3e-4, "damping": 0.03},
        "ekfac": {"lr": 0.01, "weight_decay": 3e-4, "damping": 0.03},
        "ekfac+nag": {"lr": 0.01, "weight_decay": 1e-4, "damping": 0.03},
        "ekfac+adam": {"lr": 0.003, "weight_decay": 1e-3, "damping": 1e-3},
        "ekfac+radam": {"lr": 0.01, "weight_decay": 3e-4, "damping": 1e-3},
    },
    grid={
        "lr": (0.03, 0.01, 0.003),
        "lr_first_order": (0.3, 0.1, 0.03),
        "weight_decay": (0.01, 0.003, 0.001, 0.0003, 0.0001),
        "damping": (0.03, 0.003, 0.001),
    },
    notes="001_ states no learning-rate schedule; constant is used. Its grid trains 5 "
    "epochs per point for second-order methods and 10 for first-order ones.",
)

_SKFAC = Preset(
    name="skfac",
    source="003_… §5 (VGG-11/ResNet-34, CIFAR-10): batch 32, warm-up then cosine annealing "
    "from lr 1e-3 for every method, T_cov = 20, T_inv = 200, damping 1e-3",
    methods=("sgd", "adam", "kfac", "skfac"),
    batch_size=32,
    schedule=LRSchedule("cosine", warmup=5),
    hyperparameters={
        "sgd": {"lr": 1e-3},
        "adam": {"lr": 1e-3},
        EVERY_METHOD: {"lr": 1e-3, "damping": 1e-3, "T_cov": 20, "T_inv": 200},
    },
    notes="003_ cites Goyal et al. for the warm-up without its length; 5 epochs of linear "
    "warm-up (Goyal et al.'s choice) are used.",
)

_TEKFAC = Preset(
    name="tekfac",
    source="004_… §4.1 (VGG-16/ResNet-20 with batch norm; SVHN, CIFAR-10/100): batch 128, "
    "momentum 0.9, lr × 0.1 every 40 epochs (CIFAR) / 20 (SVHN), no weight decay, "
    "TEKFAC lr 1e-3 and ϑ = 0.01 (ResNet-20, CIFAR-100)",
    methods=("sgd", "adam", "ekfac", "tkfac", "tekfac"),
    batch_size=128,
    schedule=LRSchedule("step", gamma=0.1, every=40),
    schedule_by_dataset={"svhn": LRSchedule("step", gamma=0.1, every=20)},
    hyperparameters={
        EVERY_METHOD: {"lr": 1e-3, "trace_floor": 0.01},
    },
    grid={
        "lr": (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0, 3.0),
        "damping": (1e-8, 1e-6, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1),
        "weight_decay": (0.0,),
    },
    notes="004_ tunes each method's lr and damping over its grids; the first-order "
    "baselines keep natgrad's default learning rates until tuned.",
)

_TKFAC = Preset(
    name="tkfac",
    source="004_… §4.1 settings, used there for TKFAC as a baseline",
    methods=("sgd", "adam", "tkfac"),
    batch_size=128,
    schedule=_TEKFAC.schedule,
    schedule_by_dataset=_TEKFAC.schedule_by_dataset,
    hyperparameters=_TEKFAC.hyperparameters,
    grid=_TEKFAC.grid,
    notes=_TEKFAC.notes,
)

#: Preset name → :class:`Preset`.
PRESETS: dict[str, Preset] = {
    p.name: p for p in (_KFAC, _SMKFAC, _EKFAC, _SKFAC, _TKFAC, _TEKFAC)
}


def get_preset(name: str) -> Preset:
    """Raises ValueError naming the known presets."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
    return PRESETS[name]

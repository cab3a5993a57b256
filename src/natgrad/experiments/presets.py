"""Each paper's experimental settings as a ``--preset``, named after its method.

A preset carries what the paper states: the dataset and model of its main table, the
budget (epochs; an iteration budget is converted at the paper's batch size), the batch size
and learning-rate schedule, the methods it compared and their hyperparameters (learning
rate, weight decay, damping, ``T_cov``/``T_inv``, KL clipping only where the paper clips),
the ``natgrad tune`` grid where the paper gives one, and, per table or figure, the command
that reproduces it given the data and a GPU (docs/bench.md). Hyperparameters a method
does not have are skipped with a note; command-line options override a preset. Choices
made where a paper is silent are listed in :attr:`Preset.notes`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from .schedule import LRSchedule

__all__ = ["Preset", "Reproduction", "PRESETS", "get_preset"]

#: Key of :attr:`Preset.hyperparameters` whose values apply to every K-FAC-family spec.
EVERY_METHOD = "*"


@dataclass(frozen=True)
class Reproduction:
    """One table or figure of a paper and the ``natgrad`` command that reproduces it
    (``DIR``: the folder holding the dataset)."""

    table: str
    command: str


@dataclass(frozen=True)
class Preset:
    """Attributes:
        name: the ``--preset`` name (a method's name).
        source: the paper (author, year) and section the numbers come from.
        methods: specs the paper compared (used when ``--methods`` is not given; specs
            whose method is not installed are dropped).
        batch_size: training batch size.
        dataset, model: the paper's main dataset and model (defaults of ``--dataset`` and
            ``--model`` under this preset).
        epochs: the paper's training budget in epochs (default of ``--epochs``);
            ``epochs_by_dataset`` overrides it per dataset.
        schedule: learning-rate schedule; ``schedule_by_dataset`` overrides it per dataset.
        hyperparameters: spec → settings; ``"*"`` → settings for every K-FAC-family spec
            (a spec's own entry wins).
        grid: ``natgrad tune`` grid ``{"lr" | "damping" | "weight_decay": values}``;
            ``"lr_first_order"`` is the learning-rate grid for first-order baselines; other
            keys (``"spatial_samples"``, ``"trace_floor"``) are the paper's sweeps of a
            method's own setting, run one command per value (:attr:`reproduce`).
        reproduce: per table or figure, the command that reproduces it.
        notes: choices made where the paper is silent.
    """

    name: str
    source: str
    methods: tuple[str, ...]
    batch_size: int
    dataset: str | None = None
    model: str | None = None
    epochs: float | None = None
    epochs_by_dataset: dict[str, float] = field(default_factory=dict)
    schedule: LRSchedule = LRSchedule()
    schedule_by_dataset: dict[str, LRSchedule] = field(default_factory=dict)
    hyperparameters: dict[str, dict[str, Any]] = field(default_factory=dict)
    grid: dict[str, tuple[float, ...]] = field(default_factory=dict)
    reproduce: tuple[Reproduction, ...] = ()
    notes: str = ""

    def schedule_for(self, dataset: str) -> LRSchedule:
        return self.schedule_by_dataset.get(dataset, self.schedule)

    def epochs_for(self, dataset: str) -> float | None:
        return self.epochs_by_dataset.get(dataset, self.epochs)

    def settings_for(self, spec: str, preconditioned: bool) -> dict[str, Any]:
        base = dict(self.hyperparameters.get(EVERY_METHOD, {})) if preconditioned else {}
        base.update(self.hyperparameters.get(spec, {}))
        return base

    def describe(self) -> dict[str, Any]:
        """What ``--dry-run`` shows of the preset besides the resolved plan."""
        return {
            "name": self.name,
            "source": self.source,
            "dataset": self.dataset,
            "model": self.model,
            "epochs": self.epochs,
            "epochs_by_dataset": dict(self.epochs_by_dataset),
            "grid": {k: list(v) for k, v in self.grid.items()},
            "reproduce": [asdict(r) for r in self.reproduce],
            "notes": self.notes,
        }


def _bench(preset: str, dataset: str, extra: str = "") -> str:
    cmd = f"natgrad bench --preset {preset} --dataset {dataset} --data-dir DIR --device cuda"
    return f"{cmd} {extra}".rstrip()


_SMKFAC_TARGETS = "--targets 89,90,91,92,93"

_SMKFAC = Preset(
    name="smkfac",
    source="Liu, Gao & Wang 2021 (Sherman–Morrison K-FAC), §3 (ResNet-20, CIFAR-10/100): "
    "batch 128, momentum 0.9, 39,100 iterations, SGDM lr 0.03, K-FAC and SM-K-FAC lr 1e-3, "
    "lr × 0.1 every 16,000 iterations, T_FIM = 10, T_inv = 100, damping 1e-3, "
    "α = β = 0.1, k = 10, no weight decay, no KL clipping",
    methods=("sgd", "kfac", "smkfac"),
    batch_size=128,
    dataset="cifar10",
    model="resnet20",
    epochs=100,  # 39,100 iterations = 100 epochs of 391 batches of 128 (50,000 images)
    schedule=LRSchedule("step", gamma=0.1, every_steps=16_000),
    hyperparameters={
        "sgd": {"lr": 0.03},
        EVERY_METHOD: {"lr": 1e-3, "damping": 1e-3, "T_cov": 10, "T_inv": 100, "kl_clip": None},
        "smkfac": {"alpha": 0.1, "beta": 0.1, "k": 10, "reading": "paper"},
    },
    reproduce=(
        Reproduction("Table 2, CIFAR-10 (accuracy, s/iteration, time to 89–93 %)",
                     _bench("smkfac", "cifar10", _SMKFAC_TARGETS)),
        Reproduction("Table 2, CIFAR-100 (accuracy)", _bench("smkfac", "cifar100")),
        Reproduction("Table 2, K-FAC (1:1) column",
                     _bench("smkfac", "cifar10", "--methods kfac --set kfac:T_inv=1 "
                            + _SMKFAC_TARGETS)),
        Reproduction("Figures 2–3 (loss and accuracy curves)",
                     "natgrad report OUT  # the plots of the Table 2 runs"),
    ),
    notes="The paper has no KL clipping (kl_clip=None). Its iteration budget is converted to "
    "epochs at its batch size on CIFAR's 50,000 training images. 'K-FAC (1:1)' updates "
    "the inverses every iteration; the paper does not say whether T_FIM changed too.",
)

_KFAC = Preset(
    name="kfac",
    source="Liu, Gao & Wang 2021, §3, its K-FAC (100:100) column: as the smkfac preset "
    "without SM-K-FAC",
    methods=("sgd", "kfac"),
    batch_size=128,
    dataset=_SMKFAC.dataset,
    model=_SMKFAC.model,
    epochs=_SMKFAC.epochs,
    schedule=_SMKFAC.schedule,
    hyperparameters={k: v for k, v in _SMKFAC.hyperparameters.items() if k != "smkfac"},
    reproduce=(
        Reproduction("Liu, Gao & Wang 2021, Table 2, K-FAC (100:100)",
                     _bench("kfac", "cifar10", _SMKFAC_TARGETS)),
    ),
    notes=_SMKFAC.notes,
)

_EKFAC = Preset(
    name="ekfac",
    source="Xu 2021 (EKFAC-NAG/-Adam/-RAdam), §3–4 and Table 1 (ResNet-50, CIFAR-10): "
    "batch 64, 100 epochs, ε = 0.95, T_c = 10, T_s = 10, T_inv = 100, clip C = 1e-2, "
    "Adam ρ1 = 0.9, ρ2 = 0.999, δ = 1e-8; (lr, weight decay, damping) grid-searched per "
    "method, 5 epochs per point (10 for first-order methods)",
    methods=("sgd", "kfac", "ekfac", "ekfac+nag", "ekfac+adam", "ekfac+radam"),
    batch_size=64,
    dataset="cifar10",
    model="resnet50",
    epochs=100,
    hyperparameters={
        EVERY_METHOD: {"decay": 0.95, "T_cov": 10, "T_s": 10, "T_inv": 100, "kl_clip": 1e-2,
                       "scale_rule": "batch"},
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
        "damping": (0.03, 0.001, 0.003),
    },
    reproduce=(
        Reproduction("§4.2 grid search (second-order methods, 5 epochs per point)",
                     "natgrad tune --preset ekfac --dataset cifar10 --data-dir DIR "
                     "--device cuda --methods kfac,ekfac,ekfac+nag,ekfac+adam,ekfac+radam "
                     "--epochs 5"),
        Reproduction("§4.2 grid search (SGD, 10 epochs per point)",
                     "natgrad tune --preset ekfac --dataset cifar10 --data-dir DIR "
                     "--device cuda --methods sgd --epochs 10"),
        Reproduction("Figures 1–4 (training/test loss and accuracy over 100 epochs)",
                     _bench("ekfac", "cifar10")),
    ),
    notes="Xu 2021 states no learning-rate schedule; constant is used. Its ResNet-50 is He "
    "et al.'s (natgrad's ImageNet-style resnet50, here on 32×32 images). The clip C = 1e-2 "
    "is KL clipping (its KLClipandUpdateGrad). S is set to each mini-batch's estimate "
    "(UpdateScale; scale_rule='batch').",
)

_SKFAC_CIFAR = "--epochs 100"

_SKFAC = Preset(
    name="skfac",
    source="Tang et al. 2021 (SKFAC), §4 (VGG-11/ResNet-34, CIFAR-10): batch 32, warm-up "
    "then cosine annealing from lr 1e-3 for every method, T_cov = 20, T_inv = 200, damping "
    "1e-3, SKFAC-SS with s' ∈ {1, 2, 4, 8}; ResNet-50 on ImageNet-1k: batch 4 × 32, "
    "polynomial decay from 0.025 (half-life 5 epochs), s' = 1",
    methods=("sgd", "adam", "kfac", "skfac"),
    batch_size=32,
    dataset="cifar10",
    model="resnet34",
    epochs=100,
    schedule=LRSchedule("cosine", warmup=5),
    hyperparameters={
        "sgd": {"lr": 1e-3},
        "adam": {"lr": 1e-3},
        EVERY_METHOD: {"lr": 1e-3, "damping": 1e-3, "T_cov": 20, "T_inv": 200, "kl_clip": None},
        "skfac": {"reading": "algorithm2", "reduction": "reduce_sum"},
    },
    grid={"spatial_samples": (1, 2, 4, 8)},
    reproduce=(
        Reproduction("Figure 1, ResNet-34: SGD, Adam, K-FAC, SKFAC-RS",
                     _bench("skfac", "cifar10", _SKFAC_CIFAR)),
        *(
            Reproduction(f"Figure 1, ResNet-34: SKFAC-SS, s' = {s}",
                         _bench("skfac", "cifar10",
                                f"{_SKFAC_CIFAR} --methods skfac --set skfac:reduction=subsample "
                                f"--set skfac:spatial_samples={s} --out results/skfac-ss{s}"))
            for s in (1, 2, 4, 8)
        ),
        Reproduction("Figure 1, VGG-11 (each command above with --model vgg11)",
                     _bench("skfac", "cifar10", f"{_SKFAC_CIFAR} --model vgg11")),
        Reproduction("Table 1 and Figures 2–3 (ResNet-50, ImageNet-1k, 4 GPUs)",
                     "not reproducible with natgrad bench: no ImageNet loader; the model is "
                     "natgrad.experiments.models.build_model('resnet50', 3, 1000, 224)"),
    ),
    notes="Tang et al. 2021 cite Goyal et al. for the warm-up without its length and state no "
    "CIFAR epoch budget: 5 warm-up epochs (Goyal et al.'s) and 100 epochs are natgrad's "
    "choices. No KL clipping. SKFAC uses Algorithm 2's factor scale "
    "(reading='algorithm2'). Its ResNet-34 is He et al.'s (natgrad's ImageNet-style "
    "resnet34, here on 32×32 images).",
)

_TEKFAC_GRID = {
    "lr": (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0, 3.0),
    "damping": (1e-8, 1e-6, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1),
    "weight_decay": (0.0,),
    "trace_floor": (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0),
}

_TEKFAC = Preset(
    name="tekfac",
    source="Gao et al. 2020 (TEKFAC), §4.1 (VGG-16/ResNet-20 with batch norm; SVHN, "
    "CIFAR-10/100): batch 128, momentum 0.9, lr × 0.1 every 40 epochs (CIFAR) / 20 (SVHN), "
    "no weight decay, lr and damping tuned per method, TEKFAC lr 1e-3 and ϑ = 0.01 "
    "(ResNet-20, CIFAR-100)",
    methods=("sgd", "adam", "ekfac", "tkfac", "tekfac"),
    batch_size=128,
    dataset="cifar10",
    model="resnet20",
    epochs=120,
    epochs_by_dataset={"svhn": 60},
    schedule=LRSchedule("step", gamma=0.1, every=40),
    schedule_by_dataset={"svhn": LRSchedule("step", gamma=0.1, every=20)},
    hyperparameters={
        EVERY_METHOD: {"lr": 1e-3, "trace_floor": 0.01, "kl_clip": None},
    },
    grid=_TEKFAC_GRID,
    reproduce=(
        *(
            Reproduction(f"Table 3 and Figure 3, {data}, {model}",
                         _bench("tekfac", data, f"--model {model}"))
            for data in ("cifar10", "cifar100", "svhn")
            for model in ("resnet20", "vgg16")
        ),
        Reproduction("Table 4 (ϑ on ResNet-20, CIFAR-100; one command per ϑ)",
                     _bench("tekfac", "cifar100",
                            "--methods tekfac --set tekfac:trace_floor=THETA "
                            "--out results/tekfac-theta-THETA")),
        Reproduction("Table 4 (learning rate on ResNet-20, CIFAR-100)",
                     "natgrad tune --preset tekfac --dataset cifar100 --data-dir DIR "
                     "--device cuda --methods tekfac --lrs 1e-4,1e-3,1e-2,0.1 --dampings 1e-3"),
        Reproduction("the lr × damping grid of §4.1",
                     "natgrad tune --preset tekfac --dataset cifar10 --data-dir DIR "
                     "--device cuda"),
    ),
    notes="Gao et al. 2020 tune each method's lr and damping over its grids; the first-order "
    "baselines keep natgrad's default learning rates until tuned. No KL clipping. Its epoch "
    "budget and moving-average values are missing from our copy: 120 epochs (CIFAR) and 60 "
    "(SVHN), three stages of the step schedule, are natgrad's choice.",
)

_TKFAC = Preset(
    name="tkfac",
    source="Gao et al. 2020 (TEKFAC), §4.1 settings, used there for TKFAC as a baseline",
    methods=("sgd", "adam", "tkfac"),
    batch_size=128,
    dataset=_TEKFAC.dataset,
    model=_TEKFAC.model,
    epochs=_TEKFAC.epochs,
    epochs_by_dataset=_TEKFAC.epochs_by_dataset,
    schedule=_TEKFAC.schedule,
    schedule_by_dataset=_TEKFAC.schedule_by_dataset,
    hyperparameters=_TEKFAC.hyperparameters,
    grid=_TEKFAC.grid,
    reproduce=(
        Reproduction("Gao et al. 2020, Table 3, TKFAC column (and --dataset/--model as there)",
                     _bench("tkfac", "cifar10")),
    ),
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

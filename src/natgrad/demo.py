"""``make demo``: ``natgrad bench`` on Fashion-MNIST with the CNN: SGD-momentum, Adam,
every K-FAC-family method and heavyball's SOAP (installed by ``make setup``), on a budget
that fits a few minutes on a small CPU machine; prints the table and writes the plots to
``results/demo``.

The methods take turns in one process (``bench``'s interleaved clock, 10 steps a turn), so
a busy machine slows them alike and the time ratios stay fair. Each method gets the same
training-clock budget (``--minutes``, at most one epoch): the demo takes about
:data:`TOTAL_TRAINING_MINUTES` plus the evaluations. Pass any ``natgrad bench`` option to
change it, e.g. ``python -m natgrad.demo --epochs 3`` or ``--methods sgd,kfac,soap,shampoo``.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from .cli import main as cli_main
from .experiments.data import DatasetMissing, load_fashion_mnist
from .experiments.methods import default_specs, select

__all__ = ["main", "TOTAL_TRAINING_MINUTES", "demo_specs"]

#: Training-clock minutes shared by all methods (evaluation and start-up come on top).
TOTAL_TRAINING_MINUTES = 2.0


def demo_specs() -> list[str]:
    """SGD-momentum, Adam, every registered method and SOAP (Shampoo, the slowest peer per
    step, is left to ``--methods``)."""
    return [s for s in default_specs() if s != "shampoo"]


def main(argv: Sequence[str] | None = None) -> int:
    extra = list(sys.argv[1:] if argv is None else argv)
    try:
        load_fashion_mnist()
    except DatasetMissing as e:
        print(f"natgrad demo: {e}", file=sys.stderr)
        return 2
    methods, _ = select(demo_specs())
    minutes = round(TOTAL_TRAINING_MINUTES / max(1, len(methods)), 3)
    args = ["bench", "--dataset", "fashion-mnist", "--model", "cnn", "--epochs", "1",
            "--minutes", str(minutes), "--evals-per-epoch", "2",
            "--methods", ",".join(m.name for m in methods), "--out", "results/demo",
            "--fresh"]
    print(f"natgrad demo: {len(methods)} methods ({', '.join(m.name for m in methods)}), "
          f"{minutes} training minutes or 1 epoch each on Fashion-MNIST (CNN), taking turns "
          "every 10 steps", file=sys.stderr)
    return cli_main(args + extra)


if __name__ == "__main__":
    sys.exit(main())

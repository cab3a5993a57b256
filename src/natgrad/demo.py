"""``make demo``: ``natgrad bench`` on Fashion-MNIST with the CNN, every available method,
on a budget that fits about ten minutes on a small CPU machine; prints the table and
writes the plots to ``results/demo``.

Each method gets the same training-clock budget (``--minutes``, at most one epoch), so the
whole demo takes about (number of methods) × (budget + evaluation) minutes. Pass any
``natgrad bench`` option to change it, e.g. ``python -m natgrad.demo --epochs 3``.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from .cli import main as cli_main
from .experiments.data import DatasetMissing, load_fashion_mnist
from .experiments.methods import default_specs, select

__all__ = ["main", "TOTAL_TRAINING_MINUTES"]

#: Training-clock minutes shared by all methods (evaluation and start-up come on top).
TOTAL_TRAINING_MINUTES = 6.0


def main(argv: Sequence[str] | None = None) -> int:
    extra = list(sys.argv[1:] if argv is None else argv)
    try:
        load_fashion_mnist()
    except DatasetMissing as e:
        print(f"natgrad demo: {e}", file=sys.stderr)
        return 2
    methods, _ = select(default_specs())
    minutes = round(TOTAL_TRAINING_MINUTES / max(1, len(methods)), 2)
    args = ["bench", "--dataset", "fashion-mnist", "--model", "cnn", "--epochs", "1",
            "--minutes", str(minutes), "--evals-per-epoch", "3", "--out", "results/demo"]
    print(f"natgrad demo: {len(methods)} methods ({', '.join(m.name for m in methods)}), "
          f"{minutes} training minutes or 1 epoch each on Fashion-MNIST (CNN)",
          file=sys.stderr)
    return cli_main(args + extra)


if __name__ == "__main__":
    sys.exit(main())

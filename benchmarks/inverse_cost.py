"""Cost of one inverse update vs layer width: K-FAC vs SKFAC (Woodbury) vs Sherman–Morrison.

For each factor width ``n`` (default 256, 512, 1024, 2048, 4096) and batch ``M = 128``, with
rows ``Y`` (``M × n``, ReLU'd Gaussians) and the factor ``A = YᵀY/M``, it times, in one run:

* ``kfac_chol``: one K-FAC damped inverse ``(A + λI)⁻¹`` by Cholesky (``O(n³)``);
* ``kfac_eigh``: one K-FAC eigendecomposition of ``A`` (``O(n³)``, the eigen/EKFAC form);
* ``skfac``: one SKFAC Woodbury application *including its refresh*: ``K = MλI + YYᵀ``, its
  ``M × M`` Cholesky, and ``V (λI + YᵀY/M)⁻¹`` for a gradient ``V`` of ``d_out × n``
  (``O(M²n + M³ + M·n·d_out)``; no ``n × n`` matrix);
* ``sm``: one Sherman–Morrison rank-one update ``(X + α u uᵀ)⁻¹`` of an ``n × n`` inverse
  (``O(n²)``);

and, for the per-step cost, ``apply_dense`` (``V A⁻¹``, what K-FAC pays every step) vs
``apply_woodbury`` (the Woodbury application alone). It prints milliseconds and the ratios
``kfac_chol / skfac``, ``kfac_chol / sm`` (and the same against ``kfac_eigh``), and checks
the targets at the largest ``n``: SKFAC ≥ 20× and Sherman–Morrison ≥ 10× cheaper than the
K-FAC inverse update (Cholesky, the cheaper K-FAC form).

Each figure is the median of repeated runs (fewer repeats for slow ones), one thread by
default. Timings on a shared machine move with its load; ratios are measured in the same
run.

Usage: ``python benchmarks/inverse_cost.py [--sizes 256,512] [--batch 128] [--d-out 256]
[--dtype float32] [--threads N] [--json]``
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable

import torch

from natgrad.inverses.sherman_morrison import sherman_morrison_update
from natgrad.inverses.woodbury import woodbury_cholesky, woodbury_right
from natgrad.linalg import damped_inverse, symmetric_eigh

TARGETS = {"skfac": 20.0, "sm": 10.0}


def timed(fn: Callable[[], object], budget_s: float = 0.5, max_repeats: int = 7) -> float:
    """Median milliseconds of ``fn()``: one warm-up when cheap, then repeats within budget."""
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    if first > budget_s:
        return first * 1e3  # slow: one run is the figure (warm enough at this size)
    times = []
    for _ in range(max(1, min(max_repeats, int(budget_s / max(first, 1e-6))))):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def measure(n: int, batch: int, d_out: int, dtype: torch.dtype, damping: float) -> dict:
    gen = torch.Generator().manual_seed(n)
    Y = torch.randn(batch, n, generator=gen, dtype=dtype).relu_()
    A = Y.T @ Y / batch
    V = torch.randn(d_out, n, generator=gen, dtype=dtype)
    A_inv = damped_inverse(A, damping)
    u = A.diagonal().sqrt()
    L = woodbury_cholesky(Y, damping)

    def skfac() -> torch.Tensor:
        return woodbury_right(V, Y, woodbury_cholesky(Y, damping), damping)

    row = {
        "n": n,
        "kfac_chol_ms": timed(lambda: damped_inverse(A, damping)),
        "kfac_eigh_ms": timed(lambda: symmetric_eigh(A)),
        "skfac_ms": timed(skfac),
        "sm_ms": timed(lambda: sherman_morrison_update(A_inv, u, 0.1)),
        "apply_dense_ms": timed(lambda: V @ A_inv),
        "apply_woodbury_ms": timed(lambda: woodbury_right(V, Y, L, damping)),
    }
    # the two applications agree (the benchmark times the right thing)
    err = (woodbury_right(V, Y, L, damping) - V @ A_inv).norm() / (V @ A_inv).norm()
    row["woodbury_rel_err"] = err.item()
    for base in ("kfac_chol", "kfac_eigh"):
        for fast in ("skfac", "sm"):
            row[f"{base}/{fast}"] = row[f"{base}_ms"] / row[f"{fast}_ms"]
    row["apply_dense/apply_woodbury"] = row["apply_dense_ms"] / row["apply_woodbury_ms"]
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="256,512,1024,2048,4096", help="factor widths n")
    parser.add_argument("--batch", type=int, default=128, help="rows M of Y (batch size)")
    parser.add_argument("--d-out", type=int, default=256, help="rows of the gradient V")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--damping", type=float, default=1e-3)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: the ratios compare algorithms, not thread scaling; "
        "on a shared machine more threads mostly add contention)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    try:
        sizes = [int(s) for s in args.sizes.split(",")]
    except ValueError:
        parser.error(f"--sizes must be comma-separated integers, got {args.sizes!r}")
    if any(s < 1 for s in sizes) or args.batch < 1 or args.d_out < 1:
        parser.error("--sizes, --batch and --d-out must be >= 1")
    if args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)

    rows = []
    for n in sizes:
        rows.append(measure(n, args.batch, args.d_out, dtype, args.damping))
        if not args.json:
            r = rows[-1]
            print(
                f"n={n:5d}  kfac chol {r['kfac_chol_ms']:9.2f} ms  eigh {r['kfac_eigh_ms']:9.2f} ms"
                f" | skfac {r['skfac_ms']:7.2f} ms ({r['kfac_chol/skfac']:6.1f}x chol,"
                f" {r['kfac_eigh/skfac']:7.1f}x eigh)"
                f" | sm {r['sm_ms']:7.2f} ms ({r['kfac_chol/sm']:6.1f}x chol,"
                f" {r['kfac_eigh/sm']:7.1f}x eigh)"
                f" | apply dense/woodbury {r['apply_dense/apply_woodbury']:5.1f}x",
                flush=True,
            )
    last = rows[-1]
    checks = {
        f"skfac >= {TARGETS['skfac']:g}x cheaper than kfac_chol at n={last['n']}": last[
            "kfac_chol/skfac"
        ]
        >= TARGETS["skfac"],
        f"sm >= {TARGETS['sm']:g}x cheaper than kfac_chol at n={last['n']}": last["kfac_chol/sm"]
        >= TARGETS["sm"],
    }
    result = {
        "benchmark": "inverse_cost",
        "batch": args.batch,
        "d_out": args.d_out,
        "dtype": args.dtype,
        "damping": args.damping,
        "threads": torch.get_num_threads(),
        "rows": rows,
        "targets": checks,
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"(M={args.batch}, d_out={args.d_out}, {args.dtype}, {torch.get_num_threads()} threads)"
        )
        for name, ok in checks.items():
            print(f"{'PASS' if ok else 'FAIL'}: {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

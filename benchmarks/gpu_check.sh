#!/usr/bin/env bash
# GPU check: does natgrad run on CUDA, agree with the CPU, and what does a step cost there?
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]     (needs a CUDA build of torch and a GPU)
#
# 1. every method × {lr step, quadratic-model step with LM damping} on a small CNN, on the
#    CPU and on CUDA from the same weights and batches: the written gradients must agree
#    (float64, 1e-6 relative);
# 2. the CUDA-marked tests, if any (pytest -m cuda);
# 3. benchmarks/step_overhead.py on CUDA, behind SGD-momentum and with build's recommended
#    pairing (--recommended), JSON into OUT_DIR.
# Untested so far: no GPU was available where it was written.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-gpu_check_out}"
mkdir -p "$OUT"
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python}"

"$PY" - <<'PY'
import torch
assert torch.cuda.is_available(), "no CUDA device visible to torch"
print("device:", torch.cuda.get_device_name(0), "torch", torch.__version__)
PY

"$PY" - <<'PY'
import copy
import torch
import torch.nn.functional as F
from torch import nn
import natgrad

def run(method, settings, device):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Flatten(), nn.Linear(4 * 4 * 4, 10)).double().to(device)
    pre, opt = natgrad.build(method, model, **settings)
    g = torch.Generator().manual_seed(1)
    grads = []
    for _ in range(4):
        x = torch.randn(16, 1, 8, 8, generator=g, dtype=torch.float64).to(device)
        y = torch.randint(0, 10, (16,), generator=g).to(device)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        pre.step()
        grads.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]).cpu())
        opt.step()
    return grads

bad = []
for method in natgrad.METHODS:
    for label, settings in [("lr", dict(lr=0.05, T_cov=1, T_inv=2)),
                            ("quadratic", dict(T_cov=1, T_inv=2, curvature_samples=None))]:
        cpu, gpu = run(method, settings, "cpu"), run(method, settings, "cuda")
        err = max(((a - b).norm() / a.norm().clamp_min(1e-30)).item() for a, b in zip(cpu, gpu))
        print(f"{method:<7} {label:<9} max relative difference CPU vs CUDA {err:.2e}")
        if not err < 1e-6:
            bad.append((method, label, err))
assert not bad, f"CPU and CUDA disagree: {bad}"
PY

"$PY" -m pytest -q -m cuda tests || [ $? -eq 5 ]  # 5: no test is marked cuda

"$PY" benchmarks/step_overhead.py --device cuda --repeats 2 --json > "$OUT/step_overhead_cuda.json"
"$PY" benchmarks/step_overhead.py --device cuda --repeats 2 --recommended --json \
    > "$OUT/step_overhead_cuda_recommended.json"
"$PY" - "$OUT" <<'PY'
import json, sys
for name in ("step_overhead_cuda.json", "step_overhead_cuda_recommended.json"):
    report = json.load(open(f"{sys.argv[1]}/{name}"))
    print(name, "SGD", round(report["sgd_ms_per_iter"], 2), "ms/iter")
    for method, r in report["methods"].items():
        print(f"  {method:<7} {r['ms_per_iter']:8.2f} ms/iter  x SGD {r['ratio_to_sgd']:.2f}"
              f"  x twin {r['ratio_to_paired_sgd']:.2f}")
PY

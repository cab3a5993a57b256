"""Data-parallel training (issue 6): two gloo workers on loopback against one process.

One ``torch.multiprocessing`` spawn (module fixture) runs every scenario on 2 workers and
saves what they hold; the tests compare it, in float64, with a single process that sees
the concatenated batch:

* every method in ``natgrad.METHODS`` × both share modes: after ``STEPS`` steps the
  parameters and preconditioner state are bitwise identical on both workers, and equal to
  the single-process run (parameters, curvature state, and the inverse as an operator —
  eigenbases of degenerate factors are not unique, the preconditioned gradient is);
* unequal local batches (5 and 7 rows): the factors are the global batch's;
* a worker that raises makes the other raise ``PeerFailed``; a worker that vanishes makes
  the other raise ``DistributedError`` well within the group's timeout; the spawn is
  joined under a deadline, so the test cannot hang.
"""

from __future__ import annotations

import dataclasses
import datetime
import itertools
import math
import os
import random
import time
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from helpers import free_port, spawn_and_wait
from torch import nn

import natgrad
from natgrad.distributed import (
    SHARE_MODES,
    DataParallel,
    DistributedError,
    PeerFailed,
    WorkAssignment,
    balance,
    cubic_cost,
    world_from_env,
)

WORLD = 2
LOCAL = 6  # rows per worker; the single process sees WORLD * LOCAL
STEPS = 5
GROUP_TIMEOUT_S = 15
SPAWN_DEADLINE_S = 240
#: Schedules that exercise every hook within STEPS: a factor update every step, a refresh
#: every 2nd, EKFAC-style re-scaling every step, Sherman–Morrison's rank-one phase early.
SCHEDULE = {"T_cov": 1, "T_inv": 2, "T_s": 1, "k": 1}
#: Relative tolerance against the single process. The workers compute the same sums in
#: another order (``g_i = M_w·∂L_w/∂s_i`` with a local ``M_w``; means of partial sums), and
#: the preconditioner amplifies rounding by its condition number. SKFAC damps each factor
#: with λ = 1e-3 alone (no factored split), so its amplification is ~1e3 larger: measured
#: 2.6e-8 after 5 steps on one machine and 1.03e-7 on an AMD EPYC (other BLAS kernels,
#: other rounding), against O(1e-2 … 1) for any real disagreement.
RTOL = {"skfac": 1e-6}


def make_model() -> nn.Module:
    """Every factor has full rank at WORLD * LOCAL = 12 rows (the largest Linear input is
    8 + 1): the eigenbasis of a rank-deficient factor is arbitrary inside its null space,
    and EKFAC's re-scaling there depends on that choice, so only full-rank factors give
    one answer to compare against (workers are bitwise identical in any case)."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.Tanh(),
        nn.Conv2d(3, 2, 3, stride=2, bias=False),
        nn.Flatten(),
        nn.Linear(8, 5),
        nn.Tanh(),
        nn.Linear(5, 3),
    ).double()


def global_batch(step: int, size: int = WORLD * LOCAL):
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(size, 2, 6, 6, generator=g, dtype=torch.float64), torch.randint(
        0, 3, (size,), generator=g
    )


#: Scenarios besides the registered methods: label -> (method, extra settings). EKFAC with
#: both convolutions' input factors (19 and 27 wide) as rank 4 plus a complement.
VARIANTS = {"ekfac:low_rank": ("ekfac", {"low_rank": 4, "low_rank_above": 12})}


def variant(label: str) -> tuple[str, dict]:
    """``(method, extra settings)`` of a scenario label (a method name or a VARIANTS key)."""
    return VARIANTS.get(label, (label, {}))


def make_method(label: str, net: nn.Module, *args, **kwargs) -> natgrad.Preconditioner:
    """The preconditioner of scenario ``label`` with its schedule (SCHEDULE) and extras."""
    method, extra = variant(label)
    cls = natgrad.METHODS[method]
    fields = {f.name for f in dataclasses.fields(cls.config_class)}
    settings = {k: v for k, v in SCHEDULE.items() if k in fields}
    return cls(net, *args, **kwargs, **settings, **extra)


def train(method, net, forward, rows, distributed=None, steps=STEPS, fail=None):
    """``steps`` steps of SGD-momentum behind ``method``; ``rows(step)`` slices the global
    batch. ``fail(step, pre)`` may inject a fault before ``pre.step()``."""
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    pre = make_method(method, net, opt, distributed=distributed)
    for step in range(steps):
        x, y = global_batch(step)
        x, y = x[rows(step)], y[rows(step)]
        opt.zero_grad()
        F.cross_entropy(forward(x), y).backward()
        if fail is not None and fail(step, pre):
            return net, pre
        pre.step()
        opt.step()
    return net, pre


def scenarios() -> list[tuple[str, str]]:
    return [(m, s) for m in [*natgrad.METHODS, *VARIANTS] for s in SHARE_MODES]


# ---------------------------------------------------------------------- the workers
def _record(rank: int, out: dict, key: str, fn) -> None:
    start = time.monotonic()
    try:
        out[key] = fn()
    except Exception as err:  # noqa: BLE001 - the test inspects it
        out[key] = {
            "error": type(err).__name__,
            "message": str(err),
            "trace": traceback.format_exc(),
            "seconds": time.monotonic() - start,
        }


def _worker(rank: int, port: int, outdir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=WORLD,
        timeout=datetime.timedelta(seconds=GROUP_TIMEOUT_S),
    )
    out: dict = {}
    mine = slice(rank * LOCAL, (rank + 1) * LOCAL)

    def run(method: str, share: str) -> dict:
        net = make_model()
        ddp = nn.parallel.DistributedDataParallel(net)
        net, pre = train(method, net, ddp, lambda step: mine, DataParallel(share))
        return {
            "params": net.state_dict(),
            "state": pre.state_dict(),
            "owners": dict(pre.distributed.assignment.owners),
            "sent": dict(pre.distributed.comm.sent),
        }

    for method, share in scenarios():
        _record(rank, out, f"{method}/{share}", lambda: run(method, share))

    def unequal() -> dict:  # 5 rows on rank 0, 7 on rank 1: one factor update
        net = make_model()
        rows = slice(0, 5) if rank == 0 else slice(5, 12)
        _, pre = train(
            "kfac",
            net,
            nn.parallel.DistributedDataParallel(net),
            lambda step: rows,
            DataParallel(),
            steps=1,
        )
        return {"factors": pre.factors()}

    _record(rank, out, "unequal", unequal)

    def kfac_on_my_rows(fail) -> None:
        """Data-parallel K-FAC on this rank's rows, with ``fail`` injected (see train)."""
        net = make_model()
        train("kfac", net, nn.parallel.DistributedDataParallel(net), lambda s: mine,
              DataParallel(), fail=fail)

    def raises() -> dict:  # rank 1's curvature update raises at step 1
        def fail(step, pre):
            if step == 1 and rank == 1:

                def boom(*args, **kwargs):
                    raise RuntimeError("boom: injected failure on rank 1")

                for layer in pre.layers.values():
                    layer.curvature.update = boom
            return False

        kfac_on_my_rows(fail)
        return {}

    _record(rank, out, "raises", raises)
    torch.save(out, os.path.join(outdir, f"rank{rank}.pt"))

    def vanishes() -> dict:  # rank 1 leaves before pre.step() at step 1; rank 0 waits in it
        kfac_on_my_rows(lambda step, pre: step == 1 and rank == 1)
        if rank == 1:
            os._exit(0)  # gone, without saying goodbye to the group
        return {}

    vanished: dict = {}
    _record(rank, vanished, "vanishes", vanishes)
    torch.save(vanished, os.path.join(outdir, f"vanish{rank}.pt"))
    os._exit(0)  # the group is broken; do not wait on its teardown


@pytest.fixture(scope="module")
def workers(tmp_path_factory):
    outdir = str(tmp_path_factory.mktemp("distributed"))
    spawn_and_wait(_worker, (free_port(), outdir), WORLD, SPAWN_DEADLINE_S, "2-worker job")
    ranks = [
        torch.load(os.path.join(outdir, f"rank{r}.pt"), weights_only=False) for r in range(WORLD)
    ]
    vanish = torch.load(os.path.join(outdir, "vanish0.pt"), weights_only=False)
    return ranks, vanish


_REFERENCES: dict = {}


def reference(method: str):
    """The single-process run on the concatenated batch (one per method)."""
    if method not in _REFERENCES:
        net = make_model()
        _REFERENCES[method] = train(method, net, net, lambda step: slice(None))
    return _REFERENCES[method]


def result(workers, key: str, rank: int) -> dict:
    out = workers[0][rank][key]
    if "error" in out:
        pytest.fail(f"rank {rank} raised in {key}: {out['trace']}")
    return out


def assert_same(a, b, where: str, exact: bool, rtol: float = 1e-9) -> None:
    """Nested dicts/lists/tensors: bitwise (``exact``) or to ``rtol`` (float64)."""
    if isinstance(a, dict):
        assert set(a) == set(b), where
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}", exact, rtol)
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]", exact, rtol)
    elif isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.shape == b.shape, where
        if exact or not a.is_floating_point():
            assert torch.equal(a, b), where
        else:
            torch.testing.assert_close(
                a, b, rtol=rtol, atol=rtol * 1e-3, msg=lambda m: f"{where}: {m}"
            )
    elif isinstance(a, float) and not exact:
        assert math.isclose(a, b, rel_tol=rtol, abs_tol=rtol * 1e-3), where
    else:
        assert a == b, where


# ---------------------------------------------------------------------- equivalence
@pytest.mark.slow  # spawns worker processes
@pytest.mark.parametrize("method,share", scenarios())
def test_workers_agree_with_each_other_and_with_one_process(workers, method, share):
    ranks, _ = workers
    if "error" in ranks[0][f"{method}/{share}"] and share == "gradient":
        err = ranks[0][f"{method}/{share}"]
        # Only strategies that re-fit statistics in their own basis refuse this mode.
        net = make_model()
        pre = make_method(method, net)
        assert any(layer.inverse.observe_every is not None for layer in pre.layers.values())
        assert err["error"] == "ValueError" and "share='inverse'" in err["message"]
        return
    r0, r1 = (result(workers, f"{method}/{share}", r) for r in range(WORLD))
    net, pre = reference(method)

    assert_same(r0["params"], r1["params"], "params", exact=True)
    rtol = RTOL.get(method, 1e-9)
    assert_same(r0["params"], net.state_dict(), "params vs one process", exact=False, rtol=rtol)
    assert r0["state"]["steps"] == r1["state"]["steps"] == pre.steps == STEPS
    for name in pre.layers:
        curv = [r["state"]["layers"][name]["curvature"] for r in (r0, r1)]
        assert_same(curv[0], curv[1], f"{name}.curvature", exact=True)
        assert_same(
            curv[0],
            pre.state_dict()["layers"][name]["curvature"],
            f"{name}.curvature vs one process",
            exact=False,
            rtol=rtol,
        )
        if share == "inverse":
            inv = [r["state"]["layers"][name]["inverse"] for r in (r0, r1)]
            assert_same(inv[0], inv[1], f"{name}.inverse", exact=True)

    # The inverse each layer's owner holds, as an operator, against the single process.
    assert r0["owners"] == r1["owners"]
    merged = dict(r0["state"])
    merged["layers"] = {
        name: {
            "curvature": merged["layers"][name]["curvature"],
            "inverse": (r0, r1)[owner]["state"]["layers"][name]["inverse"],
        }
        for name, owner in r0["owners"].items()
    }
    distributed = make_method(method, make_model())
    distributed.load_state_dict(merged)
    g = torch.Generator().manual_seed(7)
    probe = {
        name: torch.randn(layer.handler.shape(layer.module), generator=g, dtype=torch.float64)
        for name, layer in pre.layers.items()
    }
    got, want = distributed.precondition(probe), pre.precondition(probe)
    for name in probe:
        err = (got[name] - want[name]).norm() / want[name].norm()
        assert err < 10 * rtol, f"{method}/{share} layer {name}: relative error {err:.2e}"


@pytest.mark.slow  # spawns worker processes
def test_factors_are_the_global_batchs_with_unequal_local_batches(workers):
    ranks, _ = workers
    f0, f1 = (result(workers, "unequal", r)["factors"] for r in range(WORLD))
    net = make_model()
    _, pre = train("kfac", net, net, lambda step: slice(None), steps=1)
    assert_same(f0, f1, "factors", exact=True)
    assert_same(f0, pre.factors(), "factors vs one process", exact=False)


@pytest.mark.slow  # spawns worker processes
def test_every_layer_has_one_owner_in_the_run(workers):
    ranks, _ = workers
    owners = result(workers, "kfac/inverse", 0)["owners"]
    pre = natgrad.KFAC(make_model())
    assert set(owners) == set(pre.layers)
    assert set(owners.values()) == set(range(WORLD))  # 4 layers, 2 workers: both work


@pytest.mark.slow  # spawns worker processes
def test_measured_bytes_match_the_tensors_that_travel(workers):
    """K-FAC, share='inverse': per factor update and layer, one 4-byte flag and one
    all-reduce of ``A``, ``G`` and the weight (float64); per refresh, each owner's inverses."""
    sent = result(workers, "kfac/inverse", 0)["sent"]
    pre = natgrad.KFAC(make_model())
    per_update = 0
    for layer in pre.layers.values():
        d_out, d_in = layer.handler.shape(layer.module)
        per_update += 4 + 8 * (d_in * d_in + d_out * d_out + 1)
    assert sent["all_reduce"] == STEPS * per_update
    refreshes = len(range(0, STEPS, SCHEDULE["T_inv"]))
    inverses = sum(
        8 * (d[0] ** 2 + d[1] ** 2)
        for d in (layer.handler.shape(layer.module) for layer in pre.layers.values())
    )
    assert sent["broadcast"] == refreshes * inverses  # every worker passes every buffer


# ---------------------------------------------------------------------- failures
@pytest.mark.slow  # spawns worker processes
def test_a_worker_that_raises_stops_every_worker_with_a_clear_error(workers):
    ranks, _ = workers
    r0, r1 = ranks[0]["raises"], ranks[1]["raises"]
    assert r1["error"] == "RuntimeError" and "boom: injected failure on rank 1" in r1["message"]
    assert r0["error"] == "PeerFailed" and "another worker raised" in r0["message"]
    assert issubclass(PeerFailed, DistributedError)
    assert r0["seconds"] < 5 and r1["seconds"] < 5


@pytest.mark.slow  # spawns worker processes
def test_a_worker_that_vanishes_fails_the_other_before_the_timeout(workers):
    _, vanish = workers
    out = vanish["vanishes"]
    assert out["error"] == "DistributedError", out
    assert "rank 0/2" in out["message"] and "peer worker stopped" in out["message"]
    assert out["seconds"] < GROUP_TIMEOUT_S + 5


# ---------------------------------------------------------------------- assignment
def test_cubic_cost():
    assert cubic_cost((3, 5)) == 27 + 125


@pytest.mark.parametrize("world", [1, 2, 3, 5])
def test_balance_covers_every_layer_exactly_once_and_bounds_the_load(world):
    rng = random.Random(world)
    for _ in range(20):
        costs = {
            f"layer{i}": float(rng.choice([1, 8, 27, 64, 4096]) * rng.random())
            for i in range(rng.randint(0, 12))
        }
        a = balance(costs, world)
        assert list(a.owners) == list(costs)
        parts = [a.layers_of(r) for r in range(world)]
        assert sorted(itertools.chain(*parts)) == sorted(costs)  # a partition
        loads = a.loads()
        assert math.isclose(sum(loads), sum(costs.values()))
        if costs:  # greedy list scheduling: never above the mean plus one job
            assert max(loads) <= sum(loads) / world + max(costs.values()) + 1e-9


@pytest.mark.parametrize("world", [2, 3])
def test_balance_is_within_lpt_bound_of_the_best_assignment(world):
    rng = random.Random(world)
    for _ in range(15):
        costs = {f"l{i}": float(rng.randint(1, 50) ** 3) for i in range(rng.randint(2, 7))}
        best = min(
            max(sum(c for c, r in zip(costs.values(), owners) if r == k) for k in range(world))
            for owners in itertools.product(range(world), repeat=len(costs))
        )
        got = max(balance(costs, world).loads())
        assert got <= (4 / 3 - 1 / (3 * world)) * best + 1e-6


def test_balance_does_not_depend_on_mapping_order_and_splits_equal_work_evenly():
    costs = {f"l{i}": 10.0 for i in range(7)}
    shuffled = dict(reversed(list(costs.items())))
    assert dict(balance(costs, 3).owners) == dict(balance(shuffled, 3).owners)
    assert sorted(len(balance(costs, 3).layers_of(r)) for r in range(3)) == [2, 2, 3]
    a = balance({"big": 1000.0, "s1": 1.0, "s2": 1.0}, 2)
    assert a.layers_of(a.owner("big")) == ["big"]  # the small ones go to the other worker
    assert a.imbalance() == pytest.approx(1000 / 501)


@pytest.mark.parametrize(
    "costs,world,match",
    [
        ({"a": 1.0}, 0, "world_size must be an integer >= 1, got 0"),
        ({"a": 1.0}, 1.5, "world_size must be an integer >= 1"),
        ({"a": -1.0}, 2, "cost of layer 'a' must be a finite number >= 0, got -1.0"),
        ({"a": float("nan")}, 2, "cost of layer 'a' must be a finite number >= 0"),
    ],
)
def test_balance_rejects_bad_input(costs, world, match):
    with pytest.raises(ValueError, match=match):
        balance(costs, world)


def test_work_assignment_rejects_bad_owners():
    with pytest.raises(ValueError, match=r"owner of 'a' must be a rank in \[0, 2\), got 2"):
        WorkAssignment({"a": 2}, {"a": 1.0}, 2)
    with pytest.raises(ValueError, match="must name the same layers"):
        WorkAssignment({"a": 0}, {"b": 1.0}, 2)
    with pytest.raises(KeyError, match="'c' is not an assigned layer"):
        WorkAssignment({"a": 0}, {"a": 1.0}, 1).owner("c")


# ---------------------------------------------------------------------- set-up errors
def test_data_parallel_rejects_a_bad_share_mode():
    allowed = r"share must be one of \('inverse', 'gradient'\), got 'all'"
    with pytest.raises(ValueError, match=allowed):
        DataParallel("all")


def test_data_parallel_needs_an_initialised_group():
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="torch.distributed is not initialised"):
        natgrad.KFAC(make_model(), distributed=DataParallel())


def test_world_from_env(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    assert world_from_env() == (0, 1, 0)
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert world_from_env() == (3, 4, 1)
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(ValueError, match="need 0 <= RANK < WORLD_SIZE, got RANK=4, WORLD_SIZE=4"):
        world_from_env()
    monkeypatch.setenv("RANK", "x")
    with pytest.raises(ValueError, match="environment variable RANK must be an integer, got 'x'"):
        world_from_env()

"""``torch.distributed`` (gloo, 2 processes on CPU): ``N`` ranks with ``B/N`` examples each
take the step of one process with the whole batch ``B`` — with ``distributed=True``, with the
``DistributedDataParallel`` wrapper, and with DDP told to ignore the captured layers.

The reference is the same optimizer in one process on the whole batch (float64; tolerances
1e-10 relative: the ranks reduce sums in a different order). Fisher types whose labels are
sampled (MC) are left out: each rank draws its own examples' labels, so the runs differ by
construction; empirical and exact Fishers are deterministic.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from curvlinalg_torch import FOOF, KFAC, KLDWRM, NaturalGradient, ddp_ignore_captured
from torch import nn

from tests.adapters.test_torch_foof import batches

WORLD = 2
BATCH = 8


def net() -> nn.Module:
    """Conv2d → ReLU → Flatten → LayerNorm → Linear: the LayerNorm's parameters are the
    "other" group (momentum SGD on gradients averaged over the ranks)."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.LayerNorm(48),
        nn.Linear(48, 4),
    ).to(torch.float64)


F64 = {"factor_dtype": torch.float64}
CASES = {
    "foof": lambda m, **kw: FOOF(
        m, lr=0.4, damping=0.3, momentum=0.9, weight_decay=1e-2, **F64, **kw
    ),
    "kfac-factored": lambda m, **kw: KFAC(
        m, lr=0.3, damping=0.05, momentum=0.9, fisher="empirical", inverse_every=2, **F64, **kw
    ),
    "kfac-exact": lambda m, **kw: KFAC(
        m, lr=0.3, damping=0.05, fisher="empirical", damping_rule="exact", **F64, **kw
    ),
    "ng-empirical-same": lambda m, **kw: NaturalGradient(
        m, lr=0.2, damping=0.1, fisher="empirical", momentum=0.5, **kw
    ),
    "ng-exact-independent-layerwise": lambda m, **kw: NaturalGradient(
        m,
        lr=0.2,
        damping=0.1,
        fisher="exact",
        structure="layerwise",
        fisher_batch="independent",
        refresh_every=2,
        **kw,
    ),
    "kldwrm-so": lambda m, **kw: KLDWRM(m, lr=0.5, variant="so", fisher="empirical", **F64, **kw),
    "kldwrm-q": lambda m, **kw: KLDWRM(m, lr=0.5, variant="q", fisher="empirical", **F64, **kw),
}
# (case, how the model is wrapped): None = distributed=True on the bare module.
RUNS = [(name, None) for name in CASES] + [
    ("foof", "ddp"),
    ("kfac-factored", "ddp-ignore"),
    ("ng-empirical-same", "ddp-ignore"),
]


def final_parameters(
    name: str, wrap: str | None, rank: int, world: int
) -> tuple[list[torch.Tensor], int]:
    model = net()
    if wrap == "ddp-ignore":
        ddp_ignore_captured(model)
    forward = nn.parallel.DistributedDataParallel(model) if wrap else model
    if wrap:
        optimizer = CASES[name](forward)
    else:
        optimizer = CASES[name](model, distributed=world > 1)
    share = BATCH // world
    refreshes = 0
    original = optimizer._refresh

    def counted(*args):
        nonlocal refreshes
        refreshes += 1
        return original(*args)

    optimizer._refresh = counted
    for x, y in batches(4, batch=BATCH):
        optimizer.zero_grad()
        rows = slice(rank * share, (rank + 1) * share)
        F.cross_entropy(forward(x[rows]), y[rows]).backward()
        optimizer.step()
    return [p.detach().clone() for p in model.parameters()], refreshes


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        results = {
            f"{name}/{wrap}": final_parameters(name, wrap, rank, world) for name, wrap in RUNS
        }
        # EK-FAC on its own MLP (tests/adapters/test_torch_ekfac.py), in this same spawn.
        from tests.adapters.test_torch_ekfac import distributed_run as ekfac_run

        results["ekfac-mlp"] = ekfac_run(rank, world)
        # Unequal batches cannot be gathered: every rank raises (no deadlock).
        model = net()
        optimizer = NaturalGradient(
            model, lr=0.1, damping=0.1, fisher="empirical", distributed=True
        )
        x, y = batches(1, batch=BATCH)[0]
        F.cross_entropy(model(x[: 3 + rank]), y[: 3 + rank]).backward()
        try:
            optimizer.step()
            results["unequal"] = "stepped"
        except ValueError as error:
            results["unequal"] = str(error)
        torch.save(results, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory):
    import torch.multiprocessing as mp

    tmp_path = tmp_path_factory.mktemp("distributed")
    mp.spawn(_worker, args=(WORLD, str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    return [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(WORLD)]


@pytest.mark.parametrize(("name", "wrap"), RUNS, ids=[f"{n}-{w or 'plain'}" for n, w in RUNS])
def test_two_ranks_with_half_batches_equal_one_process(rank_results, name, wrap):
    expected, refreshes = final_parameters(name, None, 0, 1)
    for rank, results in enumerate(rank_results):
        got, rank_refreshes = results[f"{name}/{wrap}"]
        for p, q in zip(got, expected):
            torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12, msg=f"{name} rank {rank}")
        if not name.startswith("ng"):
            # The inversions are spread: each of the two layers is inverted on one rank.
            assert rank_refreshes * WORLD == refreshes, (rank, rank_refreshes, refreshes)


def test_ekfac_two_ranks_with_half_batches_equal_one_process(rank_results):
    from tests.adapters.test_torch_ekfac import distributed_run as ekfac_run

    expected = ekfac_run(0, 1)  # parameters, then each layer's correction S
    for rank, results in enumerate(rank_results):
        for p, q in zip(results["ekfac-mlp"], expected):
            torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12, msg=f"ekfac rank {rank}")


def test_unequal_batches_raise_on_every_rank(rank_results):
    for results in rank_results:
        assert "same batch size on every rank" in results["unequal"]


def test_configuration_errors():
    with pytest.raises(ValueError, match="process group"):
        FOOF(net(), lr=0.1, damping=1.0, distributed=True)
    with pytest.raises(ValueError, match="does not support distributed"):
        KLDWRM(net(), lr=0.1, variant="qe", distributed=True)
    with pytest.raises(TypeError, match="before wrapping"):
        ddp_ignore_captured(
            nn.parallel.DistributedDataParallel.__new__(nn.parallel.DistributedDataParallel)
        )

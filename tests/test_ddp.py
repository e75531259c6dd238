"""DDP on CPU (gloo, 2 processes): every rank ends with the same masks, equal to a single-process run on the
full global batch.

Why the single-process comparison is exact enough: DDP averages the two half-batch mean gradients, which equals
the full-batch mean gradient up to float summation order (~1e-7 relative). Scores are 4x1 block means of
|W·G| accumulated with momentum; the test first checks, on the single-process run, that at every event the
k-th and (k+1)-th lowest scores are separated by far more than that (relative gap > 1e-4), so no rounding
difference can flip a choice, and only then compares masks.
"""
from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import prunekit
from conftest import MLP, batch, masks_of

CFG = {"pruning_type": "snip_momentum", "pattern": "4x1", "target_sparsity": 0.75, "start_step": 2,
       "end_step": 8, "pruning_frequency": 2}
STEPS = 10
GLOBAL_BATCH = 16
WORLD = 2


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _step(model, opt, step, rank=0, world=1):
    x, y = batch(step, size=GLOBAL_BATCH)
    share = GLOBAL_BATCH // world
    x, y = x[rank * share:(rank + 1) * share], y[rank * share:(rank + 1) * share]
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


VARIANTS = ("wrap_then_prepare", "prepare_then_wrap")


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    """Both variants in one process group (spawning costs more than the training itself)."""
    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        for variant in VARIANTS:
            _train(rank, world, out_dir, variant)
        _unsynced(rank, out_dir)
        # a broadcast's source can finish before its receivers: tearing the group down then closes sockets a
        # receiver still reads, and gloo aborts that process at exit
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _train(rank: int, world: int, out_dir: str, variant: str) -> None:
    prepare_first = variant == "prepare_then_wrap"
    model = MLP(seed=0)
    if prepare_first:  # masks registered before wrapping: DDP then also syncs the (bool) mask buffers
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        pruning = prunekit.prepare_pruning(model, CFG, opt)
        ddp = nn.parallel.DistributedDataParallel(model)
    else:
        ddp = nn.parallel.DistributedDataParallel(model)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
        pruning = prunekit.prepare_pruning(ddp, CFG, opt)
    for step in range(STEPS):
        _step(ddp, opt, step, rank, world)
    masks = {n.removeprefix("module."): m for n, m in masks_of(pruning).items()}
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    torch.save({"masks": masks, "params": params, "step": pruning.global_step,
                "history": [(e.step, e.sparsity) for e in pruning.pruners[0].history]},
               os.path.join(out_dir, f"{variant}_rank{rank}.pt"))


def _unsynced(rank: int, out_dir: str) -> None:
    """No DDP: each rank's weights differ, so only prunekit's broadcast can make the masks agree (rank 0's)."""
    model = MLP(seed=rank)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    pruning = prunekit.prepare_pruning(model, {"pruning_type": "magnitude", "target_sparsity": 0.5}, opt)
    _step(model, opt, 0, rank, WORLD)
    dead = {n: bool((model.get_submodule(n).weight[~m] == 0).all()) for n, m in masks_of(pruning).items()}
    torch.save({"masks": masks_of(pruning), "dead_are_zero": dead}, os.path.join(out_dir, f"unsynced_rank{rank}.pt"))


def single_process_run():
    """The reference on the full global batch, with the scores each event ranked."""
    model = MLP(seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    pruning = prunekit.prepare_pruning(model, CFG, opt)
    ranked = {}

    def keep_scores(o, a, k):  # after prunekit's pre-hook: the scores an event at the next step will rank
        ranked[pruning.global_step + 1] = torch.cat([s.reshape(-1).clone() for s in
                                                     pruning.pruners[0].criterion.scores.values()])
    opt.register_step_pre_hook(keep_scores)
    for step in range(STEPS):
        _step(model, opt, step)
    return pruning, masks_of(pruning), ranked


def min_relative_gap(pruning, ranked) -> float:
    pruner = pruning.pruners[0]
    total = sum(l.num_units for l in pruner.layers)
    gaps = []
    for i, event_step in enumerate(pruner.schedule.event_steps()):
        k = round(pruner.schedule.target_at(i) * total)
        if 0 < k < total:
            s = ranked[event_step].sort().values
            gaps.append(float((s[k] - s[k - 1]) / s[k]))
    return min(gaps)


def test_ddp_ranks_agree_and_match_single_process(tmp_path):
    """Two variants: prepare_pruning on the DDP wrapper (names ``module.*``), and on the bare model before
    wrapping (DDP then also broadcasts the mask buffers)."""
    reference, ref_masks, ranked = single_process_run()
    assert min_relative_gap(reference, ranked) > 1e-4, "the setting is not well separated; change the seed"
    assert reference.current_sparsity() == pytest.approx(0.75, abs=0.005)
    mp.spawn(_worker, args=(WORLD, _free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    for variant in VARIANTS:
        results = [torch.load(tmp_path / f"{variant}_rank{r}.pt") for r in range(WORLD)]
        for rank, res in enumerate(results):
            where = f"{variant}, rank {rank}"
            assert res["step"] == STEPS, where
            assert [s for s, _ in res["history"]] == [2, 4, 6, 8], where
            assert res["masks"].keys() == ref_masks.keys() == {"fc1", "fc2", "fc3"}, where
            for name, mask in ref_masks.items():
                assert torch.equal(res["masks"][name], mask), f"{where}: {name} differs from single-process"
        for name in ref_masks:
            assert torch.equal(results[0]["masks"][name], results[1]["masks"][name]), (variant, name)
        for name, p in results[0]["params"].items():
            assert torch.equal(p, results[1]["params"][name]), f"{variant}: ranks disagree on {name}"
    unsynced = [torch.load(tmp_path / f"unsynced_rank{r}.pt") for r in range(WORLD)]
    own = prunekit.Pruning(MLP(seed=0), {"pruning_type": "magnitude", "target_sparsity": 0.5})
    own.on_train_begin()
    for name, mask in masks_of(own).items():  # rank 0's own choice is what every rank holds
        assert torch.equal(unsynced[0]["masks"][name], mask) and torch.equal(unsynced[1]["masks"][name], mask)
        assert unsynced[1]["dead_are_zero"][name], "rank 1 must zero the weights under rank 0's masks"

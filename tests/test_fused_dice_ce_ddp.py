"""Batch Dice under DDP: two CPU processes (gloo), each with half of a batch.

Each rank's fused loss with ddp=True must equal nnU-Net's DC_and_CE_loss with ddp=True
(AllGatherGrad) on the same rank, value and gradient. And against one process on the whole
batch: the Dice part is the same value on every rank; the mean of the ranks' losses is the
single-process loss; each rank's gradient divided by the world size (what DDP's gradient
averaging does) is the single-process gradient of that rank's half.
"""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2
SHAPE = (2 * WORLD, 4, 7, 9, 11)  # the whole batch; each rank gets 2 samples
# (batch_dice, weight_ce, ignore_label); the single-process comparison needs equal voxel counts
CASES = [(True, 1.0, None), (True, 0.0, None), (True, 1.0, 4), (False, 1.0, None)]


def backends():
    return ["torch", "triton"] if os.environ.get("TRITON_INTERPRET") == "1" else ["torch"]


def whole_batch():
    g = torch.Generator().manual_seed(2024)
    logits = torch.randn(SHAPE, generator=g) * 3
    target = torch.randint(0, SHAPE[1], (SHAPE[0], 1, *SHAPE[2:]), generator=g).float()
    ignored = target.clone()
    ignored[torch.rand(target.shape, generator=g) < 0.2] = 4
    return logits, target, ignored


def loss_and_grad(logits, target, ddp, backend, batch_dice, weight_ce, ignore_label):
    from nnunet_heart_ext.kernels.fused_dice_ce import fused_dice_ce

    x = logits.clone().requires_grad_()
    value = fused_dice_ce(x, target, batch_dice=batch_dice, do_bg=False, weight_ce=weight_ce,
                          ignore_label=ignore_label, ddp=ddp, backend=backend)
    value.backward()
    return value.detach().double(), x.grad.double()


def nnunet_loss_and_grad(logits, target, batch_dice, weight_ce, ignore_label):
    from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
    from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss

    loss = DC_and_CE_loss({"batch_dice": batch_dice, "smooth": 1e-5, "do_bg": False, "ddp": True}, {},
                          weight_ce=weight_ce, ignore_label=ignore_label, dice_class=MemoryEfficientSoftDiceLoss)
    x = logits.double().requires_grad_()
    value = loss(x, target.double())
    value.backward()
    return value.detach(), x.grad


def worker(rank, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    logits, target, ignored = whole_batch()
    part = slice(2 * rank, 2 * rank + 2)
    results = {}
    for backend in backends():
        for case in CASES:
            labels = (ignored if case[2] is not None else target)[part]
            results[(backend, case)] = loss_and_grad(logits[part], labels, True, backend, *case)
    for case in CASES:
        labels = (ignored if case[2] is not None else target)[part]
        results[("nnunet", case)] = nnunet_loss_and_grad(logits[part], labels, *case)
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    mp.spawn(worker, args=(str(out / "init"), str(out)), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"batch_dice={c[0]}-ce={c[1]}-ignore={c[2]}")
def test_each_rank_matches_nnunet_ddp(rank_results, backend, case):
    for rank, results in enumerate(rank_results):
        value, grad = results[(backend, case)]
        ref_value, ref_grad = results[("nnunet", case)]
        assert rel(value, ref_value) <= 1e-5, f"rank {rank}"
        assert rel(grad, ref_grad) <= 1e-4, f"rank {rank}"


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("case", [c for c in CASES if c[0] and c[2] is None],
                         ids=lambda c: f"ce={c[1]}")
def test_ranks_equal_one_process_on_the_whole_batch(rank_results, backend, case):
    logits, target, _ = whole_batch()
    value, grad = loss_and_grad(logits, target, False, backend, *case)
    values = torch.stack([r[(backend, case)][0] for r in rank_results])
    if case[1] == 0:  # batch Dice alone: the same global value on every rank
        assert all(rel(v, value) <= 1e-6 for v in values)
    assert rel(values.mean(), value) <= 1e-6
    for rank, results in enumerate(rank_results):
        rank_grad = results[(backend, case)][1]
        assert rel(rank_grad / WORLD, grad[2 * rank:2 * rank + 2]) <= 1e-5, f"rank {rank}"

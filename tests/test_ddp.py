"""GSoP-Net2 under DistributedDataParallel: 2 gloo processes on CPU.

timm's train.py cannot run DDP on CPU (it passes ``device_ids``), so the processes are spawned here.
DDP runs without ``find_unused_parameters``: a parameter that gets no gradient would make the
second step fail ("Expected to have finished reduction in the prior iteration ...").
"""
import os
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD_SIZE = 2
STEPS = 3
TIMEOUT_S = 240


def _worker(rank: int, store_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)  # two processes on a shared machine
    dist.init_process_group('gloo', init_method=f'file://{store_file}', rank=rank, world_size=WORLD_SIZE)
    try:
        import timm
        import timm_gsop  # noqa: F401

        torch.manual_seed(0)  # same initial weights on both ranks (DDP also broadcasts rank 0's)
        # GSoP-Net2 with one bottleneck per stage: the same block types, heads and fusion as the
        # full model (GSoP in stages 1-3, iSQRT-COV pool), small enough for a quick CPU test.
        model = timm.create_model(
            'gsop2_resnet50', layers=(1, 1, 1, 1), attn_mode='fusion_concat', num_classes=5)
        init = torch.cat([p.detach().flatten() for p in model.parameters()]).clone()
        ddp = torch.nn.parallel.DistributedDataParallel(model)  # find_unused_parameters=False
        opt = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
        gen = torch.Generator().manual_seed(100 + rank)  # different data per rank
        unused = set()
        for _ in range(STEPS):
            x = torch.randn(2, 3, 64, 64, generator=gen)
            y = torch.randint(0, 5, (2,), generator=gen)
            loss = torch.nn.functional.cross_entropy(ddp(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            unused |= {n for n, p in model.named_parameters() if p.grad is None}
            opt.step()
        flat = torch.cat([p.detach().flatten() for p in model.parameters()])
        torch.save(dict(params=flat, init=init, unused=sorted(unused), loss=loss.item()),
                   os.path.join(out_dir, f'rank{rank}.pt'))
    finally:
        dist.destroy_process_group()


def test_gsop_net2_fusion_concat_ddp_two_ranks(tmp_path):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip('torch.distributed with gloo is not available')
    # join() raises (ProcessRaisedException) if a rank fails, e.g. DDP's unused-parameter error.
    ctx = mp.spawn(_worker, args=(str(tmp_path / 'store'), str(tmp_path)), nprocs=WORLD_SIZE, join=False)
    deadline = time.monotonic() + TIMEOUT_S
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:  # a hung collective must not hang the suite
            for p in ctx.processes:
                p.kill()
            pytest.fail(f'DDP processes did not finish within {TIMEOUT_S} s')

    results = [torch.load(tmp_path / f'rank{r}.pt') for r in range(WORLD_SIZE)]
    for r, res in enumerate(results):
        assert res['unused'] == [], f'rank {r}: parameters without gradient: {res["unused"][:5]}'
        assert torch.isfinite(res['params']).all() and res['loss'] == res['loss']
    # The steps did something, and the averaged gradients kept the ranks identical although
    # each rank saw different data.
    assert not torch.equal(results[0]['params'], results[0]['init'])
    assert torch.equal(results[0]['params'], results[1]['params'])

"""Data-parallel training with synchronised compound batch norm: two processes on the CPU
(gloo), DistributedDataParallel, the dual-path loss.

    python examples/distributed_training.py            # 2 processes, 5 steps

On GPUs, use the "nccl" backend and one process per device (e.g. with torchrun); nothing
else changes.
"""

import argparse
import os
import sys
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import cbn_ext  # noqa: E402


def make_model():
    torch.manual_seed(0)  # the same initial weights in every process
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4))
    model = cbn_ext.convert_batchnorm(model, num_components=2)           # BN -> CBN
    return cbn_ext.SyncCompoundBatchNorm.convert_sync_batchnorm(model)  # statistics over all ranks


def train(rank, world, init_file, steps):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    torch.set_num_threads(1)
    model = nn.parallel.DistributedDataParallel(make_model())
    class_to_group = cbn_ext.class_groups([400, 200, 40, 10], num_groups=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    gen = torch.Generator().manual_seed(rank)
    for step in range(steps):
        x = torch.randn(8 + 2 * rank, 3, 12, 12, generator=gen)     # unequal batch sizes
        y = torch.randint(0, 4, (x.shape[0],), generator=gen)
        out = cbn_ext.dual_path_loss(model, x, y, class_to_group)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        if rank == 0:
            print(f"step {step}: loss {out.loss.item():.4f} (main {out.main.item():.4f}, "
                  f"aux {out.auxiliary.item():.4f}, consistency {out.consistency.item():.4f})",
                  flush=True)
    if rank == 0:
        bn = model.module[1]
        print(f"running prior of the first layer: {bn.running_prior.tolist()}, "
              f"batches tracked: {bn.num_batches_tracked.item()}")
    del model, opt
    dist.barrier()
    dist.destroy_process_group()
    # The work is done. Skip the interpreter's teardown, where gloo's threads sometimes
    # abort the process ("terminate called without an active exception"; seen with plain
    # DDP too, about 1 run in 15 with torch 2.14.1; see pytorch/pytorch#179291).
    sys.stdout.flush()
    os._exit(0)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(train, args=(args.world, os.path.join(tmp, "init"), args.steps),
                 nprocs=args.world, join=True)


if __name__ == "__main__":
    main()

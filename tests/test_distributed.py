"""SyncCompoundBatchNorm over 2 processes (gloo, CPU) against one process on the
concatenated batch: outputs, input gradients, parameter gradients (summed over the
processes) and running statistics, to 1e-5 in float32, over two steps (the first one
initialises the mixture) -- with equal and unequal batch sizes, an empty batch on one
rank, the split path, and DistributedDataParallel."""

import os
import tempfile
from contextlib import nullcontext

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import cbn_ext
from conftest import make_case, rel_err

WORLD = 2
CASES = [
    dict(name="equal", sizes=(4, 4), K=2, layout=False, split=False, ddp=False),
    dict(name="unequal", sizes=(5, 3), K=3, layout=True, split=False, ddp=False),
    dict(name="k1", sizes=(3, 6), K=1, layout=False, split=False, ddp=False),
    dict(name="empty-rank", sizes=(6, 0), K=2, layout=True, split=False, ddp=False),
    dict(name="split", sizes=(4, 5), K=2, layout=False, split=True, ddp=False),
    dict(name="ddp", sizes=(3, 5), K=2, layout=True, split=False, ddp=True),
]
STEPS = 2
C = 6


def make_layer(case):
    torch.manual_seed(7)
    layer = cbn_ext.CompoundBatchNorm2d(C, case["K"])
    with torch.no_grad():
        layer.weight.normal_(1, 0.2)
        layer.bias.normal_(0, 0.2)
    return layer


def batches(case):
    """The concatenated batch of each step (the same in every process)."""
    total = sum(case["sizes"])
    out = []
    for step in range(STEPS):
        c = make_case((total, C, 5, 4), case["K"], torch.float32, channels_last=case["layout"],
                      seed=100 * step + case["K"], groups=case["split"])
        out.append((c.x, c.grad, c.groups))
    return out


def _worker(rank, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=WORLD)
    torch.set_num_threads(1)
    results = {}
    for case in CASES:
        layer = cbn_ext.SyncCompoundBatchNorm.convert_sync_batchnorm(make_layer(case))
        model = nn.parallel.DistributedDataParallel(layer) if case["ddp"] else layer
        lo = sum(case["sizes"][:rank])
        hi = lo + case["sizes"][rank]
        steps = []
        for x, g, groups in batches(case):
            xl = x[lo:hi].clone().requires_grad_()
            ctx = cbn_ext.split_by(layer, groups[lo:hi]) if case["split"] else nullcontext()
            with ctx:
                y = model(xl)
            y.backward(g[lo:hi])
            gw, gb = layer.weight.grad.clone(), layer.bias.grad.clone()
            if case["ddp"]:  # DDP averaged the processes' gradients
                gw, gb = gw * WORLD, gb * WORLD
            else:
                dist.all_reduce(gw)
                dist.all_reduce(gb)
            layer.weight.grad = layer.bias.grad = None
            steps.append(dict(y=y.detach(), dx=xl.grad, gw=gw, gb=gb,
                              buffers={k: v.clone() for k, v in layer.named_buffers()}))
        results[case["name"]] = steps
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)  # skip the teardown where gloo's threads sometimes abort (see the example)


@pytest.fixture(scope="module")
def distributed_results():
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "init")
        mp.spawn(_worker, args=(init_file, tmp), nprocs=WORLD, join=True)
        yield [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(WORLD)]


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_sync_equals_one_process_on_the_concatenation(case, distributed_results):
    layer = make_layer(case)
    for step, (x, g, groups) in enumerate(batches(case)):
        xs = x.clone().requires_grad_()
        ctx = cbn_ext.split_by(layer, groups) if case["split"] else nullcontext()
        with ctx:
            y = layer(xs)
        y.backward(g)
        got = [r[case["name"]][step] for r in distributed_results]
        assert rel_err(torch.cat([s["y"] for s in got]), y) <= 1e-5, step
        assert rel_err(torch.cat([s["dx"] for s in got]), xs.grad) <= 1e-5, step
        for s in got:
            assert rel_err(s["gw"], layer.weight.grad) <= 1e-5, step
            assert rel_err(s["gb"], layer.bias.grad) <= 1e-5, step
            for name, buf in layer.named_buffers():
                if name == "num_batches_tracked":
                    assert s["buffers"][name].item() == buf.item() == step + 1
                else:
                    assert rel_err(s["buffers"][name], buf) <= 1e-5, (step, name)
        layer.weight.grad = layer.bias.grad = None


def test_sync_layer_without_process_group_is_the_plain_layer():
    layer = make_layer(CASES[0])
    sync = cbn_ext.SyncCompoundBatchNorm.convert_sync_batchnorm(make_layer(CASES[0]))
    assert isinstance(sync, cbn_ext.SyncCompoundBatchNorm)
    x = torch.randn(4, C, 3, 3)
    assert torch.equal(sync(x), layer(x))
    for (name, a), (_, b) in zip(sync.named_buffers(), layer.named_buffers()):
        assert torch.equal(a, b), name
    with pytest.raises(ValueError, match="at least 2D"):
        sync(torch.randn(C))


def test_convert_sync_batchnorm_keeps_state():
    model = nn.Sequential(nn.Conv2d(3, C, 1), make_layer(CASES[1]))
    model[1].bias.requires_grad_(False)
    model.eval()
    converted = cbn_ext.SyncCompoundBatchNorm.convert_sync_batchnorm(model)
    layer = converted[1]
    assert isinstance(layer, cbn_ext.SyncCompoundBatchNorm) and not layer.training
    assert layer.num_components == 3 and not layer.bias.requires_grad
    assert torch.equal(layer.weight, make_layer(CASES[1]).weight)


def test_distributed_example_runs():
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, os.path.join(root, "examples", "distributed_training.py"),
                          "--steps", "2"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "step 1: loss" in out.stdout and "batches tracked: 4" in out.stdout

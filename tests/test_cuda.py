"""CUDA-specific checks (skipped without a GPU and a build with CUDA kernels), and the
reduced-precision bar, which the CPU kernels must meet too.

The full accuracy grid of test_kernels.py runs on CUDA as well (its `device` parameter)."""

import pytest
import torch

import cbn_ext
from conftest import Fc, R, TOL, compare, device_params, make_case, make_stable_case, rel_err, run

HAS_CUDA = torch.cuda.is_available() and cbn_ext.build_info()["cuda"]
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device and a build with CUDA kernels")


@pytest.mark.parametrize("device", device_params(emu=True))
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("mode", ["train", "eval", "split-train"])
@pytest.mark.parametrize("K", [1, 2, 4])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_error_at_most_twice_the_reference(dtype, K, mode, layout, device):
    """A reduced-precision kernel may err at most about twice as much as the pure-PyTorch
    reference run in the same dtype, both against float64."""
    if mode.startswith("split") and K == 1:
        pytest.skip("K = 1 has a single group")
    training = mode != "eval"
    case = make_stable_case((8, 32, 12, 12), K, dtype, channels_last=(layout == "channels_last"),
                            seed=K, device=device, groups=mode.startswith("split"))
    ours = run(Fc.compound_batch_norm, case, training)
    same = run(R.compound_batch_norm, case, training)  # the reference in the input dtype
    exact = run(R.compound_batch_norm, case, training, dtype=torch.float64)
    for name in ("y", "dx"):
        e_ours = rel_err(getattr(ours, name), getattr(exact, name))
        e_same = rel_err(getattr(same, name), getattr(exact, name))
        assert e_ours <= 2.0 * e_same + 1e-6, (name, e_ours, e_same)


@needs_cuda
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("mode", ["train", "eval", "split-train", "split-eval"])
@pytest.mark.parametrize("K", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_cpu_and_cuda_agree(dtype, K, mode, layout):
    if mode.startswith("split") and K == 1:
        pytest.skip("K = 1 has a single group")
    training = mode.endswith("train")
    shape = (6, 40, 9, 11)
    case = make_stable_case(shape, K, dtype, channels_last=(layout == "channels_last"), seed=K,
                            groups=mode.startswith("split"))
    cpu = run(Fc.compound_batch_norm, case, training)
    gpu_case = make_stable_case(shape, K, dtype, channels_last=(layout == "channels_last"),
                                seed=K, device="cuda", groups=mode.startswith("split"))
    gpu = run(Fc.compound_batch_norm, gpu_case, training)
    compare(gpu, cpu, 2 * TOL[dtype])


@needs_cuda
def test_cuda_deterministic():
    case = make_case((16, 64, 14, 14), 4, torch.float32, channels_last=True, seed=3, device="cuda")
    a = run(Fc.compound_batch_norm, case, True)
    b = run(Fc.compound_batch_norm, case, True)
    for name in ("y", "dx", "dw", "db", "running_mean", "running_var", "running_prior"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


@needs_cuda
def test_cuda_device_mismatch():
    x = torch.randn(4, 3, 2, 2, device="cuda")
    with pytest.raises(RuntimeError, match="expected weight on cuda"):
        cbn_ext.compound_batch_norm(x, torch.zeros(2, 3, device="cuda"),
                                    torch.ones(2, 3, device="cuda"),
                                    torch.full((2,), 0.5, device="cuda"), weight=torch.ones(2, 3))


@needs_cuda
@pytest.mark.slow
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_more_than_2_31_elements(layout):
    """64-bit indexing: a batch made of copies of a small one has the small batch's
    statistics, so its output repeats the small batch's output."""
    K = 2
    small = make_case((2, 16, 256, 257), K, torch.bfloat16, channels_last=(layout == "channels_last"),
                      seed=1, device="cuda")
    reps = (2 ** 31) // small.x.numel() + 1
    big_x = small.x.repeat(reps, 1, 1, 1)
    if layout == "channels_last":
        big_x = big_x.contiguous(memory_format=torch.channels_last)
    assert big_x.numel() > 2 ** 31
    args = (small.running_mean, small.running_var, small.running_prior, small.weight, small.bias)
    with torch.no_grad():
        y_small = Fc.compound_batch_norm(small.x, *[a.clone() for a in args], training=True)
        y_big = Fc.compound_batch_norm(big_x, *[a.clone() for a in args], training=True)
        n = small.x.shape[0]
        assert rel_err(y_big[-n:], y_small) <= 1e-2
        assert rel_err(y_big[:n], y_small) <= 1e-2
        ys_eval = Fc.compound_batch_norm(small.x, *args)
        yb_eval = Fc.compound_batch_norm(big_x, *args)
        assert torch.equal(yb_eval[-n:], ys_eval)
    del big_x, y_big, yb_eval
    torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------
# A GPU-friendly training step: no host synchronisation, and capturable in a CUDA graph.
# ---------------------------------------------------------------------------------------

def _converted_resnet(K, seed=0):
    from test_training import TinyResNet, randomize_bn
    torch.manual_seed(seed)
    model = TinyResNet(num_classes=4)
    randomize_bn(model)
    return cbn_ext.convert_batchnorm(model, num_components=K).cuda().train()


@needs_cuda
@pytest.mark.parametrize("path", ["soft", "split", "dual"])
@pytest.mark.parametrize("K", [1, 2])
def test_training_step_without_sync(K, path):
    """A steady-state training step (forward, backward, optimizer) of a converted ResNet
    never synchronises with the host: torch.cuda.set_sync_debug_mode("error") raises at
    any synchronising call. The first steps (the mixture's initialisation) are warm-up."""
    if path != "soft" and K == 1:
        pytest.skip("the split and dual paths need K > 1")
    model = _converted_resnet(K)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    class_to_group = cbn_ext.class_groups(torch.tensor([50, 30, 10, 5]), K)
    x = torch.randn(16, 3, 16, 16, device="cuda")
    y = torch.randint(0, 4, (16,), device="cuda")
    groups = class_to_group.cuda()[y]

    def step():
        if path == "dual":
            loss = cbn_ext.dual_path_loss(model, x, y, class_to_group).loss
        elif path == "split":
            with cbn_ext.split_by(model, groups):
                loss = torch.nn.functional.cross_entropy(model(x), y)
        else:
            loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(2):
            step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    assert all(torch.isfinite(p).all() for p in model.parameters())


@needs_cuda
@pytest.mark.parametrize("K", [1, 2])
def test_training_step_in_a_cuda_graph(K):
    """The same step captured in a CUDA graph and replayed gives what eager mode gives:
    parameters and running statistics after three steps on the same batches."""
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    eager, graphed = _converted_resnet(K), _converted_resnet(K)
    opt_e = torch.optim.SGD(eager.parameters(), lr=0.01, momentum=0.9)
    opt_g = torch.optim.SGD(graphed.parameters(), lr=0.01, momentum=0.9)
    g = torch.Generator(device="cuda").manual_seed(0)
    batches = [(torch.randn(16, 3, 16, 16, device="cuda", generator=g),
                torch.randint(0, 4, (16,), device="cuda", generator=g)) for _ in range(6)]

    def step(model, opt, x, y):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=False)
        loss.backward()
        opt.step()

    # warm-up on a side stream, as torch.cuda.graphs' whole-network capture asks
    static_x, static_y = batches[0][0].clone(), batches[0][1].clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for x, y in batches[:3]:
            static_x.copy_(x)
            static_y.copy_(y)
            step(graphed, opt_g, static_x, static_y)
    torch.cuda.current_stream().wait_stream(side)
    for x, y in batches[:3]:
        step(eager, opt_e, x, y)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step(graphed, opt_g, static_x, static_y)
    for x, y in batches[3:]:
        static_x.copy_(x)
        static_y.copy_(y)
        graph.replay()
        step(eager, opt_e, x, y)
    torch.cuda.synchronize()
    for (name, pe), (_, pg) in zip(eager.named_parameters(), graphed.named_parameters()):
        assert rel_err(pg, pe) <= 1e-5, name
    for (name, be), (_, bg) in zip(eager.named_buffers(), graphed.named_buffers()):
        assert rel_err(bg.float(), be.float()) <= 1e-5, name

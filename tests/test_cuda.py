"""CUDA-specific checks (skipped without a GPU and a build with CUDA kernels), and the
reduced-precision bar, which the CPU kernels must meet too.

The full accuracy grid of test_kernels.py runs on CUDA as well (its `device` parameter)."""

import pytest
import torch

import cbn_ext
from conftest import Fc, R, TOL, compare, device_params, make_case, make_stable_case, rel_err, run

HAS_CUDA = torch.cuda.is_available() and cbn_ext.build_info()["cuda"]
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device and a build with CUDA kernels")


@pytest.mark.parametrize("device", device_params())
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

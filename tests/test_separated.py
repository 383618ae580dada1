"""Well-separated mixtures, the case CBN exists for: components tens to thousands of nats
apart, whose responsibilities at far positions are tiny (subnormal) or exactly zero. The
kernels must stay finite wherever the float64 reference is, and match it.

Constructions (unit running variances, equal priors unless said otherwise): a position at
x has log-likelihood ratio l_j - l_k = 1/2 (|x - mu_k|^2 - |x - mu_j|^2) / (1 + eps), so a
component at distance delta along a unit direction from a cluster is about delta^2 / 2
nats from it. Float32's subnormal range of exp starts near 87 nats, float64's near 708.
"""

import math

import pytest
import torch

from conftest import (Case, Fc, R, backend, compare_with_rule, device_params, rel_err, run,
                      torch_device)

DISTANCES = [10.0, 30.0, 95.0, 200.0, 720.0, 1e4]


def ops_of(device):
    return torch.ops.cbn_ext_emu if device == "emu" else torch.ops.cbn_ext


def _unit(C, g):
    u = torch.randn(C, generator=g, dtype=torch.float64)
    return u / u.norm()


def _to(case_tensors, dtype, device, layout):
    x, rm, rv, rp, w, b, gr, groups = case_tensors
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    dev = torch_device(device)
    x, gr = x.to(device=dev, dtype=dtype), gr.to(device=dev, dtype=dtype)
    if layout == "channels_last" and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
        gr = gr.contiguous(memory_format=torch.channels_last)
    return Case(x, rm.to(dev, acc), rv.to(dev, acc), rp.to(dev, acc), w.to(dev, acc),
                b.to(dev, acc), gr, None if groups is None else groups.to(dev), device)


def far_component_case(shape, K, distance, seed, far_from_all=True):
    """Samples around the first K - 1 components (or, far_from_all=False, the last
    component keeps the second half of the samples and is `distance` nats from the first
    half, so that only the tiles holding the first half see it as far)."""
    g = torch.Generator().manual_seed(seed)
    N, C = shape[0], shape[1]
    view = (N, C) + (1,) * (len(shape) - 2)
    delta = math.sqrt(2.0 * distance)
    near = max(K - 1, 1)
    centers = torch.randn(K, C, generator=g, dtype=torch.float64) * 0.3
    for k in range(1, near):  # the near components a few nats apart
        centers[k] = centers[0] + 3.0 * _unit(C, g)
    centers[K - 1] = centers[0] + delta * _unit(C, g)
    if far_from_all:
        assign = torch.randint(0, near, (N,), generator=g)
    else:
        assign = torch.randint(0, near, (N,), generator=g)
        assign[N // 2:] = K - 1
    x = centers[assign].view(view) + 0.3 * torch.randn(shape, generator=g, dtype=torch.float64) / math.sqrt(C)
    rm = centers.clone()
    rv = torch.ones(K, C, dtype=torch.float64)
    rp = torch.full((K,), 1.0 / K, dtype=torch.float64)
    w = 1.0 + 0.2 * torch.randn(K, C, generator=g, dtype=torch.float64)
    b = 0.2 * torch.randn(K, C, generator=g, dtype=torch.float64)
    gr = torch.randn(shape, generator=g, dtype=torch.float64)
    return x, rm, rv, rp, w, b, gr, None


def count_near_one_case(shape, target, seed):
    """K = 2: every sample near component 0 except two positions, placed between the
    components so that each holds a responsibility target / 2 for component 1, which is far
    from the rest: N_1 is about `target` (above or below the active threshold 1)."""
    g = torch.Generator().manual_seed(seed)
    N, C = shape[0], shape[1]
    assert len(shape) == 2
    u = _unit(C, g)
    delta = math.sqrt(2.0 * 400.0)  # 400 nats: the other positions hold tau_1 = 0 (float32)
    mu0 = torch.randn(C, generator=g, dtype=torch.float64) * 0.3
    mu1 = mu0 + delta * u
    x = mu0 + 0.3 * torch.randn(N, C, generator=g, dtype=torch.float64) / math.sqrt(C)
    # l_1 - l_0 at x = mu1 + t (mu0 - mu1) is 1/2 delta^2 (1 - 2 t) / (1 + eps)
    logit = math.log((target / 2) / (1 - target / 2))
    t = 0.5 * (1 - 2 * logit * (1 + 1e-5) / delta ** 2)
    x[:2] = mu1 + t * (mu0 - mu1)
    rm = torch.stack([mu0, mu1])
    rv = torch.ones(2, C, dtype=torch.float64)
    rp = torch.full((2,), 0.5, dtype=torch.float64)
    w = 1.0 + 0.2 * torch.randn(2, C, generator=g, dtype=torch.float64)
    b = 0.2 * torch.randn(2, C, generator=g, dtype=torch.float64)
    gr = torch.randn(N, C, generator=g, dtype=torch.float64)
    return x, rm, rv, rp, w, b, gr, None


def _check(case, dtype, training=True):
    """Finite wherever the float64 reference is, and within the SPEC's accuracy rule."""
    ours = run(Fc.compound_batch_norm, case, training)
    ref = run(R.compound_batch_norm, case, training, dtype=torch.float64)
    for name in ("y", "dx", "dw", "db"):
        a, b = getattr(ours, name), getattr(ref, name)
        assert torch.isfinite(b).all(), f"the float64 reference is not finite ({name})"
        assert torch.isfinite(a).all(), (
            f"{name}: {(~torch.isfinite(a)).sum().item()} of {a.numel()} values not finite")
    compare_with_rule(ours, case, training, dtype)
    return ours, ref


@pytest.mark.parametrize("device", device_params(emu=True))
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("K", [2, 4])
@pytest.mark.parametrize("distance", DISTANCES)
def test_component_far_from_everything(distance, K, dtype, layout, device):
    """The far component holds (almost) no responsibility anywhere: inactive, its running
    statistics kept; the others are normalized as usual."""
    shape = (16, 24, 6, 5)
    case = _to(far_component_case(shape, K, distance, seed=int(distance) + K), dtype, device,
               layout)
    ours, _ = _check(case, dtype)
    assert torch.equal(ours.running_mean[K - 1], case.running_mean[K - 1])
    assert torch.isfinite(ours.running_mean).all() and torch.isfinite(ours.running_var).all()
    assert ours.num_batches_tracked.item() == 4, "the batch was tracked"


@pytest.mark.parametrize("device", device_params(emu=True))
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("K", [2, 4])
@pytest.mark.parametrize("distance", DISTANCES)
def test_component_far_from_some_tiles(distance, K, dtype, layout, device):
    """Half the samples belong to the far component: it is active, yet every tile of the
    other half sees it at `distance` nats (the realistic failure: one tile's partial
    poisoned the whole component)."""
    shape = (32, 64, 4, 8)  # several tiles in both layouts, on the CPU and on the GPU
    case = _to(far_component_case(shape, K, distance, seed=int(distance) + 7 * K,
                                  far_from_all=False), dtype, device, layout)
    ours, ref = _check(case, dtype)
    assert not torch.equal(ours.running_mean[K - 1], case.running_mean[K - 1]), "updated"


@pytest.mark.parametrize("device", device_params(emu=True))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("target", [0.9, 1.1])
def test_count_just_below_and_above_one(target, dtype, device):
    case = _to(count_near_one_case((300, 40), target, seed=3), dtype, device, "contiguous")
    ours, ref = _check(case, dtype)
    count = torch.ops.cbn_ext.forward_train(
        case.x.double().cpu(), None, None, case.running_mean.double().cpu(),
        case.running_var.double().cpu(), case.running_prior.double().cpu(), None, None, 2,
        1e-5)[4]
    assert abs(count[1].item() - target) < 1e-3, count
    kept = torch.equal(ours.running_mean[1], case.running_mean[1])
    assert kept == (target < 1), "inactive below 1: running statistics kept"


@pytest.mark.parametrize("device", device_params(emu=True))
def test_float64_clusters_720_nats_apart(device):
    """The reported case: N = 512, C = 1024, half the rows near each component, which
    contribute about 720 nats to each other's log-likelihood: tau is subnormal in float64
    at every row of the other cluster."""
    g = torch.Generator().manual_seed(0)
    N, C = 512, 1024
    dev = torch_device(device)
    delta = math.sqrt(2.0 * 720.0)
    mu0 = torch.randn(C, generator=g, dtype=torch.float64) * 0.5
    mu1 = mu0 + delta * _unit(C, g)
    x = torch.randn(N, C, generator=g, dtype=torch.float64) * 0.05
    x[: N // 2] += mu0
    x[N // 2:] += mu1
    rm = torch.stack([mu0, mu1])
    case = Case(x.to(dev), rm.to(dev), torch.ones(2, C, dtype=torch.float64, device=dev),
                torch.full((2,), 0.5, dtype=torch.float64, device=dev),
                torch.ones(2, C, dtype=torch.float64, device=dev),
                torch.zeros(2, C, dtype=torch.float64, device=dev),
                torch.randn(N, C, generator=g, dtype=torch.float64).to(dev), None, device)
    with backend(device):
        tau = ops_of(device).forward_eval(case.x, None, None, case.running_mean,
                                          case.running_var, case.running_prior, None, 2, 1e-5)[1]
    tiny = tau[tau < 1e-300]
    assert tiny.numel() > 0 and (tiny > 0).any(), "the case has subnormal responsibilities"
    ours, ref = _check(case, torch.float64)
    assert rel_err(ours.y, ref.y) <= 1e-10

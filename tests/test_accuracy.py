"""Accuracy at many channels (SPEC "Accuracy"): sums over channels (the E-step's
log-likelihoods, dtau) and over positions are blocked, so the error of float32 does not
grow linearly with C. Each result is judged by the SPEC's rule: within the dtype's bound
of a float64 evaluation, or, where the pure-PyTorch reference in the same dtype misses it
too, within twice that reference's error."""

import pytest
import torch

from conftest import Fc, compare_with_rule, device_params, make_stable_case, run, seed_of_params

CHANNELS = [1, 33, 129, 256, 1024, 2048]


def _shape(C):
    # small N and spatial size keep the (M, K, C) reference cheap
    return (16, C, 4, 4) if C <= 256 else (4, C, 4, 4)


@pytest.mark.parametrize("device", device_params(emu=True))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("K", [1, 2, 4])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("C", CHANNELS)
def test_many_channels(C, layout, K, dtype, device):
    case = make_stable_case(_shape(C), K, dtype, channels_last=(layout == "channels_last"),
                            seed=seed_of_params(C, layout, K, str(dtype)), device=device)
    for training in (True, False):
        ours = run(Fc.compound_batch_norm, case, training)
        compare_with_rule(ours, case, training, dtype)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_reported_case_129_channels(layout):
    """The reported case: (16, 129, 4, 4), K = 4, float32, training forward and backward;
    the contiguous layout erred at 1.7e-5 in dx (every one of 30 seeds above 1e-5)."""
    for seed in range(5):
        case = make_stable_case((16, 129, 4, 4), 4, torch.float32,
                                channels_last=(layout == "channels_last"), seed=100 + seed)
        ours = run(Fc.compound_batch_norm, case, True)
        errs = compare_with_rule(ours, case, True, torch.float32)
        assert errs["dx"][0] <= 1e-5, errs["dx"]

"""Functional compound batch normalization, the counterpart of ``F.batch_norm``."""

from __future__ import annotations

from typing import Optional

from torch import Tensor

from . import ops
from .reference import num_components

__all__ = ["compound_batch_norm"]

_cuda_built: Optional[bool] = None


def _has_cuda_kernels() -> bool:
    global _cuda_built
    if _cuda_built is None:
        _cuda_built = bool(ops.build_info()["cuda"])
    return _cuda_built


def _check_cuda_build() -> None:
    if not _has_cuda_kernels():
        raise RuntimeError(
            "compound_batch_norm: got a CUDA tensor, but this build of cbn_ext has no CUDA "
            "kernels (cbn_ext.build_info() says which backends were compiled); rebuild with a "
            "CUDA build of torch and a CUDA toolkit, or FORCE_CUDA=1")


def _check_devices(input: Tensor, **tensors) -> None:
    for name, t in tensors.items():
        if t is not None and t.device != input.device:
            raise RuntimeError(
                f"compound_batch_norm: expected {name} on {input.device} (the input's device), "
                f"got {t.device}")
    if input.device.type == "cuda":
        _check_cuda_build()


def _forward_train(input, weight, bias, running_mean, running_var, running_prior,
                   num_batches_tracked, groups, K, eps, momentum, init):
    """forward_train, then (with running statistics) the running update. `init`: the
    num_batches_tracked the operator reads for the first-batch question (None: the caller
    knows the mixture is initialised)."""
    lib = ops._ops
    out, _tau, mean, var, count, mix_mean, mix_var, mix_prior = lib.forward_train.default(
        input, weight, bias, running_mean, running_var, running_prior, init, groups, K, eps)
    if running_mean is not None:
        positions = input.numel() // max(input.shape[1], 1)
        lib.update_running_stats.default(running_mean, running_var, running_prior,
                                         num_batches_tracked, mix_mean, mix_var, mix_prior,
                                         mean, var, count, positions, momentum)
    return out


def compound_batch_norm(
    input: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    running_prior: Optional[Tensor] = None,
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    training: bool = False,
    momentum: Optional[float] = 0.1,
    eps: float = 1e-5,
    num_batches_tracked: Optional[Tensor] = None,
    groups: Optional[Tensor] = None,
) -> Tensor:
    r"""Compound batch normalization (``../shared/SPEC.md``).

    Each position's C-vector is normalized by a mixture of K Gaussians:

    .. math::
        y[p, c] = \sum_k \tau[p, k] (\gamma_{kc} (x[p, c] - m_{kc}) / \sqrt{v_{kc} + \epsilon}
                  + \beta_{kc})

    where the responsibilities :math:`\tau` come from the E-step on the running mixture
    (softmax over k of :math:`\log \bar\pi_k - \tfrac12 \sum_c [\log(\bar\sigma^2_{kc} +
    \epsilon) + (x - \bar\mu_{kc})^2 / (\bar\sigma^2_{kc} + \epsilon)]`), or are given by
    ``groups`` (one-hot, the split path). In training, m and v are the responsibility-
    weighted batch mean and biased variance of each component (the running ones for a
    component holding at most one position), and the running buffers are updated in
    place like ``F.batch_norm``: ``running_mean``, ``running_var`` (unbiased) and
    ``running_prior`` by an exponential moving average with ``momentum``, or a
    cumulative average when ``momentum`` is None; ``num_batches_tracked`` increments. If
    an active batch statistic is not finite, no buffer changes. At the first training
    batch (``num_batches_tracked == 0``) with K > 1 and no ``groups``, the running mixture
    is first initialised from the batch. At evaluation, m and v are the running ones.

    Synchronisation: none with a GPU. Given ``num_batches_tracked`` (K > 1, no
    ``groups``), the first-batch question is answered on the device, which costs an extra
    pass over the batch on a GPU at every call (the layers remember the answer and skip
    it); group ids are checked on the device there (a device-side assert).

    Args:
        input: (N, C, *) float32, float64, float16 or bfloat16; contiguous or channels-last
            inputs are read in place, others are copied.
        running_mean, running_var: (K, C) in the accumulation dtype (float64 for float64
            input, else float32). May be None only for K = 1 in training (batch statistics,
            no update), like ``F.batch_norm``.
        running_prior: (K,), needed for K > 1 without ``groups``.
        weight, bias: (K, C) affine parameters, or None (gamma = 1, beta = 0).
        training: use and update batch statistics.
        momentum: the running-average factor, or None for a cumulative average (needs
            ``num_batches_tracked``).
        eps: added to the variances.
        num_batches_tracked: int64 scalar tensor, incremented in training; None skips the
            first-batch initialisation.
        groups: (N,) int64 in [0, K): the group of each sample (the split path).

    K is taken from ``running_mean``, ``weight`` or ``bias`` (1 when all are None).

    Returns:
        A tensor like ``input`` (same dtype and memory format).

    Raises:
        ValueError: training with at most one value per channel, wrong shapes, group ids
            outside [0, K), missing running statistics.
        TypeError: unsupported input dtype, or parameters not in the accumulation dtype.
        RuntimeError: tensors on different devices, or a CUDA tensor with a build without
            CUDA kernels.
    """
    K = num_components(running_mean, weight, bias)
    _check_devices(input, running_mean=running_mean, running_var=running_var,
                   running_prior=running_prior, weight=weight, bias=bias, groups=groups,
                   num_batches_tracked=num_batches_tracked)
    if (running_mean is None) != (running_var is None):
        raise ValueError("compound_batch_norm: give both running_mean and running_var, or neither")
    if not training and running_mean is None:
        raise ValueError("compound_batch_norm: running_mean and running_var are needed when not "
                         "training")
    if training and running_mean is not None and momentum is None and num_batches_tracked is None:
        raise ValueError("compound_batch_norm: momentum=None (a cumulative average) needs "
                         "num_batches_tracked")
    if training:
        return _forward_train(input, weight, bias, running_mean, running_var, running_prior,
                              num_batches_tracked, groups, K, eps, momentum,
                              num_batches_tracked)
    out, _tau = ops._ops.forward_eval(input, weight, bias, running_mean, running_var,
                                      running_prior, groups, K, eps)
    return out

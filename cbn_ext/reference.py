"""Pure-PyTorch Compound Batch Normalization: the ground truth of the tests.

This module implements ``../shared/SPEC.md`` with plain tensor operations, in the
accumulation dtype (float32, or float64 for float64 input), and lets autograd derive the
backward. It has the same call signature as :func:`cbn_ext.functional.compound_batch_norm`
and updates the running buffers in place in the same way. It is written for clarity, not
speed: it materialises (M, K, C) intermediates.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["compound_batch_norm", "initial_mixture", "accumulation_dtype", "num_components"]

MIN_PRIOR = 1e-6


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 input, float32 for every other floating dtype."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _positions(x: Tensor) -> Tensor:
    """(N, C, *S) -> (M, C) with position p = n * prod(S) + s."""
    return x.movedim(1, -1).reshape(-1, x.shape[1])


def initial_mixture(x: Tensor, num_components: int, eps: float):
    """The first-batch initialisation of the running mixture (SPEC, "Initialisation").

    ``x`` is (M, C). Positions are ordered (stable sort) by the mean over channels of
    their standardized values and cut into K chunks like ``torch.tensor_split``; chunk k
    gives the mean of component k. Every component gets the batch's biased variance and
    the prior 1/K. A chunk that is empty (M < K) takes the batch mean.

    Returns (mean (K, C), var (K, C), prior (K,)), without gradient.
    """
    x = x.detach()
    m = x.mean(0)
    v = x.var(0, unbiased=False)
    z = ((x - m) / torch.sqrt(v + eps)).mean(1)
    order = torch.sort(z, stable=True).indices
    means = []
    for chunk in torch.tensor_split(order, num_components):
        means.append(x[chunk].mean(0) if chunk.numel() > 0 else m)
    mean = torch.stack(means)
    var = v.expand(num_components, -1).clone()
    prior = torch.full((num_components,), 1.0 / num_components, dtype=x.dtype, device=x.device)
    return mean, var, prior


def num_components(running_mean, weight, bias) -> int:
    """K of the call: the leading size of running_mean, weight or bias; 1 when all are
    None (the functional API's convention)."""
    for t in (running_mean, weight, bias):
        if t is not None:
            return t.shape[0]
    return 1


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
    """Reference forward (and, through autograd, backward) of compound batch norm.

    See :func:`cbn_ext.functional.compound_batch_norm` for the arguments.
    """
    K = num_components(running_mean, weight, bias)
    N, C = input.shape[0], input.shape[1]
    spatial = input.shape[2:]
    M = N * math.prod(spatial)
    acc = accumulation_dtype(input.dtype)
    x = _positions(input).to(acc)

    def buf(t):
        return None if t is None else t.detach().to(acc)

    mix_mean, mix_var, mix_prior = buf(running_mean), buf(running_var), buf(running_prior)
    if (training and K > 1 and groups is None and num_batches_tracked is not None
            and int(num_batches_tracked) == 0):
        mix_mean, mix_var, mix_prior = initial_mixture(x, K, eps)

    # E-step (or given responsibilities).
    if groups is not None:
        tau = F.one_hot(groups.repeat_interleave(M // N), K).to(acc)
    elif K == 1:
        tau = torch.ones(M, 1, dtype=acc, device=x.device)
    else:
        a = 1.0 / (mix_var + eps)
        b = torch.log(mix_prior.clamp(min=MIN_PRIOR)) - 0.5 * torch.log(mix_var + eps).sum(1)
        loglik = b - 0.5 * (a * (x[:, None, :] - mix_mean) ** 2).sum(-1)
        tau = torch.softmax(loglik, dim=1)

    # M-step.
    if training:
        count = tau.sum(0)
        active = count > 1
        safe = torch.where(active, count, torch.ones_like(count))[:, None]
        mean = tau.t() @ x / safe
        var = torch.einsum("pk,pkc->kc", tau, (x[:, None, :] - mean) ** 2) / safe
        if mix_mean is not None:
            mean = torch.where(active[:, None], mean, mix_mean)
            var = torch.where(active[:, None], var, mix_var)
    else:
        mean, var = mix_mean, mix_var

    gamma = weight.to(acc) if weight is not None else torch.ones(K, C, dtype=acc, device=x.device)
    beta = bias.to(acc) if bias is not None else torch.zeros(K, C, dtype=acc, device=x.device)
    xhat = (x[:, None, :] - mean) * torch.rsqrt(var + eps)
    y = torch.einsum("pk,pkc->pc", tau, gamma * xhat + beta)
    y = y.reshape(N, *spatial, C).movedim(-1, 1).to(input.dtype)
    y = y.contiguous(memory_format=_memory_format(input))

    if training and running_mean is not None:
        _update_running(running_mean, running_var, running_prior, num_batches_tracked,
                        mix_mean, mix_var, mix_prior, mean.detach(), var.detach(),
                        count.detach(), M, momentum)
    return y


def _memory_format(x: Tensor) -> torch.memory_format:
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    if x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d) and not x.is_contiguous():
        return torch.channels_last_3d
    return torch.contiguous_format


@torch.no_grad()
def _update_running(running_mean, running_var, running_prior, num_batches_tracked,
                    mix_mean, mix_var, mix_prior, mean, var, count, M, momentum):
    active = count > 1
    finite = (torch.isfinite(mean[active]).all() and torch.isfinite(var[active]).all()
              and torch.isfinite(count).all())
    if not finite:
        return  # one bad batch must not poison the running statistics
    if momentum is None:
        eta = 1.0 / (int(num_batches_tracked) + 1)
    else:
        eta = momentum
    a = active[:, None]
    safe = torch.where(active, count, torch.full_like(count, 2.0))[:, None]
    new_mean = torch.where(a, (1 - eta) * mix_mean + eta * mean, mix_mean)
    new_var = torch.where(a, (1 - eta) * mix_var + eta * var * safe / (safe - 1), mix_var)
    running_mean.copy_(new_mean)
    running_var.copy_(new_var)
    if running_prior is not None:
        running_prior.copy_((1 - eta) * mix_prior + eta * count / M)
    if num_batches_tracked is not None:
        num_batches_tracked.add_(1)

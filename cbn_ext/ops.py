"""The Python side of the cbn_ext operators: loading the library, fake (meta) kernels for
torch.compile, and the autograd wiring of the forward operators.

The schemas live in csrc/cbn_ext.cpp (one TORCH_LIBRARY block). Autograd is registered
on the operators themselves with ``torch.library.register_autograd`` (which wraps one
``torch.autograd.Function`` per operator, calling the backward operators); PyTorch
recommends this over a hand-written ``autograd.Function`` around a custom operator, and
it makes ``torch.library.opcheck`` pass on inputs that require grad.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _C  # noqa: F401  (loads the library, which registers the operators)

__all__ = ["build_info"]

_ops = torch.ops.cbn_ext


def build_info() -> dict:
    """What the compiled extension contains: ``{"cpu": True, "cuda": bool, "torch": str,
    "cuda_version": str | None, "cuda_archs": str | None, "cpu_isa": str}``; ``cpu_isa``
    is the instruction set of the CPU kernels chosen for this processor ("avx2" or
    "baseline")."""
    return _C.build_info()


# ---------------------------------------------------------------------------------------
# Layout rules, mirrored from csrc/cbn_common.cpp (canonical_input, empty_tau).
# ---------------------------------------------------------------------------------------

def _channels_innermost(x: Tensor) -> bool:
    if x.stride(1) != 1 and x.size(1) != 1:
        return False
    perm = [0, *range(2, x.dim()), 1]
    return x.permute(perm).is_contiguous()


def _canonical(x: Tensor):
    """(canonical input, interleaved) as the C++ operators choose them."""
    spatial = 1
    for d in x.shape[2:]:
        spatial *= d
    if x.is_contiguous():
        return x, spatial == 1
    if _channels_innermost(x):
        return x, True
    return x.contiguous(), spatial == 1


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _empty_tau(x: Tensor, inter: bool, K: int) -> Tensor:
    acc = _acc(x.dtype)
    if K == 1:
        return x.new_empty((0,), dtype=acc)
    sizes = [x.shape[0], K, *x.shape[2:]]
    if not inter or x.dim() == 2:
        return x.new_empty(sizes, dtype=acc)
    inner = [x.shape[0], *x.shape[2:], K]
    perm = [0, x.dim() - 1, *range(1, x.dim() - 1)]
    return x.new_empty(inner, dtype=acc).permute(perm)


def _empty_like_canonical(x: Tensor) -> Tensor:
    return torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device=x.device)


# ---------------------------------------------------------------------------------------
# Fake kernels
# ---------------------------------------------------------------------------------------

@torch.library.register_fake("cbn_ext::forward_train")
def _forward_train_fake(input, weight, bias, running_mean, running_var, running_prior,
                        num_batches_tracked, groups, num_components, eps):
    x, inter = _canonical(input)
    K, C = num_components, x.shape[1]
    acc = _acc(x.dtype)

    def kc():
        return x.new_empty((K, C), dtype=acc)

    return (_empty_like_canonical(x), _empty_tau(x, inter, K), kc(), kc(),
            x.new_empty((K,), dtype=acc), kc(), kc(), x.new_empty((K,), dtype=acc))


@torch.library.register_fake("cbn_ext::forward_eval")
def _forward_eval_fake(input, weight, bias, running_mean, running_var, running_prior, groups,
                       num_components, eps):
    x, inter = _canonical(input)
    return _empty_like_canonical(x), _empty_tau(x, inter, num_components)


def _backward_fake(grad_out, input, weight, K, output_mask):
    x, _ = _canonical(input)
    acc = _acc(x.dtype)
    C = x.shape[1]
    gi = _empty_like_canonical(x) if output_mask[0] else x.new_empty((0,))
    gw = x.new_empty((K, C), dtype=acc) if output_mask[1] else x.new_empty((0,), dtype=acc)
    gb = x.new_empty((K, C), dtype=acc) if output_mask[2] else x.new_empty((0,), dtype=acc)
    return gi, gw, gb


@torch.library.register_fake("cbn_ext::backward_train")
def _backward_train_fake(grad_out, input, weight, bias, tau, mean, var, count, mix_mean,
                         mix_var, soft, eps, output_mask):
    return _backward_fake(grad_out, input, weight, mean.shape[0], output_mask)


@torch.library.register_fake("cbn_ext::backward_eval")
def _backward_eval_fake(grad_out, input, weight, bias, tau, running_mean, running_var, soft,
                        eps, output_mask):
    return _backward_fake(grad_out, input, weight, running_mean.shape[0], output_mask)


@torch.library.register_fake("cbn_ext::batch_stats")
def _batch_stats_fake(input, running_mean, running_var, running_prior, num_batches_tracked,
                      groups, num_components, eps):
    x, inter = _canonical(input)
    K, C = num_components, x.shape[1]
    acc = _acc(x.dtype)

    def kc():
        return x.new_empty((K, C), dtype=acc)

    return (_empty_tau(x, inter, K), kc(), kc(), x.new_empty((K,), dtype=acc), kc(), kc(),
            x.new_empty((K,), dtype=acc))


@torch.library.register_fake("cbn_ext::normalize")
def _normalize_fake(input, weight, bias, tau, mean, var, groups, eps):
    x, _ = _canonical(input)
    return _empty_like_canonical(x)


@torch.library.register_fake("cbn_ext::grad_sums")
def _grad_sums_fake(grad_out, input, tau, mean):
    return torch.empty_like(mean), torch.empty_like(mean)


@torch.library.register_fake("cbn_ext::grad_input")
def _grad_input_fake(grad_out, input, weight, bias, tau, mean, var, count, mix_mean, mix_var,
                     sum_g, sum_gx, soft, batch_stats, eps):
    x, _ = _canonical(input)
    return _empty_like_canonical(x)


@torch.library.register_fake("cbn_ext::update_running_stats")
def _update_running_stats_fake(running_mean, running_var, running_prior, num_batches_tracked,
                               mix_mean, mix_var, mix_prior, mean, var, count, num_positions,
                               momentum):
    return None


# ---------------------------------------------------------------------------------------
# Autograd: the forward operators' backward calls the backward operators.
# ---------------------------------------------------------------------------------------

def _output_mask(ctx):
    return [bool(ctx.needs_input_grad[0]), bool(ctx.needs_input_grad[1]),
            bool(ctx.needs_input_grad[2])]


def _grads(ctx, gi, gw, gb, num_other_inputs):
    mask = _output_mask(ctx)
    return (gi if mask[0] else None, gw if mask[1] else None, gb if mask[2] else None,
            *([None] * num_other_inputs))


def _setup_train(ctx, inputs, output):
    (input, weight, bias, _rm, _rv, _rp, _nbt, groups, num_components, eps) = inputs
    _out, tau, mean, var, count, mix_mean, mix_var, mix_prior = output
    ctx.mark_non_differentiable(tau, mean, var, count, mix_mean, mix_var, mix_prior)
    ctx.save_for_backward(input, weight, bias, tau, mean, var, count, mix_mean, mix_var)
    ctx.soft = num_components > 1 and groups is None
    ctx.eps = eps


def _backward_train(ctx, grad_out, *unused):
    input, weight, bias, tau, mean, var, count, mix_mean, mix_var = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(input)
    gi, gw, gb = _ops.backward_train(grad_out, input, weight, bias, tau, mean, var, count,
                                     mix_mean, mix_var, ctx.soft, ctx.eps, _output_mask(ctx))
    return _grads(ctx, gi, gw, gb, 7)


def _setup_eval(ctx, inputs, output):
    (input, weight, bias, running_mean, running_var, _rp, groups, num_components, eps) = inputs
    _out, tau = output
    ctx.mark_non_differentiable(tau)
    ctx.save_for_backward(input, weight, bias, tau, running_mean, running_var)
    ctx.soft = num_components > 1 and groups is None
    ctx.eps = eps


def _backward_eval(ctx, grad_out, *unused):
    input, weight, bias, tau, running_mean, running_var = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(input)
    gi, gw, gb = _ops.backward_eval(grad_out, input, weight, bias, tau, running_mean,
                                    running_var, ctx.soft, ctx.eps, _output_mask(ctx))
    return _grads(ctx, gi, gw, gb, 6)


torch.library.register_autograd("cbn_ext::forward_train", _backward_train,
                                setup_context=_setup_train)
torch.library.register_autograd("cbn_ext::forward_eval", _backward_eval,
                                setup_context=_setup_eval)

"""The Python side of the cbn_ext operators: loading the library and the fake (meta)
kernels for torch.compile.

The schemas live in csrc/cbn_schemas.h (one TORCH_LIBRARY block in csrc/cbn_ext.cpp).
Autograd is registered in C++ under the Autograd dispatch key (csrc/cbn_autograd.h, one
torch::autograd::Function per forward operator, calling the backward operators), as
torchvision's operators do: a training step then costs microseconds of CPU per layer,
not a Python round trip, and ``torch.library.opcheck`` passes on inputs that require
grad.
"""

from __future__ import annotations

import importlib

import torch
from torch import Tensor

from . import _C  # noqa: F401  (loads the library, which registers the operators)

__all__ = ["build_info"]

_ops = torch.ops.cbn_ext


def build_info() -> dict:
    """What the compiled extension contains: ``{"cpu": True, "cuda": bool, "torch": str,
    "cuda_version": str | None, "cuda_archs": str | None, "cpu_isa": str,
    "cpu_stream_min_bytes": int | None, "cuda_emulation": bool}``; ``cpu_isa``
    is the instruction set of the CPU kernels chosen for this processor ("avx512",
    "avx2" or "baseline"; the environment variable ``CBN_EXT_CPU_ISA`` caps it);
    ``cpu_stream_min_bytes``: the AVX2 and AVX-512 CPU kernels write outputs (y, dx) of
    at least this many bytes whose rows are whole cache lines by non-temporal stores (half
    the last-level cache's size, or the environment variable ``CBN_EXT_STREAM_MIN_BYTES``,
    read once per process; None: never); ``cuda_emulation``:
    whether the emulated CUDA backend (the CUDA kernels run on the CPU,
    ``torch.ops.cbn_ext_emu``, for the tests) was built."""
    info = _C.build_info()
    info["cuda_emulation"] = has_emulation()
    return info


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
# Fake kernels, registered for every library of the operators: cbn_ext, and
# cbn_ext_emu (the emulated CUDA backend, when built: cbn_ext._emu).
# ---------------------------------------------------------------------------------------

def _mixture_outputs(x, K, C, soft):
    """The E-step's mixture as the operators return it (csrc/cbn_common.h, mix_outputs):
    (K, C), (K, C), (K,) with soft responsibilities, else three empty tensors."""
    acc = _acc(x.dtype)
    if not soft:
        return tuple(x.new_empty((0,), dtype=acc) for _ in range(3))
    return (x.new_empty((K, C), dtype=acc), x.new_empty((K, C), dtype=acc),
            x.new_empty((K,), dtype=acc))


def _forward_train_fake(input, weight, bias, running_mean, running_var, running_prior,
                        num_batches_tracked, groups, num_components, eps):
    x, inter = _canonical(input)
    K, C = num_components, x.shape[1]
    acc = _acc(x.dtype)

    def kc():
        return x.new_empty((K, C), dtype=acc)

    return (_empty_like_canonical(x), _empty_tau(x, inter, K), kc(), kc(),
            x.new_empty((K,), dtype=acc), *_mixture_outputs(x, K, C, K > 1 and groups is None))


def _forward_eval_fake(input, weight, bias, running_mean, running_var, running_prior, groups,
                       num_components, eps):
    x, inter = _canonical(input)
    return _empty_like_canonical(x), _empty_tau(x, inter, num_components)


def _backward_fake(grad_out, input, weight, bias, K, output_mask):
    x, _ = _canonical(input)
    acc = _acc(x.dtype)
    C = x.shape[1]

    def grad(param, wanted):  # in the parameter's dtype (model.half()), else acc
        dtype = param.dtype if param is not None else acc
        return x.new_empty((K, C) if wanted else (0,), dtype=dtype if wanted else acc)

    gi = _empty_like_canonical(x) if output_mask[0] else x.new_empty((0,))
    return gi, grad(weight, output_mask[1]), grad(bias, output_mask[2])


def _backward_train_fake(grad_out, input, weight, bias, tau, mean, var, count, mix_mean,
                         mix_var, soft, eps, output_mask):
    return _backward_fake(grad_out, input, weight, bias, mean.shape[0], output_mask)


def _backward_eval_fake(grad_out, input, weight, bias, tau, running_mean, running_var, soft,
                        eps, output_mask):
    return _backward_fake(grad_out, input, weight, bias, running_mean.shape[0], output_mask)


def _batch_stats_fake(input, running_mean, running_var, running_prior, num_batches_tracked,
                      groups, num_components, eps):
    x, inter = _canonical(input)
    K, C = num_components, x.shape[1]
    acc = _acc(x.dtype)

    def kc():
        return x.new_empty((K, C), dtype=acc)

    return (_empty_tau(x, inter, K), kc(), kc(), x.new_empty((K,), dtype=acc),
            *_mixture_outputs(x, K, C, K > 1 and groups is None))


def _normalize_fake(input, weight, bias, tau, mean, var, groups, eps):
    x, _ = _canonical(input)
    return _empty_like_canonical(x)


def _grad_sums_fake(grad_out, input, tau, mean):
    return torch.empty_like(mean), torch.empty_like(mean)


def _grad_input_fake(grad_out, input, weight, bias, tau, mean, var, count, mix_mean, mix_var,
                     sum_g, sum_gx, soft, batch_stats, eps):
    x, _ = _canonical(input)
    return _empty_like_canonical(x)


def _update_running_stats_fake(running_mean, running_var, running_prior, num_batches_tracked,
                               mix_mean, mix_var, mix_prior, mean, var, count, num_positions,
                               momentum):
    return None


_FAKES = {"forward_train": _forward_train_fake, "forward_eval": _forward_eval_fake,
          "backward_train": _backward_train_fake, "backward_eval": _backward_eval_fake,
          "batch_stats": _batch_stats_fake, "normalize": _normalize_fake,
          "grad_sums": _grad_sums_fake, "grad_input": _grad_input_fake,
          "update_running_stats": _update_running_stats_fake}


def _register(ns: str) -> None:
    """Fake kernels of library `ns`, for torch.compile (autograd is registered in C++:
    csrc/cbn_autograd.h)."""
    for name, fake in _FAKES.items():
        torch.library.register_fake(f"{ns}::{name}")(fake)


_register("cbn_ext")

# The emulated CUDA backend, when this build has it (CBN_CUDA_EMULATION=1). Only its
# absence is tolerated: a module that is there but does not load is an error.
# (importlib, not `from . import _emu`: that form turns a missing submodule into a plain
# ImportError about the package, which the test below could not tell from a broken one.)
try:
    _emu = importlib.import_module(f"{__package__}._emu")  # registers torch.ops.cbn_ext_emu
except ModuleNotFoundError as e:
    if e.name != f"{__package__}._emu":
        raise
    _emu = None
else:
    _register("cbn_ext_emu")


def has_emulation() -> bool:
    """Whether this build has the emulated CUDA backend (torch.ops.cbn_ext_emu)."""
    return _emu is not None

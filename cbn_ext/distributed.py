"""Compound batch norm with statistics over a process group (SPEC, "Distributed").

W processes with batches b_1..b_W produce the same outputs, input gradients and running
statistics as one process with their concatenation; parameter gradients are each
process's share (summed over the processes, or averaged by DistributedDataParallel, as
for ``nn.SyncBatchNorm``). One collective per direction: the forward all-gathers every
process's per-component count, mean and variance and merges them in rank order (Chan's
formula, exact for any split); the backward all-reduces the sums Sg and Sgx. The first
training batch initialises the mixture from the whole group's batch (a few more
collectives, once). Ranks with different batch sizes, and ranks with an empty batch, are
handled. Works with gloo (CPU) and NCCL (CUDA).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

from . import functional as F_cbn
from . import ops
from .modules import _CompoundBatchNorm

__all__ = ["SyncCompoundBatchNorm"]



def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _gather(t: Tensor, group) -> list:
    out = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, t.contiguous(), group=group)
    return out


def _merge(counts, means, m2s):
    """Chan's merge, in order, of (count, mean, M2) triples; counts broadcast over means."""
    n, mean, m2 = counts[0], means[0], m2s[0]
    for nb, mb, m2b in zip(counts[1:], means[1:], m2s[1:]):
        total = n + nb
        safe = torch.where(total > 0, total, torch.ones_like(total))
        wb = nb / safe
        delta = mb - mean
        mean = mean + delta * wb
        m2 = m2 + m2b + delta * delta * n * wb
        n = total
    return n, mean, m2


def _global_initial_mixture(x: Tensor, K: int, eps: float, group):
    """SPEC "Initialisation" over the concatenation of every process's batch (positions in
    rank order), with collectives; see cbn_ext.reference.initial_mixture."""
    C = x.shape[1]
    acc = _acc(x.dtype)
    xp = x.detach().movedim(1, -1).reshape(-1, C).to(acc)
    M_r = xp.shape[0]
    if M_r > 0:
        m_r = xp.mean(0)
        m2_r = ((xp - m_r) ** 2).sum(0)
    else:
        m_r = m2_r = xp.new_zeros(C)
    packed = torch.cat([xp.new_tensor([M_r]), m_r, m2_r]).double()
    gathered = _gather(packed, group)
    sizes = [int(g[0]) for g in gathered]
    n, m, m2 = _merge([g[:1] for g in gathered], [g[1:1 + C] for g in gathered],
                      [g[1 + C:] for g in gathered])
    m, v = m.to(acc), (m2 / n).to(acc)
    # every position's z, gathered in rank order (padded to the largest batch)
    z = ((xp - m) / torch.sqrt(v + eps)).mean(1)
    padded = z.new_full((max(sizes),), float("inf"))
    padded[:M_r] = z
    zs = _gather(padded, group)
    z_all = torch.cat([zr[:s] for zr, s in zip(zs, sizes)])
    order = torch.sort(z_all, stable=True).indices
    chunk_of = torch.empty_like(order)
    for k, chunk in enumerate(torch.tensor_split(order, K)):
        chunk_of[chunk] = k
    rank = dist.get_rank(group)
    offset = sum(sizes[:rank])
    mine = chunk_of[offset:offset + M_r]
    sums = xp.new_zeros(K, C).index_add_(0, mine, xp)
    counts = torch.bincount(mine, minlength=K).to(acc)
    packed = torch.cat([sums.flatten(), counts]).double()
    dist.all_reduce(packed, group=group)
    sums, counts = packed[:K * C].view(K, C), packed[K * C:]
    mean = torch.where(counts[:, None] > 0, sums / counts.clamp(min=1)[:, None],
                       m.double()).to(acc)
    var = v.expand(K, C).clone()
    prior = torch.full((K,), 1.0 / K, dtype=acc, device=x.device)
    return mean, var, prior


class _SyncCompoundBatchNormFunction(torch.autograd.Function):
    """Forward: local E-step and M-step (batch_stats), one all-gather of (positions,
    count, mean, variance) per rank, merge, normalize. Backward: local sums (grad_sums),
    the parameter gradients from them, one all-reduce of the sums, the input gradient from
    the group's sums (grad_input). No host read of device memory, except when this rank
    has at most one position (to tell whether the whole group has more)."""

    @staticmethod
    def forward(ctx, input, weight, bias, running_mean, running_var, running_prior, groups, K,
                eps, group):
        # the E-step mixture as batch_stats returns it: copies (soft responsibilities), or
        # empty (the running buffers serve as they are)
        tau, mean_l, var_l, count_l, mix_mean, mix_var, mix_prior = ops._ops.batch_stats(
            input, running_mean, running_var, running_prior, None, groups, K, eps)
        C = input.shape[1]
        M_l = input.shape[0] * math.prod(input.shape[2:])
        # (new_full, not new_tensor: no blocking host-to-device copy)
        packed = torch.cat([mean_l.new_full((1,), M_l), count_l, mean_l.flatten(),
                            var_l.flatten()]).double()
        gathered = _gather(packed, group)
        if M_l <= 1:  # only then can the whole group hold one position or none
            positions = int(sum(int(g[0]) for g in gathered))
            if positions <= 1:
                raise ValueError("Expected more than 1 value per channel when training, got "
                                 f"{positions} over the process group")
        # raw moments of every rank (batch_stats keeps inactive components' own)
        counts = [g[1:1 + K][:, None] for g in gathered]
        means = [g[1 + K:1 + K + K * C].view(K, C) for g in gathered]
        m2s = [g[1 + K + K * C:].view(K, C) * c for g, c in zip(gathered, counts)]
        n, mean, m2 = _merge(counts, means, m2s)
        count = n[:, 0]
        active = (count > 1)[:, None]
        acc = mean_l.dtype
        # inactive components take the E-step mixture's statistics (K = 1 is never
        # inactive here: the group holds more than one position)
        ref_mean = mix_mean if mix_mean.numel() else (running_mean if running_mean is not None
                                                      else mean_l)
        ref_var = mix_var if mix_var.numel() else (running_var if running_var is not None
                                                   else var_l)
        mean = torch.where(active, mean, ref_mean.double()).to(acc)
        var = torch.where(active, m2 / n.clamp(min=1), ref_var.double()).to(acc)
        count = count.to(acc)
        out = ops._ops.normalize(input, weight, bias, tau, mean, var, groups, eps)
        ctx.save_for_backward(input, weight, bias, tau, mean, var, count, mix_mean, mix_var)
        ctx.soft = K > 1 and groups is None
        ctx.eps, ctx.group, ctx.K = eps, group, K
        ctx.mark_non_differentiable(mean, var, count, mix_mean, mix_var, mix_prior)
        return out, mean, var, count, mix_mean, mix_var, mix_prior

    @staticmethod
    def backward(ctx, grad_out, *unused):
        input, weight, bias, tau, mean, var, count, mix_mean, mix_var = ctx.saved_tensors
        sum_g, sum_gx = ops._ops.grad_sums(grad_out, input, tau, mean)
        # this process's share of the parameter gradients (SPEC): dbeta = Sg, dgamma = Sgx r
        # (in the parameters' dtype: float32, or theirs after model.half())
        grad_weight = ((sum_gx * torch.rsqrt(var + ctx.eps)).to(weight.dtype)
                       if ctx.needs_input_grad[1] else None)
        grad_bias = sum_g.to(bias.dtype, copy=True) if ctx.needs_input_grad[2] else None
        sums = torch.cat([sum_g, sum_gx])
        dist.all_reduce(sums, group=ctx.group)
        grad_input = None
        if ctx.needs_input_grad[0]:
            K = ctx.K
            grad_input = ops._ops.grad_input(grad_out, input, weight, bias, tau, mean, var, count,
                                         mix_mean, mix_var, sums[:K], sums[K:], ctx.soft, True,
                                         ctx.eps)
        return grad_input, grad_weight, grad_bias, None, None, None, None, None, None, None


class SyncCompoundBatchNorm(_CompoundBatchNorm):
    r"""Compound batch norm whose training statistics span a process group, for inputs
    (N, C, *). In evaluation mode, or without an initialised process group of more than
    one process, it is :class:`cbn_ext.CompoundBatchNorm2d`'s computation.

    Args:
        num_features, num_components, eps, momentum, affine, track_running_stats, device,
            dtype, bias (keyword-only): as the compound layers.
        process_group: the group to synchronise over (default: the whole world).
    """

    def __init__(self, num_features: int, num_components: int = 2, eps: float = 1e-5,
                 momentum: Optional[float] = 0.1, affine: bool = True,
                 track_running_stats: bool = True, process_group=None, device=None,
                 dtype=None, *, bias: bool = True) -> None:
        super().__init__(num_features, num_components, eps, momentum, affine,
                         track_running_stats, device, dtype, bias=bias)
        self.process_group = process_group

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")
        if input.shape[1] != self.num_features:
            raise ValueError(
                f"{type(self).__name__}: expected input with {self.num_features} channels "
                f"(dim 1), got {input.shape[1]} (input shape {tuple(input.shape)})")

    def _synced(self) -> bool:
        return (self.training and dist.is_available() and dist.is_initialized()
                and dist.get_world_size(self.process_group) > 1)

    def forward(self, input: Tensor) -> Tensor:
        if not self._synced():
            return super().forward(input)
        self._check_input_dim(input)
        group = self.process_group if self.process_group is not None else dist.group.WORLD
        K = self.num_components
        groups = self._groups_for(input)
        F_cbn._check_devices(input, weight=self.weight, running_mean=self.running_mean,
                             groups=groups)
        rm, rv, rp = self.running_mean, self.running_var, self.running_prior
        if rm is not None and K > 1 and groups is None and self._needs_initial_mixture():
            # the E-step's mixture: the whole group's initialisation, once (collectives
            # that every rank runs: the question is answered on the host, a sync once)
            rm, rv, rp = _global_initial_mixture(input, K, self.eps, group)
        out, mean, var, count, mix_mean, mix_var, mix_prior = \
            _SyncCompoundBatchNormFunction.apply(input, self.weight, self.bias, rm, rv, rp,
                                                 groups, K, self.eps, group)
        if self.running_mean is not None:
            # num_positions 0: M = sum_k N_k, computed on the device
            ops._ops.update_running_stats(self.running_mean, self.running_var, self.running_prior,
                                      self.num_batches_tracked, mix_mean, mix_var, mix_prior,
                                      mean, var, count, 0, self.momentum)
        return out

    def _needs_initial_mixture(self) -> bool:
        """Whether num_batches_tracked is 0. Every rank must answer alike, at the same step,
        before the collectives of the initialisation, so this reads the counter on the host
        (a sync on a GPU) until it is known to be positive, and again only when another
        tensor takes its place, reset_running_stats or load_state_dict (not for in-place
        writes from outside, such as DistributedDataParallel's broadcast of the buffers:
        reset the counter with reset_running_stats)."""
        nbt = self.num_batches_tracked
        if self._mixture_ready and (self._nbt_seen is None or self._nbt_seen[0] != id(nbt)):
            self._mixture_ready = False
        if not self._mixture_ready:
            self._mixture_ready = int(nbt) > 0
            self._nbt_seen = (id(nbt), nbt._version)
        return not self._mixture_ready

    def extra_repr(self) -> str:
        return super().extra_repr() + (
            f", process_group={self.process_group}" if self.process_group is not None else "")

    @classmethod
    def convert_sync_batchnorm(cls, module: nn.Module, process_group=None) -> nn.Module:
        """Swaps every compound layer of ``module`` for a :class:`SyncCompoundBatchNorm`
        with the same parameters, buffers, device, dtype, ``requires_grad`` and training
        mode (like ``nn.SyncBatchNorm.convert_sync_batchnorm``). Returns the converted
        module."""
        out = module
        if isinstance(module, _CompoundBatchNorm) and not isinstance(module, cls):
            ref = module.weight if module.weight is not None else module.running_mean
            factory = {} if ref is None else {"device": ref.device, "dtype": ref.dtype}
            out = cls(module.num_features, module.num_components, module.eps, module.momentum,
                      module.affine, module.track_running_stats, process_group, **factory,
                      bias=module.bias is not None or not module.affine)
            out.load_state_dict(module.state_dict())
            for name in ("weight", "bias"):
                src = getattr(module, name)
                if src is not None:
                    getattr(out, name).requires_grad_(src.requires_grad)
            out.train(module.training)
        for name, child in module.named_children():
            new = cls.convert_sync_batchnorm(child, process_group)
            if new is not child:
                out.add_module(name, new)
        return out

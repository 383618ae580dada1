"""Compound batch normalization layers, drop-in replacements for ``nn.BatchNorm1d/2d/3d``."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from . import functional as F_cbn
from . import ops

__all__ = ["CompoundBatchNorm1d", "CompoundBatchNorm2d", "CompoundBatchNorm3d"]


class _CompoundBatchNorm(nn.Module):
    """Shared implementation of the compound batch norm layers.

    Parameters (affine=True): ``weight`` and ``bias``, (K, C), initialised to 1 and 0
    (``bias=False``: no bias, beta = 0, as BatchNorm's keyword). Buffers
    (track_running_stats=True): ``running_mean`` (K, C) = 0, ``running_var`` (K, C) = 1,
    ``running_prior`` (K,) = 1/K, ``num_batches_tracked`` () int64 = 0. All are float32
    (float64 when the layer is float64) and in ``state_dict``.

    A BatchNorm checkpoint loads too (``load_state_dict``): (C,) weight, bias, running_mean
    and running_var are taken as the same in every component, the prior is 1/K and
    ``num_batches_tracked`` is 0, so the next training batch initialises the mixture
    (what ``from_batchnorm`` does).
    """

    _version = 1
    _dims: tuple = ()

    def __init__(self, num_features: int, num_components: int = 2, eps: float = 1e-5,
                 momentum: Optional[float] = 0.1, affine: bool = True,
                 track_running_stats: bool = True, device=None, dtype=None, *,
                 bias: bool = True) -> None:
        super().__init__()
        if num_features < 1:
            raise ValueError(f"num_features must be positive, got {num_features}")
        if num_components < 1:
            raise ValueError(f"num_components must be at least 1, got {num_components}")
        if not track_running_stats and num_components > 1:
            raise ValueError(
                f"track_running_stats=False needs num_components=1 (got {num_components}): "
                "the E-step of a mixture uses the running mixture")
        factory = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.num_components = num_components
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        self.track_running_stats = track_running_stats
        shape = (num_components, num_features)
        if affine:
            self.weight = nn.Parameter(torch.empty(shape, **factory))
            if bias:
                self.bias = nn.Parameter(torch.empty(shape, **factory))
            else:
                self.register_parameter("bias", None)
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(shape, **factory))
            self.register_buffer("running_var", torch.ones(shape, **factory))
            self.register_buffer("running_prior",
                                 torch.full((num_components,), 1.0 / num_components, **factory))
            self.register_buffer(
                "num_batches_tracked",
                torch.tensor(0, dtype=torch.long,
                             **{k: v for k, v in factory.items() if k != "dtype"}))
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("running_prior", None)
            self.register_buffer("num_batches_tracked", None)
        # set by cbn_ext.split_by: the group of each sample for the next forward passes
        self._split_groups: Optional[Tensor] = None
        self._split_name: str = ""
        self._forget_mixture_state()
        self.reset_parameters()

    # The first-batch initialisation (SPEC) happens while num_batches_tracked == 0. On the
    # CPU the operator reads the counter (free). On a GPU a read would stop the CPU until
    # the device catches up, so the layer remembers once it has seen the counter > 0
    # (_mixture_ready) and then skips the question; until then the operator decides on the
    # device (no sync), and the layer learns the counter's value from non-blocking copies
    # (_nbt_readback). load_state_dict and reset_running_stats start over at once; a
    # counter written in place from outside (zero_(), copy_(), a broadcast) is noticed by
    # its version and read back without waiting, so a reset by hand takes effect when that
    # copy arrives (a step or so later); another tensor put in its place is asked about
    # on the device at once.
    def _forget_mixture_state(self) -> None:
        self._mixture_ready = False
        self._nbt_seen = None      # (id, _version) of the counter when known > 0
        self._nbt_readback = None  # (pinned host copy, CUDA event, (id, _version))

    def _first_batch_question(self, nbt: Tensor) -> Optional[Tensor]:
        """The num_batches_tracked the operator should read for the first-batch question,
        or None when the mixture is known to be initialised (CUDA tensors only)."""
        key = (id(nbt), nbt._version)
        pending = self._nbt_readback
        if pending is not None and pending[1].query():
            self._nbt_readback = None
            ready = bool(pending[0].item() > 0)  # a pinned host copy: no sync
            self._mixture_ready = ready
            self._nbt_seen = pending[2] if ready else None
        if self._mixture_ready and key != self._nbt_seen:
            if self._nbt_seen is None or self._nbt_seen[0] != key[0]:
                self._mixture_ready = False  # another tensor: ask on the device
            elif self._nbt_readback is None:
                self._start_readback(nbt)  # written in place: read it back, no wait
        return None if self._mixture_ready else nbt

    def _start_readback(self, nbt: Tensor) -> None:
        if self._nbt_readback is None and not torch.cuda.is_current_stream_capturing():
            host = torch.empty((), dtype=torch.long, pin_memory=True)
            host.copy_(nbt, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            self._nbt_readback = (host, event, (id(nbt), nbt._version))

    def __getstate__(self):
        state = super().__getstate__()
        state = dict(state)
        state["_nbt_readback"] = None  # a CUDA event does not copy
        return state

    def reset_running_stats(self) -> None:
        """Running statistics back to their initial values; the next training batch
        re-initialises the mixture."""
        if self.track_running_stats:
            self.running_mean.zero_()
            self.running_var.fill_(1)
            self.running_prior.fill_(1.0 / self.num_components)
            self.num_batches_tracked.zero_()
        self._forget_mixture_state()

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        if self.affine:
            nn.init.ones_(self.weight)
            if self.bias is not None:
                nn.init.zeros_(self.bias)

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() not in self._dims:
            want = " or ".join(f"{d}D" for d in self._dims)
            raise ValueError(f"expected {want} input (got {input.dim()}D input)")
        if input.shape[1] != self.num_features:
            raise ValueError(
                f"{type(self).__name__}: expected input with {self.num_features} channels "
                f"(dim 1), got {input.shape[1]} (input shape {tuple(input.shape)})")

    def _groups_for(self, input: Tensor) -> Optional[Tensor]:
        """The split path's group ids for this input (cbn_ext.split_by), checked."""
        groups = self._split_groups
        if groups is not None and groups.shape[0] != input.shape[0]:
            raise ValueError(
                f"{self._split_name or type(self).__name__}: split_by gave {groups.shape[0]} "
                f"group ids for a batch of {input.shape[0]} samples")
        return groups

    def forward(self, input: Tensor) -> Tensor:
        """Compound batch norm of ``input`` (see :func:`cbn_ext.compound_batch_norm`).

        In a steady-state training step nothing here reads device memory on the host (no
        synchronisation with a GPU); group ids of the split path are checked on the
        device there (a device-side assert).
        """
        if input.dim() not in self._dims or input.shape[1] != self.num_features:
            self._check_input_dim(input)
        groups = self._groups_for(input)
        if input.is_cuda:
            F_cbn._check_cuda_build()
        # parameters and buffers straight from their dicts: nn.Module.__getattr__ costs
        # microseconds per access, a good part of a layer's CPU time on small inputs
        p, b = self._parameters, self._buffers
        # (torch.nn.utils.parametrize and prune move a parameter out of _parameters)
        weight = p["weight"] if "weight" in p else self.weight
        bias = p["bias"] if "bias" in p else self.bias
        running_mean = b["running_mean"]
        K, eps = self.num_components, self.eps
        if not self.training and running_mean is not None:
            return ops._ops.forward_eval.default(input, weight, bias, running_mean,
                                                 b["running_var"], b["running_prior"], groups, K,
                                                 eps)[0]
        # Like BatchNorm: without running statistics (K = 1 only), batch statistics are
        # used in eval mode too.
        if not (self.training and self.track_running_stats):
            return F_cbn._forward_train(input, weight, bias, None, None, None, None, groups, K,
                                        eps, self.momentum, None)
        nbt = b["num_batches_tracked"]
        init = None  # no first-batch question: the mixture is known to be initialised
        if K > 1 and groups is None:
            if not input.is_cuda:
                init = nbt  # the operator reads it (free on the CPU)
            elif torch.compiler.is_compiling():
                init = None if self._mixture_ready else nbt  # graph-safe: no readback
            else:
                init = self._first_batch_question(nbt)
        out = F_cbn._forward_train(input, weight, bias, running_mean, b["running_var"],
                                   b["running_prior"], nbt, groups, K, eps, self.momentum, init)
        if init is not None and input.is_cuda and not torch.compiler.is_compiling():
            self._start_readback(nbt)  # after this step's update
        return out

    def extra_repr(self) -> str:
        return ("{num_features}, num_components={num_components}, eps={eps}, "
                "momentum={momentum}, affine={affine}, bias={use_bias}, "
                "track_running_stats={track_running_stats}".format(
                    **self.__dict__, use_bias=self.bias is not None))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs) -> None:
        # A BatchNorm checkpoint: (C,) entries are the same in every component; the prior
        # is 1/K and num_batches_tracked 0, so the next training batch initialises the
        # mixture (as from_batchnorm). Other shapes are left to the usual (clear) error.
        K, C = self.num_components, self.num_features
        per_channel = [prefix + n for n in ("weight", "bias", "running_mean", "running_var")]

        def is_bn_shaped(key):
            t = state_dict.get(key)
            return t is not None and t.dim() == 1 and t.shape[0] == C

        from_bn = any(is_bn_shaped(k) for k in per_channel)
        self._forget_mixture_state()
        if from_bn:
            for k in per_channel:
                if is_bn_shaped(k):  # a copy: with assign=True it becomes the tensor itself
                    state_dict[k] = state_dict[k].unsqueeze(0).expand(K, C).clone()
            if self.running_prior is not None:
                state_dict.setdefault(prefix + "running_prior",
                                      torch.full((K,), 1.0 / K, dtype=self.running_prior.dtype))
            if self.num_batches_tracked is not None:
                state_dict[prefix + "num_batches_tracked"] = torch.tensor(0, dtype=torch.long)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    @classmethod
    def from_batchnorm(cls, bn: nn.modules.batchnorm._BatchNorm, num_components: int = 2):
        """A compound layer that starts as ``bn``: its weight, bias, running mean and
        variance copied into every component, prior 1/K, ``num_batches_tracked`` = 0 (the
        first training batch initialises the mixture). Keeps ``bn``'s eps, momentum,
        device, dtype, ``requires_grad`` and training mode; in eval mode the output equals
        ``bn``'s until that first training step.
        """
        if not isinstance(bn, nn.modules.batchnorm._BatchNorm):
            raise TypeError(f"from_batchnorm expects a BatchNorm layer, got {type(bn).__name__}")
        if not bn.track_running_stats and num_components > 1:
            raise ValueError("from_batchnorm: a BatchNorm without running statistics can only "
                             "become a compound layer with num_components=1")
        ref = next((t for t in (bn.weight, bn.running_mean) if t is not None), None)
        factory = {} if ref is None else {"device": ref.device, "dtype": ref.dtype}
        layer = cls(bn.num_features, num_components, eps=bn.eps, momentum=bn.momentum,
                    affine=bn.affine, track_running_stats=bn.track_running_stats,
                    bias=bn.bias is not None or not bn.affine, **factory)
        with torch.no_grad():
            for name in ("weight", "bias"):
                src, dst = getattr(bn, name), getattr(layer, name)
                if src is not None:
                    dst.copy_(src.expand_as(dst))
                    dst.requires_grad_(src.requires_grad)
            if bn.track_running_stats:
                layer.running_mean.copy_(bn.running_mean.expand_as(layer.running_mean))
                layer.running_var.copy_(bn.running_var.expand_as(layer.running_var))
        layer.train(bn.training)
        return layer


class CompoundBatchNorm1d(_CompoundBatchNorm):
    r"""Compound batch norm over a 2D (N, C) or 3D (N, C, L) input; replaces
    ``nn.BatchNorm1d``. See :func:`cbn_ext.functional.compound_batch_norm` for the math.

    Args:
        num_features: C.
        num_components: K, the number of Gaussians in the mixture (1 is BatchNorm).
        eps, momentum, affine, track_running_stats, device, dtype, bias (keyword-only):
            as ``nn.BatchNorm1d``; track_running_stats=False is only allowed with K = 1.
    """

    _dims = (2, 3)


class CompoundBatchNorm2d(_CompoundBatchNorm):
    r"""Compound batch norm over a 4D (N, C, H, W) input; replaces ``nn.BatchNorm2d``.
    Contiguous and channels_last inputs are read in place and the output keeps the
    input's memory format. See :class:`CompoundBatchNorm1d` for the arguments."""

    _dims = (4,)


class CompoundBatchNorm3d(_CompoundBatchNorm):
    r"""Compound batch norm over a 5D (N, C, D, H, W) input; replaces ``nn.BatchNorm3d``.
    See :class:`CompoundBatchNorm1d` for the arguments."""

    _dims = (5,)

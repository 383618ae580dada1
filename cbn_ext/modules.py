"""Compound batch normalization layers, drop-in replacements for ``nn.BatchNorm1d/2d/3d``."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from . import functional as F_cbn

__all__ = ["CompoundBatchNorm1d", "CompoundBatchNorm2d", "CompoundBatchNorm3d"]


class _CompoundBatchNorm(nn.Module):
    """Shared implementation of the compound batch norm layers.

    Parameters (affine=True): ``weight`` and ``bias``, (K, C), initialised to 1 and 0.
    Buffers (track_running_stats=True): ``running_mean`` (K, C) = 0, ``running_var``
    (K, C) = 1, ``running_prior`` (K,) = 1/K, ``num_batches_tracked`` () int64 = 0. All are
    float32 (float64 when the layer is float64) and in ``state_dict``.
    """

    _version = 1
    _dims: tuple = ()

    def __init__(self, num_features: int, num_components: int = 2, eps: float = 1e-5,
                 momentum: Optional[float] = 0.1, affine: bool = True,
                 track_running_stats: bool = True, device=None, dtype=None) -> None:
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
            self.bias = nn.Parameter(torch.empty(shape, **factory))
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
        self.reset_parameters()
        # set by cbn_ext.split_by: the group of each sample for the next forward passes
        self._split_groups: Optional[Tensor] = None
        self._split_name: str = ""

    def reset_running_stats(self) -> None:
        """Running statistics back to their initial values; the next training batch
        re-initialises the mixture."""
        if self.track_running_stats:
            self.running_mean.zero_()
            self.running_var.fill_(1)
            self.running_prior.fill_(1.0 / self.num_components)
            self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        if self.affine:
            nn.init.ones_(self.weight)
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
        self._check_input_dim(input)
        # Like BatchNorm: without running statistics (K = 1 only), batch statistics are
        # used in eval mode too; the buffers are passed when they are updated (training)
        # or used (eval).
        use_batch_stats = self.training or self.running_mean is None
        track = self.training and self.track_running_stats
        return F_cbn.compound_batch_norm(
            input,
            self.running_mean if (not self.training or self.track_running_stats) else None,
            self.running_var if (not self.training or self.track_running_stats) else None,
            self.running_prior,
            self.weight,
            self.bias,
            use_batch_stats,
            self.momentum,
            self.eps,
            self.num_batches_tracked if track else None,
            self._groups_for(input),
        )

    def extra_repr(self) -> str:
        return ("{num_features}, num_components={num_components}, eps={eps}, "
                "momentum={momentum}, affine={affine}, "
                "track_running_stats={track_running_stats}".format(**self.__dict__))

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
                    affine=bn.affine, track_running_stats=bn.track_running_stats, **factory)
        with torch.no_grad():
            if bn.affine:
                layer.weight.copy_(bn.weight.expand_as(layer.weight))
                layer.bias.copy_(bn.bias.expand_as(layer.bias))
                layer.weight.requires_grad_(bn.weight.requires_grad)
                layer.bias.requires_grad_(bn.bias.requires_grad)
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
        eps, momentum, affine, track_running_stats, device, dtype: as ``nn.BatchNorm1d``;
            track_running_stats=False is only allowed with K = 1.
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

"""cbn_ext: Compound Batch Normalization for PyTorch, with fused CPU and CUDA kernels.

Compound batch norm (Cheng et al., ACM MM 2022) normalizes features with a mixture of K
Gaussians instead of BatchNorm's one, so that frequent classes of a long-tailed data set
do not dominate the statistics. ``../shared/SPEC.md`` (in the repository) is the contract.

    import cbn_ext
    layer = cbn_ext.CompoundBatchNorm2d(64, num_components=2)   # for nn.BatchNorm2d(64)
"""

from . import functional, reference
from .distributed import SyncCompoundBatchNorm
from .functional import compound_batch_norm
from .modules import CompoundBatchNorm1d, CompoundBatchNorm2d, CompoundBatchNorm3d
from .ops import build_info
from .training import (DualPathLoss, class_groups, convert_batchnorm, dual_path_loss,
                       read_mixture_state, split_by)

__version__ = "0.1.0"

__all__ = [
    "CompoundBatchNorm1d",
    "CompoundBatchNorm2d",
    "CompoundBatchNorm3d",
    "DualPathLoss",
    "SyncCompoundBatchNorm",
    "build_info",
    "class_groups",
    "compound_batch_norm",
    "convert_batchnorm",
    "dual_path_loss",
    "functional",
    "read_mixture_state",
    "reference",
    "split_by",
]

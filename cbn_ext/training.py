"""Training with compound batch norm: model conversion, the class-aware split path and the
dual-path loss (SPEC, "Class-aware split and the dual path").

A complete training loop::

    import torch
    import torch.nn.functional as F
    import cbn_ext

    model = cbn_ext.convert_batchnorm(make_resnet(), num_components=2)   # BN -> CBN
    class_to_group = cbn_ext.class_groups(class_counts, num_groups=2)   # head = group 0
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for images, labels in loader:
        out = cbn_ext.dual_path_loss(model, images, labels, class_to_group)
        opt.zero_grad()
        out.loss.backward()          # main + auxiliary + consistency
        opt.step()
    model.eval()                     # inference uses the main path only
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, NamedTuple, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .modules import (CompoundBatchNorm1d, CompoundBatchNorm2d, CompoundBatchNorm3d,
                      _CompoundBatchNorm)

__all__ = ["convert_batchnorm", "class_groups", "split_by", "dual_path_loss", "DualPathLoss",
           "read_mixture_state"]

_MATCHING = ((nn.BatchNorm1d, CompoundBatchNorm1d), (nn.BatchNorm2d, CompoundBatchNorm2d),
             (nn.BatchNorm3d, CompoundBatchNorm3d))


def convert_batchnorm(module: nn.Module, num_components: int = 2) -> nn.Module:
    """Replaces every ``nn.BatchNorm1d/2d/3d`` in ``module`` by the matching compound layer,
    and every ``nn.SyncBatchNorm`` by :class:`cbn_ext.SyncCompoundBatchNorm` (same process
    group), through ``from_batchnorm``: weight, bias and running statistics copied into
    every component, so that the converted model in eval mode computes what it did before
    (until its first training step). Device, dtype, ``requires_grad`` and training mode are
    kept. Returns the converted module (``module`` itself when it is not a BatchNorm; its
    children are replaced in place).

    Raises:
        ValueError: a BatchNorm without running statistics with ``num_components > 1``
            (the E-step needs a running mixture); the message names the module.
    """
    from .distributed import SyncCompoundBatchNorm

    def convert(m: nn.Module, name: str) -> nn.Module:
        target = None
        if isinstance(m, nn.SyncBatchNorm):
            target = SyncCompoundBatchNorm
        else:
            for bn_cls, cbn_cls in _MATCHING:
                if isinstance(m, bn_cls):
                    target = cbn_cls
        if target is not None:
            try:
                new = target.from_batchnorm(m, num_components)
            except ValueError as e:
                raise ValueError(f"convert_batchnorm: {name or type(m).__name__}: {e}") from e
            if isinstance(m, nn.SyncBatchNorm):
                new.process_group = m.process_group
            return new
        for child_name, child in m.named_children():
            full = f"{name}.{child_name}" if name else child_name
            new_child = convert(child, full)
            if new_child is not child:
                m.add_module(child_name, new_child)
        return m

    return convert(module, "")


def class_groups(class_counts: Union[Tensor, Sequence[int]], num_groups: int) -> Tensor:
    """Cuts the classes into ``num_groups`` groups by frequency (SPEC): classes ordered by
    count, descending (ties: lower class index first), cut into contiguous groups like
    ``torch.tensor_split``. Returns a LongTensor of length num_classes mapping each class
    to its group; group 0 holds the most frequent (head) classes.

    Raises:
        ValueError: ``num_groups`` not in [1, num_classes], or counts not 1-D.
    """
    counts = torch.as_tensor(class_counts)
    if counts.dim() != 1 or counts.numel() == 0:
        raise ValueError(f"class_groups: expected a 1-D sequence of class counts, got shape "
                         f"{tuple(counts.shape)}")
    if not 1 <= num_groups <= counts.numel():
        raise ValueError(f"class_groups: num_groups must be in [1, {counts.numel()}] "
                         f"(the number of classes), got {num_groups}")
    order = torch.sort(-counts.to(torch.float64), stable=True).indices
    out = torch.empty(counts.numel(), dtype=torch.long)
    for g, chunk in enumerate(torch.tensor_split(order, num_groups)):
        out[chunk] = g
    return out


def _compound_layers(model: nn.Module) -> Iterator[tuple]:
    for name, m in model.named_modules():
        if isinstance(m, _CompoundBatchNorm):
            yield name or type(m).__name__, m


@contextlib.contextmanager
def split_by(model: nn.Module, groups: Tensor):
    """Inside the context, every compound layer of ``model`` takes its responsibilities
    from ``groups`` (the split path): tau[p, k] = 1 if the sample of position p is in group
    k, else 0. ``groups`` is an integer tensor (N,) of values in [0, K) for the batches
    that follow. Statistics, the active rule and the running update are the M-step's; the
    first-batch initialisation does not run.

    Raises:
        ValueError (on entry): groups not 1-D integers, or (groups on the CPU) a group id
            outside [0, K) of some layer, naming it; (at a forward) a batch size other
            than len(groups), naming the layer.
        RuntimeError: group ids on a GPU outside [0, K): a device-side assert at the
            layer's kernel (the host does not read device memory to check them, so that
            a training step does not synchronise).
    """
    groups = torch.as_tensor(groups)
    if groups.dim() != 1 or groups.dtype.is_floating_point or groups.dtype == torch.bool:
        raise ValueError(f"split_by: expected a 1-D integer tensor of group ids, got "
                         f"{groups.dtype} of shape {tuple(groups.shape)}")
    layers = list(_compound_layers(model))
    if groups.numel() > 0 and layers and groups.device.type == "cpu":
        lo, hi = int(groups.min()), int(groups.max())  # free on the CPU
        for name, m in layers:
            if lo < 0 or hi >= m.num_components:
                raise ValueError(f"{name}: split_by group ids must be in [0, "
                                 f"{m.num_components}), got ids in [{lo}, {hi}]")
    by_device = {}
    previous = [(m, m._split_groups, m._split_name) for _, m in layers]
    try:
        for name, m in layers:
            device = m.running_mean.device if m.running_mean is not None else (
                m.weight.device if m.weight is not None else groups.device)
            if device not in by_device:
                # non-blocking: a host-to-device copy that does not wait for the device
                by_device[device] = groups.to(device=device, dtype=torch.long,
                                              non_blocking=True)
            m._split_groups = by_device[device]
            m._split_name = name
        yield model
    finally:
        for m, g, n in previous:
            m._split_groups = g
            m._split_name = n


def read_mixture_state(model: nn.Module) -> nn.Module:
    """Reads every compound layer's ``num_batches_tracked`` (one host-device
    synchronisation on a GPU), so that the layers past their first training batch skip the
    first-batch question from the next step on. On a GPU the layers otherwise learn it from
    a non-blocking copy after their first steps; inside ``torch.compile`` they cannot, and
    answer the question on the device at every step (an extra pass over the batch): call
    this before compiling a model that has trained, or after its first eager step.
    Returns ``model``."""
    for _, m in _compound_layers(model):
        nbt = m.num_batches_tracked
        if nbt is None:
            continue
        m._nbt_readback = None
        m._mixture_ready = bool(int(nbt) > 0)
        m._nbt_seen = (id(nbt), nbt._version) if m._mixture_ready else None
    return model


class DualPathLoss(NamedTuple):
    """What :func:`dual_path_loss` returns."""

    loss: Tensor         # main + auxiliary + consistency_weight * consistency
    main: Tensor         # criterion(logits of the main path, targets)
    auxiliary: Tensor    # criterion(logits of the split path, targets)
    consistency: Tensor  # KL(softmax(aux).detach() || softmax(main)), batch mean
    logits: Tensor       # the main path's logits


def dual_path_loss(model: nn.Module, inputs: Tensor, targets: Tensor, class_to_group: Tensor,
                   criterion: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy,
                   consistency_weight: float = 1.0) -> DualPathLoss:
    """The dual-path training loss (SPEC): the main path (soft responsibilities) and the
    auxiliary path, which runs the model again under :func:`split_by` with each sample in
    the group of its class, ``class_to_group[targets]``::

        loss = criterion(main, y) + criterion(aux, y)
               + consistency_weight * KL(softmax(aux).detach() || softmax(main))

    Both passes update the running statistics (the split path's running update is the
    M-step's). Inference uses the main path only.

    Args:
        model: a model with compound layers, in training mode.
        inputs: the batch; targets: class indices (N,).
        class_to_group: LongTensor (num_classes,), e.g. from :func:`class_groups`.
    Returns:
        :class:`DualPathLoss` (loss, main, auxiliary, consistency, logits).
    """
    logits_main = model(inputs)
    groups = class_to_group.to(targets.device, non_blocking=True)[targets]
    with split_by(model, groups):
        logits_aux = model(inputs)
    main = criterion(logits_main, targets)
    aux = criterion(logits_aux, targets)
    consistency = F.kl_div(F.log_softmax(logits_main, dim=1),
                           F.softmax(logits_aux, dim=1).detach(), reduction="batchmean")
    loss = main + aux + consistency_weight * consistency
    return DualPathLoss(loss, main, aux, consistency, logits_main)

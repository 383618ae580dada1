"""Shared helpers: devices, random mixture-like inputs, runs of the kernels and of the
float64 reference, and relative errors."""

from __future__ import annotations

import contextlib
import functools
import os
import subprocess
import sys
import zlib
from dataclasses import dataclass
from typing import Optional

import pytest
import torch

import cbn_ext
from cbn_ext import functional as Fc
from cbn_ext import ops
from cbn_ext import reference as R

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
# SPEC "Accuracy": relative error against a float64 evaluation of the formulas.
TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}


HAS_CUDA = torch.cuda.is_available() and cbn_ext.build_info()["cuda"]
HAS_EMU = cbn_ext.build_info()["cuda_emulation"]


def device_params(emu: bool = False):
    """"cpu", "cuda" (skipped without a GPU) and, with emu=True, "emu": the CUDA kernels
    run by the emulated CUDA backend on CPU tensors (skipped when it is not built)."""
    params = [pytest.param("cpu"),
              pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(
                  not HAS_CUDA, reason="needs a CUDA device and a build with CUDA kernels")])]
    if emu:
        params.append(pytest.param("emu", marks=[pytest.mark.emu, pytest.mark.skipif(
            not HAS_EMU, reason="needs the emulated CUDA backend (CBN_CUDA_EMULATION=1)")]))
    return params


def seed_of_params(*params) -> int:
    """A seed that depends on a test's parameters only (str hashes vary per process)."""
    return zlib.crc32(repr(params).encode())


def torch_device(device: str) -> str:
    """The torch device of a test device ("emu" runs on CPU tensors)."""
    return "cpu" if device == "emu" else device


@contextlib.contextmanager
def backend(device: str):
    """Within the context, the operators of `device`'s backend serve cbn_ext's calls: the
    emulated CUDA backend's for "emu", the dispatcher's choice otherwise."""
    if device != "emu":
        yield
        return
    saved = ops._ops
    ops._ops = torch.ops.cbn_ext_emu
    try:
        yield
    finally:
        ops._ops = saved


def rel_err(out, ref) -> float:
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    assert out.shape == ref.shape, (out.shape, ref.shape)
    den = ref.norm().item()
    num = (out - ref).norm().item()
    if den == 0.0:
        return num
    return num / den


def acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def channels_inner(x: torch.Tensor) -> torch.Tensor:
    """x with its channels innermost in memory (channels_last for 4D/5D; the same
    strides for 2D/3D inputs), same values."""
    perm = [0, *range(2, x.dim()), 1]
    inv = [0, x.dim() - 1, *range(1, x.dim() - 1)]
    return x.permute(perm).contiguous().permute(inv)


@dataclass
class Case:
    x: torch.Tensor
    running_mean: torch.Tensor
    running_var: torch.Tensor
    running_prior: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor
    grad: torch.Tensor
    groups: Optional[torch.Tensor]
    device: str = ""  # the test device ("emu": CPU tensors, emulated CUDA kernels)

    @property
    def K(self):
        return self.running_mean.shape[0]


def make_case(shape, K, dtype=torch.float32, channels_last=False, seed=0, device="cpu",
              groups=False, spread=0.8, offset=0.0) -> Case:
    """Mixture-like random data: each sample around one of max(K, 2) random centers, and
    running statistics near those centers (never zeros, never constants)."""
    g = torch.Generator().manual_seed(seed)
    N, C = shape[0], shape[1]
    nc = max(K, 2)
    centers = torch.randn(nc, C, generator=g, dtype=torch.float64) * 1.5
    assign = torch.randint(0, nc, (N,), generator=g)
    view = (N, C) + (1,) * (len(shape) - 2)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * spread
         + centers[assign].view(view) + offset)
    rm = centers[:K] + 0.3 * torch.randn(K, C, generator=g, dtype=torch.float64) + offset
    rv = 0.5 + torch.rand(K, C, generator=g, dtype=torch.float64)
    rp = torch.softmax(torch.randn(K, generator=g, dtype=torch.float64), 0)
    w = 1.0 + 0.3 * torch.randn(K, C, generator=g, dtype=torch.float64)
    b = 0.3 * torch.randn(K, C, generator=g, dtype=torch.float64)
    gr = torch.randn(shape, generator=g, dtype=torch.float64)
    grp = torch.randint(0, K, (N,), generator=g) if groups else None
    acc = acc_dtype(dtype)

    tdev = torch_device(device)

    def dev(t, dt):
        return t.to(device=tdev, dtype=dt)

    x, gr = dev(x, dtype), dev(gr, dtype)
    if channels_last:
        x, gr = channels_inner(x), channels_inner(gr)
    return Case(x, dev(rm, acc), dev(rv, acc), dev(rp, acc), dev(w, acc), dev(b, acc), gr,
                None if grp is None else grp.to(tdev), device)


def counts_near_one(case: Case, nbt: Optional[int] = 3, eps=1e-5, band=1e-3) -> bool:
    """Whether some component's N_k lies within `band` of 1 (float64 evaluation). The
    SPEC's active rule (N_k > 1) is discontinuous there, so a float32 and a float64
    evaluation may then legitimately disagree on whether the component is active."""
    d = torch.float64
    n = None if nbt is None else torch.tensor(nbt, device=case.x.device)
    out = torch.ops.cbn_ext.forward_train(
        case.x.to(d), case.weight.to(d), case.bias.to(d), case.running_mean.to(d),
        case.running_var.to(d), case.running_prior.to(d), n, case.groups, case.K, eps)
    count = out[4]
    return bool(((count - 1).abs() < band).any())


def make_stable_case(*args, seed=0, nbt: Optional[int] = 3, **kwargs) -> Case:
    """make_case, with the seed moved on until no N_k sits at the active threshold."""
    for s in range(seed, seed + 50):
        case = make_case(*args, seed=s, **kwargs)
        if not counts_near_one(case, nbt):
            return case
    raise AssertionError("no seed without a count near 1")


@dataclass
class Result:
    y: torch.Tensor
    dx: Optional[torch.Tensor]
    dw: Optional[torch.Tensor]
    db: Optional[torch.Tensor]
    running_mean: torch.Tensor
    running_var: torch.Tensor
    running_prior: torch.Tensor
    num_batches_tracked: torch.Tensor


def run(fn, case: Case, training: bool, nbt: Optional[int] = 3, momentum=0.1, eps=1e-5,
        dtype=None, backward=True, affine=True) -> Result:
    """Forward (and backward with case.grad) of fn = functional or reference; dtype: run
    on copies cast to it (the reference in float64)."""
    def cast(t, dt=None):
        if t is None:
            return None
        t = t.detach().clone()
        return t if dt is None else t.to(dt)

    in_dt = dtype
    acc = None if dtype is None else acc_dtype(dtype)
    x = cast(case.x, in_dt).requires_grad_(backward)
    w = cast(case.weight, acc).requires_grad_(backward) if affine else None
    b = cast(case.bias, acc).requires_grad_(backward) if affine else None
    rm, rv, rp = cast(case.running_mean, acc), cast(case.running_var, acc), cast(case.running_prior, acc)
    n = None if nbt is None else torch.tensor(nbt, device=case.x.device)
    with backend(case.device):
        y = fn(x, rm, rv, rp, w, b, training, momentum, eps, n, case.groups)
        dx = dw = db = None
        if backward:
            y.backward(cast(case.grad, in_dt))
            dx, dw, db = x.grad, (w.grad if affine else None), (b.grad if affine else None)
    return Result(y.detach(), dx, dw, db, rm, rv, rp, n)


def compare(ours: Result, ref: Result, tol: float, what=("y", "dx", "dw", "db", "running_mean",
                                                         "running_var", "running_prior")):
    errs = {}
    for name in what:
        a, b = getattr(ours, name), getattr(ref, name)
        if a is None and b is None:
            continue
        errs[name] = rel_err(a, b)
    bad = {k: v for k, v in errs.items() if not (v <= tol)}  # NaN fails
    assert not bad, f"relative errors above {tol:g}: {bad} (all: {errs})"
    return errs


def compare_with_rule(ours: Result, case: Case, training: bool, dtype, what=(
        "y", "dx", "dw", "db", "running_mean", "running_var", "running_prior"), **kwargs):
    """The SPEC's accuracy rule: each result within TOL[dtype] (relative) of the float64
    evaluation, or, where the pure-PyTorch reference run in `dtype` on the same input
    misses that too, within twice that reference's own error. Returns {name: (error,
    bound)}."""
    exact = run(R.compound_batch_norm, case, training, dtype=torch.float64, **kwargs)
    same = run(R.compound_batch_norm, case, training, **kwargs)
    out, bad = {}, {}
    for name in what:
        a, b, c = getattr(ours, name), getattr(exact, name), getattr(same, name)
        if a is None and b is None:
            continue
        err = rel_err(a, b)
        bound = max(TOL[dtype], 2.0 * rel_err(c, b))
        out[name] = (err, bound)
        if not err <= bound:  # NaN fails
            bad[name] = (err, bound)
    assert not bad, f"(error, bound) above the SPEC's rule: {bad} (all: {out})"
    return out


# The CPU kernels' builds, in order, and the ones this processor runs (the best last),
# asked of a process without CBN_EXT_CPU_ISA (which caps the choice).
CPU_ISAS = ("baseline", "avx2", "avx512")


@functools.lru_cache(maxsize=None)
def cpu_isas_run():
    env = dict(os.environ)
    env.pop("CBN_EXT_CPU_ISA", None)
    p = subprocess.run([sys.executable, "-c",
                        "import cbn_ext; print(cbn_ext.build_info()['cpu_isa'])"],
                       env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    return CPU_ISAS[:CPU_ISAS.index(p.stdout.strip()) + 1]


__all__ = ["DTYPES", "TOL", "Case", "Result", "make_case", "make_stable_case", "run", "compare", "rel_err",
           "device_params", "channels_inner", "Fc", "R", "acc_dtype", "torch_device", "backend",
           "compare_with_rule", "seed_of_params",
           "HAS_CUDA", "HAS_EMU", "CPU_ISAS", "cpu_isas_run"]

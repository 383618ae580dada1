"""The emulated CUDA backend (CBN_CUDA_EMULATION=1 builds): the CUDA kernels of csrc/cuda/,
compiled as host C++ and run on the CPU (csrc/emu/). The accuracy grids of test_kernels.py,
test_cuda.py and test_separated.py run through it too (their "emu" device); this file
checks what is particular to it: the schedule does not change results (no races), launch
configurations are checked like the hardware does, tile boundaries and large shared
memory, and agreement with the CPU kernels on every kernel path."""

import os
import sys

import pytest
import torch

import cbn_ext
from conftest import (HAS_EMU, TOL, Fc, R, backend, compare, make_case, make_stable_case, rel_err,
                      run)

needs_emu = pytest.mark.skipif(not HAS_EMU, reason="needs the emulated CUDA backend "
                                                   "(build with CBN_CUDA_EMULATION=1)")
pytestmark = [pytest.mark.emu]

emu_ops = torch.ops.cbn_ext_emu if HAS_EMU else None
RESULTS = ("y", "dx", "dw", "db", "running_mean", "running_var", "running_prior")


def _emu():
    from cbn_ext import _emu
    return _emu


def test_built_when_asked():
    """CI builds with CBN_CUDA_EMULATION=1: then the emulated backend must be there, or
    every emulated test would be skipped silently."""
    if os.environ.get("CBN_CUDA_EMULATION", "0") == "1":
        assert HAS_EMU, "CBN_CUDA_EMULATION=1, but cbn_ext._emu is not built"
    else:
        pytest.skip("CBN_CUDA_EMULATION is not set")


# A build without the emulated backend (any user's pip install): cbn_ext._emu is missing,
# which a finder stands in for here (CI builds the backend). The first GPU run found the
# package not importing in that case: `from . import _emu` raises a plain ImportError for
# a missing submodule, not the ModuleNotFoundError that ops.py tolerated.
_WITHOUT_EMU = """
import importlib.abc, sys
class NoEmu(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "cbn_ext._emu":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, NoEmu())
import cbn_ext
print("has_emulation", cbn_ext.ops.has_emulation())
"""

_BROKEN_EMU = """
import importlib.abc, sys
class BrokenEmu(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "cbn_ext._emu":
            raise ModuleNotFoundError("No module named 'a_dependency'", name="a_dependency")
sys.meta_path.insert(0, BrokenEmu())
import cbn_ext
"""


def test_imports_without_the_emulated_backend():
    """The package imports without cbn_ext._emu (has_emulation() is then False), and an
    _emu that is there but cannot load (a dependency missing) is an error, not a silent
    absence."""
    import subprocess
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    r = subprocess.run([sys.executable, "-c", _WITHOUT_EMU], capture_output=True, text=True,
                       env=env, timeout=120)
    assert r.returncode == 0 and "has_emulation False" in r.stdout, r.stderr[-2000:]
    r = subprocess.run([sys.executable, "-c", _BROKEN_EMU], capture_output=True, text=True,
                       env=env, timeout=120)
    assert r.returncode != 0 and "a_dependency" in r.stderr, (r.stdout, r.stderr[-2000:])


@needs_emu
def test_planted_defects_are_caught():
    """Kernels with a defect each (csrc/emu/operators_emu.cpp): the emulation reports or
    exposes every one."""
    r = _emu().self_test()
    # static shared memory is poisoned before every block: a read of a value no thread
    # of this launch wrote is NaN (0xFFFFFFFF), not the previous launch's 7
    assert r["static_smem_read_before_write"] == 0xFFFFFFFF
    assert r["static_smem_read_before_write_2"] == 0xFFFFFFFF
    assert r["shared_variables"] >= 1
    assert r["dynamic_smem_in_bounds"] == ""
    assert "written out of bounds (after its 256 bytes)" in r["dynamic_smem_past_end"]
    assert "dynamic_smem_kernel (operators_emu.cpp:" in r["dynamic_smem_past_end"]
    assert "divergent barrier" in r["divergent_barrier"]
    assert "warp of 16 threads" in r["partial_warp"]
    assert "invalid configuration" in r["too_many_threads"]
    assert "cudaFuncSetAttribute" in r["smem_without_opt_in"]
    assert r["block_sum_with_barrier"] == [256.0] * 6
    # a missing __syncthreads: wrong (NaN from the poison) under some schedules
    assert any(not v == 256.0 for v in r["block_sum_without_barrier"])


@needs_emu
def test_build_info_and_device():
    assert cbn_ext.build_info()["cuda_emulation"] is True
    dev = _emu().device()
    assert dev["multi_processor_count"] == 132
    assert dev["shared_memory_per_block_optin"] == 227 * 1024


def _all_paths():
    """(shape, K, dtype, channels_last, mode): every kernel and branch of csrc/cuda/."""
    out = []
    for shape, cl in (((3, 13, 5, 7), False), ((3, 13, 5, 7), True), ((40, 70), False)):
        for K in (1, 2, 5, 9):
            for mode in ("train", "eval", "split-train", "split-eval"):
                if mode.startswith("split") and K == 1:
                    continue
                out.append((shape, K, cl, mode))
    return out


@needs_emu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape,K,channels_last,mode", _all_paths())
def test_agrees_with_cpu_kernels(shape, K, channels_last, mode, dtype):
    training = mode.endswith("train")
    split = mode.startswith("split")
    cpu = make_stable_case(shape, K, dtype, channels_last=channels_last, seed=K, groups=split)
    emu = make_stable_case(shape, K, dtype, channels_last=channels_last, seed=K, groups=split,
                           device="emu")
    a = run(Fc.compound_batch_norm, cpu, training)
    b = run(Fc.compound_batch_norm, emu, training)
    compare(b, a, 2 * TOL[dtype], RESULTS)


@needs_emu
@pytest.mark.parametrize("mode", ["train", "eval", "split-train"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_schedule_does_not_change_results(channels_last, mode):
    """Threads resume in a different order after every barrier and warp operation under
    each seed (seed 0: thread order): a race would change the bits."""
    emu = _emu()
    case = make_case((5, 37, 6, 7), 4, torch.float32, channels_last=channels_last, seed=3,
                     device="emu", groups=mode.startswith("split"))
    training = mode != "eval"
    results = []
    old = emu.set_seed(0)
    try:
        for seed in (0, 1, 12345, 2 ** 40 + 7):
            emu.set_seed(seed)
            results.append(run(Fc.compound_batch_norm, case, training))
    finally:
        emu.set_seed(old)
    for other in results[1:]:
        for name in RESULTS:
            assert torch.equal(getattr(results[0], name), getattr(other, name)), name


@needs_emu
@pytest.mark.parametrize("sms", [1, 3, 16])
@pytest.mark.parametrize("mode", ["train", "eval", "split-train"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_other_multiprocessor_counts(channels_last, mode, sms):
    """The tile plans and grids follow the device's multiprocessor count: on smaller
    devices a block walks many tiles, merging each tile's partials into its row, and the
    tree reductions take other shapes. Results stay within the accuracy bar."""
    emu = _emu()
    old = emu.set_multiprocessors(sms)
    try:
        assert emu.device()["multi_processor_count"] == sms
        split = mode.startswith("split")
        case = make_stable_case((6, 37, 30, 30), 3, torch.float32, channels_last=channels_last,
                                seed=sms, device="emu", groups=split)
        training = mode != "eval"
        ours = run(Fc.compound_batch_norm, case, training)
        ref = run(R.compound_batch_norm, case, training, dtype=torch.float64)
        compare(ours, ref, TOL[torch.float32])
    finally:
        emu.set_multiprocessors(old)
    assert emu.device()["multi_processor_count"] == old == 132
    with pytest.raises(ValueError, match="expected a count in"):
        emu.set_multiprocessors(0)


@needs_emu
@pytest.mark.parametrize("sms", [1, 132])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("K", [2, 3])
@pytest.mark.parametrize("shape", [(3, 3, 7, 41), (3, 11, 7, 41), (4, 7, 1, 700), (2, 19, 1, 700)])
def test_planar_channel_rows(shape, K, dtype, sms):
    """NCHW gradient sums, a warp per channel stepping its row pointers by 8 channels
    (csrc/cuda/backward.cu): C = 3 and 7 (warps without a channel), 11 (warps 0-2 step once,
    3-7 not at all) and 19 (some warps twice, some once); samples of one tile and of several
    (700 positions), on 1 and 132 multiprocessors: the reference's results, and the same
    ones twice."""
    emu = _emu()
    old = emu.set_multiprocessors(sms)
    try:
        case = make_stable_case(shape, K, dtype, channels_last=False, seed=K + sms,
                                device="emu")
        ours = run(Fc.compound_batch_norm, case, True)
        compare(ours, run(R.compound_batch_norm, case, True, dtype=torch.float64), TOL[dtype])
        again = run(Fc.compound_batch_norm, case, True)
        for name in RESULTS:
            assert torch.equal(getattr(ours, name), getattr(again, name)), name
    finally:
        emu.set_multiprocessors(old)


def _benchmark_stages():
    """The benchmark's ResNet stage shapes (benchmarks/bench.py RESNET_SHAPES), N = 2."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks"))
    import bench
    return [(2, *map(int, s.split("x")[1:])) for s in bench.RESNET_SHAPES.split(",")]


@needs_emu
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("shape", _benchmark_stages(), ids=lambda s: "x".join(map(str, s)))
def test_benchmark_stage_shapes(shape, layout):
    """The tile plans of the benchmark's shapes (whole-sample and chunked NCHW tiles,
    channel groups of 64 to 512 channels, many tiles per block), every K of the test grid
    and every dtype (K = 3 float64: two component blocks of 2; K = 8: the wide blocks),
    training, evaluation and given groups: the emulated CUDA kernels agree with the CPU
    kernels."""
    cl = layout == "channels_last"
    for K, dtype, modes in ((1, torch.float16, ("train", "eval")),
                            (2, torch.bfloat16, ("train", "eval", "split-train")),
                            (3, torch.float64, ("train", "eval")),
                            (4, torch.float32, ("train", "eval")),
                            (8, torch.float32, ("train",))):
        for mode in modes:
            split = mode.startswith("split")
            kw = dict(channels_last=cl, seed=K, groups=split)
            cpu = make_stable_case(shape, K, dtype, **kw)
            emu = make_stable_case(shape, K, dtype, device="emu", **kw)
            training = mode.endswith("train")
            compare(run(Fc.compound_batch_norm, emu, training),
                    run(Fc.compound_batch_norm, cpu, training), 2 * TOL[dtype], RESULTS)


@needs_emu
def test_large_dynamic_shared_memory():
    """float64 with 16 components and long tiles: the soft backward's tile needs more than
    48 KiB of shared memory per block (2 x 128 positions x 16 components of tau and its
    gradient, and the reduction buffer), which the launch must opt into (the emulation
    refuses it otherwise, as the hardware does)."""
    case = make_stable_case((34000, 4), 16, torch.float64, seed=16, device="emu")
    ours = run(Fc.compound_batch_norm, case, True)
    ref = run(R.compound_batch_norm, case, True, dtype=torch.float64)
    compare(ours, ref, TOL[torch.float64])


@needs_emu
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("delta", [-1, 0, 1])
def test_tile_boundaries(delta, layout):
    """Inputs whose positions end just before, at and just after a tile boundary of the
    CUDA tile plan (interleaved tiles of 16 positions and more; planar tiles of whole
    samples or 32-position chunks)."""
    if layout == "channels_last":
        shape = (4, 9, 8, 33 + delta)   # M = 4 * 8 * (33 + delta) positions
    else:
        shape = (3, 9, 1, 64 + delta)   # S around two 32-position chunks
    case = make_stable_case(shape, 3, torch.float32, channels_last=(layout == "channels_last"),
                            seed=11 + delta, device="emu")
    for training in (True, False):
        ours = run(Fc.compound_batch_norm, case, training)
        ref = run(R.compound_batch_norm, case, training, dtype=torch.float64)
        compare(ours, ref, TOL[torch.float32])


@needs_emu
def test_building_block_operators():
    """The synced layer's building blocks (batch_stats, normalize, grad_sums, grad_input)
    on the emulated backend equal the fused operators' results."""
    case = make_stable_case((4, 11, 5, 6), 3, torch.float32, seed=4, device="emu")
    x, w, b = case.x, case.weight, case.bias
    rm, rv, rp = case.running_mean, case.running_var, case.running_prior
    out, tau, mean, var, count, mm, mv, mp = emu_ops.forward_train(x, w, b, rm, rv, rp, None,
                                                                   None, 3, 1e-5)
    tau2, mean2, var2, count2, *_ = emu_ops.batch_stats(x, rm, rv, rp, None, None, 3, 1e-5)
    assert torch.equal(tau, tau2) and torch.equal(count, count2)
    active = count > 1
    assert torch.equal(mean[active], mean2[active]) and torch.equal(var[active], var2[active])
    y = emu_ops.normalize(x, w, b, tau, mean, var, None, 1e-5)
    assert rel_err(y, out) <= 1e-6
    g = case.grad
    sg, sgx = emu_ops.grad_sums(g, x, tau, mean)
    gi = emu_ops.grad_input(g, x, w, b, tau, mean, var, count, mm, mv, sg, sgx, True, True, 1e-5)
    gi2, gw, gb = emu_ops.backward_train(g, x, w, b, tau, mean, var, count, mm, mv, True, 1e-5,
                                         [True, True, True])
    assert rel_err(gi, gi2) <= 1e-6
    assert rel_err(gb, sg) <= 1e-6


@needs_emu
def test_backend_errors_reach_python():
    """The shared checks raise the same errors on the emulated backend."""
    with backend("emu"):
        with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
            Fc.compound_batch_norm(torch.randn(1, 3), torch.zeros(2, 3), torch.ones(2, 3),
                                   torch.full((2,), 0.5), training=True)

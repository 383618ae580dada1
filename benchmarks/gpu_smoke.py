"""Every CUDA kernel on small shapes, against the CPU kernels: train, eval and split
forwards, both backwards (training and evaluation), the running update; K = 1, 2, 5
(several register blocks) and 9 (more components than a block); contiguous and
channels-last; float32 and bfloat16. Exits non-zero on a mismatch.

    python benchmarks/gpu_smoke.py [--device cuda]            # the full grid (84 cases)
    python benchmarks/gpu_smoke.py --quick                    # 14 cases, every kernel
    python benchmarks/gpu_smoke.py --quick --list-kernels     # and the GPU kernels they ran

--quick is what benchmarks/gpu_check.sh runs under compute-sanitizer (each tool
multiplies a kernel's time by 10-100): few cases, chosen so that together they still
launch every kernel and every branch of it -- see QUICK_CASES.
"""

import argparse
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
sys.path.insert(0, ROOT)
from conftest import Fc, make_stable_case, rel_err, run  # noqa: E402

TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float64: 1e-9}

# (shape, channels_last, dtype, K, mode, why): every kernel of csrc/cuda and each of its
# paths -- soft / given / single responsibilities, planar / interleaved tiles, one and
# several register blocks (KB = 4 for K <= 4, else 8 in passes), the evaluation backward
# (no batch statistics), 2D input, and dynamic shared memory above the default 48 KiB.
QUICK_CASES = [
    ((3, 13, 5, 7), False, torch.float32, 1, "train", "K = 1: no responsibilities"),
    ((3, 13, 5, 7), True, torch.bfloat16, 2, "train", "soft, interleaved, bfloat16"),
    ((3, 13, 5, 7), False, torch.bfloat16, 9, "train", "soft, planar, two register passes"),
    ((3, 13, 5, 7), True, torch.float32, 5, "train", "soft, interleaved, KB = 8"),
    ((3, 13, 5, 7), False, torch.float32, 5, "eval", "eval forward and backward, planar"),
    ((3, 13, 5, 7), True, torch.float32, 9, "eval", "eval, interleaved, K > 8"),
    ((3, 13, 5, 7), True, torch.float32, 9, "split-train", "given groups, interleaved"),
    ((3, 13, 5, 7), False, torch.bfloat16, 2, "split-train", "given groups, planar"),
    ((3, 13, 5, 7), False, torch.float32, 2, "split-eval", "given groups at eval"),
    ((40, 70), False, torch.float32, 2, "train", "2D input (N, C)"),
    ((40, 70), False, torch.bfloat16, 5, "split-eval", "2D, given groups, bfloat16"),
    # planar soft grad_input: 8 * (K + 2 K 256) bytes = 49248 > 48 KiB for K = 12
    ((4, 6, 20, 20), False, torch.float64, 12, "train", "dynamic shared memory > 48 KiB"),
    # the two kernels the first GPU runs' smoke never launched (2026-11-29), so that no
    # sanitizer checked them: the ids' check of a single component with group ids, and
    # the backward's sums reduced in chunks (256 tiles of 16 positions)
    ((3, 13, 5, 7), False, torch.float32, 1, "split-train", "K = 1 with group ids: the ids' check"),
    ((16, 6, 16, 16), True, torch.float32, 2, "train", "256 tiles: the sums in chunks"),
]


def full_cases():
    for shape in [(3, 13, 5, 7), (40, 70)]:
        for layout in (False, True):
            if layout and len(shape) == 2:
                continue
            for dtype in (torch.float32, torch.bfloat16):
                for K in (1, 2, 5, 9):
                    for mode in ("train", "eval", "split-train", "split-eval"):
                        if mode.startswith("split") and K == 1:
                            continue
                        yield shape, layout, dtype, K, mode, ""


def check_case(device, shape, layout, dtype, K, mode):
    """Relative errors of the device's forward, backward and running update against the
    CPU kernels' on the same case: {name: error} for those above the dtype's bound."""
    training = mode.endswith("train")
    split = mode.startswith("split")
    cpu = make_stable_case(shape, K, dtype, channels_last=layout, seed=K, groups=split)
    dev = make_stable_case(shape, K, dtype, channels_last=layout, seed=K, groups=split,
                           device=device)
    a = run(Fc.compound_batch_norm, cpu, training)
    b = run(Fc.compound_batch_norm, dev, training)
    errs = {name: rel_err(getattr(b, name), getattr(a, name))
            for name in ("y", "dx", "dw", "db", "running_mean", "running_var", "running_prior")}
    return {k: v for k, v in errs.items() if not v <= TOL[dtype]}


def kernels_seen(device, cases):
    """Names of the GPU kernels that the cases launch (torch.profiler; CUDA only)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for shape, layout, dtype, K, mode, _ in cases:
            check_case(device, shape, layout, dtype, K, mode)
        torch.cuda.synchronize()
    names = set()
    for evt in prof.events():
        if getattr(evt, "device_type", None) == torch.autograd.DeviceType.CUDA:
            names.add(evt.name)
    return sorted(names)


def short_kernel_name(name):
    """'void ns::(anonymous namespace)::foo_kernel<float, 4>(P)' -> 'foo_kernel'."""
    depth, out = 0, []
    for ch in name:  # drop template arguments and the parameter list
        if ch in "<(":
            depth += 1
        elif ch in ">)":
            depth -= 1
        elif depth == 0:
            out.append(ch)
    base = "".join(out).split()[-1] if "".join(out).split() else name
    return base.split("::")[-1]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--quick", action="store_true", help="the short list (QUICK_CASES)")
    p.add_argument("--cases", type=int, default=None, help="only the first N cases")
    p.add_argument("--list-kernels", action="store_true",
                   help="also print the GPU kernels the cases launch (CUDA only)")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_smoke: --device cuda, but no CUDA device is available")
    cases = QUICK_CASES if args.quick else list(full_cases())
    cases = cases[:args.cases] if args.cases else cases
    t0 = time.perf_counter()
    failures = 0
    for shape, layout, dtype, K, mode, why in cases:
        tag = (f"{'x'.join(map(str, shape))} {'channels_last' if layout else 'contiguous'} "
               f"{str(dtype).split('.')[-1]} K={K} {mode}")
        try:
            bad = check_case(args.device, shape, layout, dtype, K, mode)
        except Exception as e:  # a launch error must not hide the other cases' results
            bad = {"exception": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
            if args.device == "cuda" and "CUDA error" in str(e):
                failures += 1
                print(f"MISMATCH {tag}: {bad} -- the CUDA context is lost, stopping", flush=True)
                break
        if bad:
            failures += 1
            print(f"MISMATCH {tag}: {bad}", flush=True)
        elif args.quick:
            print(f"ok {tag}" + (f"  ({why})" if why else ""), flush=True)
    n = len(cases)
    print(f"gpu_smoke: {n - failures}/{n} cases agree with the CPU kernels "
          f"({time.perf_counter() - t0:.1f} s)", flush=True)
    if args.list_kernels and args.device == "cuda" and not failures:
        try:
            names = kernels_seen(args.device, cases)
            ours = sorted({short_kernel_name(n) for n in names if "cbn_ext" in n})
            print(f"gpu_smoke: kernels of cbn_ext launched ({len(ours)}): {', '.join(ours)}")
            others = sorted({short_kernel_name(n) for n in names if "cbn_ext" not in n})
            print(f"gpu_smoke: other kernels ({len(others)}): {', '.join(others)}")
        except Exception as e:  # the profiler is a nicety here
            print(f"gpu_smoke: could not list the kernels ({type(e).__name__}: {e})")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()

"""Every CUDA kernel once, on small shapes, against the CPU kernels: train, eval and split
forwards, both backwards, the running update; K = 1, 2, 5 (several register blocks) and
9 (more components than a block); contiguous and channels-last; float32 and bfloat16.
Fast enough to run under compute-sanitizer (benchmarks/gpu_check.sh). Exits non-zero on
a mismatch.

    python benchmarks/gpu_smoke.py [--device cuda]
"""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from conftest import Fc, make_stable_case, rel_err, run  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cuda")
    args = p.parse_args()
    failures = 0
    n = 0
    for shape in [(3, 13, 5, 7), (40, 70)]:
        for layout in (False, True):
            if layout and len(shape) == 2:
                continue
            for dtype, tol in ((torch.float32, 2e-5), (torch.bfloat16, 2e-2)):
                for K in (1, 2, 5, 9):
                    for mode in ("train", "eval", "split-train", "split-eval"):
                        if mode.startswith("split") and K == 1:
                            continue
                        training = mode.endswith("train")
                        split = mode.startswith("split")
                        cpu = make_stable_case(shape, K, dtype, channels_last=layout, seed=K,
                                               groups=split)
                        dev = make_stable_case(shape, K, dtype, channels_last=layout, seed=K,
                                               groups=split, device=args.device)
                        a = run(Fc.compound_batch_norm, cpu, training)
                        b = run(Fc.compound_batch_norm, dev, training)
                        errs = {name: rel_err(getattr(b, name), getattr(a, name))
                                for name in ("y", "dx", "dw", "db", "running_mean",
                                             "running_var", "running_prior")}
                        n += 1
                        bad = {k: v for k, v in errs.items() if not v <= tol}
                        if bad:
                            failures += 1
                            print(f"MISMATCH {shape} channels_last={layout} {dtype} K={K} "
                                  f"{mode}: {bad}", flush=True)
    print(f"gpu_smoke: {n - failures}/{n} cases agree with the CPU kernels")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()

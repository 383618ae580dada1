"""Per-call overhead: the CPU cost of a layer call on a tiny input, where the kernels do
next to nothing and what remains is Python, the dispatcher, autograd and allocations.
On a GPU this is what decides whether the CPU runs ahead of the device.

For nn.BatchNorm2d ("bn") and cbn_ext.CompoundBatchNorm2d ("ext"), K = 1 and 2, one
thread, a (4, 8, 2, 2) float32 input: the median time per call of a training forward +
backward and of an evaluation forward (no grad), over interleaved repeats after a
warm-up; and the operators per layer per step, counted with the profiler (ATen operators
on the CPU; kernel launches when a GPU is present).

    python benchmarks/overhead.py               # prints a table
    python benchmarks/overhead.py --json o.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import cbn_ext  # noqa: E402

SHAPE = (4, 8, 2, 2)


def _layers(K, device):
    bn = nn.BatchNorm2d(SHAPE[1]).to(device)
    ext = cbn_ext.CompoundBatchNorm2d(SHAPE[1], num_components=K).to(device)
    with torch.no_grad():  # a first batch, so that the mixture is initialised
        ext(torch.randn(SHAPE, device=device))
    return {"bn": bn, "ext": ext}


def _train_step(layer, x, g):
    def f():
        layer(x).backward(g)
    return f


def _eval_step(layer, x):
    def f():
        with torch.no_grad():
            layer(x)
    return f


def _median_us(fns, calls, repeats, warmup, sync):
    """Median microseconds per call of each function (timed over `calls` calls per
    repeat, the functions interleaved repeat by repeat), and the median over repeats of
    the ratio ext/bn within a repeat: this machine's speed drifts by up to 2x from second
    to second, and a ratio of neighbouring measurements is steadier than one of medians."""
    times = {name: [] for name in fns}
    for r in range(warmup + repeats):
        for name, fn in fns.items():
            sync()
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            sync()
            if r >= warmup:
                times[name].append((time.perf_counter() - t0) / calls * 1e6)
    out = {name: statistics.median(ts) for name, ts in times.items()}
    out["ratio"] = statistics.median(e / b for e, b in zip(times["ext"], times["bn"]))
    return out


@contextlib.contextmanager
def _quiet_stderr():
    """The profiler's library prints a line at each start and stop: keep them out of the
    report."""
    sys.stderr.flush()
    saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


def count_ops(fn, device):
    """(ATen operators, cbn_ext operators, GPU kernels) of one call of fn."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    fn()
    with _quiet_stderr(), torch.profiler.profile(activities=activities) as prof:
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
    aten = ext = kernels = 0
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            kernels += 1
        elif e.name.startswith("aten::"):
            aten += 1
        elif e.name.startswith("cbn_ext::"):
            ext += 1
    return {"aten_ops": aten, "cbn_ext_ops": ext, "gpu_kernels": kernels if device == "cuda" else None}


def measure(device="cpu", Ks=(1, 2), calls=100, repeats=41, warmup=3):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    records = []
    try:
        for K in Ks:
            layers = _layers(K, device)
            x = torch.randn(SHAPE, device=device, requires_grad=True)
            g = torch.randn(SHAPE, device=device)
            rec = {"device": device, "shape": list(SHAPE), "K": K}
            for phase in ("train", "eval"):
                for layer in layers.values():
                    layer.train(phase == "train")
                fns = {name: (_train_step(layer, x, g) if phase == "train" else
                              _eval_step(layer, x)) for name, layer in layers.items()}
                us = _median_us(fns, calls, repeats, warmup, sync)
                rec[phase] = {"bn_us": us["bn"], "ext_us": us["ext"], "ext_over_bn": us["ratio"],
                              "bn_ops": count_ops(fns["bn"], device),
                              "ext_ops": count_ops(fns["ext"], device)}
            records.append(rec)
    finally:
        torch.set_num_threads(threads)
    return records


def table(records):
    rows = ["| device | K | phase | BN us | ext us | ext/BN (median of paired ratios) | "
            "ATen ops BN / ext | GPU kernels BN / ext |", "|" + " --- |" * 8]
    for r in records:
        for phase in ("train", "eval"):
            p = r[phase]
            kern = (f"{p['bn_ops']['gpu_kernels']} / {p['ext_ops']['gpu_kernels']}"
                    if p["ext_ops"]["gpu_kernels"] is not None else "-")
            rows.append(f"| {r['device']} | {r['K']} | {phase} | {p['bn_us']:.1f} | "
                        f"{p['ext_us']:.1f} | {p['ext_over_bn']:.2f} | "
                        f"{p['bn_ops']['aten_ops']} / {p['ext_ops']['aten_ops']} | {kern} |")
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=41)
    p.add_argument("--calls", type=int, default=100)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    records = measure(args.device, calls=args.calls, repeats=args.repeats)
    print("\n".join(table(records)))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"records": records}, f, indent=1)


if __name__ == "__main__":
    main()

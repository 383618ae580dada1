"""Kernel benchmark: cbn_ext against nn.BatchNorm2d and the pure-PyTorch reference.

For each configuration (device, shape, K, dtype, memory format) it times
  * training forward + backward (gradients of the input, weight and bias),
  * evaluation forward (no grad),
for nn.BatchNorm2d ("bn"), cbn_ext.CompoundBatchNorm2d ("ext") and
cbn_ext.reference.compound_batch_norm ("ref"), and reports medians over the repeats after a
warm-up, the ratios ext/bn and ref/ext, and ext's achieved bandwidth on the minimum bytes
(forward: read x, write y; backward: read x and grad, write dx) as a share of a
device-to-device copy measured in the same run.

Calls are interleaved round-robin, so that machine noise hits every implementation
alike: ext against bn, then (apart, so that the reference's large temporaries do not
evict the others' data from the caches) ext against ref; ref/ext uses that second time.
On a GPU, times come from CUDA events and the calls rotate over enough copies of the
input to exceed the L2 cache.

    python benchmarks/bench.py                      # CPU, (16, 64, 32, 32), K = 1, 2, 4
    python benchmarks/bench.py --device cuda --shapes 64x256x14x14 --dtypes float32,bfloat16
    python benchmarks/bench.py --json results.json  # also write the records as JSON

The JSON file is rewritten (atomically) after every configuration, so a run stopped by a
time limit keeps what it measured; --time-budget stops starting new configurations after
that many seconds, and --ref-shapes runs the slow reference on some shapes only.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import cbn_ext  # noqa: E402
from cbn_ext import reference  # noqa: E402

DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16,
          "bfloat16": torch.bfloat16}
LAYOUTS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}
RESNET_SHAPES = "64x64x56x56,64x128x28x28,64x256x14x14,64x512x7x7"


class ReferenceCBN(nn.Module):
    """The reference functional with the layer's parameters and buffers."""

    def __init__(self, layer: cbn_ext.CompoundBatchNorm2d):
        super().__init__()
        self.weight = nn.Parameter(layer.weight.detach().clone())
        self.bias = nn.Parameter(layer.bias.detach().clone())
        for name in ("running_mean", "running_var", "running_prior", "num_batches_tracked"):
            self.register_buffer(name, getattr(layer, name).clone())
        self.momentum, self.eps = layer.momentum, layer.eps

    def forward(self, x):
        return reference.compound_batch_norm(
            x, self.running_mean, self.running_var, self.running_prior, self.weight, self.bias,
            self.training, self.momentum, self.eps,
            self.num_batches_tracked if self.training else None)


def machine_info(device: str) -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "threads": torch.get_num_threads(),
            "build": cbn_ext.build_info(),
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info["cpu"] = f"{cpu}, {os.cpu_count()} logical cores"
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = f"{props.name}, {props.multi_processor_count} SMs, " \
                      f"{props.total_memory / 2**30:.0f} GiB"
    return info


class Timer:
    """Seconds per call: perf_counter on the CPU, CUDA events on a GPU."""

    def __init__(self, device: str):
        self.cuda = device == "cuda"

    def __call__(self, fn) -> float:
        if self.cuda:
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) * 1e-3
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0


def measure(timer, fns, repeats, warmup):
    """Medians of interleaved (round-robin) calls: noise hits every function alike."""
    times = {name: [] for name in fns}
    for i in range(warmup + repeats):
        for name, fn in fns.items():
            t = timer(fn)
            if i >= warmup:
                times[name].append(t)
    return {name: statistics.median(ts) for name, ts in times.items()}


def copy_bandwidth(device, repeats, warmup) -> float:
    """Bytes read plus bytes written per second by a large tensor copy (device to device
    on a GPU, memory to memory on the CPU)."""
    n = (256 << 20) if device == "cuda" else (64 << 20)
    src = torch.empty(n, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    t = measure(Timer(device), {"copy": lambda: dst.copy_(src)}, repeats, warmup)["copy"]
    return 2 * n / t


def bench_config(shape, K, dtype, layout, device, repeats, warmup, with_reference, copy_bw,
                 ref_repeats=None):
    """Times one configuration; returns its record (see the module's docstring).
    ref_repeats: repeats of the (slow) reference comparison (default: repeats)."""
    torch.manual_seed(0)
    N, C = shape[:2]
    elt = torch.empty((), dtype=dtype).element_size()
    # on a GPU, rotate over enough inputs to exceed the L2 cache (ext and bn alike)
    copies = 1
    if device == "cuda":
        l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 << 20)
        copies = max(1, min(8, -(-3 * l2 // (N * C * shape[2] * shape[3] * elt))))

    def make_input():
        x = torch.randn(shape, device=device, dtype=dtype)
        x = x + torch.randn(N, 1, 1, 1, device=device, dtype=dtype)
        return x.contiguous(memory_format=layout)

    xs = [make_input() for _ in range(copies)]
    gs = [torch.randn_like(x) for x in xs]
    xgs = [x.detach().clone().requires_grad_() for x in xs]
    bn = nn.BatchNorm2d(C, device=device)
    ext = cbn_ext.CompoundBatchNorm2d(C, K, device=device)
    with torch.no_grad():
        ext(xs[0])  # first batch: initialise the mixture
    impls = {"bn": bn, "ext": ext}
    if with_reference:
        impls["ref"] = ReferenceCBN(ext)

    def rotating(step):
        state = {"i": 0}

        def f():
            i = state["i"] = (state["i"] + 1) % copies
            step(i)
        return f

    def train_step(m):
        def step(i):
            torch.autograd.grad(m(xgs[i]), [xgs[i], m.weight, m.bias], gs[i])
        return rotating(step)

    def eval_step(m):
        def step(i):
            with torch.no_grad():
                m(xs[i])
        return rotating(step)

    timer = Timer(device)
    out = {}
    for phase, make, train in (("train", train_step, True), ("eval", eval_step, False)):
        for m in impls.values():
            m.train(train)
        fns = {name: make(m) for name, m in impls.items()}
        t = measure(timer, {"bn": fns["bn"], "ext": fns["ext"]}, repeats, warmup)
        if "ref" in fns:
            rr = repeats if ref_repeats is None else ref_repeats
            t2 = measure(timer, {"ref": fns["ref"], "ext": fns["ext"]}, rr, min(warmup, 2))
            t["ref"], t["ext_with_ref"] = t2["ref"], t2["ext"]
        out[phase] = t
    numel = N * C * shape[2] * shape[3]
    min_bytes = {"train": 5 * numel * elt, "eval": 2 * numel * elt}
    rec = {"device": device, "shape": list(shape), "K": K, "dtype": str(dtype).split(".")[1],
           "layout": "channels_last" if layout == torch.channels_last else "contiguous",
           "repeats": repeats, "warmup": warmup, "input_copies": copies,
           "ref_repeats": repeats if ref_repeats is None else ref_repeats}
    for phase in ("train", "eval"):
        t = out[phase]
        rec[phase] = {f"{name}_ms": 1e3 * v for name, v in t.items()}
        rec[phase]["ext_over_bn"] = t["ext"] / t["bn"]
        if "ref" in t:
            rec[phase]["ref_over_ext"] = t["ref"] / t["ext_with_ref"]
        rec[phase]["min_bytes"] = min_bytes[phase]
        rec[phase]["ext_GBps"] = min_bytes[phase] / t["ext"] / 1e9
        rec[phase]["bn_GBps"] = min_bytes[phase] / t["bn"] / 1e9
        rec[phase]["ext_copy_fraction"] = min_bytes[phase] / t["ext"] / copy_bw
    return rec


HEADER = ("{:<6} {:<15} {:>2} {:<8} {:<13} | {:>8} {:>8} {:>8} {:>6} {:>7} {:>5} | {:>8} {:>8} "
          "{:>8} {:>6} {:>7} {:>5}").format(
    "device", "shape", "K", "dtype", "layout", "bn ms", "ext ms", "ref ms", "ext/bn", "ref/ext",
    "%copy", "bn ms", "ext ms", "ref ms", "ext/bn", "ref/ext", "%copy")


def format_row(rec) -> str:
    def part(p):
        ref = p.get("ref_ms")
        return "{:>8.3f} {:>8.3f} {:>8} {:>6.2f} {:>7} {:>5.0f}".format(
            p["bn_ms"], p["ext_ms"], "-" if ref is None else f"{ref:.3f}", p["ext_over_bn"],
            "-" if ref is None else f"{p['ref_over_ext']:.1f}x", 100 * p["ext_copy_fraction"])

    return "{:<6} {:<15} {:>2} {:<8} {:<13} | {} | {}".format(
        rec["device"], "x".join(map(str, rec["shape"])), rec["K"], rec["dtype"], rec["layout"],
        part(rec["train"]), part(rec["eval"]))


def parse_shapes(text):
    return [tuple(int(v) for v in s.split("x")) for s in text.split(",")]


def pin_allocator():
    """Re-run this script with glibc's allocator keeping freed memory (no mmap, no
    trimming). Otherwise a tensor of a few MiB is often mapped afresh at every call and
    page-faults in, which in a VM makes medians vary up to tenfold from run to run; the
    setting applies to every implementation alike. CBN_BENCH_MALLOC=0 keeps the
    environment as it is."""
    if (sys.platform.startswith("linux") and os.environ.get("CBN_BENCH_MALLOC", "1") != "0"
            and "MALLOC_TRIM_THRESHOLD_" not in os.environ):
        env = dict(os.environ, MALLOC_MMAP_MAX_="0", MALLOC_TRIM_THRESHOLD_=str(1 << 40))
        os.execve(sys.executable, [sys.executable, os.path.abspath(sys.argv[0]), *sys.argv[1:]], env)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda", "all"])
    p.add_argument("--shapes", default=None,
                   help="NxCxHxW,... (default: 16x64x32x32 on the CPU, ResNet stages on a GPU: "
                        f"{RESNET_SHAPES})")
    p.add_argument("--K", default="1,2,4", help="components, e.g. 1,2,4")
    p.add_argument("--dtypes", default="float32", help=f"of {','.join(DTYPES)}")
    p.add_argument("--layouts", default="contiguous,channels_last")
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--no-reference", action="store_true", help="skip the (slow) reference")
    p.add_argument("--ref-shapes", default=None,
                   help="NxCxHxW,...: run the reference on these shapes only (default: all; "
                        "'none': on none)")
    p.add_argument("--ref-repeats", type=int, default=None,
                   help="repeats of the reference comparison (default: --repeats)")
    p.add_argument("--time-budget", type=float, default=None,
                   help="seconds: start no new configuration after this (the JSON says so)")
    p.add_argument("--json", help="write the records and the machines to this file, rewritten "
                                  "after every configuration")
    args = p.parse_args(argv)
    t_start = time.perf_counter()
    ref_shapes = None  # None: every shape
    if args.no_reference or args.ref_shapes == "none":
        ref_shapes = set()
    elif args.ref_shapes:
        ref_shapes = set(parse_shapes(args.ref_shapes))

    devices = ["cpu", "cuda"] if args.device == "all" else [args.device]
    if "cuda" in devices and not torch.cuda.is_available():
        if args.device == "cuda":
            sys.exit("error: --device cuda, but no CUDA device is available")
        devices.remove("cuda")
    if "cuda" in devices and not cbn_ext.build_info()["cuda"]:
        sys.exit("error: a CUDA device is there, but cbn_ext was built without CUDA kernels")
    records, machines = [], {}
    state = {"complete": False, "skipped": 0}

    def save():
        if args.json:
            write_json(args.json, {"machines": machines, "records": records,
                                   "complete": state["complete"], "skipped": state["skipped"],
                                   "argv": sys.argv[1:] if argv is None else list(argv)})

    for device in devices:
        machines[device] = info = machine_info(device)
        info["copy_GBps"] = copy_bandwidth(device, args.repeats, args.warmup) / 1e9
        shapes = args.shapes or ("16x64x32x32" if device == "cpu" else RESNET_SHAPES)
        print(f"# {device}: {info['gpu' if device == 'cuda' else 'cpu']}, torch "
              f"{torch.__version__}, {torch.get_num_threads()} threads, cbn_ext {info['build']}",
              flush=True)
        print(f"# medians of {args.repeats} interleaved repeats after {args.warmup} warm-up; "
              "train = forward + backward, eval = forward; %copy: ext's bandwidth on the "
              f"minimum bytes over a copy's ({info['copy_GBps']:.0f} GB/s); glibc malloc "
              f"trim threshold {os.environ.get('MALLOC_TRIM_THRESHOLD_', 'default')}",
              flush=True)
        print(f"{'':<50}| {'train':^47} | {'eval':^47}", flush=True)
        print(HEADER, flush=True)
        save()
        for shape in parse_shapes(shapes):
            for dt in args.dtypes.split(","):
                for layout in args.layouts.split(","):
                    for K in (int(k) for k in args.K.split(",")):
                        if (args.time_budget is not None
                                and time.perf_counter() - t_start > args.time_budget):
                            state["skipped"] += 1
                            continue
                        with_ref = ref_shapes is None or tuple(shape) in ref_shapes
                        rec = bench_config(shape, K, DTYPES[dt], LAYOUTS[layout], device,
                                           args.repeats, args.warmup, with_ref,
                                           info["copy_GBps"] * 1e9, args.ref_repeats)
                        print(format_row(rec), flush=True)
                        records.append(rec)
                        save()
    state["complete"] = state["skipped"] == 0
    save()
    if state["skipped"]:
        print(f"# time budget of {args.time_budget:g} s spent: {state['skipped']} "
              "configurations skipped", flush=True)
    if args.json:
        print(f"# wrote {args.json}")
    return records


def write_json(path, data):
    """Write data to path through a temporary file and a rename: a reader (or a time
    limit) never sees half a file."""
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)


if __name__ == "__main__":
    pin_allocator()
    main()

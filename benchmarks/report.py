"""The benchmark report (the README's main command, `make bench`).

Runs the kernel benchmark (benchmarks/bench.py) on every device present -- the CPU
always, CUDA when a GPU and the CUDA kernels are there -- over ResNet-stage shapes,
K = 1, 2, 4, float32 and bfloat16, contiguous and channels_last. Shows progress while it
runs, prints a table (times, ratio to nn.BatchNorm2d, speed-up over the reference,
achieved bandwidth), the per-call overhead on a tiny input (benchmarks/overhead.py: CPU
time per layer call and the operators per step, against BatchNorm), and writes JSON, a
Markdown table and a PNG plot:

    python benchmarks/report.py            # benchmarks/results/report.{json,md,png}
    python benchmarks/report.py --quick    # small shapes, few repeats: under a minute on 2 cores
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import bench  # noqa: E402
import overhead  # noqa: E402

import cbn_ext  # noqa: E402

FULL = dict(shapes=bench.RESNET_SHAPES, repeats=10, warmup=2, ref_repeats=3)
QUICK = dict(shapes="8x64x16x16,8x128x8x8", repeats=5, warmup=1, ref_repeats=2)


def devices_present():
    out = ["cpu"]
    if torch.cuda.is_available():
        if cbn_ext.build_info()["cuda"]:
            out.append("cuda")
        else:
            print("# a GPU is present, but cbn_ext was built without CUDA kernels: CPU only",
                  flush=True)
    return out


def table_rows(records):
    """Markdown rows: one per configuration."""
    head = ("| device | shape | dtype | layout | K | train BN ms | train ext ms | ext/BN | "
            "ref/ext | %copy | eval BN ms | eval ext ms | ext/BN | ref/ext |")
    rows = [head, "|" + " --- |" * 14]
    for r in records:
        t, e = r["train"], r["eval"]

        def ref(p):
            return f"{p['ref_over_ext']:.1f}x" if "ref_over_ext" in p else "-"

        rows.append(
            f"| {r['device']} | {'x'.join(map(str, r['shape']))} | {r['dtype']} | {r['layout']} | "
            f"{r['K']} | {t['bn_ms']:.3f} | {t['ext_ms']:.3f} | {t['ext_over_bn']:.2f} | "
            f"{ref(t)} | {100 * t['ext_copy_fraction']:.0f} | {e['bn_ms']:.3f} | "
            f"{e['ext_ms']:.3f} | {e['ext_over_bn']:.2f} | {ref(e)} |")
    return rows


def plot(records, machines, path):
    """ext/BN time ratio per configuration and K: one panel per device and phase."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    devices = list(dict.fromkeys(r["device"] for r in records))
    Ks = sorted({r["K"] for r in records})
    fig, axes = plt.subplots(2, len(devices), figsize=(7.5 * len(devices), 7.5), squeeze=False)
    for col, device in enumerate(devices):
        recs = [r for r in records if r["device"] == device]
        groups = list(dict.fromkeys(
            ("x".join(map(str, r["shape"])), r["dtype"], r["layout"]) for r in recs))
        for row, phase in enumerate(("train", "eval")):
            ax = axes[row][col]
            width = 0.8 / len(Ks)
            for i, K in enumerate(Ks):
                vals = []
                for g in groups:
                    match = [r for r in recs if r["K"] == K and
                             ("x".join(map(str, r["shape"])), r["dtype"], r["layout"]) == g]
                    vals.append(match[0][phase]["ext_over_bn"] if match else float("nan"))
                ax.bar([j + (i - (len(Ks) - 1) / 2) * width for j in range(len(groups))], vals,
                       width, label=f"K = {K}")
            ax.axhline(1.0, color="k", lw=0.8)
            ax.set_xticks(range(len(groups)))
            ax.set_xticklabels([f"{s}\n{d} {'NHWC' if l == 'channels_last' else 'NCHW'}"
                                for s, d, l in groups], rotation=60, ha="right", fontsize=7)
            ax.set_ylabel(f"{phase}: time ext / nn.BatchNorm2d")
            name = machines[device].get("gpu") if device == "cuda" else machines[device]["cpu"]
            ax.set_title(f"{device} ({name}), "
                         f"{'forward + backward' if phase == 'train' else 'eval forward'}",
                         fontsize=9)
            ax.legend(fontsize=8)
    fig.suptitle(f"cbn_ext vs nn.BatchNorm2d (lower is better), torch {torch.__version__}, "
                 f"{datetime.date.today().isoformat()}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small shapes, few repeats")
    p.add_argument("--devices", default=None, help="cpu,cuda (default: every device present)")
    p.add_argument("--K", default="1,2,4")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--layouts", default="contiguous,channels_last")
    p.add_argument("--shapes", default=None, help="NxCxHxW,... (default: ResNet stages)")
    p.add_argument("--out", default=os.path.join(HERE, "results"))
    p.add_argument("--name", default=None, help="file name stem (default: report, report-quick)")
    p.add_argument("--no-reference", action="store_true")
    args = p.parse_args(argv)

    cfg = dict(QUICK if args.quick else FULL)
    if args.shapes:
        cfg["shapes"] = args.shapes
    devices = args.devices.split(",") if args.devices else devices_present()
    grid = [(d, shape, dt, layout, int(K)) for d in devices
            for shape in bench.parse_shapes(cfg["shapes"]) for dt in args.dtypes.split(",")
            for layout in args.layouts.split(",") for K in args.K.split(",")]
    machines, records = {}, []
    for device in devices:
        machines[device] = info = bench.machine_info(device)
        info["copy_GBps"] = bench.copy_bandwidth(device, cfg["repeats"], cfg["warmup"]) / 1e9
        print(f"# {device}: {info['gpu' if device == 'cuda' else 'cpu']}, torch {torch.__version__}, "
              f"{info['threads']} threads, copy {info['copy_GBps']:.0f} GB/s, cbn_ext "
              f"{info['build']}", flush=True)
    print(f"# {len(grid)} configurations; medians of {cfg['repeats']} interleaved repeats after "
          f"{cfg['warmup']} warm-up ({cfg['ref_repeats']} for the reference); glibc malloc: "
          f"mmap max {os.environ.get('MALLOC_MMAP_MAX_', 'default')}, trim threshold "
          f"{os.environ.get('MALLOC_TRIM_THRESHOLD_', 'default')}", flush=True)
    print(bench.HEADER, flush=True)
    t0 = time.perf_counter()
    for i, (device, shape, dt, layout, K) in enumerate(grid, 1):
        rec = bench.bench_config(shape, K, bench.DTYPES[dt], bench.LAYOUTS[layout], device,
                                 cfg["repeats"], cfg["warmup"], not args.no_reference,
                                 machines[device]["copy_GBps"] * 1e9,
                                 ref_repeats=cfg["ref_repeats"])
        records.append(rec)
        print(f"{bench.format_row(rec)}   [{i}/{len(grid)}, {time.perf_counter() - t0:.0f} s]",
              flush=True)

    # the per-call overhead (one thread, a tiny input): what a layer costs the CPU
    over = []
    for device in devices:
        over += overhead.measure(device, repeats=11 if args.quick else 41,
                                 calls=50 if args.quick else 100)
    over_rows = overhead.table(over)
    print("\n".join(over_rows), flush=True)

    stem = args.name or ("report-quick" if args.quick else "report")
    os.makedirs(args.out, exist_ok=True)
    command = "python benchmarks/report.py" + (" --quick" if args.quick else "")
    meta = {"command": command, "machines": machines, "seconds": time.perf_counter() - t0}
    with open(os.path.join(args.out, stem + ".json"), "w") as f:
        json.dump({**meta, "records": records, "overhead": over}, f, indent=1)
    rows = table_rows(records)
    with open(os.path.join(args.out, stem + ".md"), "w") as f:
        f.write(f"Command: `{command}`, {datetime.date.today().isoformat()}.\n\n")
        for device, m in machines.items():
            f.write(f"- {device}: {m.get('gpu') if device == 'cuda' else m['cpu']}, torch "
                    f"{m['torch']}, {m['threads']} threads, copy {m['copy_GBps']:.0f} GB/s\n")
        f.write("\nTimes are medians; train = forward + backward; ext/BN: time ratio to "
                "nn.BatchNorm2d (lower is better); ref/ext: speed-up over the reference; "
                "%copy: ext's bandwidth on the minimum bytes over a copy's.\n\n")
        f.write("\n".join(rows) + "\n")
        f.write(f"\nPer-call overhead ({overhead.__doc__.splitlines()[0].rstrip('.:')}; "
                f"one thread, a {'x'.join(map(str, overhead.SHAPE))} float32 input, medians of "
                "paired ratios):\n\n")
        f.write("\n".join(over_rows) + "\n")
    plot(records, machines, os.path.join(args.out, stem + ".png"))
    print()
    print("\n".join(rows))
    print(f"\n# wrote {os.path.join(args.out, stem)}.{{json,md,png}} in "
          f"{time.perf_counter() - t0:.0f} s")
    return records


if __name__ == "__main__":
    bench.pin_allocator()
    main()

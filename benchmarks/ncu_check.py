"""Nsight Compute check of the CUDA kernels: DRAM bytes per kernel against the design.

Two parts, both used by benchmarks/gpu_check.sh:

    # the workload: one warm training step, then the profiled one between
    # cudaProfilerStart/Stop (run it under `ncu --profile-from-start off`)
    python benchmarks/ncu_check.py run --config train-64x256x14x14-bf16-cl-K2

    # the table: per kernel, DRAM bytes read and written in units of the bytes of x
    # ("how many times x is read"), next to what the design expects, achieved bandwidth,
    # occupancy, registers and shared memory
    python benchmarks/ncu_check.py parse ncu.csv [--sms 132] [--json out.json]

ncu.csv holds one or more `ncu --import REPORT --csv --page raw --print-units base`
outputs, each after a line `# config: NAME`. The long CSV layout (one row per metric,
ncu's default page) is read as well, and values scaled by units (Kbyte, usecond) or
grouped by thousands are undone.

The design (csrc/cuda/forward.cu, backward.cu), in bytes of x (X), of the
responsibilities tau (T = M K 4: float32 per position and component) and of the tiles'
partial results (P, about tiles x K x C x 4 per array):

    collect_mixture_stats  reads x once from DRAM (the tile's second pass hits L2);
                           writes tau and the tile partials (count, mean, M2)
    merge_moments          reads the partials
    normalize_mixture      reads x and tau, writes y
    collect_grad_stats     reads g, x and tau; writes the partials (Sg, Sgx)
    sum_tiles              reads the partials
    grad_input_*           reads g, x and tau, writes dx
    estep_coefs, affine_coefs, grad_coefs, update_running_stats: (K, C)-sized, ~0

so a training step (forward + backward) reads x four times and g twice: about 6 X + 3 T
read and 2 X + T written, against the 5 X that any implementation must move (read x and
g, write y and dx, read x once more or keep it on chip).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# name -> (shape, dtype, channels_last, K, phase)
CONFIGS = {
    "train-64x256x14x14-bf16-cl-K2": ((64, 256, 14, 14), "bfloat16", True, 2, "train"),
    "train-64x64x56x56-bf16-cl-K2": ((64, 64, 56, 56), "bfloat16", True, 2, "train"),
    "train-64x64x56x56-f32-K4": ((64, 64, 56, 56), "float32", False, 4, "train"),
    "eval-64x64x56x56-bf16-cl-K2": ((64, 64, 56, 56), "bfloat16", True, 2, "eval"),
}
DEFAULT_CONFIGS = ["train-64x256x14x14-bf16-cl-K2", "train-64x64x56x56-bf16-cl-K2"]
ELEMENT_SIZE = {"float32": 4, "bfloat16": 2, "float16": 2, "float64": 8}

# What ncu should collect: the sections give occupancy and launch statistics (registers,
# shared memory, grid), the metrics DRAM traffic, L2 traffic and time.
NCU_SECTIONS = ["LaunchStats", "Occupancy"]
NCU_METRICS = ["gpu__time_duration.sum", "dram__bytes_read.sum", "dram__bytes_write.sum",
               "lts__t_bytes.sum", "dram__throughput.avg.pct_of_peak_sustained_elapsed"]


# ---------------------------------------------------------------------------------------
# The workload
# ---------------------------------------------------------------------------------------

def run_workload(name: str, device: str = "cuda", batch: int = 0, steps_before: int = 2) -> None:
    """The config's layer on its input: the first batch (initialisation), steps_before
    warm steps, then one step between cudaProfilerStart and cudaProfilerStop. device cpu:
    the same steps without a profiler, and batch (if not 0) in place of the config's (the
    rehearsal)."""
    import torch

    sys.path.insert(0, ROOT)
    import cbn_ext

    shape, dtype, channels_last, K, phase = CONFIGS[name]
    if batch:
        shape = (batch, *shape[1:])
    dt = getattr(torch, dtype)
    cuda = device == "cuda"
    torch.manual_seed(0)
    layer = cbn_ext.CompoundBatchNorm2d(shape[1], K).to(device)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(shape, device=device, dtype=dt)
    x = (x + torch.randn(shape[0], 1, 1, 1, device=device, dtype=dt)).contiguous(memory_format=fmt)
    g = torch.randn_like(x)
    xg = x.detach().clone().requires_grad_()

    def step():
        if phase == "train":
            layer.train()
            torch.autograd.grad(layer(xg), [xg, layer.weight, layer.bias], g)
        else:
            layer.eval()
            with torch.no_grad():
                layer(x)

    layer.train()
    with torch.no_grad():
        layer(x)  # the first batch initialises the mixture (kernels of its own)
    for _ in range(steps_before):
        step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.profiler.start()
    step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.profiler.stop()
    print(f"ncu_check: {name}: x {tuple(shape)} {dtype} "
          f"{'channels_last' if channels_last else 'contiguous'} K={K} {phase}: "
          f"{x.numel() * x.element_size()} bytes; profiled one step", flush=True)


# ---------------------------------------------------------------------------------------
# The CSV
# ---------------------------------------------------------------------------------------

UNIT_SCALE = {
    "byte": 1, "kbyte": 1e3, "mbyte": 1e6, "gbyte": 1e9, "tbyte": 1e12,
    "kibyte": 2**10, "mibyte": 2**20, "gibyte": 2**30,
    "nsecond": 1e-9, "usecond": 1e-6, "msecond": 1e-3, "second": 1, "ns": 1e-9, "us": 1e-6,
    "ms": 1e-3, "s": 1,
}
# metric -> the base unit we keep (seconds, bytes, or as is)
TIME_METRICS = {"gpu__time_duration.sum"}


def to_number(text: str, unit: str = "", metric: str = "") -> float:
    """A CSV value in base units: bytes, and seconds for durations (nanoseconds when the
    unit is not given)."""
    t = (text or "").strip().replace(",", "")
    if t in ("", "n/a", "N/A"):
        return math.nan
    try:
        v = float(t)
    except ValueError:
        return math.nan
    u = (unit or "").strip().lower()
    if metric in TIME_METRICS and u not in UNIT_SCALE:
        return v * 1e-9
    return v * UNIT_SCALE.get(u, 1)


def split_configs(text: str):
    """[(config name or '', csv text)] from a file of `# config: NAME` sections."""
    parts, name, buf = [], "", []
    for line in text.splitlines():
        m = re.match(r"#\s*config:\s*(\S+)", line)
        if m:
            if buf:
                parts.append((name, "\n".join(buf)))
            name, buf = m.group(1), []
        elif line.startswith('"'):  # CSV rows; ncu's ==PROF== lines and the rest go
            buf.append(line)
    if buf:
        parts.append((name, "\n".join(buf)))
    return parts


def parse_ncu_csv(text: str):
    """Launches of one ncu CSV (raw page or long layout): a list of
    {"id", "kernel", metric: value in base units (seconds for durations)}."""
    text = "\n".join(line for line in text.splitlines() if line.startswith('"'))
    rows = [r for r in csv.reader(io.StringIO(text)) if r]
    if not rows:
        return []
    header = rows[0]
    launches = {}
    if "Metric Name" in header:  # long: one row per (launch, metric)
        col = {h: i for i, h in enumerate(header)}
        for r in rows[1:]:
            if len(r) < len(header) or r[col["ID"]] == "ID":
                continue
            lid = r[col["ID"]]
            rec = launches.setdefault(lid, {"id": lid, "kernel": r[col["Kernel Name"]]})
            metric = r[col["Metric Name"]]
            unit = r[col["Metric Unit"]] if "Metric Unit" in col else ""
            rec[metric] = to_number(r[col["Metric Value"]], unit, metric)
        return [launches[k] for k in sorted(launches, key=lambda s: int(s) if s.isdigit() else 0)]
    col = {h: i for i, h in enumerate(header)}
    units = None
    out = []
    for r in rows[1:]:
        if r[col["ID"]] == "" and units is None:  # the units row
            units = r
            continue
        if r[col["ID"]] == "ID":
            continue
        rec = {"id": r[col["ID"]], "kernel": r[col.get("Kernel Name", 0)]}
        for h, i in col.items():
            if "__" in h and i < len(r):
                rec[h] = to_number(r[i], units[i] if units and i < len(units) else "", h)
        out.append(rec)
    return out


def short_name(kernel: str) -> str:
    """'void cbn_ext::cuda::(anonymous namespace)::foo_kernel<float, 4>(P)' -> 'foo_kernel'."""
    depth, out = 0, []
    for ch in kernel:
        if ch in "<(":
            depth += 1
        elif ch in ">)":
            depth = max(0, depth - 1)
        elif depth == 0:
            out.append(ch)
    words = "".join(out).split()
    return (words[-1] if words else kernel).split("::")[-1]


def is_ours(kernel: str) -> bool:
    """A kernel of cbn_ext: in its namespace, or (ncu's function-only names) one of the
    names csrc/cuda uses."""
    if "cbn_ext" in kernel:
        return True
    return short_name(kernel) in DESIGN_NAMES or short_name(kernel).startswith("grad_input_")


# ---------------------------------------------------------------------------------------
# The design
# ---------------------------------------------------------------------------------------

def plan_tiles(shape, channels_last, K, sms, acc_size=4):
    """Tiles of the statistics kernels (a mirror of plan_tiles in csrc/cuda/cuda_utils.cuh,
    for the expected size of the partial results)."""
    N, C = shape[0], shape[1]
    S = math.prod(shape[2:]) if len(shape) > 2 else 1
    M = N * S
    target = 2 * sms
    max_len = max(1, min(512, 32768 // (K * acc_size)))
    if channels_last:
        length = max(16, min(-(-M // target), 256))
        length = min(length, max_len)
        return -(-M // length)
    chunks = max(1, -(-target // N))
    length = -(-S // chunks)
    length = min(S, -(-length // 32) * 32)
    length = max(1, min(length, max_len))
    return N * (-(-S // length))


def design_bytes(kernel: str, name: str, sms: int):
    """(read, write, note) in bytes that the design expects of a kernel in a config, or
    None for a kernel without a design entry."""
    shape, dtype, channels_last, K, phase = CONFIGS[name]
    N, C = shape[0], shape[1]
    M = N * math.prod(shape[2:])
    X = M * C * ELEMENT_SIZE[dtype]
    T = M * K * 4 if K > 1 else 0
    tiles = plan_tiles(shape, channels_last, K, sms)
    P = tiles * K * C * 4
    small = K * C * 4
    base = short_name(kernel)
    if base.startswith("collect_mixture_stats"):
        if phase == "eval":
            return X, T, "x once; writes tau"
        return X, T + 2 * P + tiles * K * 4, "x once (2nd pass from L2); writes tau, partials"
    if base.startswith("merge_moments"):
        return 2 * P + tiles * K * 4, 4 * small, "the partials"
    if base.startswith("normalize_mixture"):
        return X + T, X, "x and tau; writes y"
    if base.startswith("collect_grad_stats"):
        return 2 * X + T, 2 * P, "g, x, tau; writes partials"
    if base.startswith("sum_tiles"):
        return P, small, "one partial array"
    if base.startswith("grad_input"):
        return 2 * X + T, X, "g, x, tau; writes dx"
    if base.split("_kernel")[0] in ("estep_coefs", "affine_coefs", "grad_coefs",
                                    "update_running_stats"):
        return 0, 0, "(K, C)-sized"
    return None


DESIGN_NAMES = {"collect_mixture_stats_kernel", "merge_moments_kernel", "normalize_mixture_kernel",
                "estep_coefs_kernel", "affine_coefs_kernel", "update_running_stats_kernel",
                "collect_grad_stats_kernel", "sum_tiles_kernel", "grad_coefs_kernel"}


def x_bytes(name: str) -> int:
    shape, dtype, *_ = CONFIGS[name]
    return math.prod(shape) * ELEMENT_SIZE[dtype]


def summarize(name: str, launches, sms: int):
    """Rows of the table of one config: kernels in launch order (repeated launches of a
    kernel merged), with totals for ours and for the others."""
    X = x_bytes(name) if name in CONFIGS else math.nan
    rows, by_name = [], {}
    for rec in launches:
        kname = short_name(rec["kernel"])
        row = by_name.get(kname)
        if row is None:
            row = by_name[kname] = {"kernel": kname, "ours": is_ours(rec["kernel"]), "calls": 0,
                                    "time_s": 0.0, "read": 0.0, "write": 0.0, "l2": 0.0,
                                    "dram_pct": [], "occ": [], "occ_theory": [], "regs": set(),
                                    "smem": set(), "design": None}
            rows.append(row)
            if name in CONFIGS:
                row["design"] = design_bytes(rec["kernel"], name, sms)
        row["calls"] += 1
        row["time_s"] += nz(rec.get("gpu__time_duration.sum"))
        row["read"] += nz(rec.get("dram__bytes_read.sum"))
        row["write"] += nz(rec.get("dram__bytes_write.sum"))
        row["l2"] += nz(rec.get("lts__t_bytes.sum"))
        for key, dst in (("dram__throughput.avg.pct_of_peak_sustained_elapsed", "dram_pct"),
                         ("sm__warps_active.avg.pct_of_peak_sustained_active", "occ"),
                         ("sm__maximum_warps_per_active_cycle_pct", "occ_theory")):
            if not math.isnan(rec.get(key, math.nan)):
                row[dst].append(rec[key])
        if not math.isnan(rec.get("launch__registers_per_thread", math.nan)):
            row["regs"].add(int(rec["launch__registers_per_thread"]))
        smem = nz(rec.get("launch__shared_mem_per_block_dynamic")) + nz(
            rec.get("launch__shared_mem_per_block_static"))
        if smem:
            row["smem"].add(int(smem))
    for row in rows:
        row["read_x"] = row["read"] / X
        row["write_x"] = row["write"] / X
        moved = row["read"] + row["write"]
        row["GBps"] = moved / row["time_s"] / 1e9 if row["time_s"] else math.nan
        if row["design"] is not None:
            dr, dw, note = row["design"]
            n = row["calls"]
            row["design_read_x"], row["design_write_x"] = n * dr / X, n * dw / X
            row["design_note"] = note
    return rows


def nz(v):
    return 0.0 if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)


def avg(values):
    return sum(values) / len(values) if values else math.nan


def fmt_table(name: str, rows, sms: int) -> str:
    X = x_bytes(name) if name in CONFIGS else math.nan
    lines = [f"## {name}: x = {X / 1e6:.2f} MB; DRAM bytes in units of x (cold caches: ncu "
             f"flushes them before each kernel); design for {sms} SMs"]
    head = (f"{'kernel':<36} {'n':>2} {'us':>8} {'rd/x':>6} {'design':>6} {'wr/x':>6} "
            f"{'design':>6} {'GB/s':>6} {'%dram':>5} {'occ%':>5} {'theo%':>5} {'regs':>5} "
            f"{'smem':>6}  note")
    lines.append(head)

    def f(v, spec):
        if isinstance(v, (int, float)) and not math.isnan(v):
            return format(v, spec)
        return "-".rjust(int(spec.split(".")[0]))

    total = {"ours": [0.0, 0.0, 0.0, 0.0, 0.0], "other": [0.0, 0.0, 0.0, 0.0, 0.0]}
    for r in rows:
        key = "ours" if r["ours"] else "other"
        t = total[key]
        t[0] += r["time_s"]
        t[1] += r["read"]
        t[2] += r["write"]
        t[3] += r.get("design_read_x", 0.0) * X
        t[4] += r.get("design_write_x", 0.0) * X
        note = r.get("design_note", "no design entry" if r["ours"] else "(not cbn_ext)")
        lines.append(
            f"{r['kernel'][:36]:<36} {r['calls']:>2} {f(1e6 * r['time_s'], '8.1f')} "
            f"{f(r['read_x'], '6.2f')} {f(r.get('design_read_x', math.nan), '6.2f')} "
            f"{f(r['write_x'], '6.2f')} {f(r.get('design_write_x', math.nan), '6.2f')} "
            f"{f(r['GBps'], '6.0f')} {f(avg(r['dram_pct']), '5.0f')} {f(avg(r['occ']), '5.0f')} "
            f"{f(avg(r['occ_theory']), '5.0f')} {'/'.join(map(str, sorted(r['regs']))) or '-':>5} "
            f"{'/'.join(map(str, sorted(r['smem']))) or '-':>6}  {note}")
    for key, label in (("ours", "cbn_ext kernels"), ("other", "other kernels")):
        t = total[key]
        if t[0] or t[1]:
            gbps = (t[1] + t[2]) / t[0] / 1e9 if t[0] else math.nan
            design = (f"design {t[3] / X:.2f} read, {t[4] / X:.2f} written"
                      if key == "ours" else "")
            lines.append(f"= {label}: {1e6 * t[0]:.1f} us, read {t[1] / X:.2f} x, written "
                         f"{t[2] / X:.2f} x, {gbps:.0f} GB/s; {design}")
    return "\n".join(lines)


def parse_file(path: str, sms: int):
    with open(path) as fh:
        text = fh.read()
    out = []
    for name, part in split_configs(text):
        launches = parse_ncu_csv(part)
        out.append((name, summarize(name, launches, sms)))
    return out


def totals(rows):
    """Totals of a config's rows (cbn_ext kernels only), for the summary."""
    ours = [r for r in rows if r["ours"]]
    return {"kernels": len(ours), "launches": sum(r["calls"] for r in ours),
            "time_us": 1e6 * sum(r["time_s"] for r in ours),
            "read_x": sum(r["read_x"] for r in ours), "write_x": sum(r["write_x"] for r in ours),
            "design_read_x": sum(r.get("design_read_x", 0.0) for r in ours),
            "design_write_x": sum(r.get("design_write_x", 0.0) for r in ours),
            "other_kernels": sum(1 for r in rows if not r["ours"])}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="the profiled workload")
    r.add_argument("--config", required=True, choices=sorted(CONFIGS))
    r.add_argument("--device", default="cuda", help="cpu: the rehearsal, no profiler")
    r.add_argument("--batch", type=int, default=0, help="in place of the config's batch size")
    a = sub.add_parser("parse", help="the table from ncu's CSV")
    a.add_argument("csv")
    a.add_argument("--sms", type=int, default=132, help="multiprocessors (for the design)")
    a.add_argument("--json", help="also write the rows and totals here")
    sub.add_parser("args", help="print ncu's --section/--metrics arguments")
    args = p.parse_args(argv)
    if args.cmd == "run":
        run_workload(args.config, args.device, args.batch)
    elif args.cmd == "args":
        sections = [f"--section {s}" for s in NCU_SECTIONS]
        print(" ".join(sections + ["--metrics", ",".join(NCU_METRICS)]))
    else:
        configs = parse_file(args.csv, args.sms)
        if not configs:
            print("ncu_check: no CSV rows found")
            return 1
        for name, rows in configs:
            print(fmt_table(name, rows, args.sms))
            print()
        if args.json:
            data = {name: {"totals": totals(rows),
                           "rows": [{k: (sorted(v) if isinstance(v, set) else v)
                                     for k, v in row.items()} for row in rows]}
                    for name, rows in configs}
            with open(args.json, "w") as f:
                json.dump(data, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())

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

The design (the host code of csrc/cuda/forward.cu and backward.cu, the tile plan of
cuda_utils.cuh), in bytes of x (X), of the responsibilities tau (T = M K 4: float32 per
position and component, 8 bytes for float64 inputs; none for K = 1), of the blocks' rows
of partial results (R rows = partial_rows(tiles) = min(tiles, 4 SMs): one per block of
the tile kernel, which walks tiles b, b + R, ... and accumulates into its row) and of
(K, C)-sized arrays (a few KiB, counted too: ncu flushes the caches before each kernel).
`design` below has the numbers: what the code is meant to move, not measurements.

  training forward (forward_train, then update_running_stats)
    estep_coefs            K > 1: reads the running mixture, writes 1/2 a, b and copies of
                           the mixture (returned for the backward)
    collect_mixture_stats  reads x once from DRAM (its tile's later sweeps from L2: tiles
                           of at most kTileBytes = 48 KiB of x, but not under 16 or 32
                           positions); writes tau and R partial rows (count R x K, mean
                           and M2 R x K x C)
    merge_tile_moments     reads the R rows; writes G chunks (G = reduce_groups(R, K C))
    finish_moments         reads the chunks, weight, bias; writes mean, var, count, alpha,
                           delta ((K, C))
    normalize_mixture      reads x and tau, writes y
    update_running_stats   (K, C)-sized
  backward (backward_train)
    collect_grad_stats     reads g, x and tau; writes R' rows of Sg, Sgx (its own plan:
                           a single sweep, tiles not capped by kTileBytes)
    reduce_tile_sums       reads the R' rows (both sums in one launch); writes G' chunks
    finish_sums            only when G' > 1: reads the chunks, writes Sg, Sgx
    grad_coefs             (K, C)-sized
    grad_input_soft        K > 1: reads g, x (once: the dx sweep from L2; tiles of at most
                           48 KiB of x and g) and tau, writes dx
    grad_input_given       K = 1 or given groups (no config here): reads g, x (and tau),
                           writes dx
  evaluation forward (forward_eval)
    affine_coefs           (K, C)-sized
    estep_coefs            K > 1, without copies
    estep_normalize        K > 1: reads x once (the normalization sweep from L2), writes y
                           and tau
    normalize_mixture      K = 1 instead of the two above: reads x, writes y
  check_group_ids (K = 1 with group ids) is in no config (NOT_PROFILED).

so a training step with K > 1 reads x four times and g twice: about 6 X + 3 T + the partial
rows read and 2 X + T + the partial rows written, against the 5 X that any implementation
must move (read x and g, write y and dx, read x once more or keep it on chip); evaluation
reads X and writes X + T.
"""

from __future__ import annotations

import argparse
import collections
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
# SpeedOfLight and WarpStateStats (a pass or two more per kernel): the SM's share of its
# peak and why warps stalled, for kernels that are not limited by DRAM -- the H200 run of
# 2026-11-29 found collect_mixture_stats_kernel at 3 % of DRAM (187 us) with no more to go on
NCU_SECTIONS = ["LaunchStats", "Occupancy", "SpeedOfLight", "WarpStateStats"]
# the stall reasons, as WarpStateStats names them (cycles a warp waits per issued
# instruction, by reason)
STALL_RE = re.compile(r"^smsp__average_warps?_(?:latency_)?issue_stalled_([a-z0-9_]+?)"
                      r"_per_issue_active\.ratio$")
SM_PCT = "sm__throughput.avg.pct_of_peak_sustained_elapsed"
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
    """'void cbn_ext::cuda::(anonymous namespace)::foo_kernel<float, 4>(P)' -> 'foo_kernel'.
    The anonymous namespace is dropped first in each of its spellings: ncu's demangled
    base names write it "unnamed>::" (H200, 2026-11-29), whose lone '>' had closed the
    parameter list early and named collect_mixture_stats_kernel<...>(unnamed>::StatsParams<T2>)
    "StatsParams"."""
    kernel = re.sub(r"\(anonymous namespace\)::|<?unnamed>::|\{anonymous\}::", "", kernel)
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
    return short_name(kernel) in DESIGN_NAMES or short_name(kernel) in NOT_PROFILED


# ---------------------------------------------------------------------------------------
# The design
# ---------------------------------------------------------------------------------------

# Mirrors of the tile plan of csrc/cuda/cuda_utils.cuh (plan_tiles, partial_rows,
# reduce_groups), for the sizes of the partial results; sms: the device's multiprocessors.
TILE_BYTES = 48 * 1024  # kTileBytes
REDUCE_COLS = 32        # kReduceCols
THREADS = 256           # kThreads


# as the C++ struct Tiles
Tiles = collections.namedtuple("Tiles", "num len chunks")


def plan_tiles(shape, channels_last, K, sms, acc_size=4, elem_bytes=0, partials=False):
    """Tiles(num, len, chunks) of plan_tiles(shape, K, acc_size, elem_bytes, partials) in
    csrc/cuda/cuda_utils.cuh, line for line (C++ integer division: //, rounded up: -(-a // b)).
    elem_bytes: the bytes per element that the kernel re-reads from cache (x.element_size()
    for collect_mixture_stats and estep_normalize, 2 x that for grad_input_soft, 0 for
    collect_grad_stats). partials: the kernel merges its tiles into rows of partials
    (collect_mixture_stats, collect_grad_stats), so the cache cap stops at the length where
    the row updates cost half of x. The layout is interleaved for channels_last inputs and
    when S = 1."""
    N, C = shape[0], shape[1]
    S = math.prod(shape[2:]) if len(shape) > 2 else 1
    M = N * S
    interleaved = channels_last or S == 1
    if M == 0:
        return Tiles(0, 1, 1)
    target = 2 * sms
    max_len = max(1, min(512, 16384 // (K * acc_size)))
    if max_len >= 32:
        max_len = max_len // 32 * 32
    row_bytes = C * elem_bytes
    partial_floor = -(-(8 * K * acc_size) // elem_bytes) if partials and elem_bytes > 0 else 1
    cache_len = max(1, TILE_BYTES // row_bytes, partial_floor) if row_bytes > 0 else M
    # the kernels index a tile's elements in 32 bits: len x C < 2^31 (C <= 2^30 is checked)
    max_len = min(max_len, (2**31 - 1) // C)
    if interleaved:
        length = -(-M // target)
        length = max(16, min(length, 256, cache_len))
        length = min(length, max_len)
        return Tiles(-(-M // length), length, 1)
    chunks = max(1, -(-target // N))
    length = -(-S // chunks)
    length = min(S, -(-length // 32) * 32)
    length = min(length, max(32, cache_len // 32 * 32))
    length = max(1, min(length, max_len))
    chunks = -(-S // length)
    return Tiles(N * chunks, length, chunks)


def partial_rows(tiles, sms):
    """Blocks (and rows of partials) of a tile kernel that writes per-(k, c) partials."""
    return min(tiles, 4 * sms)


def reduce_groups(tiles, entries, sms):
    """Chunks (blocks along y) of merge_tile_moments_kernel / reduce_tile_sums_kernel."""
    cols = -(-entries // REDUCE_COLS)
    g = max(1, min(32, (tiles + 63) // 64))
    while g > 1 and cols * (g // 2) >= 4 * sms:
        g //= 2
    return g


def design(name: str, sms: int):
    """{kernel: (read, write, note)}, in launch order, of the cbn_ext kernels that one
    profiled step of the config launches (CONFIGS: no group ids; K > 1 is the soft E-step,
    K = 1 a single component), with the DRAM bytes each is meant to move: x (and g) read
    once per kernel, the later sweeps of a tile from L2; tau in the accumulation type
    (float32; float64 for float64 inputs); the partial rows and (K, C)-sized arrays as the
    host code allocates them (ncu flushes the caches before each kernel, so these come
    from DRAM too). Not measurements."""
    shape, dtype, channels_last, K, phase = CONFIGS[name]
    N, C = shape[0], shape[1]
    M = N * (math.prod(shape[2:]) if len(shape) > 2 else 1)
    es = ELEMENT_SIZE[dtype]
    a = 8 if dtype == "float64" else 4  # the accumulation type (acc_t)
    X = M * C * es
    soft = K > 1
    T = M * K * a if soft else 0  # tau: none for K = 1
    KC = K * C
    kc = KC * a  # one (K, C) array
    ka = K * a   # one (K,) array
    out = {}
    if phase == "eval":
        out["affine_coefs_kernel"] = (4 * kc, 2 * kc, "(K, C): running stats, weight, bias")
        if not soft:
            out["normalize_mixture_kernel"] = (X + 2 * kc, X, "K = 1: x; writes y")
            return out
        out["estep_coefs_kernel"] = (2 * kc + ka, kc + ka, "(K, C): the running mixture")
        out["estep_normalize_kernel"] = (
            X + 4 * kc + ka, X + T, "x once (normalization from L2); writes y, tau")
        return out
    # training: forward_train, update_running_stats
    rows = partial_rows(plan_tiles(shape, channels_last, K, sms, a, es, True).num, sms)
    G = reduce_groups(rows, KC, sms)
    parts = rows * (K + 2 * KC) * a  # count | mean | M2
    if soft:
        # with copies of the mixture for the backward (the E-step reads the running
        # buffers in place, as in a steady-state step)
        out["estep_coefs_kernel"] = (2 * kc + ka, 3 * kc + 2 * ka, "(K, C): mixture; copies")
    out["collect_mixture_stats_kernel"] = (
        X + (2 * kc + ka if soft else 0), T + parts,
        f"x once (later sweeps from L2); writes {'tau, ' if soft else ''}{rows} partial rows")
    out["merge_tile_moments_kernel"] = (parts, 3 * G * kc, f"the partial rows, into {G} chunks")
    out["finish_moments_kernel"] = (3 * G * kc + 2 * kc, 4 * kc + ka, "(K, C): the chunks")
    out["normalize_mixture_kernel"] = (X + T + 2 * kc, X,
                                       "x and tau; writes y" if soft else "x; writes y")
    out["update_running_stats_kernel"] = (4 * kc + 2 * ka, 2 * kc + ka, "(K, C)")
    # backward_train: grad_sums, grad_coefs, grad_input
    rows_b = partial_rows(plan_tiles(shape, channels_last, K, sms, a, 0, True).num, sms)
    G_b = reduce_groups(rows_b, KC, sms)
    sums = 2 * rows_b * kc  # Sg | Sgx
    out["collect_grad_stats_kernel"] = (
        2 * X + T + kc, sums, f"g, x{', tau' if soft else ''}; writes {rows_b} partial rows")
    out["reduce_tile_sums_kernel"] = (
        sums, 2 * G_b * kc,
        f"the partial rows, into {G_b} chunks" if G_b > 1 else "the partial rows: Sg, Sgx")
    if G_b > 1:
        out["finish_sums_kernel"] = (2 * G_b * kc, 2 * kc, "(K, C): the chunks")
    ev = K * (-(-C // THREADS)) * a  # per-block parts of ev
    # reads weight, bias, var, Sg, Sgx (and the E-step's mean and variance); writes alpha,
    # beta, e1, e2, p, a, mu, dgamma, dbeta
    out["grad_coefs_kernel"] = ((7 if soft else 5) * kc + ka, 9 * kc + ev, "(K, C)")
    if soft:
        # mean, alpha, beta, e1, e2 (dtau), p, a, mu (dx)
        out["grad_input_soft_kernel"] = (2 * X + T + 8 * kc + ev, X,
                                         "g, x once (dx sweep from L2), tau; writes dx")
    else:
        out["grad_input_given_kernel"] = (2 * X + 4 * kc, X, "g, x; writes dx")
    return out


def design_bytes(kernel: str, name: str, sms: int):
    """(read, write, note) in bytes that the design expects of a kernel in a config, or
    None for a kernel the config's step is not meant to launch."""
    return design(name, sms).get(short_name(kernel))


# Every kernel some path of the design launches (training, evaluation, K = 1 or not).
DESIGN_NAMES = {
    "estep_coefs_kernel", "collect_mixture_stats_kernel", "merge_tile_moments_kernel",
    "finish_moments_kernel", "normalize_mixture_kernel", "update_running_stats_kernel",
    "collect_grad_stats_kernel", "reduce_tile_sums_kernel", "finish_sums_kernel",
    "grad_coefs_kernel", "grad_input_soft_kernel", "grad_input_given_kernel",
    "affine_coefs_kernel", "estep_normalize_kernel"}

# Kernels of csrc/cuda that no config of CONFIGS launches (no design numbers for them in
# any profiled step); tests/test_gpu_check.py checks that every kernel of csrc/cuda is
# either in a config's design or here.
NOT_PROFILED = {
    # only for K = 1 with group ids (split_by): the ids are checked on the device where no
    # responsibility kernel reads them
    "check_group_ids_kernel",
    # the input gradient for given groups or K = 1; every config is K > 1 without groups
    # (its design above is for a K = 1 config)
    "grad_input_given_kernel",
}


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
                                    "smem": set(), "design": None, "stalls": {}, "sm_pct": []}
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
        if not math.isnan(rec.get(SM_PCT, math.nan)):
            row["sm_pct"].append(rec[SM_PCT])
        for key, value in rec.items():
            m = STALL_RE.match(key) if isinstance(value, float) else None
            if m and not math.isnan(value):
                row["stalls"].setdefault(m.group(1), []).append(value)
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
        if r["ours"] and (r["sm_pct"] or r["stalls"]):
            top = sorted(((avg(v), k) for k, v in r["stalls"].items()), reverse=True)[:2]
            note += (f" | SM {avg(r['sm_pct']):.0f}%" if r["sm_pct"] else " |") + "".join(
                f", {k} {v:.1f}" for v, k in top if v >= 0.05)
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

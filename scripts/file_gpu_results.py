"""File a GPU check's results (benchmarks/gpu_check.sh's $OUT) into the repository, and
update the README's table of GPU runs from every run filed so far.

    python scripts/file_gpu_results.py RUN_DIR            # the folder the device brought back
    python scripts/file_gpu_results.py --readme-only      # just regenerate the README table

The run goes to benchmarks/results/gpu/<date>_<device>/: its files (a log over --max-kib
keeps its head and tail), and meta.json completed with the device, driver, torch and CUDA
versions, the date and the commit the run was made from. The README's GPU table and the
GPU line of its status paragraph are regenerated from every run filed. The device's copy of the working
tree may come without .git: the commit is then found here, as the one whose csrc/ tree has
the id the preflight computed from the files (benchmarks/gpu_check_report.py), or given
with --commit. The README's table sits between the markers
`<!-- gpu-results:begin -->` and `<!-- gpu-results:end -->`.

A rehearsal's output (CBN_CHECK_DEVICE=cpu) is refused unless --allow-rehearsal (the test
of this script uses it, on temporary folders).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import gpu_check_report  # noqa: E402  (the parsers of a run's logs, standard library only)
import ncu_check  # noqa: E402
BEGIN, END = "<!-- gpu-results:begin -->", "<!-- gpu-results:end -->"
NO_RUN = "No GPU run yet: `bash benchmarks/gpu_check.sh` on a GPU machine, then this script."
# the GPU line of the README's status paragraph
STATUS_BEGIN, STATUS_END = "<!-- gpu-status:begin -->", "<!-- gpu-status:end -->"
NO_RUN_STATUS = (
    "- **On a GPU: nothing yet.** No lent GPU machine has run `benchmarks/gpu_check.sh`; the\n"
    "  GPU speed figures and the GPU tests (compute-sanitizer, CUDA graphs, no host\n"
    "  synchronisation) are still to come. Treat the CUDA path as untested on hardware.")


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def git(*args, cwd=ROOT):
    try:
        out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def commit_from_tree(csrc_tree: str, depth: int = 500):
    """The newest commit (of the last `depth`) whose csrc/ has this tree id."""
    if not csrc_tree:
        return None
    revs = git("rev-list", f"--max-count={depth}", "--all")
    if not revs:
        return None
    revs = revs.split()
    try:
        out = subprocess.run(["git", "cat-file", "--batch-check"], cwd=ROOT, text=True,
                             input="".join(f"{r}:csrc\n" for r in revs), capture_output=True,
                             timeout=60).stdout.splitlines()
    except (OSError, subprocess.SubprocessError):
        return None
    for rev, line in zip(revs, out):
        if line.split()[:1] == [csrc_tree]:
            return rev
    return None


def copy_capped(src: str, dst: str, max_bytes: int) -> str:
    """Copies src to dst; a log (*.log) larger than max_bytes keeps its first and last
    max_bytes / 2 (data files are copied whole)."""
    size = os.path.getsize(src)
    if size <= max_bytes or not src.endswith(".log"):
        shutil.copyfile(src, dst)
        return f"{size} bytes"
    half = max_bytes // 2
    with open(src, "rb") as f:
        head = f.read(half)
        f.seek(size - half)
        tail = f.read()
    with open(dst, "wb") as f:
        f.write(head)
        gap = size - 2 * half
        f.write(f"\n\n[... {gap} bytes left out by file_gpu_results.py ...]\n\n".encode())
        f.write(tail)
    return f"{size} bytes, truncated to {max_bytes}"


def file_run(run_dir, results_dir, commit=None, allow_rehearsal=False, max_kib=1024, force=False):
    """Files one run; returns the folder it went to."""
    meta_path = os.path.join(run_dir, "meta.json")
    if not os.path.isfile(meta_path):
        raise SystemExit(f"error: {meta_path} not found (is {run_dir} a gpu_check.sh output?)")
    with open(meta_path) as f:
        meta = json.load(f)
    if meta.get("rehearsal") and not allow_rehearsal:
        raise SystemExit("error: this is a rehearsal's output (CBN_CHECK_DEVICE=cpu), not a GPU "
                         "run; --allow-rehearsal files it anyway")
    m = meta.get("machine", {})
    device = m.get("gpu") or ("rehearsal-cpu" if meta.get("rehearsal") else "unknown-device")
    date = (m.get("date") or datetime.date.today().isoformat())[:10]
    ident = m.get("identity", {})
    resolved, source = commit, "--commit" if commit else None
    if not resolved and ident.get("commit"):
        resolved, source = ident["commit"], ident.get("source") or "run"
    if not resolved:
        resolved = commit_from_tree(ident.get("csrc_tree"))
        source = "csrc tree id" if resolved else None
    dest = os.path.join(results_dir, f"{date}_{slug(device)}")
    if os.path.exists(dest) and not force:
        n = 2
        while os.path.exists(f"{dest}_{n}"):
            n += 1
        dest = f"{dest}_{n}"
    os.makedirs(dest, exist_ok=True)
    files = {}
    for name in sorted(os.listdir(run_dir)):
        src = os.path.join(run_dir, name)
        if not os.path.isfile(src) or name == "meta.json":
            continue
        files[name] = copy_capped(src, os.path.join(dest, name), max_kib * 1024)
    meta["filed"] = {
        "date": date, "device": device, "driver": m.get("driver"), "torch": m.get("torch"),
        "cuda": m.get("torch_cuda"), "nvcc": (m.get("tools", {}).get("nvcc") or {}).get("version"),
        "commit": resolved, "commit_source": source, "csrc_tree": ident.get("csrc_tree"),
        "dirty_files": ident.get("dirty_files"), "files": files,
        "filed_at": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
    with open(os.path.join(dest, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)
    return dest


def run_number(folder: str) -> int:
    """The n of a run's folder <date>_<device>_<n> (1 without the suffix): the order of a
    day's runs, 10 after 9."""
    m = re.search(r"_(\d+)$", os.path.basename(folder))
    return int(m.group(1)) if m else 1


def run_tests(folder: str, meta: dict) -> dict:
    """The run's tests per chunk: parsed again from its tests.log where it has one, so that
    a run filed before the parser learned something (a crash, say) is read the same way as a
    new one; else meta.json's."""
    log = os.path.join(folder, "tests.log")
    if os.path.isfile(log):
        with open(log, errors="replace") as f:
            return gpu_check_report.parse_pytest(f.read())
    return meta.get("tests", {})


def run_ncu(folder: str, meta: dict) -> dict:
    """The run's Nsight Compute totals per configuration: from its ncu.csv with today's
    parser where it has one (the runs of 2026-11-29 were summarized on the device by a
    parser that took four of our kernels for PyTorch's), else meta.json's."""
    path = os.path.join(folder, "ncu.csv")
    if os.path.isfile(path) and "ncu" not in (meta.get("canned") or []):
        sms = (meta.get("machine") or {}).get("sms") or 132
        try:
            return {name: ncu_check.totals(rows) for name, rows in ncu_check.parse_file(path, sms)}
        except Exception as e:  # a CSV this parser cannot read: what the device made of it
            print(f"file_gpu_results: {path}: {type(e).__name__}: {e}", file=sys.stderr)
    return meta.get("ncu") or {}


def test_totals(tests: dict):
    """(passed, failed, crashed chunks) of a run's tests per chunk."""
    passed = sum(r.get("counts", {}).get("passed", 0) for r in tests.values())
    failed = sum(len(r.get("failed", [])) + len(r.get("errors", [])) for r in tests.values())
    return passed, failed, [r["crashed"] for r in tests.values() if r.get("crashed")]


def load_runs(results_dir: str):
    """[(folder, meta)] of the runs filed, newest first: by date, then by the day's number."""
    runs = []
    if os.path.isdir(results_dir):
        for name in os.listdir(results_dir):
            p = os.path.join(results_dir, name, "meta.json")
            if os.path.isfile(p):
                with open(p) as f:
                    runs.append((os.path.join(results_dir, name), json.load(f)))
    runs.sort(key=lambda r: (r[1].get("filed", {}).get("date", ""), run_number(r[0]), r[0]),
              reverse=True)
    return runs


def run_row(folder: str, meta: dict, readme_dir: str) -> str:
    fm = meta.get("filed", {})
    m = meta.get("machine", {})
    san = meta.get("sanitizer", {})

    canned = meta.get("canned", [])

    def san_cell(tool):
        r = san.get(tool)
        if "sanitizer" in canned:
            return "(sample)"
        if not r or r.get("skipped"):
            return "-"
        if r.get("timeout"):
            found = sum((r.get("kinds") or {}).values())
            return f"timeout, {found} errors before it" if found else "timeout"
        n = r.get("errors")
        if n is None and r.get("hazards"):
            n = r["hazards"].get("errors")
        return "?" if n is None else str(n)

    tests = run_tests(folder, meta)
    passed, failed, crashes = test_totals(tests)
    timeouts = sum(1 for r in tests.values() if r.get("timeout"))
    worker = sum(len(r.get("worker_crashes") or []) for r in tests.values())
    tcell = f"{passed} / {failed}" + (f" ({timeouts} chunks timed out)" if timeouts else "") \
        + (f" ({worker} of them crashed the process)" if worker else "") \
        + (f" + {len(crashes)} crash ({', '.join(c.split('::')[-1] for c in crashes)}: the "
           "rest of its chunk did not run)" if crashes else "") if tests else "-"
    bench_cell = "-"
    bench_path = os.path.join(folder, "bench.json")
    if os.path.isfile(bench_path):
        try:
            with open(bench_path) as f:
                recs = json.load(f).get("records", [])
        except ValueError:
            recs = []
        k2 = [r["train"]["ext_over_bn"] for r in recs if r.get("K") == 2]
        cp = [r["train"]["ext_copy_fraction"] for r in recs if r.get("K") == 2]
        if k2:
            bench_cell = f"{min(k2):.2f}-{max(k2):.2f} ({100 * min(cp):.0f}-{100 * max(cp):.0f}%)"
    ncu = run_ncu(folder, meta)
    ncu_cell = "; ".join(f"{t['read_x']:.1f}/{t['design_read_x']:.1f} in {t['time_us']:.0f} us"
                         if t.get("time_us") else f"{t['read_x']:.1f}/{t['design_read_x']:.1f}"
                         for t in ncu.values()) or "-"
    if "ncu" in canned:
        ncu_cell = "(sample)"
    smoke = (meta.get("smoke") or {}).get("result") or "-"
    commit = (fm.get("commit") or "?")[:10]
    rel = os.path.relpath(folder, readme_dir)
    torch_v = f"{fm.get('torch') or m.get('torch')} / {fm.get('cuda') or m.get('torch_cuda')}"
    return (f"| {fm.get('date', '?')} | {fm.get('device', '?')} | {fm.get('driver') or '-'} "
            f"| {torch_v} "
            f"| `{commit}` | {smoke} | {san_cell('memcheck')} / {san_cell('initcheck')} / "
            f"{san_cell('racecheck')} / {san_cell('synccheck')} | {tcell} | {bench_cell} | "
            f"{ncu_cell} | [{os.path.basename(folder)}]({rel}) |")


def readme_table(results_dir: str, readme_path: str) -> str:
    runs = load_runs(results_dir)
    if not runs:
        return NO_RUN
    head = ("| date | device | driver | torch / CUDA | commit | smoke | sanitizer errors: mem / "
            "init / race / sync | tests passed / failed | train ext/BN, K = 2 (% of copy) | "
            "ncu: x read per step / design | files |")
    rows = [head, "|" + " --- |" * 11]
    rows += [run_row(folder, meta, os.path.dirname(os.path.abspath(readme_path)))
             for folder, meta in runs]
    text = ("Runs of `bash benchmarks/gpu_check.sh` (filed with `scripts/file_gpu_results.py`; "
            "newest first; each folder holds the run's summary and logs):\n\n" + "\n".join(rows))
    for folder, meta in runs:  # the newest run's benchmark, whole
        table = bench_table(folder, meta)
        if table:
            return text + "\n\n" + table
    return text


def bench_table(folder: str, meta: dict) -> str:
    """The run's benchmark (bench.json) as a table: per shape, dtype and layout, training
    (forward + backward) and evaluation time against nn.BatchNorm2d for each K, the share
    of the copy bandwidth at K = 2 (the step's least bytes over its time), and the
    pure-PyTorch reference's time over ours."""
    path = os.path.join(folder, "bench.json")
    if not os.path.isfile(path) or "bench" in (meta.get("canned") or []):
        return ""
    try:
        with open(path) as f:
            data = json.load(f)
    except ValueError:
        return ""
    recs = [r for r in data.get("records", []) if r.get("device") == "cuda"]
    if not recs:
        return ""
    groups = {}
    for r in recs:
        key = ("x".join(map(str, r["shape"])), r["dtype"], r["layout"])
        groups.setdefault(key, {})[r["K"]] = r
    Ks = sorted({r["K"] for r in recs})
    ks = "/".join(map(str, Ks))

    def cells(g, mode, field, fmt):
        return " / ".join(fmt.format(g[k][mode][field]) if k in g and g[k].get(mode)
                          and g[k][mode].get(field) is not None else "-" for k in Ks)

    fm = meta.get("filed", {})
    copy = (data.get("machines", {}).get("cuda") or {}).get("copy_GBps")
    lines = [f"Its benchmark ({fm.get('date', '?')}, {fm.get('device', '?')}, commit "
             f"`{(fm.get('commit') or '?')[:10]}`; copy bandwidth "
             f"{copy:.0f} GB/s; medians of {recs[0].get('repeats')} calls after "
             f"{recs[0].get('warmup')}; K = {ks}):" if copy else "Its benchmark:", "",
             f"| shape | dtype | layout | train ext/BN, K = {ks} | train % of copy, K = 2 | "
             f"eval ext/BN, K = {ks} | reference / ext (train), K = {ks} |",
             "|" + " --- |" * 7]
    for (shape, dtype, layout), g in groups.items():
        k2 = g.get(2, {}).get("train", {}).get("ext_copy_fraction")
        ref = cells(g, "train", "ref_over_ext", "{:.1f}x")
        lines.append(f"| {shape} | {dtype} | {layout} | {cells(g, 'train', 'ext_over_bn', '{:.2f}')} "
                     f"| {'-' if k2 is None else f'{100 * k2:.0f}'} | "
                     f"{cells(g, 'eval', 'ext_over_bn', '{:.2f}')} | "
                     f"{'-' if set(ref.split(' / ')) == {'-'} else ref} |")
    return "\n".join(lines)


def status_line(results_dir: str) -> str:
    """The status paragraph's GPU line, from the newest run filed."""
    runs = load_runs(results_dir)
    if not runs:
        return NO_RUN_STATUS
    folder, meta = runs[0]
    fm = meta.get("filed", {})
    tests = run_tests(folder, meta)
    passed, failed, crashed = test_totals(tests)
    crashes = len(crashed)
    verdict = "all CUDA tests passed" if tests and failed + crashes == 0 else (
        f"{failed} CUDA test(s) failed, {passed} passed"
        + (f", {crashes} chunk(s) of tests crashed" if crashes else "") if tests
        else "no test results")
    return (f"- **On a GPU: last run {fm.get('date', '?')}** on {fm.get('device', '?')} (commit "
            f"`{(fm.get('commit') or '?')[:10]}`): {verdict}; sanitizer, benchmark and Nsight\n"
            f"  Compute figures in [the GPU table](#gpu). Later commits are checked by CI and the "
            f"emulated backend only.")


def replace_between(text: str, begin: str, end: str, body: str, path: str) -> str:
    if begin not in text or end not in text:
        raise SystemExit(f"error: {path} lacks the markers {begin} ... {end}")
    start = text.index(begin) + len(begin)
    return text[:start] + "\n" + body + "\n" + text[text.index(end):]


def update_readme(readme_path: str, results_dir: str) -> bool:
    with open(readme_path) as f:
        text = f.read()
    new = replace_between(text, BEGIN, END, readme_table(results_dir, readme_path), readme_path)
    new = replace_between(new, STATUS_BEGIN, STATUS_END, status_line(results_dir), readme_path)
    if new != text:
        with open(readme_path, "w") as f:
            f.write(new)
    return new != text


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("run_dir", nargs="?", help="the folder of a gpu_check.sh run ($OUT)")
    p.add_argument("--results", default=os.path.join(ROOT, "benchmarks", "results", "gpu"))
    p.add_argument("--readme", default=os.path.join(ROOT, "README.md"))
    p.add_argument("--commit", help="the commit the run was made from (default: from the run)")
    p.add_argument("--max-kib", type=int, default=1024, help="a larger log keeps head and tail")
    p.add_argument("--allow-rehearsal", action="store_true")
    p.add_argument("--force", action="store_true", help="replace a run filed in the same folder")
    p.add_argument("--readme-only", action="store_true")
    args = p.parse_args(argv)
    if not args.readme_only:
        if not args.run_dir:
            p.error("RUN_DIR is required (or --readme-only)")
        dest = file_run(args.run_dir, args.results, args.commit, args.allow_rehearsal,
                        args.max_kib, args.force)
        with open(os.path.join(dest, "meta.json")) as f:
            filed = json.load(f)["filed"]
        print(f"filed {args.run_dir} -> {os.path.relpath(dest, ROOT)} ({filed['device']}, driver "
              f"{filed['driver']}, torch {filed['torch']}, commit {filed['commit']} "
              f"[{filed['commit_source']}])")
    changed = update_readme(args.readme, args.results)
    print(f"README table {'updated' if changed else 'unchanged'}: {args.readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

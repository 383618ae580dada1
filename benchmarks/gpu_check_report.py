"""The Python half of benchmarks/gpu_check.sh: the preflight, the parsing of its logs,
and the one-screen summary (summary.txt) with its machine-readable twin (meta.json).

    python benchmarks/gpu_check_report.py preflight --device cuda --json M.json --env E.sh
    python benchmarks/gpu_check_report.py summary --out OUT --scratch SCR
    python benchmarks/gpu_check_report.py sanitizer OUT/sanitizer.log   # what it found
    python benchmarks/gpu_check_report.py tests OUT/tests.log

Only the preflight imports torch; the summary is rewritten after every stage, so it must
stay cheap (standard library only).
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

SCHEMA = 1


# ---------------------------------------------------------------------------------------
# Preflight
# ---------------------------------------------------------------------------------------

def _run(cmd, timeout=20):
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        return out.returncode, (out.stdout + out.stderr).strip()
    except (OSError, subprocess.SubprocessError) as e:
        return None, f"{type(e).__name__}: {e}"


def find_tool(name, extra_dirs=()):
    """A CUDA tool on the PATH or in the usual toolkit folders."""
    path = shutil.which(name)
    if path:
        return path
    homes = [os.environ.get("CUDA_HOME"), "/usr/local/cuda"]
    for home in filter(None, homes):
        for sub in ("bin", "compute-sanitizer", "nsight-compute", *extra_dirs):
            cand = os.path.join(home, sub, name)
            if os.path.isfile(cand) and os.access(cand, os.X_OK):
                return cand
    for base in ("/opt/nvidia/nsight-compute", "/usr/local/NVIDIA-Nsight-Compute"):
        if os.path.isdir(base):
            for dirpath, _, files in os.walk(base):
                if name in files:
                    return os.path.join(dirpath, name)
    return None


def git_tree_id(path):
    """The id git gives the tree of a folder (`git rev-parse HEAD:csrc`), computed from the
    files alone -- the device's copy of the working tree may come without .git. Files git
    ignores here (__pycache__, *.pyc, *.so, *.egg-info) are left out."""
    def blob(data):
        return hashlib.sha1(b"blob %d\0" % len(data) + data).digest()

    def tree(d):
        entries = []
        for name in os.listdir(d):
            full = os.path.join(d, name)
            if name in ("__pycache__",) or name.endswith((".pyc", ".so", ".egg-info")):
                continue
            if os.path.islink(full):
                entries.append((name, b"120000", blob(os.readlink(full).encode())))
            elif os.path.isdir(full):
                sub = tree(full)
                if sub is not None:
                    entries.append((name + "/", b"40000", sub))
            else:
                with open(full, "rb") as f:
                    data = f.read()
                mode = b"100755" if os.access(full, os.X_OK) else b"100644"
                entries.append((name, mode, blob(data)))
        if not entries:
            return None
        body = b"".join(mode + b" " + name.rstrip("/").encode() + b"\0" + sha
                        for name, mode, sha in sorted(entries, key=lambda e: e[0].encode()))
        return hashlib.sha1(b"tree %d\0" % len(body) + body).digest()

    t = tree(path) if os.path.isdir(path) else None
    return t.hex() if t else None


def source_identity():
    """The commit of the run: git's when .git came along, else CBN_GIT_COMMIT, and in any
    case the tree ids of csrc/ and cbn_ext/ (scripts/file_gpu_results.py finds the commit
    from them)."""
    ident = {"commit": None, "dirty_files": None, "source": None,
             "csrc_tree": git_tree_id(os.path.join(ROOT, "csrc")),
             "cbn_ext_tree": git_tree_id(os.path.join(ROOT, "cbn_ext"))}
    rc, out = _run(["git", "-C", ROOT, "rev-parse", "HEAD"])
    if rc == 0 and re.fullmatch(r"[0-9a-f]{40}", out):
        ident["commit"], ident["source"] = out, "git"
        rc, st = _run(["git", "-C", ROOT, "status", "--porcelain", "--untracked-files=no"])
        if rc == 0:
            ident["dirty_files"] = len([line for line in st.splitlines() if line.strip()])
    elif os.environ.get("CBN_GIT_COMMIT"):
        ident["commit"], ident["source"] = os.environ["CBN_GIT_COMMIT"], "CBN_GIT_COMMIT"
    return ident


def preflight(device, json_path, env_path):
    """Machine, tools and versions; writes JSON and a shell file of settings for the
    script. Returns 2 when the check cannot go on (no GPU, no nvcc, no Python headers)."""
    info = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "device_mode": device, "python": sys.version.split()[0],
            "cores": os.cpu_count(), "identity": source_identity()}
    fatal, notes, env = [], [], {}
    try:
        import torch
        info["torch"] = torch.__version__
        info["torch_cuda"] = torch.version.cuda
        info["cuda_available"] = torch.cuda.is_available()
        if torch.cuda.is_available():
            p = torch.cuda.get_device_properties(0)
            info["gpu"] = p.name
            info["gpus"] = torch.cuda.device_count()
            info["cc"] = f"{p.major}.{p.minor}"
            info["sms"] = p.multi_processor_count
            info["gpu_memory_GiB"] = round(p.total_memory / 2**30, 1)
            env["CBN_ARCH"] = info["cc"]
            env["CBN_SMS"] = str(p.multi_processor_count)
    except Exception as e:  # reported, and fatal on a GPU run
        info["torch"] = f"import failed: {e}"
        fatal.append("torch does not import")
    rc, out = _run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                    "--format=csv,noheader"])
    if rc == 0 and out:
        name, driver, mem = (s.strip() for s in (out.splitlines()[0].split(",") + ["", ""])[:3])
        info["nvidia_smi"] = {"name": name, "driver": driver, "memory": mem}
        info["driver"] = driver
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    tools = {}
    given = {"compute-sanitizer": os.environ.get("CBN_SANITIZER"), "ncu": os.environ.get("CBN_NCU")}
    for tool, args in (("nvcc", ["--version"]), ("ninja", ["--version"]),
                       ("compute-sanitizer", ["--version"]), ("ncu", ["--version"])):
        path = given.get(tool) or find_tool(tool)  # CBN_SANITIZER / CBN_NCU: this one
        version = None
        if path:
            rc, out = _run([path, *args])
            lines = [line for line in out.splitlines() if line.strip()]
            version = lines[-1].strip() if rc == 0 and lines else f"(rc {rc})"
        tools[tool] = {"path": path, "version": version}
    info["tools"] = tools
    if not tools["ninja"]["path"]:
        try:  # the pip package's binary, off the PATH
            import ninja
            env["CBN_PATH_PREPEND"] = ninja.BIN_DIR
            tools["ninja"]["path"] = os.path.join(ninja.BIN_DIR, "ninja")
            notes.append(f"ninja: from the Python package ({ninja.BIN_DIR})")
        except Exception:
            notes.append("ninja missing: the build compiles through setuptools, in parallel "
                         "threads (benchmarks/build_inplace.py)")
    env["CBN_NINJA"] = "1" if tools["ninja"]["path"] else "0"
    env["CBN_SANITIZER"] = tools["compute-sanitizer"]["path"] or ""
    env["CBN_NCU"] = tools["ncu"]["path"] or ""
    import sysconfig
    header = os.path.join(sysconfig.get_paths()["include"], "Python.h")
    info["python_headers"] = os.path.isfile(header)
    for mod in ("pytest", "pytest_timeout", "xdist", "numpy"):
        try:
            __import__(mod)
            info[mod] = True
        except Exception:
            info[mod] = False
    env["CBN_PYTEST_TIMEOUT"] = "1" if info["pytest_timeout"] else "0"
    env["CBN_HAVE_PYTEST"] = "1" if info["pytest"] else "0"
    env["CBN_PYTEST_XDIST"] = "1" if info["xdist"] else "0"
    if device == "cuda":
        if not info.get("cuda_available"):
            fatal.append("no GPU visible to torch")
        if not tools["nvcc"]["path"]:
            fatal.append("no nvcc")
        if not info["python_headers"]:
            fatal.append(f"no Python headers ({header})")
        if not tools["compute-sanitizer"]["path"]:
            notes.append("no compute-sanitizer: the sanitizer stage is skipped")
        if not tools["ncu"]["path"]:
            notes.append("no ncu: the Nsight Compute stage is skipped")
        if not info["pytest"]:
            notes.append("no pytest: the test stage is skipped")
    info["fatal"], info["notes"] = fatal, notes
    with open(json_path, "w") as f:
        json.dump(info, f, indent=1)
    with open(env_path, "w") as f:
        for k, v in env.items():
            f.write(f"{k}='{v}'\n")
    gpu = info.get("gpu", "no GPU")
    print(f"preflight: {gpu}{', cc ' + info['cc'] if 'cc' in info else ''}"
          f"{', ' + str(info['sms']) + ' SMs' if 'sms' in info else ''}; driver "
          f"{info.get('driver', '-')}; torch {info.get('torch')} (CUDA {info.get('torch_cuda')}); "
          f"Python {info['python']}; {info['cores']} cores")
    for tool, t in tools.items():
        version = f" -- {t['version']}" if t["version"] else ""
        print(f"preflight: {tool}: {t['path'] or 'missing'}{version}")
    print(f"preflight: Python headers {'found' if info['python_headers'] else 'MISSING'}; "
          f"pytest {info['pytest']}, pytest-timeout {info['pytest_timeout']}, "
          f"pytest-xdist {info['xdist']}")
    ident = info["identity"]
    dirty = f" ({ident['dirty_files']} files changed)" if ident["dirty_files"] else ""
    print(f"preflight: commit {ident['commit'] or 'unknown (no .git)'}{dirty}; "
          f"csrc tree {ident['csrc_tree']}")
    for n in notes:
        print(f"preflight: note: {n}")
    for fl in fatal:
        print(f"preflight: FATAL: {fl}")
    return 2 if fatal else 0


# ---------------------------------------------------------------------------------------
# Logs
# ---------------------------------------------------------------------------------------

def sections(text, tag):
    """{name: (body, end line)} of a log made of `### TAG NAME ...` ... `### TAG NAME: rc=...`
    sections, in order."""
    out = {}
    cur = None
    for line in text.splitlines():
        m = re.match(rf"### {tag} (\S+?)(:)? (.*)$", line)
        if m and m.group(2):  # the end line
            name = m.group(1)
            out.setdefault(name, ["", None])[1] = m.group(3)
            cur = None
        elif m:
            cur = m.group(1)
            out[cur] = ["", None]
        elif cur is not None:
            out[cur][0] += line + "\n"
    return {k: tuple(v) for k, v in out.items()}


def end_fields(end):
    """rc and seconds of an end line `rc=R, S s`."""
    if not end:
        return None, None
    rc = re.search(r"rc=(-?\d+)", end)
    secs = re.search(r"([\d.]+) s", end)
    return (int(rc.group(1)) if rc else None), (float(secs.group(1)) if secs else None)


ERROR_HEAD = re.compile(
    r"^=+ (Invalid .*|Uninitialized .*|(?:Error|Warning): Race reported.*|Race reported.*|"
    r"Barrier error.*|Misaligned .*|Out-of-range .*|Out of range .*|Program hit .*|"
    r"Malloc/Free error.*|Leaked .*|Hardware exception.*|"
    r"Illegal .*|.*[Dd]ivergent thread.*|Invalid arguments.*)")


def parse_sanitizer(text):
    """Per tool: rc, seconds, errors, racecheck hazards, and the kinds of errors with the
    kernels they were found in."""
    from ncu_check import short_name

    out = {}
    for tool, (body, end) in sections(text, "tool").items():
        rc, secs = end_fields(end)
        res = {"rc": rc, "seconds": secs, "errors": None, "hazards": None, "kinds": {},
               "smoke": None, "timeout": rc in (124, 137), "skipped": "skipped" in (end or "")}
        m = re.findall(r"ERROR SUMMARY: (\d+) error", body)
        if m:
            res["errors"] = int(m[-1])
        m = re.findall(r"RACECHECK SUMMARY: (\d+) hazards? displayed "
                       r"\((\d+) errors?, (\d+) warnings?\)", body)
        if m:
            res["hazards"] = {"displayed": int(m[-1][0]), "errors": int(m[-1][1]),
                              "warnings": int(m[-1][2])}
        lines = body.splitlines()
        for i, line in enumerate(lines):
            h = ERROR_HEAD.match(line)
            if not h:
                continue
            kind = re.sub(r"0x[0-9a-fA-F]+", "ADDR", h.group(1)).strip()
            kind = re.sub(r"\s+at\s+\S+.*$", "", kind)[:90]
            kernel = "?"
            own = re.search(r"\bat (?:0x[0-9a-f]+ in )?(\S.*?)\+0x[0-9a-f]+", line)
            if own:
                kernel = short_name(own.group(1))
            for nxt in ([] if own else lines[i + 1:i + 6]):
                a = re.search(r"=+\s+at (?:0x[0-9a-f]+ in )?(.+?)(?:\+0x[0-9a-f]+)?(?: in .*)?$",
                              nxt)
                if a and not a.group(1).startswith("0x"):
                    kernel = short_name(a.group(1))
                    break
            key = f"{kind} @ {kernel}"
            res["kinds"][key] = res["kinds"].get(key, 0) + 1
        sm = re.findall(r"gpu_smoke: (\d+)/(\d+) cases agree", body)
        if sm:
            res["smoke"] = f"{sm[-1][0]}/{sm[-1][1]}"
        out[tool] = res
    return out


def parse_pytest(text):
    """Per chunk: counts, rc, seconds, timeout, failures (test ids), the last test seen."""
    out = {}
    for chunk, (body, end) in sections(text, "chunk").items():
        rc, secs = end_fields(end)
        res = {"rc": rc, "seconds": secs, "timeout": rc in (124, 137), "counts": {},
               "failed": [], "errors": [], "last_test": None, "crashed": None,
               "skipped_stage": "skipped" in (end or "")}
        seen = {}  # the -v lines' results, for a run that ends without its summary line
        for line in body.splitlines():
            m = re.match(r"^(FAILED|ERROR) (\S+)", line)
            if m:
                (res["failed"] if m.group(1) == "FAILED" else res["errors"]).append(m.group(2))
            m = re.match(r"^(?:\[gw\d+\] (?:\[ *\d+%\] )?(PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS) )?"
                         r"(\S+::\S+)(?: (PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS))?", line)
            if m and not line.startswith(("FAILED", "ERROR")):
                res["last_test"] = m.group(2)
                what = m.group(1) or m.group(3)
                if what:
                    seen[m.group(2)] = what
        for line in reversed(body.splitlines()):
            if re.search(r"\b(passed|failed|skipped|deselected|errors?|no tests ran)\b", line) \
                    and re.search(r" in [\d.]+s", line):
                for n, what in re.findall(
                        r"(\d+) (passed|failed|skipped|deselected|errors?|xfailed|xpassed)", line):
                    res["counts"][what.rstrip("s") if what.startswith("error") else what] = int(n)
                break
        # a crash (a segfault, say: rc 128 + signal, "Fatal Python error") ends pytest before
        # its summary: the test it was in, and the results of the -v lines before it
        if not res["timeout"] and not res["counts"] and (
                (rc is not None and rc > 128) or "Fatal Python error" in body):
            res["crashed"] = res["last_test"] if seen.get(res["last_test"]) is None else "?"
            for what in seen.values():
                key = {"PASSED": "passed", "FAILED": "failed", "SKIPPED": "skipped",
                       "ERROR": "error", "XFAIL": "xfailed", "XPASS": "xpassed"}[what]
                res["counts"][key] = res["counts"].get(key, 0) + 1
        # pytest-xdist: a test that crashed its worker is reported failed, and named so
        res["worker_crashes"] = list(dict.fromkeys(
            re.findall(r"worker '?gw\d+'? crashed while running '([^']+)'", body)))
        res["failed"] = list(dict.fromkeys(res["failed"]))
        res["errors"] = list(dict.fromkeys(res["errors"]))
        out[chunk] = res
    return out


def group_failures(ids):
    """{test function: count} of failed test ids."""
    groups = {}
    for tid in ids:
        base = tid.split("[")[0]
        groups[base] = groups.get(base, 0) + 1
    return groups


# A kernel's name after `__global__ void`, past a `__launch_bounds__(...)` whose arguments
# may hold one level of parentheses: `__launch_bounds__(kThreads, (kMinBlocks<acc_t, KB>))`.
KERNEL_RE = r"__global__\s+void\s+(?:__launch_bounds__\((?:[^()]|\([^()]*\))*\)\s*)?(\w+)"


def cuda_kernel_names():
    """The __global__ functions of csrc/cuda."""
    names = []
    folder = os.path.join(ROOT, "csrc", "cuda")
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        if name.endswith((".cu", ".cuh")):
            names += re.findall(KERNEL_RE, read(os.path.join(folder, name)))
    return names


def read(path):
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def load_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def num(text):
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


def read_stages(path):
    stages = []
    for line in read(path).splitlines():
        parts = line.split("\t")
        if len(parts) >= 6:
            name, status, rc, secs, limit, note = parts[:6]
            at = parts[6] if len(parts) > 6 else ""
            stages.append({"stage": name, "status": status,
                           "rc": int(rc) if rc.lstrip("-").isdigit() else None,
                           "seconds": num(secs), "limit": num(limit), "note": note,
                           "at": num(at)})
    return stages


# ---------------------------------------------------------------------------------------
# Summary
# ---------------------------------------------------------------------------------------

def bench_table(bench):
    """Compact rows: per shape, dtype and layout, train ext/BN for each K, %copy, eval ext/BN."""
    recs = bench.get("records", [])
    Ks = sorted({r["K"] for r in recs})
    def key_of(r):
        return "x".join(map(str, r["shape"])), r["dtype"], r["layout"]

    keys = list(dict.fromkeys(key_of(r) for r in recs))
    ks = "/".join(map(str, Ks))
    lines = [f"{'shape':<13} {'dtype':<8} {'layout':<13} train ext/BN K={ks:<7} "
             f"%copy(K=2) eval ext/BN  ref/ext"]
    for key in keys:
        rs = {r["K"]: r for r in recs if key_of(r) == key}
        train = " / ".join(f"{rs[k]['train']['ext_over_bn']:.2f}" if k in rs else "-" for k in Ks)
        k2 = rs.get(2) or rs[sorted(rs)[0]]
        ev = " / ".join(f"{rs[k]['eval']['ext_over_bn']:.2f}" if k in rs else "-" for k in Ks)
        ref = " / ".join(f"{rs[k]['train']['ref_over_ext']:.1f}x" for k in Ks
                         if k in rs and "ref_over_ext" in rs[k]["train"]) or "-"
        lines.append(f"{key[0]:<13} {key[1]:<8} {key[2]:<13} {train:<26} "
                     f"{100 * k2['train']['ext_copy_fraction']:>5.0f}      {ev}  {ref}")
    return lines


def summarize(out_dir, scratch, limit_total=None):
    """Writes summary.txt and meta.json into out_dir from what the stages left there."""
    pre = load_json(os.path.join(scratch, "preflight.json")) or {}
    stages = read_stages(os.path.join(scratch, "stages.tsv"))
    now = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    meta = {"schema": SCHEMA, "written": now, "rehearsal": pre.get("device_mode") == "cpu",
            "machine": pre, "stages": stages, "budget_s": limit_total}
    lines = []
    ident = pre.get("identity", {})
    mode = ("REHEARSAL on the CPU (small sizes; GPU stages skipped)" if meta["rehearsal"]
            else "GPU check")
    lines.append(f"cbn_ext {mode} -- {pre.get('date', '?')}")
    lines.append(f"machine: {pre.get('gpu', 'no GPU')}, driver {pre.get('driver', '-')}, torch "
                 f"{pre.get('torch', '?')} (CUDA {pre.get('torch_cuda')}), "
                 f"Python {pre.get('python')}, {pre.get('cores')} cores")
    dirty = f" +{ident['dirty_files']} changed files" if ident.get("dirty_files") else ""
    lines.append(f"commit: {ident.get('commit') or 'unknown'}{dirty}; "
                 f"csrc tree {str(ident.get('csrc_tree'))[:12]}")
    used = max([s["at"] or 0 for s in stages] or [0])
    meta["elapsed_s"] = used
    lines.append("")
    lines.append(f"{'stage':<10} {'status':<8} {'secs':>5} {'limit':>5}  note")
    for s in stages:
        lines.append(f"{s['stage']:<10} {s['status']:<8} {s['seconds'] or 0:>5.0f} "
                     f"{s['limit'] or 0:>5.0f}  {s['note'][:150]}")
    lines.append(f"{'(in all)':<10} {'':<8} {used:>5.0f} {limit_total or 0:>5.0f}  wall clock; "
                 "sanitizer and tests share their lanes' time")

    # smoke
    smoke_text = read(os.path.join(out_dir, "build.log"))
    smoke = {"result": None, "mismatches": [], "kernels": None}
    m = re.findall(r"gpu_smoke: (\d+)/(\d+) cases agree.*", smoke_text)
    if m:
        smoke["result"] = f"{m[-1][0]}/{m[-1][1]}"
    smoke["mismatches"] = re.findall(r"^MISMATCH (.*)$", smoke_text, flags=re.M)[:20]
    k = re.findall(r"gpu_smoke: kernels of cbn_ext launched \((\d+)\): (.*)", smoke_text)
    if k:
        smoke["kernels"] = k[-1][1].split(", ")
        # the sanitizers run these same cases: a kernel they never launch goes unchecked
        smoke["not_launched"] = sorted(set(cuda_kernel_names()) - set(smoke["kernels"]))
    meta["smoke"] = smoke
    if smoke["result"] or smoke["mismatches"]:
        lines.append("")
        seen = ""
        if smoke["kernels"]:
            missing = smoke["not_launched"]
            seen = (f"; launched {len(smoke['kernels'])} kernels of ours, "
                    + (f"NOT {', '.join(missing)}" if missing else "every __global__ in csrc/cuda"))
        lines.append(f"smoke: {smoke['result'] or '?'} cases agree with the CPU kernels{seen}")
        for mm in smoke["mismatches"][:4]:
            lines.append(f"  MISMATCH {mm[:150]}")

    # sanitizer
    san = parse_sanitizer(read(os.path.join(out_dir, "sanitizer.log")))
    meta["sanitizer"] = san
    if san:
        lines.append("")
        canned = "canned sample" in read(os.path.join(out_dir, "sanitizer.log"))
        if canned:
            meta.setdefault("canned", []).append("sanitizer")
        lines.append("compute-sanitizer" + (" (CANNED SAMPLE, parse check only)" if canned else "")
                     + ", filtered to cbn_ext's kernels:")
        for tool, r in san.items():
            if r["skipped"]:
                lines.append(f"  {tool:<10} skipped")
                continue
            what = "TIMEOUT" if r["timeout"] else f"rc {r['rc']}"
            h = r["hazards"]
            haz = f", hazards {h['errors']} errors / {h['warnings']} warnings" if h else ""
            errors = r["errors"] if r["errors"] is not None else ("-" if h else "?")
            lines.append(f"  {tool:<10} errors {errors}{haz}; {what}, {r['seconds'] or 0:.0f} s; "
                         f"smoke {r['smoke'] or '-'}")
            for kind, n in list(r["kinds"].items())[:3]:
                lines.append(f"      {n} x {kind[:120]}")

    # tests
    tests = parse_pytest(read(os.path.join(out_dir, "tests.log")))
    meta["tests"] = tests
    if tests:
        lines.append("")
        lines.append("tests:")
        for chunk, r in tests.items():
            c = r["counts"]
            counts = ", ".join(f"{v} {k}" for k, v in c.items() if k != "deselected")
            state = ("TIMEOUT" if r["timeout"] else
                     "skipped" if r["skipped_stage"] else
                     f"CRASHED (rc {r['rc']}) in {r['crashed']}" if r.get("crashed") else
                     f"rc {r['rc']}")
            last = f"; last test {r['last_test']}" if r["timeout"] and r["last_test"] else ""
            if r.get("crashed"):
                last = "; the tests after it did not run"
            if r.get("worker_crashes"):
                last += (f"; {len(r['worker_crashes'])} of the failures crashed the process: "
                         + ", ".join(t.split("::")[-1] for t in r["worker_crashes"][:3]))
            lines.append(f"  {chunk:<12} {counts or 'no result line'}; {state}, "
                         f"{r['seconds'] or 0:.0f} s{last}")
            groups = list(group_failures(r["failed"] + r["errors"]).items())
            for base, n in groups[:4]:  # the rest is in tests.log (a screen is short)
                lines.append(f"      {n} x {base}")
            if len(groups) > 4:
                lines.append(f"      ... {len(groups) - 4} more tests with failures")
        nfail = sum(len(r["failed"]) + len(r["errors"]) + bool(r.get("crashed"))
                    for r in tests.values())
        lines.append(f"  failures in all: {nfail} (every one listed in tests.log; a crash "
                     "counts as one)")

    # benchmark
    bench = load_json(os.path.join(out_dir, "bench.json"))
    if bench:
        copy = {d: m.get("copy_GBps") for d, m in bench.get("machines", {}).items()}
        meta["bench"] = {"records": len(bench.get("records", [])),
                         "complete": bench.get("complete"), "skipped": bench.get("skipped"),
                         "copy_GBps": copy}
        lines.append("")
        cp = ", ".join(f"{d} copy {v:.0f} GB/s" for d, v in copy.items() if v)
        partial = "" if bench.get("complete") else f" (incomplete: {bench.get('skipped')} skipped)"
        lines.append(f"benchmark: {meta['bench']['records']} configurations{partial}; {cp}")
        lines.extend("  " + line for line in bench_table(bench))

    # Nsight Compute
    ncu_json = load_json(os.path.join(scratch, "ncu.json"))
    if ncu_json:
        meta["ncu"] = {name: v["totals"] for name, v in ncu_json.items()}
        canned = "CANNED" in read(os.path.join(out_dir, "perf.log"))
        if canned:
            meta.setdefault("canned", []).append("ncu")
        lines.append("")
        lines.append("Nsight Compute" + (" (CANNED SAMPLE, parse check only)" if canned else "")
                     + ": DRAM bytes of cbn_ext's kernels per step, in units of x (design):")
        for name, t in meta["ncu"].items():
            lines.append(f"  {name:<31} read {t['read_x']:.2f} ({t['design_read_x']:.2f}), "
                         f"written {t['write_x']:.2f} ({t['design_write_x']:.2f}); "
                         f"{t['time_us']:.0f} us in {t['launches']} launches; "
                         f"+{t['other_kernels']} other kernels")
    text = "\n".join(lines) + "\n"
    tmp = os.path.join(out_dir, ".summary.tmp")
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, os.path.join(out_dir, "summary.txt"))
    tmp = os.path.join(out_dir, ".meta.tmp")
    with open(tmp, "w") as f:
        json.dump(meta, f, indent=1, default=str)
    os.replace(tmp, os.path.join(out_dir, "meta.json"))
    return text


def stage_status(kind, text):
    """(status, note) of the sanitizer or the tests stage, from its log: TIMEOUT when a
    run hit its limit, FAIL when one failed (pytest's 5, "no tests collected", is not a
    failure), else ok."""
    if kind == "sanitizer":
        res = parse_sanitizer(text)
        parts, status = [], "ok"
        for tool, r in res.items():
            if r["skipped"]:
                continue
            n = r["errors"] if r["errors"] is not None else (r["hazards"] or {}).get("errors", "?")
            parts.append(f"{tool} {'TIMEOUT' if r['timeout'] else n}")
            if r["timeout"]:
                status = "TIMEOUT"
            elif r["rc"] not in (0, None) and status == "ok":
                status = "FAIL"
        return status, "errors: " + (", ".join(parts) or "none run")
    res = parse_pytest(text)
    parts, status = [], "ok"
    for name, r in res.items():
        c = r["counts"]
        parts.append(f"{name} {c.get('passed', 0)}/{c.get('failed', 0) + c.get('error', 0)}"
                     + ("/TIMEOUT" if r["timeout"] else "/CRASHED" if r.get("crashed") else ""))
        if r["timeout"]:
            status = "TIMEOUT"
        elif r["rc"] not in (0, 5, None) and status == "ok":
            status = "FAIL"
    return status, "passed/failed: " + (", ".join(parts) or "none run")


def stage_note(kind, path):
    """The summary's note on the bench or ncu stage, from bench.json / ncu.json."""
    data = load_json(path)
    if not data:
        return "no results"
    if kind == "bench":
        left = "" if data.get("complete") else f" (time budget: {data.get('skipped')} skipped)"
        return f"{len(data.get('records', []))} configurations{left}"
    return "; ".join(f"{name}: read {v['totals']['read_x']:.2f} x (design "
                     f"{v['totals']['design_read_x']:.2f})" for name, v in data.items())


# An operator's error whose message formats integers: check_tau's "tau has shape [2, 2,
# 16], expected [2, 2, 4, 4]" goes through std::ostream's num_put facet.
CXX_PROBE = """
import torch, cbn_ext
x = torch.randn(2, 3, 4, 4)
try:
    torch.ops.cbn_ext.normalize(x, None, None, torch.zeros(2, 2, 16), torch.zeros(2, 3),
                                torch.ones(2, 3), None, 1e-5)
except ValueError as e:
    print("cxx-runtime: the error's message:", str(e).splitlines()[0][:120])
"""


def cxx_runtime(python=sys.executable):
    """Whether the built extension formats an error message with integers without crashing,
    in a child process; where it crashes, what the C++ toolchain was (printed for
    build.log). The second GPU run (H200, 2026-11-29) built with /opt/gcc/bin/g++ an
    extension in which every such message segfaulted: cuda-gdb placed the crash in code of
    libstdc++ inside _C.so itself, and messages of text alone worked -- the mark of a
    second C++ runtime in the process, whose functions (bound in the extension by
    -Bsymbolic-functions) meet the first one's locale data."""
    r = subprocess.run([python, "-c", CXX_PROBE], capture_output=True, text=True, timeout=120)
    ok = r.returncode == 0 and "tau has shape" in r.stdout
    print(r.stdout.strip() or "(no output)")
    if ok:
        print("cxx-runtime: ok (an error message with integers formats in the extension)")
        return 0
    print(f"cxx-runtime: FAILED: rc {r.returncode}; {r.stderr.strip()[-600:]}")
    cxx = os.environ.get("CXX") or shutil.which("c++") or "c++"
    print(f"cxx-runtime: CC={os.environ.get('CC')!r} CXX={os.environ.get('CXX')!r}; "
          f"c++ is {shutil.which('c++')}, g++ is {shutil.which('g++')}")
    for args in ([cxx, "--version"], [cxx, "-print-file-name=libstdc++.so"],
                 [cxx, "-print-file-name=libstdc++.a"], ["file", "-L", shutil.which(cxx) or cxx]):
        rc, out = _run(args)
        print(f"cxx-runtime: {' '.join(args)}: {out.strip().splitlines()[0] if out.strip() else rc}")
    path = shutil.which(cxx) or cxx
    try:
        with open(path, "rb") as f:
            head = f.read(1500)
        if head.startswith(b"#!"):
            print(f"cxx-runtime: {path} is a script:")
            print(head.decode(errors="replace"))
    except OSError:
        pass
    import glob
    for so in glob.glob(os.path.join(ROOT, "cbn_ext", "_C*.so")):
        rc, out = _run(["nm", "-C", "--defined-only", so])
        n = sum(1 for line in out.splitlines() if "std::locale::" in line)
        print(f"cxx-runtime: {os.path.basename(so)} defines {n} std::locale symbols (nm rc {rc};"
              " a shared libstdc++ leaves none in the extension)")
        rc, out = _run(["ldd", so])
        print("cxx-runtime: ldd: " + "; ".join(line.strip() for line in out.splitlines()
                                             if "stdc++" in line or "gcc_s" in line))
    return 1


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("preflight")
    a.add_argument("--device", default="cuda")
    a.add_argument("--json", required=True)
    a.add_argument("--env", required=True)
    s = sub.add_parser("summary")
    s.add_argument("--out", required=True)
    s.add_argument("--scratch", required=True)
    s.add_argument("--budget", type=float, default=None)
    s.add_argument("--print", action="store_true")
    for name in ("sanitizer", "tests"):
        x = sub.add_parser(name)
        x.add_argument("log")
    st = sub.add_parser("status", help="STATUS<tab>NOTE of the sanitizer or tests stage")
    st.add_argument("kind", choices=["sanitizer", "tests"])
    st.add_argument("log")
    sub.add_parser("cxx-runtime", help="does an error message with integers format, "
                   "or crash the process (a second C++ runtime)")
    nt = sub.add_parser("note", help="a line on the bench or ncu stage")
    nt.add_argument("kind", choices=["bench", "ncu"])
    nt.add_argument("json")
    args = p.parse_args(argv)
    if args.cmd == "cxx-runtime":
        return cxx_runtime()
    if args.cmd == "note":
        print(stage_note(args.kind, args.json))
        return 0
    if args.cmd == "status":
        print("\t".join(stage_status(args.kind, read(args.log))))
        return 0
    if args.cmd == "preflight":
        return preflight(args.device, args.json, args.env)
    if args.cmd == "summary":
        text = summarize(args.out, args.scratch, args.budget)
        if args.print:
            print(text, end="")
        return 0
    parse = parse_sanitizer if args.cmd == "sanitizer" else parse_pytest
    print(json.dumps(parse(read(args.log)), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

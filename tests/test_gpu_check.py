"""The prepared GPU check (benchmarks/gpu_check.sh) rehearsed on the CPU, end to end, and
its parts: the parsers of compute-sanitizer's, pytest's and Nsight Compute's output, the
stage budget, the sanitizer's case list, the parallel build without ninja, and the filing
of a run's results (scripts/file_gpu_results.py)."""

import json
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
sys.path.insert(0, os.path.join(ROOT, "scripts"))

import file_gpu_results  # noqa: E402
import gpu_check_report  # noqa: E402
import ncu_check  # noqa: E402

SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_check.sh")
OUT_FILES = {"summary.txt", "meta.json", "build.log", "sanitizer.log", "tests.log", "bench.json",
             "perf.log", "ncu.csv"}
STAGES = ["preflight", "build", "smoke", "sanitizer", "tests", "bench", "ncu"]


FAKES = os.path.join(ROOT, "tests", "fakes")


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory):
    """One rehearsal (CBN_CHECK_DEVICE=cpu) into a temporary $OUT: (out folder, stdout).
    compute-sanitizer and ncu are stand-ins (tests/fakes) that check the options the
    script passes, run its programs on the CPU and answer with canned reports."""
    out = tmp_path_factory.mktemp("gpu_check_out")
    env = dict(os.environ, OUT=str(out), CBN_CHECK_DEVICE="cpu", PYTHON=sys.executable,
               CBN_SANITIZER=os.path.join(FAKES, "compute-sanitizer"),
               CBN_NCU=os.path.join(FAKES, "ncu"))
    proc = subprocess.run(["bash", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    return out, proc.stdout


def test_rehearsal_writes_every_file_within_the_device_limits(rehearsal):
    out, stdout = rehearsal
    files = [os.path.relpath(os.path.join(d, f), out) for d, _, fs in os.walk(out) for f in fs]
    assert len(files) <= 8 and all(f.count(os.sep) <= 1 for f in files), files
    assert set(files) == OUT_FILES, files
    for name in files:
        assert os.path.getsize(out / name) < 16 << 20


def test_rehearsal_summary_and_meta(rehearsal):
    out, stdout = rehearsal
    summary = (out / "summary.txt").read_text()
    assert summary in stdout  # printed at the end too
    assert len(summary.splitlines()) <= 70  # one screen
    meta = json.loads((out / "meta.json").read_text())
    assert meta["rehearsal"] is True and meta["schema"] == gpu_check_report.SCHEMA
    stages = {s["stage"]: s for s in meta["stages"]}
    assert list(stages) == STAGES
    for name in ("preflight", "build", "smoke", "tests", "bench", "ncu"):
        assert stages[name]["status"] == "ok", stages[name]
        assert re.search(rf"^{name} +ok ", summary, flags=re.M)
    assert "cxx-runtime: ok" in (out / "build.log").read_text()
    assert stages["sanitizer"]["status"] == "skipped"
    import gpu_smoke
    n = len(gpu_smoke.QUICK_CASES)
    assert meta["smoke"]["result"] == f"{n}/{n}"
    assert meta["machine"]["identity"]["csrc_tree"]
    # every test lane ran and passed
    for chunk in ("kernels", "misc", "autograd", "compile"):
        r = meta["tests"][chunk]
        assert r["rc"] == 0 and r["counts"].get("passed", 0) >= 1 and not r["failed"], (chunk, r)
    # the sanitizer lanes ran the smoke under each (stand-in) tool
    assert set(meta["canned"]) == {"sanitizer", "ncu"} and "CANNED SAMPLE" in summary
    assert set(meta["sanitizer"]) == {"memcheck", "initcheck", "racecheck"}  # 3 of the 4
    for tool in ("memcheck", "initcheck", "racecheck"):
        r = meta["sanitizer"][tool]
        assert r["rc"] == 0 and r["smoke"] == "1/1", (tool, r)
        assert (r["errors"] if tool != "racecheck" else r["hazards"]["errors"]) == 0
    assert "PYTORCH_NO_CUDA_MEMORY_CACHING=1" in (out / "sanitizer.log").read_text()
    # the ncu stage ran its two configurations' workloads, and parsed the (canned) CSV
    assert set(meta["ncu"]) == set(ncu_check.DEFAULT_CONFIGS)
    assert (out / "ncu.csv").read_text().count("# config: ") == 2
    assert (out / "perf.log").read_text().count("profiled one step") == 2
    assert meta["elapsed_s"] <= 480


def test_rehearsal_benchmark_is_complete(rehearsal):
    out, _ = rehearsal
    bench = json.loads((out / "bench.json").read_text())
    assert bench["complete"] and bench["skipped"] == 0
    assert len(bench["records"]) == 8  # 2 shapes x 2 dtypes x 2 layouts, K = 2
    with_ref = {tuple(r["shape"]) for r in bench["records"] if "ref_ms" in r["train"]}
    assert with_ref == {(2, 8, 4, 4)}  # --ref-shapes
    for rec in bench["records"]:
        assert rec["train"]["ext_ms"] > 0 and rec["eval"]["ext_ms"] > 0


def test_filing_a_run(rehearsal, tmp_path):
    out, _ = rehearsal
    readme = tmp_path / "README.md"
    readme.write_text("# x\n\n" + file_gpu_results.STATUS_BEGIN + "\n"
                      + file_gpu_results.NO_RUN_STATUS + "\n" + file_gpu_results.STATUS_END
                      + "\n\n### GPU\n\n" + file_gpu_results.BEGIN + "\n" + file_gpu_results.NO_RUN
                      + "\n" + file_gpu_results.END + "\n\nafter\n")
    results = tmp_path / "results" / "gpu"
    args = [str(out), "--results", str(results), "--readme", str(readme)]
    with pytest.raises(SystemExit, match="rehearsal"):
        file_gpu_results.main(args)
    assert file_gpu_results.main(args + ["--allow-rehearsal", "--max-kib", "2"]) == 0
    (folder,) = results.iterdir()
    assert re.fullmatch(r"\d{4}-\d\d-\d\d_rehearsal-cpu", folder.name)
    meta = json.loads((folder / "meta.json").read_text())
    filed = meta["filed"]
    assert filed["torch"] and filed["date"] and filed["device"] == "rehearsal-cpu"
    assert filed["csrc_tree"] == gpu_check_report.git_tree_id(os.path.join(ROOT, "csrc"))
    if filed["commit_source"] == "git":
        assert re.fullmatch(r"[0-9a-f]{40}", filed["commit"])
    assert {"summary.txt", "bench.json", "tests.log"} <= {p.name for p in folder.iterdir()}
    assert "left out by file_gpu_results.py" in (folder / "tests.log").read_text()  # 2 KiB cap
    text = readme.read_text()
    assert file_gpu_results.NO_RUN not in text and text.endswith("after\n")
    # the status paragraph's GPU line follows the newest run
    assert file_gpu_results.NO_RUN_STATUS not in text
    assert re.search(r"\*\*On a GPU: last run \d{4}-\d\d-\d\d\*\* on rehearsal-cpu", text)
    row = [line for line in text.splitlines() if "rehearsal-cpu" in line and line.startswith("|")]
    import gpu_smoke
    n = len(gpu_smoke.QUICK_CASES)
    assert len(row) == 1 and "(sample)" in row[0] and f"| {n}/{n} |" in row[0]
    assert re.search(r"\| [\d.]+-[\d.]+ \(\d+-\d+%\) \|", row[0])  # the benchmark's cell
    # a second run of the same day gets its own folder; the table lists both
    assert file_gpu_results.main(args + ["--allow-rehearsal"]) == 0
    assert len(list(results.iterdir())) == 2
    assert sum("rehearsal-cpu" in line and line.startswith("|")
               for line in readme.read_text().splitlines()) == 2


def test_readme_has_the_gpu_table_markers():
    text = open(os.path.join(ROOT, "README.md")).read()
    assert text.count(file_gpu_results.BEGIN) == 1 and text.count(file_gpu_results.END) == 1
    assert text.index(file_gpu_results.BEGIN) > text.index("## Results")


def test_git_tree_id_matches_git():
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD:csrc"], cwd=ROOT, capture_output=True,
                             text=True, timeout=30)
        dirty = subprocess.run(["git", "status", "--porcelain", "csrc"], cwd=ROOT,
                               capture_output=True, text=True, timeout=30).stdout.strip()
    except OSError:
        pytest.skip("no git")
    if out.returncode != 0 or dirty:
        pytest.skip("not a git checkout, or csrc/ has changes")
    assert gpu_check_report.git_tree_id(os.path.join(ROOT, "csrc")) == out.stdout.strip()


# ---- the stage budget ------------------------------------------------------------------

def script_limits():
    text = open(SCRIPT).read()
    line = re.search(r'if \[ "\$DEV" = cuda \]; then\n(.*?)\nelse', text, flags=re.S).group(1)
    return {k: int(v) for k, v in re.findall(r"L_([A-Z]+)=(\d+)", line)}


def test_stage_limits_add_up_to_at_most_8_minutes():
    L = script_limits()
    total = L["PREFLIGHT"] + L["BUILD"] + L["SMOKE"] + L["PHASE"] + L["BENCH"] + 2 * L["NCU"] + 5
    assert total <= 480, total
    # the parallel lanes each fit in the correctness phase
    for lane in ("SAN", "KERNELS", "AUTOGRAD", "COMPILE"):
        assert L[lane] <= L["PHASE"], lane
    assert L["MISC"] + L["SLOW"] <= L["PHASE"]
    # and the header's table says the same
    m = re.search(r"total limits: ([\d +]+) = (\d+) s <= 480 s", open(SCRIPT).read())
    assert m and eval(m.group(1)) == int(m.group(2)) == total


def test_gpu_run_uses_every_sanitizer_tool():
    text = open(SCRIPT).read()
    assert 'SAN_TOOLS="memcheck initcheck racecheck synccheck"' in text
    assert "memcheck|initcheck) envs=(PYTORCH_NO_CUDA_MEMORY_CACHING=1)" in text
    # initcheck sees what every kernel writes only if every kernel is instrumented
    assert '[ "$tool" = initcheck ] && filter=()' in text


def test_two_ncu_configs_by_default():
    text = open(SCRIPT).read()
    default = re.search(r"CBN_NCU_CONFIGS:-([^}]*)}", text).group(1).split()
    assert default == ncu_check.DEFAULT_CONFIGS
    assert all(c in ncu_check.CONFIGS for c in default)


# ---- the sanitizer's cases --------------------------------------------------------------

def test_quick_smoke_covers_every_kernel_path():
    import torch

    import gpu_smoke
    cases = gpu_smoke.QUICK_CASES
    assert {K for _, _, _, K, _, _ in cases} >= {1, 2, 5, 9}
    assert {mode for *_, mode, _ in cases} == {"train", "eval", "split-train", "split-eval"}
    assert {cl for _, cl, *_ in cases} == {False, True}
    assert {dt for _, _, dt, *_ in cases} >= {torch.float32, torch.bfloat16}
    assert any(len(shape) == 2 for shape, *_ in cases)
    # soft responsibilities, training, both layouts, and more than 4 components (KB = 8)
    for cl in (False, True):
        assert any(c[1] == cl and c[3] > 4 and c[4] == "train" for c in cases)
    # a case above the default 48 KiB of dynamic shared memory (csrc/cuda/backward.cu:
    # the planar soft grad_input kernel takes acc * (K + 2 K 256) bytes)
    big = [c for c in cases if c[2] == torch.float64]
    assert big and any(8 * (K + 2 * K * 256) > 48 * 1024 for _, cl, _, K, mode, _ in big
                       if not cl and mode == "train")


# ---- parsers ----------------------------------------------------------------------------

def test_quick_smoke_launches_every_kernel_emulated():
    """The quick smoke's cases, run by the emulated backend, launch every __global__ of
    csrc/cuda: the sanitizers on a GPU check only the kernels these cases launch (the first
    GPU runs' smoke never launched check_group_ids_kernel and finish_sums_kernel)."""
    emu = pytest.importorskip("cbn_ext._emu")
    import gpu_smoke
    before = emu.launched()
    for shape, layout, dtype, K, mode, _ in gpu_smoke.QUICK_CASES:
        assert gpu_smoke.check_case("emu", shape, layout, dtype, K, mode) == {}, (shape, K, mode)
    after = emu.launched()
    ran = {name for name, n in after.items() if n > before.get(name, 0)}
    assert set(gpu_check_report.cuda_kernel_names()) <= ran, (
        sorted(set(gpu_check_report.cuda_kernel_names()) - ran))


def test_sanitizer_parser_on_the_sample():
    text = open(os.path.join(ROOT, "benchmarks", "samples", "sanitizer_sample.log")).read()
    res = gpu_check_report.parse_sanitizer(text)
    assert list(res) == ["memcheck", "initcheck", "racecheck", "synccheck"]
    assert res["memcheck"]["errors"] == 0 and res["memcheck"]["smoke"] == "12/12"
    assert res["initcheck"]["errors"] == 2 and res["initcheck"]["rc"] == 3
    assert res["initcheck"]["kinds"] == {
        "Uninitialized __global__ memory read of size 4 bytes @ merge_tile_moments_kernel": 2}
    assert res["racecheck"]["hazards"] == {"displayed": 1, "errors": 1, "warnings": 0}
    assert list(res["racecheck"]["kinds"]) == [
        "Error: Race reported between Write access @ collect_grad_stats_kernel"]
    status, note = gpu_check_report.stage_status("sanitizer", text)
    assert status == "FAIL" and "initcheck 2" in note and "racecheck 1" in note


def test_sanitizer_parser_timeout_and_memcheck_error():
    text = """### tool memcheck (limit 120 s): compute-sanitizer ...
========= Invalid __global__ read of size 16 bytes
=========     at void cbn_ext::cuda::normalize_mixture_kernel<float, float>(const T1 *, T1 *)+0x90 in forward.cu:360
=========     by thread (1,0,0) in block (7,0,0)
=========     Address 0x7f00 is out of bounds
========= ERROR SUMMARY: 1 error
### tool memcheck: rc=3, 50.2 s
### tool racecheck (limit 120 s): compute-sanitizer ...
### tool racecheck: rc=124, 120.0 s
"""
    res = gpu_check_report.parse_sanitizer(text)
    assert res["memcheck"]["kinds"] == {
        "Invalid __global__ read of size 16 bytes @ normalize_mixture_kernel": 1}
    assert res["racecheck"]["timeout"] and res["racecheck"]["errors"] is None
    assert gpu_check_report.stage_status("sanitizer", text)[0] == "TIMEOUT"


def test_pytest_log_parser():
    text = """### chunk kernels (limit 120 s): pytest tests/test_kernels.py -k cuda
tests/test_kernels.py::test_matches_reference[a-cuda] PASSED                [ 50%]
tests/test_kernels.py::test_matches_reference[b-cuda] FAILED                [100%]
=========================== short test summary info ============================
FAILED tests/test_kernels.py::test_matches_reference[b-cuda] - AssertionError: relative errors
FAILED tests/test_kernels.py::test_tiny[c-cuda] - AssertionError
ERROR tests/test_kernels.py::test_fixture[cuda] - RuntimeError
============ 2 failed, 1 passed, 5 skipped, 1 error in 12.34s ============
### chunk kernels: rc=1, 13.0 s
### chunk compile (limit 150 s): pytest tests -k "compile and cuda"
tests/test_autograd_ops.py::test_compile_fullgraph[True-cuda] PASSED        [ 50%]
tests/test_autograd_ops.py::test_compile_fullgraph[False-cuda]
### chunk compile: rc=124, 150.0 s
### chunk slow (limit 30 s): pytest tests -m slow
============ 3 deselected in 0.5s ============
### chunk slow: rc=5, 1.0 s
"""
    res = gpu_check_report.parse_pytest(text)
    k = res["kernels"]
    assert k["counts"] == {"failed": 2, "passed": 1, "skipped": 5, "error": 1}
    assert k["failed"] == ["tests/test_kernels.py::test_matches_reference[b-cuda]",
                           "tests/test_kernels.py::test_tiny[c-cuda]"]
    assert k["errors"] == ["tests/test_kernels.py::test_fixture[cuda]"]
    assert gpu_check_report.group_failures(k["failed"]) == {
        "tests/test_kernels.py::test_matches_reference": 1, "tests/test_kernels.py::test_tiny": 1}
    c = res["compile"]
    assert c["timeout"] and c["last_test"] == "tests/test_autograd_ops.py::test_compile_fullgraph[False-cuda]"
    assert res["slow"]["rc"] == 5
    status, note = gpu_check_report.stage_status("tests", text)
    assert status == "TIMEOUT" and "kernels 1/3" in note


def test_pytest_log_parser_crash_and_xdist():
    """A chunk that a segfault ended (no summary line: the first GPU run's test_kernels.py)
    counts its -v lines and names the test it crashed in; a chunk run with pytest-xdist
    (-n 1) has its own -v lines."""
    text = """### chunk kernels (limit 120 s): pytest tests/test_kernels.py -k cuda
tests/test_kernels.py::test_a[x-cuda] PASSED                [ 33%]
tests/test_kernels.py::test_a[y-cuda] SKIPPED (needs K > 1)   [ 66%]
tests/test_kernels.py::test_b[2-cuda] Fatal Python error: Segmentation fault

Current thread 0x00007f6154504140 (most recent call first):
  File "/work/main/tests/test_kernels.py", line 536 in test_b
### chunk kernels: rc=139, 22.6 s
### chunk misc (limit 35 s): pytest tests -n 1
[gw0] [ 50%] PASSED tests/test_cuda.py::test_c[cuda]
[gw0] node down: Not properly terminated
[gw0] [100%] FAILED tests/test_cuda.py::test_d[cuda]
=========================== short test summary info ============================
FAILED tests/test_cuda.py::test_d[cuda] - worker 'gw0' crashed while running 'tests/test_cuda.py::test_d[cuda]'
============ 1 failed, 1 passed in 9.1s ============
### chunk misc: rc=1, 9.5 s
"""
    res = gpu_check_report.parse_pytest(text)
    k = res["kernels"]
    assert k["crashed"] == "tests/test_kernels.py::test_b[2-cuda]"
    assert k["counts"] == {"passed": 1, "skipped": 1} and not k["timeout"]
    m = res["misc"]
    assert m["crashed"] is None and m["counts"] == {"failed": 1, "passed": 1}
    assert m["failed"] == m["worker_crashes"] == ["tests/test_cuda.py::test_d[cuda]"]
    status, note = gpu_check_report.stage_status("tests", text)
    assert status == "FAIL" and "kernels 1/0/CRASHED" in note and "misc 1/1" in note


def test_ncu_parser_on_the_sample():
    (name, rows), = ncu_check.parse_file(
        os.path.join(ROOT, "benchmarks", "samples", "ncu_sample.csv"), sms=132)
    assert name == "train-64x256x14x14-bf16-cl-K2"
    by = {r["kernel"]: r for r in rows}
    X = ncu_check.x_bytes(name)
    stats = by["collect_mixture_stats_kernel"]
    assert stats["ours"] and stats["calls"] == 1
    assert stats["read_x"] == pytest.approx(6500352 / X)
    # x once, plus the E-step's mu, 1/2 a (K x C floats each) and b (K floats)
    assert stats["design_read_x"] == pytest.approx((X + 2 * 2 * 256 * 4 + 2 * 4) / X)
    assert by["normalize_mixture_kernel"]["design_write_x"] == pytest.approx(1.0)
    # both sums in one launch (grid z = 2), then the 5 chunks added in order
    assert by["reduce_tile_sums_kernel"]["calls"] == 1 and by["finish_sums_kernel"]["calls"] == 1
    assert not by["vectorized_elementwise_kernel"]["ours"]
    assert by["vectorized_elementwise_kernel"]["calls"] == 2
    assert stats["regs"] == {40} and stats["smem"] == {4488}
    assert stats["time_s"] == pytest.approx(4650e-9)
    # the sample's kernels are the ones the design expects of this config, in its order
    assert [r["kernel"] for r in rows if r["ours"]] == list(ncu_check.design(name, 132))
    assert all(r.get("design_note") for r in rows if r["ours"])
    t = ncu_check.totals(rows)
    assert t["design_read_x"] == pytest.approx(6.40, abs=0.01)  # x read 4 times, g twice, tau...
    assert t["other_kernels"] == 1
    table = ncu_check.fmt_table(name, rows, 132)
    assert "collect_grad_stats_kernel" in table and "design" in table
    assert "no design entry" not in table


def test_ncu_parser_long_layout_and_units():
    head = ('"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream",'
            '"Block Size","Grid Size","Device","CC","Section Name","Metric Name","Metric Unit",'
            '"Metric Value"')
    k = '"0","1","python","h","void cbn_ext::cuda::normalize_mixture_kernel<float, float>(P)","1","7",' \
        '"(256, 1, 1)","(10, 1, 1)","0","9.0"'
    text = "\n".join([
        "==PROF== Connected to process 1", head,
        f'{k},"","gpu__time_duration.sum","usecond","12.5"',
        f'{k},"","dram__bytes_read.sum","Mbyte","25.69"',
        f'{k},"","dram__bytes_write.sum","Kbyte","1,024"',
        f'{k},"Occupancy","Achieved Occupancy","%","80.5"'])
    (launch,) = ncu_check.parse_ncu_csv(text)
    assert launch["gpu__time_duration.sum"] == pytest.approx(12.5e-6)
    assert launch["dram__bytes_read.sum"] == pytest.approx(25.69e6)
    assert launch["dram__bytes_write.sum"] == pytest.approx(1.024e6)
    assert ncu_check.short_name(launch["kernel"]) == "normalize_mixture_kernel"
    assert ncu_check.to_number("1500", "", "gpu__time_duration.sum") == pytest.approx(1.5e-6)


def test_ncu_stall_reasons_and_sm_share():
    """WarpStateStats' stall reasons (cycles per issued instruction) and SpeedOfLight's SM
    share, where the CSV has them, go into our kernels' notes: the two largest reasons."""
    head = ('"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream",'
            '"Block Size","Grid Size","Device","CC","Section Name","Metric Name","Metric Unit",'
            '"Metric Value"')
    k = ('"0","1","python","h","void unnamed>::collect_mixture_stats_kernel<c10::BFloat16, '
         'float, 4, 1>(unnamed>::StatsParams<T2>)","1","7","(256, 1, 1)","(528, 1, 1)","0","9.0"')
    stall = "smsp__average_warps_issue_stalled_{}_per_issue_active.ratio"
    text = "\n".join([
        head,
        f'{k},"","gpu__time_duration.sum","usecond","186.9"',
        f'{k},"","dram__bytes_read.sum","Mbyte","25.69"',
        f'{k},"SpeedOfLight","{ncu_check.SM_PCT}","%","31.5"',
        f'{k},"WarpStateStats","{stall.format("long_scoreboard")}","","9.25"',
        f'{k},"WarpStateStats","{stall.format("barrier")}","","4.5"',
        f'{k},"WarpStateStats","{stall.format("short_scoreboard")}","","0.75"'])
    (row,) = ncu_check.summarize("custom", ncu_check.parse_ncu_csv(text), 132)
    assert row["kernel"] == "collect_mixture_stats_kernel" and row["ours"]
    table = ncu_check.fmt_table("custom", [row], 132)
    assert "| SM 32%, long_scoreboard 9.2, barrier 4.5" in table, table
    assert "short_scoreboard" not in table


def test_plan_tiles_mirror():
    """Cases worked by hand from plan_tiles, partial_rows and reduce_groups in
    csrc/cuda/cuda_utils.cuh (132 SMs: target = 2 x 132 = 264 tiles; float32 accumulation:
    max_len = min(512, 16384 // (K x 4)), then a multiple of 32; kTileBytes = 49152)."""
    plan, rows, groups = ncu_check.plan_tiles, ncu_check.partial_rows, ncu_check.reduce_groups
    # interleaved 64x256x14x14 bf16, K = 2, the forward's plan (elem_bytes 2): M = 12544,
    # len = ceil(12544 / 264) = 48; cache_len = 49152 // (256 x 2) = 96; max_len = 512
    # -> len 48, ceil(12544 / 48) = 262 tiles; rows = min(262, 4 x 132 = 528) = 262
    assert plan((64, 256, 14, 14), True, 2, 132, 4, 2) == (262, 48, 1)
    assert rows(262, 132) == 262
    # merge: ceil(512 / 32) = 16 columns; g = min(32, (262 + 63) // 64 = 5) = 5, and
    # 16 x (5 // 2) = 32 < 528 keeps it
    assert groups(262, 2 * 256, 132) == 5
    # interleaved 64x64x56x56 bf16, K = 2: M = 200704, ceil(M / 264) = 761.
    # forward (elem 2): cache_len = 49152 // 128 = 384 -> min(761, 256, 384) = 256,
    # ceil(200704 / 256) = 784 tiles, rows = min(784, 528) = 528
    assert plan((64, 64, 56, 56), True, 2, 132, 4, 2) == (784, 256, 1)
    assert rows(784, 132) == 528
    # soft input gradient (elem 2 x 2 = 4): cache_len = 49152 // 256 = 192 -> len 192,
    # ceil(200704 / 192) = 1046 tiles (a block each: no partials)
    assert plan((64, 64, 56, 56), True, 2, 132, 4, 4) == (1046, 192, 1)
    # gradient sums (elem 0: cache_len = M, no cap) -> 256 as the forward
    assert plan((64, 64, 56, 56), True, 2, 132, 4, 0) == (784, 256, 1)
    # merge of 528 rows, K C = 128: 4 columns, g = min(32, 591 // 64 = 9) = 9
    assert groups(528, 128, 132) == 9
    # planar 64x64x56x56 float32, K = 4: S = 3136, chunks = ceil(264 / 64) = 5,
    # len = ceil(3136 / 5) = 628 -> 640 (a multiple of 32); max_len = 16384 // 16 = 1024
    # -> 512. forward (elem 4): cache_len = 49152 // 256 = 192 -> min(640, 192) = 192;
    # chunks = ceil(3136 / 192) = 17, 64 x 17 = 1088 tiles, 528 rows
    assert plan((64, 64, 56, 56), False, 4, 132, 4, 4) == (1088, 192, 17)
    # gradient sums (elem 0): min(640, 512) = 512, ceil(3136 / 512) = 7 chunks, 448 tiles,
    # rows = min(448, 528) = 448; g = min(32, 511 // 64 = 7) = 7
    assert plan((64, 64, 56, 56), False, 4, 132, 4, 0) == (448, 512, 7)
    assert rows(448, 132) == 448 and groups(448, 256, 132) == 7
    # soft input gradient (elem 8): cache_len = 49152 // 512 = 96 -> len 96,
    # ceil(3136 / 96) = 33 chunks, 2112 tiles
    assert plan((64, 64, 56, 56), False, 4, 132, 4, 8) == (2112, 96, 33)
    # planar, one chunk per sample when N >= 2 x SMs: chunks = max(1, ceil(264 / 300)) = 1,
    # len = ceil(100 / 1) = 100 -> min(S = 100, 128) = 100; cache_len = 49152 // (4 x 2) =
    # 6144 does not cap it: 300 tiles of 100
    assert plan((300, 4, 10, 10), False, 2, 132, 4, 2) == (300, 100, 1)
    # a wide interleaved input: C = 2048 bf16 -> cache_len = 12 < 16: at least 16
    # positions (M = 1024 -> ceil(1024 / 264) = 4 -> max(16, min(4, 256, 12)) = 16), 64 tiles
    assert plan((1024, 2048), False, 2, 132, 4, 2) == (64, 16, 1)  # S = 1: interleaved
    # ... and with many positions, K = 4: ceil(100000 / 264) = 379, cache_len = 49152 //
    # 4096 = 12 -> 16 positions without partials; a kernel with partials stops the cap at
    # ceil(8 x 4 x 4 / 2) = 64 positions (row updates half of x): ceil(100000 / 64) = 1563
    assert plan((100000, 2048), True, 4, 132, 4, 2) == (6250, 16, 1)
    assert plan((100000, 2048), True, 4, 132, 4, 2, True) == (1563, 64, 1)
    # many components: K = 64 -> max_len = 16384 // 256 = 64 caps a planar tile
    # (chunks = ceil(264 / 8) = 33, ceil(4096 / 33) = 125 -> 128; cache 49152 // 128 = 384)
    assert plan((8, 32, 64, 64), False, 64, 132, 4, 4) == (512, 64, 64)
    # float64 accumulation (acc 8), K = 16: 16384 // 128 = 128 -> interleaved len
    # min(ceil(100000 / 264) = 379, 256, 49152 // (8 x 8) = 768) = 256 -> 128; 782 tiles
    assert plan((100000, 8), True, 16, 132, 8, 8) == (782, 128, 1)
    assert rows(782, 132) == 528 and rows(782, 108) == 432  # an A100: 108 SMs
    assert plan((0, 8, 4, 4), True, 2, 132) == (0, 1, 1)  # no positions


def test_every_kernel_is_in_the_design_or_listed(monkeypatch):
    """Cannot go stale: every __global__ of csrc/cuda is either launched, by the design, in
    some profiled config (design_bytes gives its bytes), or in ncu_check.NOT_PROFILED (kernels
    no config launches, each with its reason); neither the design nor that list names a
    kernel that is gone."""
    kernels = set(gpu_check_report.cuda_kernel_names())
    designed = {k for name in ncu_check.CONFIGS for k in ncu_check.design(name, 132)}
    for k in kernels:
        in_design = any(ncu_check.design_bytes(f"void cbn_ext::cuda::{k}<float>(P)", name, 132)
                        is not None for name in ncu_check.CONFIGS)
        assert in_design or k in ncu_check.NOT_PROFILED, f"{k}: no design entry, not listed"
        assert not (in_design and k in ncu_check.NOT_PROFILED), f"{k}: profiled, yet listed"
    assert designed <= kernels, designed - kernels
    assert ncu_check.NOT_PROFILED <= kernels, ncu_check.NOT_PROFILED - kernels
    assert ncu_check.DESIGN_NAMES <= kernels, ncu_check.DESIGN_NAMES - kernels
    assert designed <= ncu_check.DESIGN_NAMES
    # ncu's function-only names of our kernels count as ours
    assert all(ncu_check.is_ours(k) for k in kernels)
    # a K = 1 training config would launch the element-wise input gradient
    monkeypatch.setitem(ncu_check.CONFIGS, "_k1", ((8, 16, 4, 4), "float32", False, 1, "train"))
    k1 = ncu_check.design("_k1", 132)
    assert "grad_input_given_kernel" in k1 and "estep_coefs_kernel" not in k1


# ---- the build without ninja ------------------------------------------------------------

def test_parallel_compile_patch(monkeypatch, tmp_path):
    import threading

    import setuptools  # noqa: F401  (first: `distutils` is then setuptools' own)
    from distutils import ccompiler

    import build_inplace

    monkeypatch.setattr(ccompiler.CCompiler, "compile", ccompiler.CCompiler.compile)
    build_inplace.patch_parallel_compile(4)
    seen, lock = [], threading.Lock()
    barrier = threading.Barrier(3, timeout=10)  # the 3 sources compile at the same time

    class Fake(ccompiler.CCompiler):
        compiler_type = "fake"
        executables = {}
        src_extensions = [".c"]
        obj_extension = ".o"

        def _compile(self, obj, src, ext, cc_args, extra_postargs, pp_opts):
            barrier.wait()
            with lock:
                seen.append(src)

    objs = Fake().compile(["a.c", "b.c", "c.c"], output_dir=str(tmp_path))
    assert sorted(seen) == ["a.c", "b.c", "c.c"] and len(objs) == 3


def test_cuda_kernel_names_are_the_kernels():
    """Every `__global__` in csrc/cuda gives one name, an identifier that is not a keyword
    or attribute such as __launch_bounds__ (whose arguments may hold parentheses)."""
    names = gpu_check_report.cuda_kernel_names()
    count = 0
    for name in os.listdir(os.path.join(ROOT, "csrc", "cuda")):
        if name.endswith((".cu", ".cuh")):
            count += open(os.path.join(ROOT, "csrc", "cuda", name)).read().count("__global__ ")
    assert len(names) == count, (count, names)
    assert all(re.fullmatch(r"[a-z]\w*_kernel", n) for n in names), names
    assert "collect_mixture_stats_kernel" in names and "grad_input_soft_kernel" in names


def test_sanitizer_filter_leaves_our_kernels_in():
    """The sanitizers leave out kernels whose name holds the filter's substring (PyTorch's
    at::native ones): none of ours may hold it, whatever they are renamed to."""
    text = open(SCRIPT).read()
    value = re.search(r"CBN_SAN_FILTER:-kns=([^}]+)}", text).group(1)
    names = []
    for name in os.listdir(os.path.join(ROOT, "csrc", "cuda")):
        if name.endswith((".cu", ".cuh", ".h")):
            src = open(os.path.join(ROOT, "csrc", "cuda", name)).read()
            names += re.findall(gpu_check_report.KERNEL_RE, src)
            names += re.findall(r"^namespace (\w+)", src, flags=re.M)
    assert names and not [n for n in names if value in n], (value, names)


def test_summary_and_filing_of_a_gpu_like_run(tmp_path):
    """The summary of a run with findings (made-up logs in the layouts of a GPU run), and
    its filing with the commit found from the csrc/ tree id (no .git on the device)."""
    out, scr = tmp_path / "out", tmp_path / "scr"
    out.mkdir()
    scr.mkdir()
    tree = gpu_check_report.git_tree_id(os.path.join(ROOT, "csrc"))
    (scr / "preflight.json").write_text(json.dumps({
        "date": "2026-12-01T10:00:00+00:00", "device_mode": "cuda", "gpu": "NVIDIA H200",
        "driver": "580.65", "torch": "2.11.0", "torch_cuda": "13.0", "python": "3.12.3",
        "cores": 16, "sms": 132, "identity": {"commit": None, "csrc_tree": tree}}))
    (scr / "stages.tsv").write_text("".join(
        f"{name}\t{st}\t0\t{secs}\t{lim}\tnote\t{at}\n" for name, st, secs, lim, at in [
            ("preflight", "ok", 5, 15, 5), ("build", "ok", 88, 150, 93), ("smoke", "FAIL", 14, 30, 107),
            ("sanitizer", "FAIL", 100, 140, 207), ("tests", "TIMEOUT", 100, 140, 207),
            ("bench", "ok", 33, 65, 240), ("ncu", "ok", 41, 70, 281)]))
    kernels = gpu_check_report.cuda_kernel_names()
    (out / "build.log").write_text(
        "MISMATCH 3x13x5x7 contiguous float32 K=5 eval: {'dx': 0.3}\n"
        "gpu_smoke: 11/12 cases agree with the CPU kernels (9.1 s)\n"
        f"gpu_smoke: kernels of cbn_ext launched ({len(kernels) - 1}): "
        + ", ".join(kernels[1:]) + "\n")
    sample = open(os.path.join(ROOT, "benchmarks", "samples", "sanitizer_sample.log")).read()
    (out / "sanitizer.log").write_text(
        "\n".join(line for line in sample.splitlines() if not line.startswith("# ")) + "\n")
    (out / "tests.log").write_text(
        "### chunk kernels (limit 120 s): pytest\n"
        "FAILED tests/test_kernels.py::test_matches_reference[b-cuda] - AssertionError\n"
        "FAILED tests/test_kernels.py::test_matches_reference[c-cuda] - AssertionError\n"
        "===== 2 failed, 1190 passed in 41.0s =====\n### chunk kernels: rc=1, 44.0 s\n"
        "### chunk compile (limit 140 s): pytest\n"
        "tests/test_autograd_ops.py::test_compile_fullgraph[False-cuda]\n"
        "### chunk compile: rc=124, 140.0 s\n")

    def rec(K, ratio):
        part = {"bn_ms": 1.0, "ext_ms": ratio, "ext_over_bn": ratio, "ext_copy_fraction": 0.5}
        return {"device": "cuda", "shape": [64, 256, 14, 14], "K": K, "dtype": "bfloat16",
                "layout": "channels_last", "train": dict(part), "eval": dict(part)}
    (out / "bench.json").write_text(json.dumps({
        "machines": {"cuda": {"copy_GBps": 4100.0}}, "records": [rec(1, 1.1), rec(2, 1.6), rec(4, 2.3)],
        "complete": False, "skipped": 45}))
    ncu_check.main(["parse", os.path.join(ROOT, "benchmarks", "samples", "ncu_sample.csv"),
                    "--json", str(scr / "ncu.json")])
    (out / "perf.log").write_text("measured\n")

    text = gpu_check_report.summarize(str(out), str(scr), 480)
    assert len(text.splitlines()) <= 70
    assert "GPU check" in text and "NVIDIA H200" in text and "CANNED" not in text
    assert f"NOT {kernels[0]}" in text  # the kernel the smoke never launched
    assert "MISMATCH 3x13x5x7" in text
    assert ("2 x Uninitialized __global__ memory read of size 4 bytes @ merge_tile_moments_kernel"
            in text)
    assert "2 x tests/test_kernels.py::test_matches_reference" in text
    assert "last test tests/test_autograd_ops.py::test_compile_fullgraph[False-cuda]" in text
    assert "incomplete: 45 skipped" in text and "1.10 / 1.60 / 2.30" in text
    assert "read 6.42 (6.40)" in text
    assert re.search(r"^\(in all\) +281 +480", text, flags=re.M)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["rehearsal"] is False and "canned" not in meta

    readme = tmp_path / "README.md"
    readme.write_text(f"{file_gpu_results.STATUS_BEGIN}\n{file_gpu_results.STATUS_END}\n"
                      f"{file_gpu_results.BEGIN}\n{file_gpu_results.END}\n")
    results = tmp_path / "gpu"
    file_gpu_results.main([str(out), "--results", str(results), "--readme", str(readme)])
    (folder,) = results.iterdir()
    assert folder.name == "2026-12-01_nvidia-h200"
    filed = json.loads((folder / "meta.json").read_text())["filed"]
    assert (filed["driver"], filed["torch"], filed["cuda"]) == ("580.65", "2.11.0", "13.0")
    if filed["commit"]:  # found from the csrc/ tree id (git available here)
        assert filed["commit_source"] == "csrc tree id"
        got = subprocess.run(["git", "rev-parse", f"{filed['commit']}:csrc"], cwd=ROOT,
                             capture_output=True, text=True).stdout.strip()
        assert got == tree
    row = [line for line in readme.read_text().splitlines()
           if "NVIDIA H200" in line and line.startswith("|")][0]
    assert "| 11/12 | 0 / 2 / 1 / 0 | 1190 / 2 (1 chunks timed out) |" in row
    assert "| 1.60-1.60 (50-50%) | 6.4/6.4 in 46 us |" in row


def test_cxx_runtime_check(monkeypatch, capsys):
    """The build stage's C++ runtime check passes on this build (an error message with
    integers formats), and where the probe crashes (a segfault, as the second GPU run's
    build did) it fails and prints the toolchain for build.log."""
    assert gpu_check_report.cxx_runtime() == 0
    assert "tau has shape [2, 2, 16]" in capsys.readouterr().out
    monkeypatch.setattr(gpu_check_report, "CXX_PROBE",
                        "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)")
    assert gpu_check_report.cxx_runtime() == 1
    out = capsys.readouterr().out
    assert "cxx-runtime: FAILED: rc -11" in out and "-print-file-name=libstdc++.so" in out
    assert "std::locale symbols" in out


def test_ncu_short_names_of_the_gpu_run():
    """Kernel names as ncu (--print-kernel-base demangled) and compute-sanitizer wrote them
    on the H200 (2026-11-29): the anonymous namespace spelled "unnamed>::" had made the
    parser name four of our kernels after their parameter structs (StatsParams, ...), so
    that the per-step total left out 388 of the step's 440 us."""
    names = {
        "void unnamed>::collect_mixture_stats_kernel<c10::BFloat16, float, 4, 1>"
        "(unnamed>::StatsParams<T2>)": "collect_mixture_stats_kernel",
        "void unnamed>::grad_input_soft_kernel<c10::BFloat16, float, 4, 8>"
        "(unnamed>::GradInputParams<T2>)": "grad_input_soft_kernel",
        "void unnamed>::grad_coefs_kernel<float>(unnamed>::CoefParams<T1>)": "grad_coefs_kernel",
        "void unnamed>::estep_coefs_kernel<float>(const T1 *, const T1 *, T1, long, T1 *)":
            "estep_coefs_kernel",
        "void cbn_ext::cuda::<unnamed>::tile_moments<double, double, (int)2, (bool)0>(const "
        "cbn_ext::cuda::<unnamed>::StatsParams<T2> &, long, bool)": "tile_moments",
        "void cbn_ext::cuda::(anonymous namespace)::normalize_mixture_kernel<float, float, 4>"
        "(const float*, float*)": "normalize_mixture_kernel",
    }
    for full, short in names.items():
        assert ncu_check.short_name(full) == short, full
        if short.endswith("_kernel"):
            assert ncu_check.is_ours(full), full
    assert not ncu_check.is_ours("void at::native::vectorized_elementwise_kernel<4, "
                                 "at::native::FillFunctor<float>>(int, T2)")


def test_cxx_rebuild_keeps_or_replaces_the_first_build(tmp_path):
    """benchmarks/cxx_rebuild.sh, which no CPU rehearsal reaches: the first build is put
    back where the second fails to build, fails its check, or is cut short (--restore);
    replaced, with the compiler remembered, where it passes."""
    script = os.path.join(ROOT, "benchmarks", "cxx_rebuild.sh")

    def first_build():
        import shutil
        shutil.rmtree(tmp_path / "build", ignore_errors=True)
        (tmp_path / "build").mkdir()
        (tmp_path / "build" / "first.o").write_text("1")
        (tmp_path / "cbn_ext").mkdir(exist_ok=True)
        for so in (tmp_path / "cbn_ext").glob("_C*.so"):
            so.unlink()
        (tmp_path / "cbn_ext" / "_C.x.so").write_text("first")

    build = ("mkdir -p build && echo 2 > build/second.o && echo \"$CC $CXX\" > build/cc "
             "&& echo second > cbn_ext/_C.x.so")

    def run(check, cmd=build, *args):
        env = dict(os.environ, CBN_REBUILD_CMD=cmd, CBN_REBUILD_CHECK=check)
        return subprocess.run(["bash", script, *(args or ("/usr/bin/g++-13", ".save"))],
                              cwd=tmp_path, env=env, capture_output=True, text=True).returncode

    def is_first():
        return ((tmp_path / "cbn_ext" / "_C.x.so").read_text() == "first"
                and (tmp_path / "build" / "first.o").exists()
                and not (tmp_path / "build" / "second.o").exists()
                and not (tmp_path / ".save").exists())

    first_build()
    assert run("false") == 1 and is_first()          # the check fails
    assert run("true", "echo partial > build/x; exit 3") == 1 and is_first()  # the build fails
    assert run("true") == 0                          # passes: replaced, remembered
    assert (tmp_path / "cbn_ext" / "_C.x.so").read_text().strip() == "second"
    assert (tmp_path / "build" / "cc").read_text().split() == ["/usr/bin/gcc-13", "/usr/bin/g++-13"]
    assert (tmp_path / "build" / ".cbn_cxx").read_text().split() == [
        "/usr/bin/gcc-13", "/usr/bin/g++-13"]
    assert not (tmp_path / ".save").exists()
    # cut short: the second build half done, the first set aside; --restore puts it back
    first_build()
    (tmp_path / ".save").mkdir()
    (tmp_path / "build").rename(tmp_path / ".save" / "build")
    (tmp_path / "cbn_ext" / "_C.x.so").rename(tmp_path / ".save" / "_C.x.so")
    (tmp_path / "build").mkdir()
    (tmp_path / "build" / "second.o").write_text("half")
    assert run("true", build, "--restore", ".save") == 0 and is_first()

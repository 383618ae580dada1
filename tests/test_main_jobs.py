"""The README's main job (the benchmark report) and the long-tailed demo, in reduced
sizes: they run, and write their JSON, Markdown table and PNG plot."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(args, timeout=600):
    out = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT,
                         timeout=timeout)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout


def test_benchmark_report_quick(tmp_path):
    stdout = run(["benchmarks/report.py", "--quick", "--devices", "cpu", "--K", "1,2",
                  "--dtypes", "float32", "--shapes", "4x16x8x8", "--out", str(tmp_path)])
    assert "[4/4" in stdout  # progress
    data = json.loads((tmp_path / "report-quick.json").read_text())
    assert len(data["records"]) == 4 and data["machines"]["cpu"]["copy_GBps"] > 0
    for rec in data["records"]:
        for phase in ("train", "eval"):
            p = rec[phase]
            assert p["bn_ms"] > 0 and p["ext_ms"] > 0 and p["ref_ms"] > 0
            assert p["ext_over_bn"] > 0 and p["ext_GBps"] > 0
    table = (tmp_path / "report-quick.md").read_text()
    assert table.count("| cpu | 4x16x8x8 |") == 4
    assert (tmp_path / "report-quick.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_longtail_demo_smoke(tmp_path):
    stdout = run(["examples/longtail_digits.py", "--ratios", "10", "--seeds", "2", "--epochs",
                  "1", "--out", str(tmp_path), "--device", "cpu"])
    assert "| 10 | cbn+dual |" in stdout
    data = json.loads((tmp_path / "longtail_digits.json").read_text())
    summary = data["summary"]["10"]
    assert set(summary) == {"bn", "cbn", "cbn+dual"}
    for method in summary.values():
        for group in ("overall", "head", "medium", "tail"):
            assert 0 <= method[group]["mean"] <= 100 and method[group]["std"] >= 0
    counts = data["train_counts"]["10"]
    assert counts[0] > counts[-1] and round(counts[0] / counts[-1]) in (9, 10, 11)
    assert len(data["runs"]["10"]["bn"]) == 2
    assert (tmp_path / "longtail_digits.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

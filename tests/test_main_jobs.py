"""The README's main job (the benchmark report) and the long-tailed demo, in reduced
sizes: they run, and write their JSON, Markdown table and PNG plot."""

import json
import os
import statistics
import subprocess
import sys

import pytest
import torch

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
    # the per-call overhead: train and eval, K = 1 and 2, with operator counts
    assert {(o["K"], o["device"]) for o in data["overhead"]} == {(1, "cpu"), (2, "cpu")}
    for o in data["overhead"]:
        for phase in ("train", "eval"):
            assert o[phase]["bn_us"] > 0 and o[phase]["ext_us"] > 0
            assert o[phase]["ext_ops"]["cbn_ext_ops"] >= 1 and o[phase]["bn_ops"]["aten_ops"] > 0
    table = (tmp_path / "report-quick.md").read_text()
    assert table.count("| cpu | 4x16x8x8 |") == 4 and "Per-call overhead" in table
    assert (tmp_path / "report-quick.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_longtail_demo_smoke(tmp_path):
    stdout = run(["examples/longtail_digits.py", "--ratios", "10", "--seeds", "2", "--epochs",
                  "1", "--out", str(tmp_path), "--device", "cpu"])
    assert "| 10 | cbn+dual+LA |" in stdout and "| 10 | cbn+dual+LA − bn+LA |" in stdout
    data = json.loads((tmp_path / "longtail_digits.json").read_text())
    summary = data["summary"]["10"]
    assert set(summary) == {"bn", "cbn", "cbn+dual", "bn+LA", "cbn+LA", "cbn+dual+LA"}
    for method in summary.values():
        for group in ("overall", "head", "medium", "tail"):
            assert 0 <= method[group]["mean"] <= 100 and method[group]["std"] >= 0
    counts = data["train_counts"]["10"]
    assert counts[0] > counts[-1] and round(counts[0] / counts[-1]) in (9, 10, 11)
    runs = data["runs"]["10"]
    assert all(len(r) == 2 for r in runs.values())
    # paired differences: per seed, method minus BatchNorm with the same loss, and a t interval
    diffs = data["paired_differences"]["10"]
    assert set(diffs) == {"cbn − bn", "cbn+dual − bn", "cbn+LA − bn+LA",
                          "cbn+dual+LA − bn+LA", "bn+LA − bn"}
    d = diffs["cbn+LA − bn+LA"]["tail"]
    expected = [100 * (a["tail"] - b["tail"]) for a, b in zip(runs["cbn+LA"], runs["bn+LA"])]
    assert d["per_seed"] == pytest.approx(expected)
    half = 12.706 * statistics.stdev(expected) / 2 ** 0.5  # t quantile, df = 1
    assert d["ci_low"] == pytest.approx(d["mean"] - half)
    assert d["ci_high"] == pytest.approx(d["mean"] + half)
    assert (tmp_path / "longtail_digits.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_longtail_demo_pairing():
    """Every method of a seed starts from the same convolution and linear weights, and the
    t quantiles match the table."""
    sys.path.insert(0, os.path.join(ROOT, "examples"))
    try:
        import longtail_digits as demo
    finally:
        sys.path.pop(0)
    bn = demo.make_model("bn", 2, seed=3)
    for norm in ("cbn", "cbn+dual"):
        cbn = demo.make_model(norm, 2, seed=3)
        assert type(cbn[1]).__name__ == "CompoundBatchNorm2d"
        shared = [k for k, v in bn.named_parameters() if not k.startswith(("1.", "4.", "8."))]
        assert shared and all(torch.equal(bn.state_dict()[k], cbn.state_dict()[k])
                              for k in shared)
    assert demo.t_quantile_975(9) == 2.262
    assert demo.t_quantile_975(40) == pytest.approx(2.0211, abs=1e-3)
    assert demo.t_quantile_975(200) == pytest.approx(1.9719, abs=1e-3)

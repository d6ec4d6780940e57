"""The benchmark report turns pytest-benchmark JSON into a speedup table and a chart."""
import importlib.util
import json
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_report_module():
    spec = importlib.util.spec_from_file_location("report", os.path.join(ROOT, "benchmarks", "report.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def bench(group, variant, ms):
    return {"group": group, "extra_info": {"variant": variant, "median_ms": ms, "achieved_gbs": 100.0 / ms,
                                           "pct_copy_bandwidth": 3.0 / ms, "device": "Test GPU"}}


def test_report_table_and_chart(tmp_path):
    pytest.importorskip("matplotlib")
    report = load_report_module()
    data = {
        "machine_info": {"torch_version": "2.x", "triton_version": "3.x", "python_version": "3.11"},
        "datetime": "2026-11-24T10:00:00",
        "benchmarks": [bench("peg-fwd-a", "timm", 2.0), bench("peg-fwd-a", "timm_compile", 1.0),
                       bench("peg-fwd-a", "triton", 0.5), {"group": "skipped", "extra_info": {}}],
    }
    path = tmp_path / "results.json"
    path.write_text(json.dumps(data))
    assert report.main([str(path), "--out", str(tmp_path)]) == 0
    table = (tmp_path / "report.md").read_text()
    assert "Test GPU" in table and "torch 2.x" in table
    assert "| peg-fwd-a | triton | 0.500 | 4.00× | 2.00× | 200 | 6% |" in table
    assert (tmp_path / "speedups.png").stat().st_size > 1000


def test_report_refuses_an_all_skipped_run(tmp_path):
    report = load_report_module()
    path = tmp_path / "empty.json"
    path.write_text(json.dumps({"benchmarks": []}))
    assert report.main([str(path), "--out", str(tmp_path)]) == 1

"""benchmarks/profile_report.py, the report of `run_gpu.sh profile`: Nsight Compute's raw CSV as ncu writes
it (a header row, a row of units, a row per launch, thousands separated by commas), the kernels grouped,
and their DRAM traffic set against the bytes the case counts, worked out here by hand."""
import csv
import json
import math

import pytest

from conftest import load_benchmarks_module

report = load_benchmarks_module("profile_report.py")
CASE = "lsa-fwd-svt_s-stage1-224-bs64-bf16-triton"
UNITS = {"gpu__time_duration.sum": "nsecond", "dram__bytes_read.sum": "byte", "dram__bytes_write.sum": "byte",
         "launch__grid_size": "", "launch__block_size": "", "launch__registers_per_thread": "register/thread"}


def launch(id_, kernel, time_ns, read, written, occupancy=50.0):
    metrics = {metric: "1" for metric in report.METRICS}
    metrics.update({"gpu__time_duration.sum": f"{time_ns:,}", "dram__bytes_read.sum": f"{read:,}",
                    "dram__bytes_write.sum": f"{written:,}",
                    "sm__warps_active.avg.pct_of_peak_sustained_active": str(occupancy)})
    return {"ID": str(id_), "Process ID": "4242", "Process Name": "python3", "Host Name": "127.0.0.1",
            "Kernel Name": kernel, "Context": "1", "Stream": "7", "Device": "0", "CC": "9.0", **metrics}


def write_case(directory, case, launches, bytes_moved=100e6):
    columns = ["ID", "Process ID", "Process Name", "Host Name", "Kernel Name", "Context", "Stream", "Device", "CC",
               *report.METRICS]
    with open(directory / f"{case}.csv", "w", newline="") as f:
        f.write('==PROF== Disconnected from process 4242\n')
        writer = csv.writer(f, quoting=csv.QUOTE_ALL)
        writer.writerow(columns)
        writer.writerow([UNITS.get(column, "") for column in columns])
        for row in launches:
            writer.writerow([row[column] for column in columns])
    (directory / f"{case}.json").write_text(json.dumps({"benchmarks": [
        {"param": case, "extra_info": {"bytes_moved": bytes_moved, "flops": 2e9, "device": "NVIDIA H100 80GB HBM3",
                                       "profiled": True}}]}))


def test_a_case_sets_its_kernels_dram_traffic_against_its_counted_bytes(tmp_path):
    write_case(tmp_path, CASE, [
        launch(0, "lsa_forward_kernel", 30_000, 60_000_000, 20_000_000, occupancy=40.0),
        launch(1, "elementwise_kernel", 5_000, 4_000_000, 4_000_000),
        launch(2, "lsa_forward_kernel", 40_000, 70_000_000, 21_000_000, occupancy=60.0),
    ])
    profile = report.case_profile(str(tmp_path), CASE)
    first, second = profile["kernels"]
    assert first["kernel"] == "lsa_forward_kernel" and first["launches"] == 2  # the longer in all comes first
    assert first["gpu__time_duration.sum"] == 70_000 and first["dram__bytes_read.sum"] == 130_000_000
    # the other columns are the longest launch's
    assert first["sm__warps_active.avg.pct_of_peak_sustained_active"] == 60.0
    assert second["kernel"] == "elementwise_kernel" and second["launches"] == 1
    assert profile["kernel_time_us"] == pytest.approx(75.0)
    assert profile["dram_bytes"] == 179_000_000
    assert profile["dram_over_counted"] == pytest.approx(1.79)
    assert profile["dram_gbs"] == pytest.approx(179e6 / 75e-6 / 1e9)


def test_the_report_writes_markdown_and_json_and_says_which_case_was_not_profiled(tmp_path, capsys):
    runs, out = tmp_path / "runs", tmp_path / "out"
    runs.mkdir()
    write_case(runs, CASE, [launch(i, f"kernel_{i:02d}", 1000 * (i + 1), 10, 10) for i in range(14)])
    write_case(runs, "lsa-fwd-broken", [])
    (runs / "lsa-fwd-broken.csv").write_text("==ERROR== The application returned an error code (1).\n")
    report.main([str(runs), "--out", str(out)])
    text = (out / "profile.md").read_text()
    assert f"## {CASE}" in text and "14 kernels, 105.0 µs of kernel time" in text
    assert "0.0 MB of DRAM traffic against 100.0 MB counted (0.00x)" in text
    assert "| `kernel_13` | 1 | 14 |" in text and "`kernel_01`" not in text  # 12 rows, the longest
    assert "(2 more kernels in profile.json)" in text
    assert "## lsa-fwd-broken\n\nNot profiled: ValueError: " in text and "no ncu raw CSV header" in text
    saved = {profile["case"]: profile for profile in json.loads((out / "profile.json").read_text())}
    assert len(saved[CASE]["kernels"]) == 14 and "error" in saved["lsa-fwd-broken"]
    assert capsys.readouterr().out.startswith("# Kernel profiles")


def test_missing_metrics_and_missing_values_are_said(tmp_path):
    (tmp_path / "case.csv").write_text('"ID","Kernel Name","gpu__time_duration.sum"\n"","","nsecond"\n')
    with pytest.raises(ValueError, match="ncu measured no dram__bytes_read.sum"):
        report.read_launches(str(tmp_path / "case.csv"))
    assert math.isnan(report.number("n/a")) and report.number("1,048,576") == 1048576
    assert report.cell(math.nan) == "—" and report.cell(87.54) == "87.5" and report.cell(1234.5) == "1234"


def test_the_metrics_ncu_is_asked_for_are_the_reports(capsys):
    report.main(["--metrics"])
    assert capsys.readouterr().out.strip().split(",") == list(report.METRICS)

"""The report of `run_gpu.sh profile CASE_ID...`: each benchmark case's kernels as Nsight Compute measured
them in one call of the case, and their DRAM traffic against the bytes the case counts (the minimum its
% of roofline is taken over): where a kernel behind its target spends its time and moves more than it
must, which is what to change first.

    python benchmarks/profile_report.py DIR --out OUT    # writes OUT/profile.md and OUT/profile.json
    python benchmarks/profile_report.py --metrics        # the metrics ncu is asked for, comma-separated

ncu replays each kernel with the caches flushed first (its --cache-control all), so a kernel's DRAM bytes
are those of a cold L2, as in the benchmarks' timings, which flush it between runs.

DIR holds, per case, CASE.json (pytest-benchmark's JSON of ``--profile-case CASE``: what the case counts)
and CASE.csv (``ncu --import CASE.ncu-rep --page raw --csv --print-units base``: a header row, a row of
units, then a row per kernel launch).
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os

# the ncu metrics asked for: column name, scale from ncu's base unit (nanoseconds, bytes, %, counts)
METRICS = {
    "gpu__time_duration.sum": ("µs", 1e-3),
    "dram__bytes_read.sum": ("DRAM read MB", 1e-6),
    "dram__bytes_write.sum": ("DRAM written MB", 1e-6),
    "dram__throughput.avg.pct_of_peak_sustained_elapsed": ("DRAM % of peak", 1.0),
    "sm__throughput.avg.pct_of_peak_sustained_elapsed": ("SM % of peak", 1.0),
    "sm__warps_active.avg.pct_of_peak_sustained_active": ("occupancy %", 1.0),
    "launch__registers_per_thread": ("registers", 1.0),
    "launch__grid_size": ("grid", 1.0),
    "launch__block_size": ("threads", 1.0),
    "launch__waves_per_multiprocessor": ("waves", 1.0),
}
# summed over a kernel's launches; the other columns are those of its longest launch
SUMMED = ("gpu__time_duration.sum", "dram__bytes_read.sum", "dram__bytes_write.sum")
KERNEL_ROWS_SHOWN = 12  # per case in the markdown (the JSON has all)


def number(text: str) -> float:
    """A value of ncu's CSV ("1,048,576", "87.5"); NaN where there is none ("", "n/a")."""
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return math.nan


def read_launches(path: str) -> list[dict]:
    """Each kernel launch of an ncu raw CSV: its name and the metrics in ncu's base units."""
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    header = next((i for i, row in enumerate(rows) if "Kernel Name" in row and "ID" in row), None)
    if header is None:
        raise ValueError(f"{path}: no ncu raw CSV header (a row naming 'ID' and 'Kernel Name')")
    names = rows[header]
    missing = [metric for metric in METRICS if metric not in names]
    if missing:
        raise ValueError(f"{path}: ncu measured no {', '.join(missing)}")
    launches = []
    for row in rows[header + 1:]:
        cells = dict(zip(names, row))
        if not cells.get("ID", "").isdigit():  # the units row
            continue
        launches.append({"kernel": cells["Kernel Name"], **{metric: number(cells[metric]) for metric in METRICS}})
    return launches


def kernels_of(launches: list[dict]) -> list[dict]:
    """The launches grouped by kernel, the longest-running kernel first: launches counted, time and DRAM
    bytes summed, the rest from the kernel's longest launch."""
    by_kernel: dict[str, dict] = {}
    for launch in launches:
        kernel = by_kernel.setdefault(launch["kernel"], {"kernel": launch["kernel"], "launches": 0,
                                                         **{metric: 0.0 for metric in SUMMED}, "longest": launch})
        kernel["launches"] += 1
        for metric in SUMMED:
            kernel[metric] += launch[metric]
        if launch["gpu__time_duration.sum"] > kernel["longest"]["gpu__time_duration.sum"]:
            kernel["longest"] = launch
    kernels = []
    for kernel in by_kernel.values():
        longest = kernel.pop("longest")
        kernels.append({**{metric: longest[metric] for metric in METRICS if metric not in SUMMED}, **kernel})
    return sorted(kernels, key=lambda kernel: -kernel["gpu__time_duration.sum"])


def case_profile(directory: str, case: str) -> dict:
    """A profiled case: what it counts (its JSON) and its kernels (its CSV), with the totals."""
    with open(os.path.join(directory, f"{case}.json")) as f:
        benchmarks = json.load(f)["benchmarks"]
    if len(benchmarks) != 1:
        raise ValueError(f"{case}.json: {len(benchmarks)} benchmarks, where one case was profiled")
    info = benchmarks[0]["extra_info"]
    kernels = kernels_of(read_launches(os.path.join(directory, f"{case}.csv")))
    time_ns = sum(kernel["gpu__time_duration.sum"] for kernel in kernels)
    dram_bytes = sum(kernel["dram__bytes_read.sum"] + kernel["dram__bytes_write.sum"] for kernel in kernels)
    counted = info["bytes_moved"]
    return {
        "case": case, "device": info.get("device"), "counted_bytes": counted, "flops": info["flops"],
        "kernels": kernels, "kernel_time_us": time_ns * 1e-3, "dram_bytes": dram_bytes,
        # > 1: the kernels move more than the case must; < 1: L2 kept some of it (or the count is too high)
        "dram_over_counted": dram_bytes / counted if counted else math.nan,
        "dram_gbs": dram_bytes / time_ns if time_ns else math.nan,
    }


def cell(value: float) -> str:
    if math.isnan(value):
        return "—"
    return f"{value:.0f}" if abs(value) >= 100 or value == int(value) else f"{value:.3g}"


def markdown(profiles: list[dict]) -> str:
    lines = ["# Kernel profiles (Nsight Compute, one call per case)", ""]
    for profile in profiles:
        if "error" in profile:
            lines += [f"## {profile['case']}", "", f"Not profiled: {profile['error']}", ""]
            continue
        traffic = f"{profile['dram_bytes'] / 1e6:.1f} MB of DRAM traffic"
        counted = (f"{traffic} against {profile['counted_bytes'] / 1e6:.1f} MB counted "
                   f"({profile['dram_over_counted']:.2f}x)" if profile["counted_bytes"]
                   else f"{traffic} (the case counts no bytes)")
        lines += [f"## {profile['case']}", "",
                  f"{profile['device']}: {len(profile['kernels'])} kernels, {profile['kernel_time_us']:.1f} µs of "
                  f"kernel time, {counted}, {profile['dram_gbs']:.0f} GB/s over the kernels' time.", "",
                  "| kernel | launches | " + " | ".join(column for column, _ in METRICS.values()) + " |",
                  "| --- | --- |" + " --- |" * len(METRICS)]
        for kernel in profile["kernels"][:KERNEL_ROWS_SHOWN]:
            name = kernel["kernel"] if len(kernel["kernel"]) <= 60 else kernel["kernel"][:57] + "..."
            values = [cell(kernel[metric] * scale) for metric, (_, scale) in METRICS.items()]
            lines.append(f"| `{name}` | {kernel['launches']} | " + " | ".join(values) + " |")
        hidden = len(profile["kernels"]) - KERNEL_ROWS_SHOWN
        if hidden > 0:
            lines.append(f"| ({hidden} more kernels in profile.json) | | " + " | ".join("" for _ in METRICS) + " |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("directory", nargs="?", help="the CASE.json and CASE.csv files of the profiled cases")
    parser.add_argument("--out", help="where profile.md and profile.json go")
    parser.add_argument("--metrics", action="store_true", help="print the metrics to ask ncu for, and stop")
    args = parser.parse_args(argv)
    if args.metrics:
        print(",".join(METRICS))
        return
    if not args.directory or not args.out:
        parser.error("DIR and --out are needed (or --metrics)")
    cases = sorted(name[:-len(".csv")] for name in os.listdir(args.directory) if name.endswith(".csv"))
    if not cases:
        raise SystemExit(f"{args.directory}: no profiled case (CASE.csv)")
    profiles = []
    for case in cases:  # a case ncu could not profile (its log says why) does not hide the others
        try:
            profiles.append(case_profile(args.directory, case))
        except (OSError, ValueError, KeyError) as error:
            profiles.append({"case": case, "error": f"{type(error).__name__}: {error}"})
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "profile.json"), "w") as f:
        json.dump(profiles, f, indent=1)
    text = markdown(profiles)
    with open(os.path.join(args.out, "profile.md"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()

"""Turn pytest-benchmark JSON into a markdown table of speedups and a PNG chart.

    python benchmarks/report.py benchmarks/results/latest.json --out benchmarks/results/
    python benchmarks/report.py run1/benchmarks.json run2/benchmarks.json --out benchmarks/results/
    python benchmarks/report.py RUN*/benchmarks.json --out benchmarks/results/ --readme README.md

Several files (a GPU session's device calls each run part of the suite) merge case by case: a case's
variants are all taken from one file, the last one given that has the case, so every speedup compares
timings from the same run; files from different devices are refused.

Each benchmark's ``extra_info`` carries its op, pass, variant, case and the CUDA-event median
(see benchmarks/conftest.py). Rows are cases, with each variant's median time and its speedup over
timm eager and over timm + torch.compile, plus achieved GB/s and % of the measured copy bandwidth.
Only measured numbers: the table is written from the JSON and nothing else. With ``--readme``, the
README's summary (between its two README_MARKERS) is rewritten from the same numbers: per op and
variant, the geometric mean and range of the speedups, the device and versions, and the chart.
"""
from __future__ import annotations

import argparse
import json
import math
import os
from collections import defaultdict

BASELINES = ("timm", "timm_compile")
README_MARKERS = ("<!-- benchmark summary: written by benchmarks/report.py --readme -->",
                  "<!-- end of benchmark summary -->")
HEADER_FIELDS = ("device", "date", "torch", "triton", "python")


def load_run(path: str):
    """{case label: {variant: extra_info}} of one pytest-benchmark JSON, and its header (device,
    versions, date)."""
    with open(path) as f:
        data = json.load(f)
    cases: dict[str, dict[str, dict]] = defaultdict(dict)
    device = ""
    for bench in data.get("benchmarks", []):
        info = bench.get("extra_info", {})
        if "median_ms" not in info or "variant" not in info:  # skipped, or interrupted before recording
            continue
        cases[bench["group"]][info["variant"]] = info
        device = info.get("device", device)
    machine = data.get("machine_info", {})
    header = {
        "device": device,
        "date": data.get("datetime", ""),
        "torch": machine.get("torch_version", ""),
        "triton": machine.get("triton_version", ""),
        "python": machine.get("python_version", ""),
    }
    return dict(cases), header


def load_cases(paths: list[str]):
    """The runs merged case by case (a case from the last file that has it) and one header, whose
    fields list each distinct value and whose date spans the first and last run."""
    cases: dict[str, dict[str, dict]] = {}
    headers = []
    for path in paths:
        run_cases, header = load_run(path)
        if run_cases:
            cases.update(run_cases)
            headers.append(header)
    devices = sorted({h["device"] for h in headers})
    if len(devices) > 1:
        raise ValueError(f"benchmark runs from different devices ({', '.join(devices)}) cannot share a "
                         f"report: their timings do not compare")
    merged = {key: ", ".join(sorted({h[key] for h in headers if h[key]})) for key in HEADER_FIELDS}
    dates = sorted(h["date"] for h in headers if h["date"])
    if len(set(dates)) > 1:
        merged["date"] = f"{dates[0]} to {dates[-1]}"
    return cases, merged


def speedup(baseline: dict | None, info: dict) -> str:
    if not baseline:
        return "–"
    return f"{baseline['median_ms'] / info['median_ms']:.2f}×"


def markdown_table(cases, header) -> str:
    lines = [
        f"Device: {header['device'] or 'unknown'}; torch {header['torch']}, triton {header['triton']}, "
        f"python {header['python']}; run {header['date']}. Medians of CUDA-event timings.",
        "",
        "| case | variant | median ms | vs timm eager | vs timm + compile | GB/s | % of copy BW |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for label in sorted(cases):
        variants = cases[label]
        for variant in sorted(variants, key=lambda v: (v not in BASELINES, v)):
            info = variants[variant]
            lines.append(
                f"| {label} | {variant} | {info['median_ms']:.3f} | {speedup(variants.get('timm'), info)} | "
                f"{speedup(variants.get('timm_compile'), info)} | {info.get('achieved_gbs', 0):.0f} | "
                f"{info.get('pct_copy_bandwidth', 0):.0f}% |"
            )
    return "\n".join(lines) + "\n"


def panel_of(label: str) -> str:
    """The op (or model) family of a case label, one chart panel each: "lsa", "gsa-core", "model", ..."""
    parts = label.split("-")
    return "-".join(parts[:2]) if len(parts) > 1 and parts[1] == "core" else parts[0]


def chart(cases, header, path: str) -> bool:
    """Speedups over timm eager, one panel per op (and one for the models); cases with no timm eager
    baseline (the attention cores) are in the table only. False, and no chart, when no case has one."""
    panels: dict[str, list[str]] = defaultdict(list)
    for label in sorted(cases):
        if "timm" in cases[label] and len(cases[label]) > 1:
            panels[panel_of(label)].append(label)
    if not panels:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    widest = max(len(labels) for labels in panels.values())
    fig, axes = plt.subplots(len(panels), 1, figsize=(max(8, 0.45 * widest + 4), 5 * len(panels)), squeeze=False)
    for ax, (panel, labels) in zip(axes[:, 0], sorted(panels.items())):
        others = {v for label in labels for v in cases[label]} - {"timm"}
        variants = sorted(others, key=lambda v: (v != "timm_compile", v))
        width = 0.8 / len(variants)
        for i, variant in enumerate(variants):
            values = [cases[label]["timm"]["median_ms"] / cases[label][variant]["median_ms"]
                      if variant in cases[label] else 0.0 for label in labels]
            ax.bar([x + i * width for x in range(len(labels))], values, width, label=variant)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks([x + 0.4 - width / 2 for x in range(len(labels))])
        ax.set_xticklabels(labels, rotation=60, ha="right", fontsize=7)
        ax.set_ylabel("speedup over timm eager (×)")
        ax.set_title(panel)
        ax.legend()
    fig.suptitle(f"twins_kernels on {header['device'] or 'unknown device'} ({header['date'][:10]})")
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.3 / (5 * len(panels))))  # room for the title above the panels
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def geometric_mean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


def summary_table(cases, header) -> str:
    """Per op (chart panel) and variant: cases, geometric mean and range of the speedup over timm
    eager, and geometric mean over timm + torch.compile. Cases with neither baseline (the attention
    cores) are in the full table only."""
    rows: dict[tuple[str, str], dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for label, variants in cases.items():
        for variant, info in variants.items():
            if variant == "timm":
                continue
            speedups = rows[(panel_of(label), variant)]
            for baseline in BASELINES:
                if baseline in variants and baseline != variant:
                    speedups[baseline].append(variants[baseline]["median_ms"] / info["median_ms"])
    lines = [
        f"Device: {header['device'] or 'unknown'}; torch {header['torch']}, triton {header['triton']}; run "
        f"{header['date']}. Speedups of median CUDA-event timings, geometric mean over the cases (range).",
        "",
        "| op | variant | cases | vs timm eager | vs timm + compile |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    for (panel, variant), speedups in sorted(rows.items()):
        eager, compiled = speedups.get("timm", []), speedups.get("timm_compile", [])
        if not eager and not compiled:
            continue
        vs_eager = (f"{geometric_mean(eager):.2f}× ({min(eager):.2f}–{max(eager):.2f})" if eager else "–")
        vs_compile = f"{geometric_mean(compiled):.2f}×" if compiled else "–"
        lines.append(f"| {panel} | {variant} | {max(len(eager), len(compiled))} | {vs_eager} | {vs_compile} |")
    return "\n".join(lines) + "\n"


def update_readme(readme: str, summary: str, chart_path: str | None) -> None:
    """Replace the text between README_MARKERS in ``readme`` with ``summary`` (and the chart)."""
    with open(readme) as f:
        text = f.read()
    start, end = README_MARKERS
    if text.count(start) != 1 or text.count(end) != 1 or text.index(start) > text.index(end):
        raise ValueError(f"{readme} needs the two lines {start} and {end}, in that order, once each")
    body = summary
    if chart_path:
        body += f"\n![speedups over timm eager]({os.path.relpath(chart_path, os.path.dirname(readme) or '.')})\n"
    before, rest = text.split(start)
    after = rest.split(end)[1]
    with open(readme, "w") as f:
        f.write(f"{before}{start}\n{body}{end}{after}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("json", nargs="+", help="pytest-benchmark JSON (--benchmark-json), one or more")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    parser.add_argument("--readme", help="also rewrite this README's benchmark summary (see README_MARKERS)")
    args = parser.parse_args(argv)
    try:
        cases, header = load_cases(args.json)
    except ValueError as e:
        print(e)
        return 2
    if not cases:
        print(f"{', '.join(args.json)}: no GPU benchmark results (were they all skipped?)")
        return 1
    os.makedirs(args.out, exist_ok=True)
    table = markdown_table(cases, header)
    with open(os.path.join(args.out, "report.md"), "w") as f:
        f.write(table)
    chart_path = os.path.join(args.out, "speedups.png")
    if not chart(cases, header, chart_path):
        print("no case has a timm eager baseline: no chart")
        chart_path = None
    print(table)
    if args.readme:
        try:
            update_readme(args.readme, summary_table(cases, header), chart_path)
        except ValueError as e:
            print(e)
            return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

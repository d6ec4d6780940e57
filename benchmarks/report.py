"""Turn pytest-benchmark JSON into a markdown table of speedups and a PNG chart.

    python benchmarks/report.py benchmarks/results/latest.json --out benchmarks/results/
    python benchmarks/report.py run1/benchmarks.json run2/benchmarks.json --out benchmarks/results/
    python benchmarks/report.py RUN*/benchmarks.json --out benchmarks/results/ --readme README.md

Several files (a GPU session's device calls each run part of the suite) merge variant by variant: a
case's variant from the last file given that has it. A call cut off at its deadline leaves the eager
variants of the cases that compile a baseline in one file and (with ``--skip-timed``) their compiled
variants in the next, and every one is kept; the table marks (†) a case whose ratios compare two
runs. Files from different devices are refused.

Each benchmark's ``extra_info`` carries its op, pass, variant, case and the CUDA-event median
(see benchmarks/conftest.py). Rows are cases, with each variant's median time and its speedup over
timm eager, over timm + torch.compile and (LSA, GSA) over mmsegmentation's module, plus achieved GB/s
and % of the measured copy bandwidth.
Only measured numbers: the table is written from the JSON and nothing else. Below it, the issues'
speed targets (TARGETS): per target and variant, met, missed (with the worst case) or not measured.
With ``--readme``, the README's summary (between its two README_MARKERS) is rewritten from the same
numbers: per op and variant, the geometric mean and range of the speedups, the device and versions,
the targets, and the chart.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable

# what the fused variants are compared with: timm eager, timm + torch.compile and, in the LSA and GSA
# module cases, mmsegmentation's modules (the baseline of a user patching an mmsegmentation backbone)
BASELINES = ("timm", "timm_compile", "mmseg")
FUSED = ("triton", "cuda")
README_MARKERS = ("<!-- benchmark summary: written by benchmarks/report.py --readme -->",
                  "<!-- end of benchmark summary -->")
HEADER_FIELDS = ("device", "date", "torch", "triton", "timm", "python")
ROOFLINE_MEANING = ("% of roofline: the fewest ms a case's bytes (at the measured copy bandwidth) or FLOPs (at the "
                    "measured bf16 matmul rate) allow, over its median time, and which of the two bounds it")


@dataclass(frozen=True)
class Target:
    """A speed target of an issue: in each case it applies to (whose extra_info has, for every key of
    ``where``, that value or one of a tuple of them), for each of ``variants`` the case has, ``metric``
    (a ratio, or a % of the copy bandwidth) must reach ``at_least`` (or exceed it, with ``strictly``)."""

    issue: int
    text: str
    where: dict
    variants: tuple[str, ...]
    metric: Callable[[dict, str], float | None]  # (the case's variants, variant) -> value
    at_least: float
    unit: str = "×"
    strictly: bool = False

    def applies(self, info: dict) -> bool:
        return all(info.get(key) in (value if isinstance(value, tuple) else (value,))
                   for key, value in self.where.items())

    def met(self, value: float) -> bool:
        return value > self.at_least if self.strictly else value >= self.at_least


def time_ratio(variants: dict, baseline: str, variant: str) -> float | None:
    """A case's ``baseline`` median over its ``variant`` median: the variant's speedup; None without the
    baseline."""
    if baseline not in variants:
        return None
    return variants[baseline]["median_ms"] / variants[variant]["median_ms"]


def speedup_over(baseline: str) -> Callable[[dict, str], float | None]:
    return lambda variants, variant: time_ratio(variants, baseline, variant)


def pct_copy_bandwidth(variants: dict, variant: str) -> float | None:
    return variants[variant].get("pct_copy_bandwidth")


def peak_memory_ratio(variants: dict, variant: str) -> float | None:
    """timm eager's peak memory over the variant's: at least 1 when the variant needs no more."""
    if "timm" not in variants or not variants[variant].get("peak_memory_mib"):
        return None
    return variants["timm"]["peak_memory_mib"] / variants[variant]["peak_memory_mib"]


# The issues' speed targets (H100, bf16), as they word them: the foundation/PEG issue (2), LSA (3),
# GSA (4), the patch helper (5).
TARGETS = (
    Target(2, "PEG forward ≥ 80% of the copy bandwidth", dict(op="peg", pass_="fwd"), FUSED,
           pct_copy_bandwidth, 80, unit="%"),
    Target(2, "PEG forward ≥ 2× timm eager", dict(op="peg", pass_="fwd"), FUSED, speedup_over("timm"), 2),
    Target(3, "LSA module forward ≥ 3× timm eager at 224² and 512²", dict(op="lsa", pass_="fwd", image=(224, 512)),
           FUSED, speedup_over("timm"), 3),
    Target(3, "LSA module forward+backward ≥ 2× timm eager", dict(op="lsa", pass_="fwdbwd"), FUSED,
           speedup_over("timm"), 2),
    Target(3, "LSA module ≥ 1.3× timm + torch.compile", dict(op="lsa"), FUSED, speedup_over("timm_compile"), 1.3),
    Target(3, "LSA attention core ≥ 70% of the copy bandwidth", dict(op="lsa-core"), FUSED, pct_copy_bandwidth, 70,
           unit="%"),
    Target(4, "GSA module forward ≥ 1.3× timm eager at every stage shape", dict(op="gsa", pass_="fwd"), FUSED,
           speedup_over("timm"), 1.3),
    Target(4, "GSA module forward faster than timm + torch.compile", dict(op="gsa", pass_="fwd"), FUSED,
           speedup_over("timm_compile"), 1.0, strictly=True),
    Target(4, "GSA sr = 1 attention core ≥ 80% of flash SDPA's speed", dict(op="gsa-core"), FUSED,
           speedup_over("sdpa"), 0.8),
    Target(5, "twins_svt_small patched eager ≥ 1.5× timm eager (inference, 224², batch 256)",
           dict(op="model", model="twins_svt_small", pass_="infer"), ("patched",), speedup_over("timm"), 1.5),
    Target(5, "twins_svt_small patched + compile ≥ 1.25× timm + compile (inference)",
           dict(op="model", model="twins_svt_small", pass_="infer"), ("patched_compile",),
           speedup_over("timm_compile"), 1.25),
    Target(5, "twins_pcpvt_small patched + compile ≥ 1.15× timm + compile (inference)",
           dict(op="model", model="twins_pcpvt_small", pass_="infer"), ("patched_compile",),
           speedup_over("timm_compile"), 1.15),
    Target(5, "backbones at 512² and 1024² ≥ 1.8× timm eager", dict(op="model", pass_="backbone"), ("patched",),
           speedup_over("timm"), 1.8),
    Target(5, "backbones at 512² and 1024² ≥ 1.2× timm + compile", dict(op="model", pass_="backbone"),
           ("patched_compile",), speedup_over("timm_compile"), 1.2),
    Target(5, "training step ≥ 1.3× timm eager (224², batch 64)", dict(op="model", pass_="train"), ("patched",),
           speedup_over("timm"), 1.3),
    Target(5, "training step peak memory no more than timm eager's", dict(op="model", pass_="train"),
           ("patched",), peak_memory_ratio, 1.0),
)


def load_run(path: str):
    """{case label: {variant: extra_info}} of one pytest-benchmark JSON, and its header (device,
    versions, date). ValueError, naming the file, for one that cannot be read."""
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a readable pytest-benchmark JSON ({e})") from e
    if not isinstance(data, dict) or not isinstance(data.get("benchmarks", []), list):
        raise ValueError(f"{path}: not a pytest-benchmark JSON (expected an object with a list of benchmarks)")
    cases: dict[str, dict[str, dict]] = defaultdict(dict)
    device = ""
    for bench in data.get("benchmarks", []):
        info = (bench.get("extra_info") if isinstance(bench, dict) else None) or {}
        if "median_ms" not in info or "variant" not in info:  # skipped, or interrupted before recording
            continue
        cases[bench["group"]][info["variant"]] = info
        device = info.get("device", device)
    machine = data.get("machine_info") or {}
    header = {
        "device": device,
        "date": data.get("datetime", ""),
        "torch": machine.get("torch_version", ""),
        "triton": machine.get("triton_version", ""),
        "timm": machine.get("timm_version", ""),
        "python": machine.get("python_version", ""),
    }
    return dict(cases), header


def load_cases(paths: list[str]):
    """The runs merged variant by variant (each variant of a case from the last file that has it: a
    device call cut off at its deadline, then continued with ``--skip-timed``, leaves a case's eager
    variants in one run and its compiled ones in the next; each info keeps its ``run``, the file's
    index) and one header, whose fields list each distinct value and whose date spans the first and
    last run."""
    cases: dict[str, dict[str, dict]] = {}
    headers = []
    for run, path in enumerate(paths):
        run_cases, header = load_run(path)
        if run_cases:
            for label, variants in run_cases.items():
                cases.setdefault(label, {}).update({v: {**info, "run": run} for v, info in variants.items()})
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


def speedup(variants: dict, baseline: str, variant: str) -> str:
    value = time_ratio(variants, baseline, variant)
    return "–" if value is None else f"{value:.2f}×"


def roofline_cell(info: dict) -> str:
    """"62% (memory)": the case's floor on this device over its time, and what bounds it."""
    if "pct_roofline" not in info:
        return "–"
    return f"{info['pct_roofline']:.0f}% ({info['bound']})"


def spans_runs(variants: dict) -> bool:
    """Whether a case's variants were timed in more than one run (their ratios compare two calls)."""
    return len({info.get("run", 0) for info in variants.values()}) > 1


def bandwidth_cells(info: dict) -> str:
    """"812 | 19%": achieved GB/s and % of the copy bandwidth; dashes for a case that counts no bytes (the
    whole models)."""
    if not info.get("bytes_moved", 1):
        return "– | –"
    return f"{info.get('achieved_gbs', 0):.0f} | {info.get('pct_copy_bandwidth', 0):.0f}%"


def baselines_first(variant: str) -> tuple[int, str]:
    """A case's rows in order: the baselines, in BASELINES' order, then the other variants by name."""
    return (BASELINES.index(variant) if variant in BASELINES else len(BASELINES), variant)


def versions(header) -> str:
    """The software a run measured with, as both headers name it (timm's version: every baseline is its module)."""
    return f"torch {header['torch']}, triton {header['triton']}, timm {header['timm'] or 'unknown'}"


def markdown_table(cases, header) -> str:
    lines = [
        f"Device: {header['device'] or 'unknown'}; {versions(header)}, python {header['python']}; "
        f"run {header['date']}. Medians of CUDA-event timings. {ROOFLINE_MEANING}.",
        "",
        "| case | variant | median ms | vs timm eager | vs timm + compile | vs mmseg | GB/s | % of copy BW | "
        "% of roofline |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for label in sorted(cases):
        variants = cases[label]
        shown = f"{label} †" if spans_runs(variants) else label
        for variant in sorted(variants, key=baselines_first):
            info = variants[variant]
            speedups = " | ".join(speedup(variants, baseline, variant) for baseline in BASELINES)
            lines.append(f"| {shown} | {variant} | {info['median_ms']:.3f} | {speedups} | {bandwidth_cells(info)} | "
                         f"{roofline_cell(info)} |")
    if any(spans_runs(variants) for variants in cases.values()):
        lines += ["", "† the case's variants were timed in more than one run (a device call cut off at its "
                      "deadline and continued): its ratios compare timings from different calls."]
    return "\n".join(lines) + "\n"


def op_of(variants: dict) -> str:
    """The op a case's benchmark records ("lsa", "gsa-core", "gsa-subsample", "model", ...): one chart
    panel and one group of summary rows each."""
    return next(iter(variants.values()))["op"]


def chart(cases, header, path: str) -> bool:
    """Speedups over timm eager, one panel per op (and one for the models); cases with no timm eager
    baseline (the attention cores) are in the table only. False, and no chart, when no case has one."""
    panels: dict[str, list[str]] = defaultdict(list)
    for label in sorted(cases):
        if "timm" in cases[label] and len(cases[label]) > 1:
            panels[op_of(cases[label])].append(label)
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
            values = [time_ratio(cases[label], "timm", variant) if variant in cases[label] else math.nan
                      for label in labels]  # no bar where a case lacks the variant
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
    eager, geometric means over timm + torch.compile and over mmsegmentation's module, and the median %
    of the roofline. Rows with none of these (a variant that is itself the baseline, cases that count no
    bytes) are left out."""
    rows: dict[tuple[str, str], dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for label, variants in cases.items():
        for variant, info in variants.items():
            if variant == "timm":
                continue
            row = rows[(op_of(variants), variant)]
            for baseline in BASELINES:
                if baseline in variants and baseline != variant:
                    row[baseline].append(time_ratio(variants, baseline, variant))
            if "pct_roofline" in info:
                row["roofline"].append(info["pct_roofline"])
    lines = [
        f"Device: {header['device'] or 'unknown'}; {versions(header)}; run {header['date']}. Speedups of "
        "median CUDA-event timings, geometric mean over the cases (range); "
        f"{ROOFLINE_MEANING} (the median over the cases).",
        "",
        "| op | variant | cases | vs timm eager | vs timm + compile | vs mmseg | % of roofline |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for (panel, variant), row in sorted(rows.items()):
        eager, roofline = row.get("timm", []), row.get("roofline", [])
        if not any(row.values()):
            continue
        vs_eager = (f"{geometric_mean(eager):.2f}× ({min(eager):.2f}–{max(eager):.2f})" if eager else "–")
        vs_others = " | ".join(f"{geometric_mean(row[baseline]):.2f}×" if row.get(baseline) else "–"
                               for baseline in BASELINES[1:])
        of_roofline = f"{statistics.median(roofline):.0f}%" if roofline else "–"
        lines.append(f"| {panel} | {variant} | {max(map(len, row.values()))} | {vs_eager} | {vs_others} | "
                     f"{of_roofline} |")
    return "\n".join(lines) + "\n"


def targets_table(cases) -> str:
    """Each target and variant: met (at every case measured), missed (the worst case named), or not
    measured (no case it applies to, or no baseline for it, in these runs)."""
    lines = ["| issue | target | variant | cases met | worst case | status |",
             "| ---: | --- | --- | ---: | --- | --- |"]
    for target in TARGETS:
        for variant in target.variants:
            values = []
            for label, variants in sorted(cases.items()):
                if variant in variants and target.applies(variants[variant]):
                    value = target.metric(variants, variant)
                    if value is not None:
                        values.append((value, label))
            if not values:
                lines.append(f"| {target.issue} | {target.text} | {variant} | – | – | not measured |")
                continue
            worst, worst_label = min(values)
            met = sum(target.met(value) for value, _ in values)
            # one decimal for %: 69.9% shown as 70% would read as met against a 70% target
            shown = f"{worst:.1f}%" if target.unit == "%" else f"{worst:.2f}×"
            status = "met" if met == len(values) else "**missed**"
            lines.append(f"| {target.issue} | {target.text} | {variant} | {met} of {len(values)} | "
                         f"{shown} ({worst_label}) | {status} |")
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
    targets = f"## Targets\n\nThe issues' speed targets against these runs:\n\n{targets_table(cases)}"
    with open(os.path.join(args.out, "report.md"), "w") as f:
        f.write(f"{table}\n{targets}")
    chart_path = os.path.join(args.out, "speedups.png")
    if not chart(cases, header, chart_path):
        print("no case has a timm eager baseline: no chart")
        chart_path = None
    print(f"{table}\n{targets}")
    if args.readme:
        try:
            update_readme(args.readme, f"{summary_table(cases, header)}\nTargets:\n\n{targets_table(cases)}",
                          chart_path)
        except ValueError as e:
            print(e)
            return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

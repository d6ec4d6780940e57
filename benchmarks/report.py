"""Turn a pytest-benchmark JSON into a markdown table of speedups and a PNG chart.

    python benchmarks/report.py benchmarks/results/latest.json --out benchmarks/results/

Each benchmark's ``extra_info`` carries its op, pass, variant, case and the CUDA-event median
(see benchmarks/conftest.py). Rows are cases, with each variant's median time and its speedup over
timm eager and over timm + torch.compile, plus achieved GB/s and % of the measured copy bandwidth.
Only measured numbers: the table is written from the JSON and nothing else.
"""
from __future__ import annotations

import argparse
import json
import os
from collections import defaultdict

BASELINES = ("timm", "timm_compile")


def load_cases(path: str):
    """{case label: {variant: extra_info}} and the run's header (device, versions, date)."""
    with open(path) as f:
        data = json.load(f)
    cases: dict[str, dict[str, dict]] = defaultdict(dict)
    device = ""
    for bench in data.get("benchmarks", []):
        info = bench.get("extra_info", {})
        if "median_ms" not in info or "variant" not in info:
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


def chart(cases, header, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = sorted(cases)
    fused = sorted({v for variants in cases.values() for v in variants} - set(BASELINES))
    fig, ax = plt.subplots(figsize=(max(8, 0.5 * len(labels) + 4), 5))
    width = 0.8 / max(1, len(fused) + 1)
    for i, variant in enumerate(["timm_compile", *fused]):
        values = [
            cases[label]["timm"]["median_ms"] / cases[label][variant]["median_ms"]
            if variant in cases[label] and "timm" in cases[label] else 0.0
            for label in labels
        ]
        ax.bar([x + i * width for x in range(len(labels))], values, width, label=variant)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(labels))])
    ax.set_xticklabels(labels, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("speedup over timm eager (×)")
    ax.set_title(f"twins_kernels on {header['device'] or 'unknown device'} ({header['date'][:10]})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("json", help="pytest-benchmark JSON (--benchmark-json)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = parser.parse_args(argv)
    cases, header = load_cases(args.json)
    if not cases:
        print(f"{args.json} holds no GPU benchmark results (were they all skipped?)")
        return 1
    os.makedirs(args.out, exist_ok=True)
    table = markdown_table(cases, header)
    with open(os.path.join(args.out, "report.md"), "w") as f:
        f.write(table)
    chart(cases, header, os.path.join(args.out, "speedups.png"))
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

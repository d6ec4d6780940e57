"""The benchmark report turns pytest-benchmark JSON into a speedup table and a chart."""
import json
import re

import pytest

from conftest import ROOT, load_benchmarks_module


def bench(group, variant, ms, op=None):
    """A pytest-benchmark entry of case ``group``; its op is the group's first word unless given."""
    return {"group": group, "extra_info": {"variant": variant, "median_ms": ms, "achieved_gbs": 100.0 / ms,
                                           "pct_copy_bandwidth": 3.0 / ms, "device": "Test GPU",
                                           "op": op or group.split("-")[0]}}


def test_report_table_and_chart(tmp_path):
    pytest.importorskip("matplotlib")
    report = load_benchmarks_module("report.py")
    data = {
        "machine_info": {"torch_version": "2.x", "triton_version": "3.x", "timm_version": "1.0.x",
                         "python_version": "3.11"},
        "datetime": "2026-11-24T10:00:00",
        "benchmarks": [bench("peg-fwd-a", "timm", 2.0), bench("peg-fwd-a", "timm_compile", 1.0),
                       bench("peg-fwd-a", "triton", 0.5), {"group": "skipped", "extra_info": {}}],
    }
    data["benchmarks"][2]["extra_info"].update(pct_roofline=40.0, bound="memory")
    data["benchmarks"][1]["extra_info"].update(bytes_moved=0.0)  # as a whole model records
    path = tmp_path / "results.json"
    path.write_text(json.dumps(data))
    assert report.main([str(path), "--out", str(tmp_path)]) == 0
    table = (tmp_path / "report.md").read_text()
    assert "Test GPU" in table and "torch 2.x, triton 3.x, timm 1.0.x, python 3.11" in table
    assert "| peg-fwd-a | triton | 0.500 | 4.00× | 2.00× | – | 200 | 6% | 40% (memory) |" in table
    assert "| peg-fwd-a | timm | 2.000 | 1.00× | 0.50× | – | 50 | 2% | – |" in table  # no roofline recorded
    # no bytes counted
    assert "| peg-fwd-a | timm_compile | 1.000 | 2.00× | 1.00× | – | – | – | – |" in table
    assert (tmp_path / "speedups.png").stat().st_size > 1000
    rows = [line for line in table.splitlines() if line.startswith("| peg-fwd-a |")]
    assert [row.split(" | ")[1] for row in rows] == ["timm", "timm_compile", "triton"], "the baselines first"


def test_chart_has_a_panel_per_op_and_skips_cases_without_a_baseline(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    report = load_benchmarks_module("report.py")
    cases = {"peg-fwd-a": {"timm": {"median_ms": 2.0, "op": "peg"}, "triton": {"median_ms": 1.0, "op": "peg"}},
             "lsa-fwd-b": {"timm": {"median_ms": 3.0, "op": "lsa"}, "triton": {"median_ms": 1.0, "op": "lsa"}},
             "gsa-subsample-fwd-c": {"timm": {"median_ms": 3.0, "op": "gsa-subsample"},
                                     "triton": {"median_ms": 2.0, "op": "gsa-subsample"}},
             "lsa-core-fwd-d": {"triton": {"median_ms": 0.5, "op": "lsa-core"}}}
    titles = []
    import matplotlib.axes

    monkeypatch.setattr(matplotlib.axes.Axes, "set_title", lambda ax, title: titles.append(title))
    header = {"device": "Test GPU", "date": "2026-11-25"}
    assert report.chart(cases, header, str(tmp_path / "three-panels.png"))
    assert titles == ["gsa-subsample", "lsa", "peg"]  # the cores' case has no timm eager baseline
    assert not report.chart({"lsa-core-fwd-d": cases["lsa-core-fwd-d"]}, header, str(tmp_path / "none.png"))
    assert not (tmp_path / "none.png").exists()


def test_report_refuses_an_all_skipped_run(tmp_path):
    report = load_benchmarks_module("report.py")
    path = tmp_path / "empty.json"
    path.write_text(json.dumps({"benchmarks": []}))
    assert report.main([str(path), "--out", str(tmp_path)]) == 1


def write_run(path, date, benchmarks, device="Test GPU"):
    for entry in benchmarks:
        entry["extra_info"]["device"] = device
    machine = {"torch_version": "2.x", "triton_version": "3.x", "timm_version": "1.0.x"}
    path.write_text(json.dumps({"machine_info": machine, "datetime": date, "benchmarks": benchmarks}))
    return str(path)


def test_attention_cases_are_also_compared_with_mmsegmentations_modules(tmp_path):
    """The LSA and GSA module cases' ``mmseg`` variant is a baseline: its row follows timm's two, the
    fused rows show their speedup over it, and the summary its geometric mean per op."""
    pytest.importorskip("matplotlib")
    report = load_benchmarks_module("report.py")
    run = write_run(tmp_path / "run.json", "2026-12-07T10:00:00", [
        bench("gsa-fwd-a", "timm", 2.0), bench("gsa-fwd-a", "timm_compile", 1.5), bench("gsa-fwd-a", "mmseg", 3.0),
        bench("gsa-fwd-a", "triton", 1.0), bench("gsa-fwd-b", "timm", 1.0), bench("gsa-fwd-b", "mmseg", 4.0),
        bench("gsa-fwd-b", "triton", 0.5), bench("peg-fwd-c", "timm", 1.0), bench("peg-fwd-c", "triton", 0.5)])
    readme = tmp_path / "README.md"
    readme.write_text("\n".join(report.README_MARKERS) + "\n")
    assert report.main([run, "--out", str(tmp_path), "--readme", str(readme)]) == 0
    rows = [line.split(" | ")[1:6] for line in (tmp_path / "report.md").read_text().splitlines()
            if line.startswith("| gsa-fwd-a |")]
    assert rows == [["timm", "2.000", "1.00×", "0.75×", "1.50×"],
                    ["timm_compile", "1.500", "1.33×", "1.00×", "2.00×"],
                    ["mmseg", "3.000", "0.67×", "0.50×", "1.00×"],
                    ["triton", "1.000", "2.00×", "1.50×", "3.00×"]]
    summary = readme.read_text()
    # gsa triton: 2x and 2x over timm eager, 1.5x over timm + compile (one case), 3x and 8x over mmseg
    assert "| gsa | triton | 2 | 2.00× (2.00–2.00) | 1.50× | 4.90× | – |" in summary
    assert "| gsa | mmseg | 2 | 0.41× (0.25–0.67) | 0.50× | – | – |" in summary  # not over itself
    assert "| gsa | timm_compile | 1 | 1.33× (1.33–1.33) | – | 2.00× | – |" in summary
    assert "| peg | triton | 1 | 2.00× (2.00–2.00) | – | – | – |" in summary


def test_report_merges_runs_variant_by_variant(tmp_path):
    """A GPU session's calls each run part of the suite: a call cut off at its deadline has timed a
    case's eager variants, the next (``--skip-timed``) its compiled one. Every variant is kept, the
    last run's where two have it, and the case is marked as spanning runs."""
    report = load_benchmarks_module("report.py")
    first = write_run(tmp_path / "a.json", "2026-11-24T10:00:00",
                      [bench("lsa-fwd-a", "timm", 4.0), bench("lsa-fwd-a", "triton", 1.0),
                       bench("peg-fwd-a", "timm", 2.0), bench("peg-fwd-a", "triton", 0.5)])
    second = write_run(tmp_path / "b.json", "2026-11-24T11:00:00",
                       [bench("lsa-fwd-a", "timm_compile", 2.0), bench("peg-fwd-a", "triton", 0.4),
                        bench("gsa-fwd-a", "timm", 6.0), bench("gsa-fwd-a", "triton", 2.0)])
    cases, header = report.load_cases([first, second])
    assert sorted(cases) == ["gsa-fwd-a", "lsa-fwd-a", "peg-fwd-a"]
    assert sorted(cases["lsa-fwd-a"]) == ["timm", "timm_compile", "triton"]
    assert cases["peg-fwd-a"]["triton"]["median_ms"] == 0.4 and cases["peg-fwd-a"]["timm"]["median_ms"] == 2.0
    assert [report.spans_runs(cases[c]) for c in ("gsa-fwd-a", "lsa-fwd-a", "peg-fwd-a")] == [False, True, True]
    assert header["date"] == "2026-11-24T10:00:00 to 2026-11-24T11:00:00"
    assert header["device"] == "Test GPU" and header["torch"] == "2.x"
    assert report.main([first, second, "--out", str(tmp_path)]) == 0
    table = (tmp_path / "report.md").read_text()
    assert "| gsa-fwd-a | triton | 2.000 | 3.00× |" in table
    assert "| lsa-fwd-a † | triton | 1.000 | 4.00× | 2.00× |" in table and "† the case's variants" in table
    third = write_run(tmp_path / "c.json", "2026-11-24T12:00:00", [bench("gsa-fwd-a", "timm_compile", 3.0)])
    assert report.load_cases([first, second, third])[1]["date"] == "2026-11-24T10:00:00 to 2026-11-24T12:00:00"


def test_report_names_a_file_it_cannot_read(tmp_path, capsys):
    report = load_benchmarks_module("report.py")
    cut = tmp_path / "cut.json"
    cut.write_text('{"benchmarks": [{"group": ')
    assert report.main([str(cut), "--out", str(tmp_path)]) == 2
    assert report.main([str(tmp_path / "missing.json"), "--out", str(tmp_path)]) == 2
    out = capsys.readouterr().out
    assert "cut.json: not a readable pytest-benchmark JSON" in out and "missing.json" in out


def test_report_names_json_that_is_not_a_benchmark_run(tmp_path, capsys):
    """Valid JSON of the wrong shape gets the same message as unreadable JSON, not a traceback, and a
    case with null extra_info (skipped before recording) is passed over."""
    report = load_benchmarks_module("report.py")
    listed = tmp_path / "list.json"
    listed.write_text("[]")
    assert report.main([str(listed), "--out", str(tmp_path)]) == 2
    assert "list.json: not a pytest-benchmark JSON" in capsys.readouterr().out
    run = write_run(tmp_path / "run.json", "2026-11-24T10:00:00",
                    [bench("peg-fwd-a", "timm", 2.0), bench("peg-fwd-a", "triton", 0.5)], "Test GPU")
    with open(run) as f:
        data = json.load(f)
    data["benchmarks"].append({"group": "lsa-fwd-a", "extra_info": None})
    data["machine_info"] = None
    with open(run, "w") as f:
        json.dump(data, f)
    cases, header = report.load_run(run)
    assert list(cases) == ["peg-fwd-a"] and header["torch"] == ""


def test_report_refuses_runs_from_different_devices(tmp_path):
    report = load_benchmarks_module("report.py")
    h100 = write_run(tmp_path / "a.json", "2026-11-24T10:00:00", [bench("peg-fwd-a", "timm", 2.0)], "NVIDIA H100")
    h200 = write_run(tmp_path / "b.json", "2026-11-24T11:00:00", [bench("lsa-fwd-a", "timm", 2.0)], "NVIDIA H200")
    with pytest.raises(ValueError, match="different devices"):
        report.load_cases([h100, h200])
    assert report.main([h100, h200, "--out", str(tmp_path)]) == 2


def test_readme_summary_is_written_between_the_markers(tmp_path):
    pytest.importorskip("matplotlib")
    report = load_benchmarks_module("report.py")
    start, end = report.README_MARKERS
    readme = tmp_path / "README.md"
    readme.write_text(f"# title\n\nbefore\n{start}\nold numbers\n{end}\nafter\n")
    run = tmp_path / "run.json"
    write_run(run, "2026-11-25T10:00:00", [bench("peg-fwd-a", "timm", 2.0), bench("peg-fwd-a", "timm_compile", 1.0),
                                            bench("peg-fwd-a", "triton", 0.5), bench("peg-fwd-b", "timm", 1.0),
                                            bench("peg-fwd-b", "triton", 1.0),
                                            bench("gsa-core-c", "sdpa", 1.0, "gsa-core"),
                                            bench("gsa-core-c", "triton", 1.0, "gsa-core")])
    out = tmp_path / "results"
    assert report.main([str(run), "--out", str(out), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert text.startswith("# title\n\nbefore\n") and text.endswith(f"{end}\nafter\n")
    assert "old numbers" not in text and "Test GPU; torch 2.x, triton 3.x, timm 1.0.x; run" in text
    # peg triton: 4x and 1x over timm eager (geometric mean 2x), 2x over timm + compile (one case)
    assert "| peg | triton | 2 | 2.00× (1.00–4.00) | 2.00× | – | – |" in text
    assert "| peg | timm_compile | 1 | 2.00× (2.00–2.00) | – | – | – |" in text
    assert "| peg | timm |" not in text, "timm eager is the baseline, not a variant of its own"
    assert "](results/speedups.png)" in text and "| gsa-core |" not in text  # no baseline, no roofline
    # with a roofline %, the cores (no timm baseline) get a row: the median over their cases
    cores = [bench("gsa-core-c", "triton", 1.0, "gsa-core"), bench("gsa-core-d", "triton", 1.0, "gsa-core"),
             bench("gsa-core-e", "triton", 1.0, "gsa-core")]
    for entry, pct in zip(cores, (20.0, 70.0, 40.0)):
        entry["extra_info"].update(pct_roofline=pct, bound="compute")
    write_run(run, "2026-11-25T10:00:00", cores)
    assert report.main([str(run), "--out", str(out), "--readme", str(readme)]) == 0
    assert "| gsa-core | triton | 3 | – | – | – | 40% |" in readme.read_text()
    readme.write_text("no markers\n")
    assert report.main([str(run), "--out", str(out), "--readme", str(readme)]) == 2


def test_the_readme_has_the_summary_markers(tmp_path):
    """A GPU session's `report.py ... --readme README.md` finds where the summary goes."""
    report = load_benchmarks_module("report.py")
    readme = tmp_path / "README.md"
    readme.write_text(open(f"{ROOT}/README.md").read())
    report.update_readme(str(readme), "the summary\n", None)
    assert "the summary" in readme.read_text()


def case(group, variant, ms, **info):
    entry = bench(group, variant, ms)
    entry["extra_info"].update(info)
    return entry


def target_row(table: str, text: str, variant: str) -> str:
    rows = [line for line in table.splitlines() if f"| {text} | {variant} |" in line]
    assert len(rows) == 1, (text, variant, table)
    return rows[0]


def test_targets_met_missed_and_not_measured(tmp_path):
    """Each target and variant is judged on every case it applies to, against the case's own baseline."""
    report = load_benchmarks_module("report.py")
    lsa = dict(op="lsa", pass_="fwd")
    run = write_run(tmp_path / "run.json", "2026-11-25T10:00:00", [
        # LSA forward at 224: triton 4x timm eager, cuda 2x; at 1024 (outside the 3x target) 1.5x
        case("lsa-fwd-224", "timm", 8.0, image=224, **lsa), case("lsa-fwd-224", "triton", 2.0, image=224, **lsa),
        case("lsa-fwd-224", "cuda", 4.0, image=224, **lsa), case("lsa-fwd-1024", "timm", 3.0, image=1024, **lsa),
        case("lsa-fwd-1024", "triton", 2.0, image=1024, **lsa),
        # GSA forward exactly as fast as timm + compile: not "faster than"
        case("gsa-fwd-a", "timm_compile", 1.0, op="gsa", pass_="fwd"),
        case("gsa-fwd-a", "triton", 1.0, op="gsa", pass_="fwd"),
        # sr = 1 core against SDPA; PEG bandwidth
        case("gsa-core-a", "sdpa", 1.0, op="gsa-core", pass_="fwd"),
        case("gsa-core-a", "triton", 1.2, op="gsa-core", pass_="fwd"),
        case("peg-fwd-a", "triton", 1.0, op="peg", pass_="fwd", pct_copy_bandwidth=85.0),
        case("peg-fwd-b", "triton", 1.0, op="peg", pass_="fwd", pct_copy_bandwidth=60.0),
        # a training step: faster, but more memory
        case("model-train", "timm", 2.0, op="model", pass_="train", peak_memory_mib=1000.0),
        case("model-train", "patched", 1.0, op="model", pass_="train", peak_memory_mib=1100.0),
    ])
    cases, _ = report.load_cases([run])
    table = report.targets_table(cases)
    lsa_3x = "LSA module forward ≥ 3× timm eager at 224² and 512²"
    expected = {
        (lsa_3x, "triton"): "| 1 of 1 | 4.00× (lsa-fwd-224) | met |",
        (lsa_3x, "cuda"): "| 0 of 1 | 2.00× (lsa-fwd-224) | **missed** |",
        ("LSA module ≥ 1.3× timm + torch.compile", "triton"): "| – | – | not measured |",
        ("GSA module forward faster than timm + torch.compile", "triton"):
            "| 0 of 1 | 1.00× (gsa-fwd-a) | **missed** |",
        ("GSA sr = 1 attention core ≥ 80% of flash SDPA's speed", "triton"): "| 1 of 1 | 0.83× (gsa-core-a) | met |",
        ("PEG forward ≥ 80% of the copy bandwidth", "triton"): "| 1 of 2 | 60.0% (peg-fwd-b) | **missed** |",
        ("training step ≥ 1.3× timm eager (224², batch 64)", "patched"): "| 1 of 1 | 2.00× (model-train) | met |",
        ("training step peak memory no more than timm eager's", "patched"):
            "| 0 of 1 | 0.91× (model-train) | **missed** |",
    }
    for (text, variant), ending in expected.items():
        assert target_row(table, text, variant).endswith(ending), (text, variant)
    assert table.count("| not measured |") == len(table.splitlines()) - 2 - 7  # the header, 7 measured
    assert report.main([run, "--out", str(tmp_path)]) == 0
    assert "## Targets" in (tmp_path / "report.md").read_text()
    # a variant with no peak memory recorded: not measured (None), not a failed report
    assert report.peak_memory_ratio({"timm": {"peak_memory_mib": 1000.0}, "patched": {}}, "patched") is None


def test_each_target_judges_by_the_number_its_text_states():
    """A target's threshold and the wording the report prints (the issue's) are one number: "≥ 3×" is 3,
    "≥ 80% of the copy bandwidth" 80 %, "≥ 80% of flash SDPA's speed" a 0.8× ratio; "faster than" strictly
    above 1, "no more than" at least 1."""
    report = load_benchmarks_module("report.py")
    for target in report.TARGETS:
        stated = re.search(r"≥ ([\d.]+)(×|%)", target.text)
        if stated:
            value = float(stated[1]) / (100 if (stated[2], target.unit) == ("%", "×") else 1)
            assert (value, target.strictly) == (target.at_least, False), target
            assert target.unit == "×" or "copy bandwidth" in target.text, target
        else:
            strictly = "faster than" in target.text
            assert strictly or "no more than" in target.text, target.text
            assert (target.at_least, target.unit, target.strictly) == (1.0, "×", strictly), target

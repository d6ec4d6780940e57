"""benchmarks/run_gpu.sh, the script a GPU session's device calls run, with a stub Python that records
what it is asked to run: a mistake in it costs a call of a session's 15 minutes of device time."""
import os
import shutil
import subprocess
import time

import pytest

from conftest import ROOT

STUB_PYTHON = """#!/usr/bin/env bash
echo "$*" >> "$STUB_LOG"
case "$*" in
  "-c import twins_kernels._C")
    [ -z "${STUB_NO_EXTENSION:-}" ] || { echo "ModuleNotFoundError: No module named 'twins_kernels._C'"; exit 1; } ;;
  "-m pytest tests/"*) sleep "${STUB_TEST_SECONDS:-0}" ;;
  "benchmarks/profile_report.py --metrics") echo "gpu__time_duration.sum,dram__bytes_read.sum" ;;
  "-m pytest benchmarks/"*)
    for arg in "$@"; do
      case "$arg" in --benchmark-json=*) json="${arg#--benchmark-json=}" ;; esac
    done
    # pytest-benchmark writes its JSON as the session ends, an interrupted (SIGINT) session's too
    write_json() { echo '{"benchmarks": []}' > "$json"; }
    trap 'write_json; exit 2' INT
    sleep "${STUB_BENCH_SECONDS:-0}" & wait $!
    write_json ;;
esac
"""

# Nsight Compute: a profiling run records its report and runs the program; --import prints the report's rows
STUB_NCU = """#!/usr/bin/env bash
echo "ncu $*" >> "$STUB_LOG"
if [ "$1" = --import ]; then
  echo '"ID","Kernel Name"'
  exit
fi
while [ "$1" != "$PYTHON" ]; do
  [ "$1" = --export ] && touch "$2.ncu-rep"
  shift
done
"$@"
"""


@pytest.fixture
def gpu_script(tmp_path):
    """A copy of what run_gpu.sh reads (itself, setup.py, csrc/) and a stub Python logging its calls."""
    if shutil.which("timeout") is None:
        pytest.skip("needs coreutils' timeout")
    tree = tmp_path / "tree"
    (tree / "benchmarks").mkdir(parents=True)
    (tree / "twins_kernels").mkdir()
    shutil.copy(os.path.join(ROOT, "benchmarks", "run_gpu.sh"), tree / "benchmarks")
    shutil.copy(os.path.join(ROOT, "setup.py"), tree)
    shutil.copytree(os.path.join(ROOT, "csrc"), tree / "csrc")
    stub = tmp_path / "python"
    stub.write_text(STUB_PYTHON)
    stub.chmod(0o755)
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "ncu").write_text(STUB_NCU)
    (tmp_path / "bin" / "ncu").chmod(0o755)
    log, out = tmp_path / "calls.log", tmp_path / "out"

    def run(*args, **env):
        started = time.monotonic()
        result = subprocess.run(["bash", str(tree / "benchmarks" / "run_gpu.sh"), *args], capture_output=True,
                                text=True, timeout=120,
                                env={**os.environ, "PYTHON": str(stub), "STUB_LOG": str(log), "OUT": str(out),
                                     **{key: str(value) for key, value in env.items()}})
        calls = log.read_text().splitlines() if log.exists() else []
        return result, calls, time.monotonic() - started

    run.tree, run.out, run.bin = tree, out, tmp_path / "bin"
    return run


def test_session_builds_then_main_job_then_tests_then_headline_benchmarks(gpu_script):
    result, calls, _ = gpu_script("session", "--skip-timed", "run1/benchmarks.json")
    assert result.returncode == 0, result.stdout + result.stderr
    pip, loads, main_job, tests, bench, report = calls[1:]
    assert pip.startswith("-m pip install") and loads == "-c import twins_kernels._C"
    assert "-m pytest tests/ -q -n 8 --durations=15" in tests
    assert main_job == "-m twins_kernels"
    assert bench.startswith("-m pytest benchmarks/ --benchmark-only")
    assert bench.endswith("-m headline --skip-timed run1/benchmarks.json")
    assert report.startswith("benchmarks/report.py") and report.endswith(f"--out {gpu_script.out}")
    # the build is recorded against its sources: the next call with the same sources only imports it
    hash_file = gpu_script.tree / "twins_kernels" / "_C.sources.sha256"
    assert hash_file.read_text().strip() == subprocess.run(
        ["bash", str(gpu_script.tree / "benchmarks" / "run_gpu.sh"), "sources-hash"], capture_output=True,
        text=True).stdout.strip()
    first_run = len(calls)
    _, calls, _ = gpu_script("bench")
    assert calls[first_run + 1] == "-c import twins_kernels._C"  # after the environment line; no pip
    assert not any(call.startswith("-m pip") for call in calls[first_run:])
    assert "extension: the carried build" in (gpu_script.out / "env.txt").read_text()
    assert len(list(gpu_script.out.iterdir())) <= 8  # what the device tool brings back


def test_a_build_that_gives_no_extension_is_not_recorded_and_env_txt_says_why(gpu_script):
    hash_file = gpu_script.tree / "twins_kernels" / "_C.sources.sha256"
    hash_file.write_text("0" * 64 + "\n")  # a carried build of other sources
    result, calls, _ = gpu_script("session", STUB_NO_EXTENSION=1)
    assert result.returncode == 0, result.stdout + result.stderr
    env = (gpu_script.out / "env.txt").read_text()
    assert f"the carried build is of other sources ({'0' * 64})" in env
    # pip succeeded (no toolkit: the pure-Python package), but nothing loads: not recorded as built
    assert "No module named 'twins_kernels._C'" in env and "extension: build FAILED" in env
    assert not hash_file.exists()
    assert any(call.startswith("-m pytest tests/") for call in calls)  # the tests still say what fails


def test_the_test_budget_interrupts_the_tests_and_the_session_goes_on(gpu_script):
    result, calls, elapsed = gpu_script("session", TEST_BUDGET_S=2, STUB_TEST_SECONDS=30)
    assert result.returncode == 0, result.stdout + result.stderr
    assert elapsed < 20 and any(call.startswith("-m pytest benchmarks/") for call in calls)
    # the run's deadline stops whatever is running, and what comes after it is not started
    first_run = len(calls)
    _, calls, elapsed = gpu_script("tests", RUN_BUDGET_S=2, STUB_TEST_SECONDS=30)
    assert elapsed < 20 and calls[-1].startswith("-m pytest tests/")
    _, calls, elapsed = gpu_script("session", RUN_BUDGET_S=2, STUB_TEST_SECONDS=30)
    assert elapsed < 20 and calls[-1].startswith("-m pytest tests/")  # no benchmarks after the deadline
    assert len(calls) > first_run


def test_benchmarks_cut_off_at_the_deadline_leave_their_json_and_report(gpu_script):
    """The deadline interrupts pytest as Ctrl-C would: pytest-benchmark ends the session and writes the
    JSON of the cases done, which the report reads (a signal pytest cannot handle would leave nothing)."""
    result, calls, elapsed = gpu_script("bench", RUN_BUDGET_S=3, STUB_BENCH_SECONDS=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert elapsed < 30 and (gpu_script.out / "benchmarks.json").exists()
    assert calls[-1].startswith("benchmarks/report.py")


def test_the_sources_hash_follows_setup_py_and_every_file_of_csrc(gpu_script):
    """A carried build is used only where the hash of what it was built from is this tree's."""
    def sources_hash():
        return subprocess.run(["bash", str(gpu_script.tree / "benchmarks" / "run_gpu.sh"), "sources-hash"],
                              capture_output=True, text=True, check=True).stdout.strip()

    hashes = [sources_hash()]
    for changed in ("setup.py", "csrc/peg_kernels.cuh", "csrc/a_new_header.cuh"):
        with open(gpu_script.tree / changed, "a") as source:
            source.write("\n")
        hashes.append(sources_hash())
    assert len(set(hashes)) == len(hashes) and all(len(h) == 64 for h in hashes)


def test_an_unknown_phase_is_refused(gpu_script):
    result, calls, _ = gpu_script("al")
    assert result.returncode == 2 and "unknown phase 'al'" in result.stdout and not calls


def test_the_sweep_gets_its_arguments_and_a_budget_inside_the_deadline(gpu_script):
    result, calls, _ = gpu_script("sweep", "--sweep", "lsa-fwd", RUN_BUDGET_S=300)
    assert result.returncode == 0, result.stdout + result.stderr
    sweep = calls[-1].split()
    assert sweep[0] == "benchmarks/sweep_tiles.py" and sweep[-2:] == ["--sweep", "lsa-fwd"]
    budget = int(sweep[sweep.index("--budget-s") + 1])
    assert 260 <= budget <= 270 and "--skip-static" not in sweep
    static = gpu_script.tree / "benchmarks" / "results" / "sweep_static.json"  # `make sweep-report`'s
    static.parent.mkdir()
    static.write_text("{}")
    _, calls, _ = gpu_script("sweep")
    assert "--skip-static benchmarks/results/sweep_static.json" in calls[-1]


def test_profile_runs_each_case_under_ncu_in_its_own_process_and_reports(gpu_script):
    cases = ["lsa-fwd-svt_s-stage1-224-bs64-bf16-triton", "gsa-core-sr1-fwdbwd-svt_s-28x28-bs64-bf16-cuda"]
    result, calls, _ = gpu_script("profile", *cases, PATH=f"{gpu_script.bin}:{os.environ['PATH']}")
    assert result.returncode == 0, result.stdout + result.stderr
    assert calls[3] == "benchmarks/profile_report.py --metrics"  # after the build and its import
    for case, (profiling, run, importing) in zip(cases, (calls[4:7], calls[7:10])):
        assert profiling.startswith("ncu --profile-from-start off --target-processes all --clock-control none "
                                    "--metrics gpu__time_duration.sum,dram__bytes_read.sum --export ")
        assert profiling.endswith(f"--benchmark-only -q -p no:cacheprovider --profile-case {case} "
                                  f"--benchmark-json={profiling.split('--export ')[1].split()[0]}.json")
        assert run.startswith("-m pytest benchmarks/") and f"--profile-case {case} " in run
        assert importing.startswith("ncu --import ") and importing.endswith(f"/{case}.ncu-rep --page raw --csv "
                                                                             "--print-units base")
    report = calls[10].split()
    assert report[0] == "benchmarks/profile_report.py" and report[2:] == ["--out", str(gpu_script.out)]
    assert f"{cases[0]}: exit 0" in result.stdout
    assert (gpu_script.out / "profile_raw.tar.gz").exists() and len(list(gpu_script.out.iterdir())) <= 8


def test_profile_without_cases_is_refused_before_the_build(gpu_script):
    result, calls, _ = gpu_script("profile")
    assert result.returncode == 2 and "name the benchmark cases to profile" in result.stdout and not calls


def test_on_a_gpu_the_op_parity_files_run_first():
    """What the session's test budget cuts is the tail: hardening, report and the CPU-side checks."""
    from pathlib import Path
    from types import SimpleNamespace

    from conftest import GPU_FIRST_FILES, gpu_first_order

    names = ["test_backend.py", "test_hardening.py", "test_lsa.py", "test_lsa.py", "test_patch.py", "test_peg.py"]
    items = [SimpleNamespace(path=Path("tests") / name, index=i) for i, name in enumerate(names)]
    ordered = gpu_first_order(items)
    assert [item.path.name for item in ordered] == ["test_peg.py", "test_lsa.py", "test_lsa.py", "test_backend.py",
                                                    "test_patch.py", "test_hardening.py"]
    assert [item.index for item in ordered if item.path.name == "test_lsa.py"] == [2, 3]  # a file keeps its order
    assert all(os.path.exists(os.path.join(ROOT, "tests", name)) for name in GPU_FIRST_FILES)

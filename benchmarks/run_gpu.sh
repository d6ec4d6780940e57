#!/usr/bin/env bash
# What a GPU session runs. A session has 15 minutes of device time in all (a machine's start, a minute or
# two, included) and a call at most 10: one full call, and a short second one if the first leaves time.
# Each phase writes under ${OUT:-benchmarks/results/run} (the device tool brings $OUT back, 8 files at most):
#   bash benchmarks/run_gpu.sh session [ARGS]  the session's call: build, the main job, the test suite (on
#                                           a GPU the op parity files first: tests/conftest.py) for at
#                                           most TEST_BUDGET_S seconds (default 240), then the
#                                           headline benchmarks (-m headline: a case per speed target, the
#                                           cases that compile a baseline last) until the deadline, and
#                                           the report with the targets table; ARGS go to the benchmarks'
#                                           pytest (e.g. --skip-timed EARLIER.json to go on after a call)
#   bash benchmarks/run_gpu.sh tests [-k EXPR]   build, main job, the test suite (a subset with -k)
#   bash benchmarks/run_gpu.sh bench [ARGS]      build, pytest benchmarks/ --benchmark-only ARGS, report
#   bash benchmarks/run_gpu.sh sweep [ARGS]      build, benchmarks/sweep_tiles.py ARGS (e.g. --sweep
#                                           lsa-fwd): each Triton kernel's tiles against alternatives, timed
#   bash benchmarks/run_gpu.sh profile CASE_ID...  build, each benchmark case (its id, as the JSON's "param")
#                                           run once under Nsight Compute (its own process, --profile-case):
#                                           per kernel, time, DRAM bytes against the bytes the case counts,
#                                           % of DRAM and SM peak, occupancy, registers (profile.md, from
#                                           benchmarks/profile_report.py; the raw rows in profile_raw.tar.gz)
#   bash benchmarks/run_gpu.sh sanitize [-k EXPR]   build, the cuda backend's parity tests at small shapes (or
#                                           the -k subset) under compute-sanitizer's memcheck (out-of-bounds
#                                           and misaligned accesses), racecheck (shared-memory hazards) and
#                                           synccheck (barriers in divergent code)
#   bash benchmarks/run_gpu.sh sources-hash      print the hash of the sources the extension is built from
# The plan for a session: `session` with RUN_BUDGET_S=440 and the call's timeout_s 480, which leaves
# (with a start of up to two minutes) the four minutes a second machine needs: then the failing tests
# again after a fix (`tests -k ...`), more benchmarks (`bench -m headline --skip-timed
# RUN1/benchmarks.json`, RUN1 copied into the tree so that it travels), or for a case behind its target
# its kernels under Nsight Compute (`profile CASE_ID`) and the tile sweep of a kernel (`sweep --sweep
# NAME`). The whole suite (622 cases, 148 compiling a baseline anew) takes several sessions; parts merge
# afterwards, here:
#   python benchmarks/report.py RUN1/benchmarks.json RUN2/... --out DIR [--readme README.md]
# Before the first call: `make gpu-versions`, then
#   cp build/gpu-versions/twins_kernels/_C.cpython-312-x86_64-linux-gnu.so build/gpu-versions/twins_kernels/_C.sources.sha256 twins_kernels/
# and name those two twins_kernels/ paths in every call's `carry` (see the build step below).
# The device tool kills a call at its limit and keeps only what is under $OUT, and pytest-benchmark
# writes its JSON when the session ends: every pytest here is interrupted (SIGINT, which still runs
# the session's end: the JSON of the cases done, the failures so far) at its deadline, RUN_BUDGET_S
# seconds after the script starts (default 540 of the 600-second call) or its own budget if sooner.
set -uo pipefail
cd "$(dirname "$0")/.."
PHASE="${1:-session}"
shift || true
case "$PHASE" in
  session|tests|bench|sweep|profile|sanitize|sources-hash) ;;
  *) echo "run_gpu.sh: unknown phase '$PHASE' (session, tests, bench, sweep, profile, sanitize or sources-hash)"
     exit 2 ;;
esac
# what the extension is built from, in a fixed order (`make gpu-versions` records it beside its build)
sources_hash() { find setup.py csrc -type f | LC_ALL=C sort | xargs cat | sha256sum | cut -d' ' -f1; }
if [ "$PHASE" = sources-hash ]; then
  sources_hash
  exit
fi
if [ "$PHASE" = profile ] && [ $# -eq 0 ]; then
  echo "run_gpu.sh profile: name the benchmark cases to profile, by id (lsa-fwd-svt_s-stage1-224-bs64-bf16-triton)"
  exit 2
fi
OUT="${OUT:-benchmarks/results/run}"
mkdir -p "$OUT"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
PY="${PYTHON:-python3}"
DEADLINE=$((SECONDS + ${RUN_BUDGET_S:-540}))
# until_deadline [-b SECONDS] CMD...: runs CMD until the deadline (or for at most SECONDS, if sooner),
# then interrupts it as Ctrl-C would
until_deadline() {
  local left=$((DEADLINE - SECONDS))
  if [ "$1" = -b ]; then
    [ "$2" -lt "$left" ] && left=$2
    shift 2
  fi
  if [ "$left" -le 0 ]; then
    echo "run_gpu.sh: no time left for: $*"
    return 124
  fi
  timeout -s INT -k 20 "$left" "$@"
}
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  $PY -c "import torch, triton, timm; print(*(f'{m.__name__} {m.__version__}' for m in (torch, triton, timm)))"
  date -u
} > "$OUT/env.txt" 2>&1
# The device machine starts bare whenever it has been idle for 30 s, and building the extension there
# costs minutes of device time each time. `make gpu-versions` builds it here for that machine's
# versions (Python 3.12, torch 2.11.0, sm_90) and writes the hash of the sources it was built from
# beside it; copied into twins_kernels/ and carried (the device tool's `carry`), it is used as it is
# when those sources are the ones here and it loads, else the extension is built, within the deadline.
# Why a carried build was not used, and the build's output, go to env.txt as they come (a build the
# deadline stops leaves its log): $OUT brings back 8 files at most.
SOURCES_HASH="$(sources_hash)"
CARRIED_HASH="$(cat twins_kernels/_C.sources.sha256 2>/dev/null)"
extension_loads() { $PY -c "import twins_kernels._C" >> "$OUT/env.txt" 2>&1; }
if [ "$CARRIED_HASH" = "$SOURCES_HASH" ] && extension_loads; then
  echo "extension: the carried build (sources $SOURCES_HASH) loads, not rebuilt" >> "$OUT/env.txt"
else
  if [ -z "$CARRIED_HASH" ]; then
    echo "extension: no carried build" >> "$OUT/env.txt"
  elif [ "$CARRIED_HASH" != "$SOURCES_HASH" ]; then
    echo "extension: the carried build is of other sources ($CARRIED_HASH)" >> "$OUT/env.txt"
  else
    echo "extension: the carried build does not load (above)" >> "$OUT/env.txt"
  fi
  rm -f twins_kernels/_C.*.so twins_kernels/_C.sources.sha256  # never test a stale build
  echo "extension: building (sources $SOURCES_HASH, CUDA_HOME=$CUDA_HOME)" >> "$OUT/env.txt"
  # pip succeeds without the extension where setup.py finds no toolkit: the import tells
  if until_deadline $PY -m pip install --quiet --no-build-isolation -e . >> "$OUT/env.txt" 2>&1 \
      && extension_loads; then
    echo "$SOURCES_HASH" > twins_kernels/_C.sources.sha256  # the next call on this machine skips the build
    echo "extension: built" >> "$OUT/env.txt"
  else
    echo "extension: build FAILED, or it built no extension that loads (output above)" >> "$OUT/env.txt"
  fi
fi
# xdist workers (the GPU image has pytest-xdist): the GPU is shared, the Triton compilations spread over
# the machine's 16 cores (the tests marked large_gpu_memory take turns: tests/conftest.py)
run_tests() {
  until_deadline "$@" env TWINS_KERNELS_REQUIRE_EXTENSION=1 $PY -m pytest tests/ -q -n "${TEST_WORKERS:-8}" \
    --durations=15 "${TEST_ARGS[@]}" > "$OUT/tests.txt" 2>&1
  tail -n 3 "$OUT/tests.txt"
}
run_main_job() {
  until_deadline "$@" $PY -m twins_kernels > "$OUT/main_job.txt" 2>&1
  tail -n 3 "$OUT/main_job.txt"
}
run_benchmarks() {
  rm -f "$OUT/benchmarks.json"  # an earlier run's, where OUT is kept between runs: never reported as this one's
  until_deadline $PY -m pytest benchmarks/ --benchmark-only -q --benchmark-json="$OUT/benchmarks.json" \
    "$@" > "$OUT/benchmarks.txt" 2>&1
  if [ -f "$OUT/benchmarks.json" ]; then
    $PY benchmarks/report.py "$OUT/benchmarks.json" --out "$OUT" >> "$OUT/benchmarks.txt" 2>&1
  else
    echo "no benchmark case finished: no JSON, no report" >> "$OUT/benchmarks.txt"
  fi
  tail -n 5 "$OUT/benchmarks.txt"
}
case "$PHASE" in
  session)
    # the main job first: every op, backend and dtype against timm at SVT-S shapes in a minute or less,
    # known even if the tests run out of time
    run_main_job -b 60
    TEST_ARGS=()
    run_tests -b "${TEST_BUDGET_S:-240}"
    run_benchmarks -m headline "$@"
    ;;
  tests)
    run_main_job
    TEST_ARGS=("$@")
    run_tests
    ;;
  bench)
    run_benchmarks "$@"
    ;;
  sweep)
    # stops starting candidates 30 s before the deadline, so that it writes its table itself; skips those
    # `make sweep-report` found spilling
    STATIC=()
    [ -f benchmarks/results/sweep_static.json ] && STATIC=(--skip-static benchmarks/results/sweep_static.json)
    until_deadline $PY benchmarks/sweep_tiles.py --out "$OUT" --budget-s $((DEADLINE - SECONDS - 30)) \
      "${STATIC[@]}" "$@" > "$OUT/sweep.txt" 2>&1
    tail -n 5 "$OUT/sweep.txt"
    ;;
  profile)
    # ncu's clocks left as the benchmarks run them (--clock-control none), so that times compare
    NCU="$(command -v ncu || echo "$CUDA_HOME/bin/ncu")"
    if [ ! -x "$NCU" ]; then
      echo "ncu not found (PATH, $CUDA_HOME/bin): no profile" | tee "$OUT/profile.txt"
    else
      PROFILES="$(mktemp -d)"
      METRICS="$($PY benchmarks/profile_report.py --metrics)"
      for case in "$@"; do
        until_deadline "$NCU" --profile-from-start off --target-processes all --clock-control none \
          --metrics "$METRICS" --export "$PROFILES/$case" --force-overwrite \
          $PY -m pytest benchmarks/ --benchmark-only -q -p no:cacheprovider --profile-case "$case" \
          --benchmark-json="$PROFILES/$case.json" >> "$OUT/profile.txt" 2>&1
        echo "$case: exit $?" | tee -a "$OUT/profile.txt"
        [ -f "$PROFILES/$case.ncu-rep" ] && "$NCU" --import "$PROFILES/$case.ncu-rep" --page raw --csv \
          --print-units base > "$PROFILES/$case.csv" 2>> "$OUT/profile.txt"
      done
      tar -czf "$OUT/profile_raw.tar.gz" -C "$PROFILES" .
      $PY benchmarks/profile_report.py "$PROFILES" --out "$OUT" >> "$OUT/profile.txt" 2>&1
      tail -n 40 "$OUT/profile.txt"
    fi
    ;;
  sanitize)
    [ $# -gt 0 ] || set -- -k "cuda_backend_matches_timm and not svt and not pcpvt and not N4096"
    SANITIZER="$(command -v compute-sanitizer || echo "$CUDA_HOME/bin/compute-sanitizer")"
    if [ ! -x "$SANITIZER" ]; then
      echo "compute-sanitizer not found (PATH, $CUDA_HOME/bin): no sanitizer run" | tee "$OUT/sanitize.txt"
    else
      for tool in memcheck racecheck synccheck; do
        until_deadline "$SANITIZER" --tool "$tool" --error-exitcode 7 --print-limit 20 \
          env TWINS_KERNELS_REQUIRE_EXTENSION=1 $PY -m pytest tests/ -q -x -p no:cacheprovider "$@" \
          > "$OUT/sanitize_$tool.txt" 2>&1
        echo "$tool: exit $?" | tee -a "$OUT/sanitize.txt"
        tail -n 3 "$OUT/sanitize_$tool.txt"
      done
    fi
    ;;
esac

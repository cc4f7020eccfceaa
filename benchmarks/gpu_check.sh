#!/usr/bin/env bash
# The prepared GPU check: on a machine with one NVIDIA GPU and no network, install this
# project into that machine's own Python (no downloads), build the CUDA extension for the
# card, run every GPU-only test group, run the GPU benchmark, and write a JSON and a
# Markdown report. docs/cuda_backend.md ("Running the GPU check") describes it.
#
#   bash benchmarks/gpu_check.sh [--dry-run] [--collect] [--skip-install] [--full-bench]
#                                [--python PY] [--out DIR] [--budget SECONDS]
#
# --dry-run prints the plan; --collect checks (no GPU needed) that every test group still
# selects tests; --skip-install reuses the installed package; --full-bench runs the full
# benchmark grid instead of --quick (give it a larger --budget).
#
# Environment: PYTHON (default python3), OUT (output folder, default gpu_check_out/ in the
# repository), GPU_CHECK_BUDGET_S (default 450), GPU_CHECK_WORKERS (pytest-xdist workers of
# the large groups, default min(8, cores / 2); 1 runs them in one process),
# TORCH_CUDA_ARCH_LIST (default: the visible GPU's compute capability).
#
# Exit status:
#   0  every part passed
#   1  a part failed or timed out, or was not reached within the time budget
#   2  bad arguments
#   3  no CUDA GPU visible: nothing was run (the Python itself was still checked)
#   4  the Python cannot run the check (not found, or torch cannot be imported)
set -u -o pipefail

EXIT_OK=0
EXIT_FAILED=1
EXIT_USAGE=2
EXIT_NO_GPU=3
EXIT_NO_PYTHON=4

CALLER_PWD=$PWD
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO" || exit "$EXIT_USAGE"

PY=${PYTHON:-python3}
OUTDIR=${OUT:-$REPO/gpu_check_out}
BUDGET=${GPU_CHECK_BUDGET_S:-450}
DRY_RUN=0
COLLECT=0
SKIP_INSTALL=0
FULL_BENCH=0

usage() {
    sed -n '2,24p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
}

while (($#)); do
    case $1 in
        --dry-run) DRY_RUN=1 ;;
        --collect) COLLECT=1 ;;
        --skip-install) SKIP_INSTALL=1 ;;
        --full-bench) FULL_BENCH=1 ;;
        --python) shift; PY=${1:-} ;;
        --python=*) PY=${1#*=} ;;
        --out) shift; OUTDIR=${1:-} ;;
        --out=*) OUTDIR=${1#*=} ;;
        --budget) shift; BUDGET=${1:-} ;;
        --budget=*) BUDGET=${1#*=} ;;
        -h | --help) usage; exit "$EXIT_OK" ;;
        *) echo "gpu_check.sh: unknown argument '$1' (see --help)" >&2; exit "$EXIT_USAGE" ;;
    esac
    shift
done
if [[ -z $PY || -z $OUTDIR ]]; then
    echo "gpu_check.sh: --python and --out need a value" >&2
    exit "$EXIT_USAGE"
fi
if ! [[ $BUDGET =~ ^[0-9]+$ ]] || ((BUDGET < 60)); then
    echo "gpu_check.sh: the budget must be a whole number of seconds >= 60, got '$BUDGET'" >&2
    exit "$EXIT_USAGE"
fi
# relative paths are the caller's, not the repository's (this script runs from the root)
case $OUTDIR in /*) ;; *) OUTDIR=$CALLER_PWD/$OUTDIR ;; esac
[[ $PY == */* && $PY != /* ]] && PY=$CALLER_PWD/$PY

# --------------------------------------------------------------------------------------
# The plan. Each part has a ceiling; the whole run also has a budget (an H100 run must
# end within 8 minutes), so a part gets min(its ceiling, what the budget has left), and the
# parts before the benchmark leave it BENCH_RESERVE_S so that the numbers always come.
# --------------------------------------------------------------------------------------
BENCH_RESERVE_S=120
MIN_PART_S=20           # a part with less time than this would only time out
TEST_TIMEOUT_S=120      # one test (pytest-timeout, when installed): a hang fails one test
PREFLIGHT_MAX_S=60
INSTALL_MAX_S=300
BUILD_MAX_S=90
BUILD_FALLBACK_MAX_S=240
BENCH_MAX_S=180

CORES=$(nproc 2>/dev/null || echo 2)
WORKERS=${GPU_CHECK_WORKERS:-$((CORES / 2 < 8 ? CORES / 2 : 8))}
if ! [[ $WORKERS =~ ^[0-9]+$ ]]; then
    echo "gpu_check.sh: GPU_CHECK_WORKERS must be a whole number, got '$WORKERS'" >&2
    exit "$EXIT_USAGE"
fi
((WORKERS < 1)) && WORKERS=1

# Test groups: a -k expression over the listed files. Names are qualified by module so
# that a word of one file cannot select tests of another (every test in test_gpu_only.py
# has "gpu" in its module name, for instance).
OP_TESTS="tests/test_op_*.py"
TEST_GROUPS=(sync-free cuda-graph cuda triton kron+class-head compile)
declare -A G_FILES G_K G_MAX G_WORKERS G_WHAT
G_WHAT[sync-free]="KalmanNGD.step (loss, dense batch, tracked Kronecker) and the class-head step under torch.cuda.set_sync_debug_mode('error'), triton and cuda backends"
G_FILES[sync-free]="tests/test_gpu_only.py"
G_K[sync-free]="test_gpu_only and sync_free"
G_MAX[sync-free]=90
G_WORKERS[sync-free]=1

G_WHAT[cuda-graph]="a whole KalmanNGD.step captured in a CUDA graph and replayed vs the reference backend; the loss step's graph capture vs eager"
G_FILES[cuda-graph]="tests/test_gpu_only.py tests/test_cuda_backend.py"
G_K[cuda-graph]="(test_gpu_only and cuda_graph) or (test_cuda_backend and test_gpu and graph and not fullgraph)"
G_MAX[cuda-graph]=90
G_WORKERS[cuda-graph]=1

G_WHAT[cuda]="the cuda backend: every op vs the float64 reference on the GPU (all dtypes, odd sizes, NaN, skip predicate), bit-identical reruns, KalmanNGD end to end"
G_FILES[cuda]="tests/test_cuda_backend.py $OP_TESTS"
G_K[cuda]="(test_cuda_backend and (test_gpu or registers) and not graph) or (test_op_ and not test_op_compile and cuda and not emulated)"
G_MAX[cuda]=180
G_WORKERS[cuda]=$WORKERS

G_WHAT[triton]="the triton backend on the GPU: every op vs the float64 reference, its registry and compile tests"
G_FILES[triton]="tests/test_triton_backend.py $OP_TESTS"
G_K[triton]="test_triton_backend or (test_op_ and not test_op_compile and triton)"
G_MAX[triton]=180
G_WORKERS[triton]=$WORKERS

G_WHAT[kron+class-head]="grouped Kronecker updates (op level and tracked KalmanNGD) and the class-head update on CUDA tensors vs the float64 reference"
G_FILES[kron+class-head]="tests/test_kron_grouped.py tests/test_gpu_only.py"
G_K[kron+class-head]="(test_kron_grouped and (triton or cuda) and not emulated) or (test_gpu_only and (test_kron or class_head_matches))"
G_MAX[kron+class-head]=120
G_WORKERS[kron+class-head]=$WORKERS

G_WHAT[compile]="torch.compile(fullgraph=True) on CUDA tensors (aot_eager and inductor) of the ops and the public steps"
G_FILES[compile]="tests/test_op_compile.py tests/test_cuda_backend.py tests/test_gpu_only.py"
G_K[compile]="(test_op_compile and (triton or cuda) and not emulated) or (test_cuda_backend and inductor) or (test_gpu_only and fullgraph)"
G_MAX[compile]=180
G_WORKERS[compile]=$WORKERS

ALL_PARTS=(preflight install build)
for g in "${TEST_GROUPS[@]}"; do ALL_PARTS+=("test:$g"); done
ALL_PARTS+=(benchmark)

BENCH_ARGS=(-m benchmarks.gpu --json "$OUTDIR/gpu_bench.json")
((FULL_BENCH)) || BENCH_ARGS+=(--quick)

print_plan() {
    echo "GPU check plan (nothing is run with --dry-run):"
    echo "  python:  $PY"
    echo "  output:  $OUTDIR"
    echo "  budget:  ${BUDGET} s for the whole run (the benchmark keeps ${BENCH_RESERVE_S} s of it)"
    echo "  parts, in order (ceiling in seconds):"
    echo "  preflight   (${PREFLIGHT_MAX_S})  $PY: torch, a visible GPU and its compute capability, triton, pytest, pip, setuptools, ninja, nvcc"
    echo "  install     (${INSTALL_MAX_S})  TORCH_CUDA_ARCH_LIST=<the GPU's capability> MAX_JOBS=$CORES $PY -m pip install -v --no-index --no-build-isolation --no-deps -e .  > install.log"
    echo "  build       (${BUILD_MAX_S})  import kalman_kernels; the triton and cuda backends available, the extension compiled for the GPU's architecture, one op of each on the GPU vs the reference (after a failed install: $PY setup.py build_ext --inplace first, ceiling ${BUILD_FALLBACK_MAX_S})"
    local g
    for g in "${TEST_GROUPS[@]}"; do
        local workers=${G_WORKERS[$g]}
        printf '  test:%-15s (%s)  %s\n' "$g" "${G_MAX[$g]}" "${G_WHAT[$g]}"
        printf '      %s -m pytest -q -k "%s" %s%s\n' "$PY" "${G_K[$g]}" "${G_FILES[$g]}" \
            "$( ((workers > 1)) && echo " -n $workers (when pytest-xdist is installed)")"
    done
    echo "  benchmark   (${BENCH_MAX_S})  $PY ${BENCH_ARGS[*]}"
    echo "  report      $OUTDIR/gpu_check.json, gpu_check.md, gpu_check.log, install.log, gpu_bench.json"
    echo "Exit status: 0 all parts passed, 1 a part failed / timed out / was not reached, 2 bad arguments, 3 no CUDA GPU visible (nothing run), 4 the Python cannot run the check."
}

if ((DRY_RUN)); then
    print_plan
    exit "$EXIT_OK"
fi

if ! command -v "$PY" >/dev/null 2>&1; then
    echo "gpu_check.sh: no Python '$PY' here; set PYTHON (or --python) to the Python that has torch" >&2
    exit "$EXIT_NO_PYTHON"
fi

# The tests find the package in the source tree even where the editable install could not
# be made (the build part then builds the extensions in place).
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
# Triton's interpreter is for machines without a GPU; here the kernels must really run.
unset TRITON_INTERPRET

# --------------------------------------------------------------------------------------
# --collect: check, without a GPU, that every test group still selects tests
# --------------------------------------------------------------------------------------
if ((COLLECT)); then
    WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
    trap 'rm -rf "$WORK"' EXIT
    # One collection of every file, with pytest's own -k matcher applied per group by a small
    # plugin: one torch import instead of one per group (the imports are most of the time).
    union=()
    for g in "${TEST_GROUPS[@]}"; do
        # shellcheck disable=SC2206  # the file lists are globs, expanded on purpose
        files=(${G_FILES[$g]})
        printf '%s\t%s\t%s\n' "$g" "${G_K[$g]}" "${files[*]}" >>"$WORK/groups.tsv"
        union+=("${files[@]}")
    done
    mapfile -t union < <(printf '%s\n' "${union[@]}" | sort -u)
    cat >"$WORK/gpu_check_collect.py" <<'PYEOF'
import json, os
from pathlib import Path


def pytest_collection_modifyitems(session, config, items):
    from _pytest.mark import KeywordMatcher
    from _pytest.mark.expression import Expression
    work = Path(os.environ["GPU_CHECK_WORK"])
    counts = {}
    for line in (work / "groups.tsv").read_text().splitlines():
        name, expr, files = line.split("\t")
        allowed = {Path(f).resolve() for f in files.split()}
        compiled = Expression.compile(expr)
        counts[name] = sum(1 for item in items if Path(item.path).resolve() in allowed
                           and compiled.evaluate(KeywordMatcher.from_item(item)))
    (work / "counts.json").write_text(json.dumps(counts))
PYEOF
    GPU_CHECK_WORK=$WORK PYTHONPATH="$WORK:$PYTHONPATH" "$PY" -m pytest --collect-only -q \
        -p no:cacheprovider -p gpu_check_collect "${union[@]}" >"$WORK/collect.out" 2>&1
    rc=$?
    if [[ ! -s $WORK/counts.json ]]; then
        echo "pytest could not collect the test files (exit $rc):"
        tail -n 15 "$WORK/collect.out"
        exit "$EXIT_FAILED"
    fi
    bad=0
    for g in "${TEST_GROUPS[@]}"; do
        count=$("$PY" -c 'import json, sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])' \
            "$WORK/counts.json" "$g")
        if ((count == 0)); then
            bad=1
            printf 'test:%-15s selects NOTHING: update its -k expression or files in benchmarks/gpu_check.sh\n' "$g"
        else
            printf 'test:%-15s selects %s tests\n' "$g" "$count"
        fi
    done
    exit $((bad ? EXIT_FAILED : EXIT_OK))
fi

# --------------------------------------------------------------------------------------
# Output, log, bookkeeping
# --------------------------------------------------------------------------------------
mkdir -p "$OUTDIR" || { echo "gpu_check.sh: cannot create the output folder $OUTDIR" >&2; exit "$EXIT_USAGE"; }
rm -f "$OUTDIR"/{gpu_check.json,gpu_check.md,gpu_check.log,install.log,build.log,gpu_bench.json}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
LOG=$OUTDIR/gpu_check.log
exec > >(tee -a "$LOG") 2>&1

START_UTC=$(date -u +%Y-%m-%dT%H:%M:%SZ)
DEADLINE=$((SECONDS + BUDGET))
: >"$WORK/parts.tsv"
FAILED=0
INCOMPLETE=0

banner() { printf '\n==== %s ====\n' "$*"; }

write_report() {    # status exit_code
    "$PY" - "$WORK" "$OUTDIR" "$1" "$2" "$START_UTC" "$BUDGET" "$PY" <<'PYEOF' || echo "(could not write the report: see above)"
import json, os, sys, time
work, outdir, status, code, started, budget, python = sys.argv[1:8]
parts = []
with open(os.path.join(work, "parts.tsv")) as fh:
    for line in fh:
        name, result, seconds, detail = (line.rstrip("\n").split("\t") + [""] * 4)[:4]
        parts.append({"part": name, "result": result, "seconds": int(seconds or 0),
                      "detail": detail})
pre = {}
try:
    with open(os.path.join(work, "preflight.json")) as fh:
        pre = json.load(fh)
except (OSError, ValueError):
    pass
bench = None
try:
    with open(os.path.join(outdir, "gpu_bench.json")) as fh:
        bench = json.load(fh)
except (OSError, ValueError):
    pass
report = {"status": status, "exit_code": int(code), "started_utc": started,
          "written_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
          "budget_s": int(budget), "python": python, "environment": pre, "parts": parts,
          "benchmark": bench}
with open(os.path.join(outdir, "gpu_check.json"), "w") as fh:
    json.dump(report, fh, indent=1, default=str)

def cell(x):
    return str(x).replace("|", "\\|")

lines = [f"# GPU check: {pre.get('gpu_name') or 'no GPU'} ({started})", "",
         f"python {pre.get('python_version', '?')}, torch {pre.get('torch') or '-'} "
         f"(CUDA {pre.get('torch_cuda') or '-'}), triton {pre.get('triton') or '-'}, "
         f"nvcc {pre.get('nvcc_version') or '-'}; status **{status}**, exit {code}", "",
         "| part | result | seconds | detail |", "| --- | --- | ---: | --- |"]
lines += [f"| {p['part']} | {p['result']} | {p['seconds']} | {cell(p['detail'])} |" for p in parts]
if bench:
    checks = bench.get("checks") or []
    bad = sum(1 for c in checks if not c.get("passed"))
    lines += ["", f"## Benchmark ({bench.get('device')}, torch {bench.get('torch')})", "",
              f"checks against the float64 reference: {len(checks) - bad} passed, {bad} failed",
              "", "| backend | op | path | n | m | ms | GB/s | of copy | GFLOP/s | of mm | / AdamW | note |",
              "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    def num(x, fmt):
        return "" if x is None else format(x, fmt)
    for r in bench.get("rows") or []:
        lines.append(f"| {r['backend']} | {cell(r['op'])} | {r['path']} | {r['n']} | {r['m']} | "
                     f"{num(r['ms'], '.4f')} | {num(r['gbps'], '.1f')} | {num(r['frac_copy'], '.2f')} | "
                     f"{num(r['gflops'], '.1f')} | {num(r.get('frac_mm'), '.2f')} | "
                     f"{num(r.get('vs_adamw'), '.2f')} | {cell(r.get('note', ''))} |")
with open(os.path.join(outdir, "gpu_check.md"), "w") as fh:
    fh.write("\n".join(lines) + "\n")
PYEOF
}

record() {          # part result seconds detail [quiet]
    local detail=${4//$'\t'/ }
    detail=${detail//$'\n'/ }
    printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$detail" >>"$WORK/parts.tsv"
    [[ $2 == FAIL ]] && FAILED=1
    [[ -n ${5:-} ]] && return
    printf '\n>>> %s: %s (%s s)%s\n' "$1" "$2" "$3" "${detail:+ - $detail}"
    # after every part, so that a run stopped from outside still leaves its results
    write_report running 0
}

part_timeout() {    # ceiling reserve -> seconds this part may run (0: none left)
    local left=$((DEADLINE - SECONDS - $2))
    ((left > $1)) && left=$1
    ((left < MIN_PART_S)) && left=0
    echo "$left"
}

skip_for_time() {
    INCOMPLETE=1
    record "$1" SKIP 0 "not reached: the time budget (${BUDGET} s) was spent; rerun with --budget or --skip-install"
}

timed_out() { [[ $1 == 124 || $1 == 137 ]]; }

# Every command runs under `timeout`, which puts itself and the command (pytest's workers
# included) in a process group of their own and kills that group at the limit. Run in the
# background and waited for, so that an interrupt of this script reaches the trap at once
# and the trap can end that group too.
CHILD=""
run_limited() {     # seconds command... -> the command's exit status (124 / 137: timed out)
    # (<&0: a background command would otherwise read /dev/null, not a here-document)
    timeout -k 5 "$1" "${@:2}" <&0 &
    CHILD=$!
    wait "$CHILD"
    local rc=$?
    CHILD=""
    return "$rc"
}

summary_and_exit() {    # exit code; status word
    local code=$1 status=$2
    banner "GPU check summary${PF_GPU_NAME:+: $PF_GPU_NAME}"
    printf '%-22s %-6s %7s  %s\n' part result seconds detail
    local name result seconds detail
    while IFS=$'\t' read -r name result seconds detail; do
        printf '%-22s %-6s %7s  %s\n' "$name" "$result" "$seconds" "$detail"
    done <"$WORK/parts.tsv"
    local p
    for p in "${ALL_PARTS[@]}"; do
        grep -q "^$p"$'\t' "$WORK/parts.tsv" || printf '%-22s %-6s %7s  %s\n' "$p" "-" "" "not run"
    done
    echo
    if ((code == EXIT_OK)); then
        echo "GPU check PASSED: every part passed (total $((SECONDS)) s)."
    elif ((code == EXIT_NO_GPU)); then
        echo "GPU check NOT RUN (exit $code): no CUDA GPU visible; only the Python was checked."
    else
        local failed
        failed=$(awk -F'\t' '$2 == "FAIL" {printf "%s%s", sep, $1; sep = ", "}' "$WORK/parts.tsv")
        echo "GPU check FAILED (exit $code)${failed:+: failed parts: $failed}$( ((INCOMPLETE)) && echo "; some parts were not reached in the time budget") (total $((SECONDS)) s)."
    fi
    echo "Report: $OUTDIR/gpu_check.json, $OUTDIR/gpu_check.md; log: $LOG"
    write_report "$status" "$code"
    exit "$code"
}

on_signal() {
    if [[ -n $CHILD ]]; then
        kill -TERM -- "-$CHILD" 2>/dev/null || kill -TERM "$CHILD" 2>/dev/null
    fi
    echo
    echo "gpu_check.sh: interrupted; the report holds the parts finished so far"
    write_report interrupted 130
    exit 130
}
trap on_signal INT TERM

# --------------------------------------------------------------------------------------
# 1. preflight: what this Python has, and whether a GPU is visible
# --------------------------------------------------------------------------------------
banner "preflight: $PY"
t0=$SECONDS
run_limited "$PREFLIGHT_MAX_S" "$PY" - "$WORK" >"$WORK/preflight.sh" 2>"$WORK/preflight.err" <<'PYEOF'
import importlib.metadata, json, os, re, shlex, shutil, subprocess, sys, sysconfig
work = sys.argv[1]
env = {"python": sys.executable, "python_version": sys.version.split()[0],
       "scripts": sysconfig.get_path("scripts") or ""}

def version(dist):
    # the installed distribution's metadata: importing pip and setuptools side by side
    # can fail on its own (their distutils shims), and imports cost seconds
    try:
        return importlib.metadata.version(dist)
    except Exception:
        return ""

try:
    import torch
    env["torch"] = torch.__version__
    env["torch_cuda"] = torch.version.cuda or ""
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    env["gpu_count"] = count
    if count:
        props = torch.cuda.get_device_properties(0)
        major, minor = torch.cuda.get_device_capability(0)
        env.update(gpu_name=props.name, gpu_capability=f"{major}.{minor}",
                   gpu_memory_gb=round(props.total_memory / 2**30, 1),
                   gpu_multiprocessors=props.multi_processor_count)
except Exception as exc:   # torch missing or broken: the caller says so
    env["torch"] = ""
    env["torch_error"] = f"{type(exc).__name__}: {exc}"
    env["gpu_count"] = 0
for key, dist in [("triton", "triton"), ("pytest", "pytest"), ("xdist", "pytest-xdist"),
                  ("pytest_timeout", "pytest-timeout"), ("pytest_benchmark", "pytest-benchmark"),
                  ("pybind11", "pybind11"), ("pip", "pip"), ("setuptools", "setuptools"),
                  ("wheel", "wheel"), ("numpy", "numpy"), ("scipy", "scipy")]:
    env[key] = version(dist)
# torch's extension builder runs the `ninja` program: it must be on PATH (the Python's own
# scripts folder is put on PATH by the caller)
path = os.pathsep.join([env["scripts"], os.environ.get("PATH", "")])
env["ninja"] = shutil.which("ninja", path=path) or ""
# the toolkit setup.py will find: CUDA_HOME / CUDA_PATH, the nvcc on PATH, /usr/local/cuda
nvcc = ""
for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")):
    if root and os.path.isfile(os.path.join(root, "bin", "nvcc")):
        nvcc = os.path.join(root, "bin", "nvcc")
        break
nvcc = nvcc or shutil.which("nvcc", path=path) or (
    "/usr/local/cuda/bin/nvcc" if os.path.isfile("/usr/local/cuda/bin/nvcc") else "")
env["cuda_home_hint"] = ""
if not nvcc:
    # a versioned toolkit folder that none of setup.py's places points to: the caller
    # exports CUDA_HOME for it (newest version first)
    import glob
    found = sorted(glob.glob("/usr/local/cuda-*/bin/nvcc"),
                   key=lambda p: [int(x) for x in re.findall(r"\d+", p)], reverse=True)
    if found:
        nvcc = found[0]
        env["cuda_home_hint"] = os.path.dirname(os.path.dirname(nvcc))
env["nvcc"] = nvcc
env["nvcc_version"] = ""
if nvcc:
    try:
        text = subprocess.run([nvcc, "--version"], capture_output=True, text=True,
                              timeout=30).stdout
        m = re.search(r"release (\d+\.\d+)", text)
        env["nvcc_version"] = m.group(1) if m else "?"
    except (OSError, subprocess.SubprocessError):
        env["nvcc_version"] = "?"
with open(os.path.join(work, "preflight.json"), "w") as fh:
    json.dump(env, fh, indent=1)
for key, value in env.items():
    print(f"PF_{key.upper()}={shlex.quote(str(value))}")
PYEOF
rc=$?
if ((rc != 0)) || [[ ! -s $WORK/preflight.sh ]]; then
    cat "$WORK/preflight.err"
    echo "gpu_check.sh: '$PY' could not run the preflight probe (exit $rc): see above. Set PYTHON (or --python) to the Python that has torch."
    exit "$EXIT_NO_PYTHON"
fi
# shellcheck disable=SC1091  # written just above, every value quoted by shlex.quote
source "$WORK/preflight.sh"
[[ -n ${PF_SCRIPTS:-} ]] && export PATH="$PF_SCRIPTS:$PATH"
if [[ -n ${PF_CUDA_HOME_HINT:-} && -z ${CUDA_HOME:-} ]]; then
    echo "CUDA toolkit found at $PF_CUDA_HOME_HINT only (not on PATH, no /usr/local/cuda): exporting CUDA_HOME for setup.py"
    export CUDA_HOME=$PF_CUDA_HOME_HINT
fi

if [[ -z $PF_TORCH ]]; then
    echo "gpu_check.sh: torch cannot be imported by $PF_PYTHON ($PF_TORCH_ERROR)."
    echo "The GPU check needs a Python with a CUDA build of torch: set PYTHON (or --python) to it."
    record preflight FAIL $((SECONDS - t0)) "torch cannot be imported: $PF_TORCH_ERROR"
    summary_and_exit "$EXIT_NO_PYTHON" no_torch
fi

have=() missing=() missing_names=()
check_tool() {      # label value why-needed
    if [[ -n $2 ]]; then
        have+=("$1 $2")
    else
        missing+=("$1 ($3)")
        missing_names+=("$1")
    fi
}
check_tool triton "$PF_TRITON" "the triton backend and inductor"
check_tool pytest "$PF_PYTEST" "every test group"
check_tool pip "$PF_PIP" "the install"
check_tool setuptools "$PF_SETUPTOOLS" "the install"
check_tool wheel "$PF_WHEEL" "the install"
check_tool ninja "$PF_NINJA" "the extension build"
check_tool nvcc "${PF_NVCC:+$PF_NVCC_VERSION ($PF_NVCC)}" "the CUDA extension; set CUDA_HOME to the toolkit"
check_tool pytest-benchmark "$PF_PYTEST_BENCHMARK" "optional"
check_tool pytest-xdist "$PF_XDIST" "optional: large groups run in one process"
check_tool pytest-timeout "$PF_PYTEST_TIMEOUT" "optional: a hung test stops its whole group"
echo "python $PF_PYTHON_VERSION ($PF_PYTHON); torch $PF_TORCH (CUDA ${PF_TORCH_CUDA:-none})"
echo "present: $(IFS=,; echo "${have[*]}" | sed 's/,/, /g')"
((${#missing[@]})) && echo "missing: $(IFS=';'; echo "${missing[*]}" | sed 's/;/; /g')"

if ((PF_GPU_COUNT == 0)); then
    echo
    echo "no CUDA GPU visible: the GPU check needs one NVIDIA GPU; nothing was run."
    if [[ -z $PF_TORCH_CUDA ]]; then
        echo "  torch $PF_TORCH is a CPU-only build: the GPU machine's Python needs a CUDA build of torch."
    elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q GPU; then
        echo "  nvidia-smi lists a GPU but torch cannot use it: check CUDA_VISIBLE_DEVICES and that the driver supports CUDA $PF_TORCH_CUDA."
    else
        echo "  torch.cuda.is_available() is False (torch $PF_TORCH, CUDA $PF_TORCH_CUDA)."
    fi
    if [[ -s $WORK/preflight.err ]]; then
        echo "  what torch said while looking for a GPU:"
        tail -n 5 "$WORK/preflight.err" | sed 's/^/    /'
    fi
    echo "  Run it on a machine with one NVIDIA GPU: bash benchmarks/gpu_check.sh (docs/cuda_backend.md, 'Running the GPU check'); exit status $EXIT_NO_GPU."
    record preflight PASS $((SECONDS - t0)) "torch $PF_TORCH; no CUDA GPU visible${missing_names:+; missing: ${missing_names[*]}}"
    for p in "${ALL_PARTS[@]:1}"; do
        record "$p" SKIP 0 "no CUDA GPU visible" quiet
    done
    summary_and_exit "$EXIT_NO_GPU" no_gpu
fi

pre_problems=()
[[ -z $PF_TRITON ]] && pre_problems+=("triton is not installed")
[[ -z $PF_PYTEST ]] && pre_problems+=("pytest is not installed")
[[ -z $PF_PIP ]] && pre_problems+=("pip is not installed")
[[ -z $PF_NINJA ]] && pre_problems+=("no ninja program on PATH")
if [[ -z $PF_NVCC ]]; then
    pre_problems+=("no nvcc found (CUDA_HOME, PATH, /usr/local/cuda): set CUDA_HOME to the CUDA toolkit")
elif [[ ${PF_NVCC_VERSION%%.*} != "${PF_TORCH_CUDA%%.*}" ]]; then
    pre_problems+=("nvcc is CUDA $PF_NVCC_VERSION but torch was built with CUDA $PF_TORCH_CUDA (the major versions must match): set CUDA_HOME to a matching toolkit")
fi
GPU_DETAIL="$PF_GPU_NAME (sm_${PF_GPU_CAPABILITY/./}, ${PF_GPU_MEMORY_GB} GiB)"
echo "GPU: $GPU_DETAIL; $PF_GPU_COUNT visible"
if ((${#pre_problems[@]})); then
    record preflight FAIL $((SECONDS - t0)) "$GPU_DETAIL; $(IFS=';'; echo "${pre_problems[*]}")"
else
    record preflight PASS $((SECONDS - t0)) "$GPU_DETAIL; torch $PF_TORCH, triton $PF_TRITON, nvcc $PF_NVCC_VERSION"
fi

# --------------------------------------------------------------------------------------
# 2. install: no downloads, the CUDA extension built for this GPU only
# --------------------------------------------------------------------------------------
ARCH=${TORCH_CUDA_ARCH_LIST:-$PF_GPU_CAPABILITY}
BUILD_ENV=(TORCH_CUDA_ARCH_LIST="$ARCH" MAX_JOBS="${MAX_JOBS:-$CORES}"
    PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore PIP_NO_INPUT=1)
INSTALLED=0
banner "install: pip install -e . (TORCH_CUDA_ARCH_LIST=$ARCH)"
t0=$SECONDS
if ((SKIP_INSTALL)); then
    INSTALLED=1
    record install SKIP 0 "--skip-install: using the package as it is installed"
elif [[ -z $PF_PIP ]]; then
    record install FAIL 0 "pip is not installed in $PY"
else
    t=$(part_timeout "$INSTALL_MAX_S" "$BENCH_RESERVE_S")
    if ((t == 0)); then
        skip_for_time install
    else
        echo "+ ${BUILD_ENV[*]} $PY -m pip install -v --no-index --no-build-isolation --no-deps -e .  (log: $OUTDIR/install.log)"
        rc=0
        run_limited "$t" env "${BUILD_ENV[@]}" "$PY" -m pip install -v --no-index \
            --no-build-isolation --no-deps -e . >"$OUTDIR/install.log" 2>&1 || rc=$?
        # setup.py's own account of what it built and why
        grep -E "kalman_kernels setup:|kalman_kernels: .*(FAILED|is set)" "$OUTDIR/install.log" | sort -u
        if ((rc == 0)); then
            INSTALLED=1
            record install PASS $((SECONDS - t0)) "editable install into $PF_PYTHON"
        else
            tail -n 40 "$OUTDIR/install.log"
            if timed_out "$rc"; then
                record install FAIL $((SECONDS - t0)) "timed out after ${t} s (see install.log)"
            else
                record install FAIL $((SECONDS - t0)) "pip exit $rc (see install.log)"
            fi
        fi
    fi
fi

# --------------------------------------------------------------------------------------
# 3. build: the backends load, the extension has this GPU's architecture, kernels run
# --------------------------------------------------------------------------------------
banner "build: the compiled backends on $PF_GPU_NAME"
t0=$SECONDS
PACKAGE_OK=0
build_max=$BUILD_MAX_S
((INSTALLED)) || build_max=$BUILD_FALLBACK_MAX_S
t=$(part_timeout "$build_max" "$BENCH_RESERVE_S")
if ((t == 0)); then
    skip_for_time build
else
    fallback_note=""
    if ((!INSTALLED)); then
        # the install failed (pip, setuptools, a read-only site-packages): build in place,
        # the tests then import the package from the source tree (PYTHONPATH)
        echo "+ ${BUILD_ENV[*]} $PY setup.py build_ext --inplace  (log: $OUTDIR/build.log)"
        rc=0
        run_limited "$t" env "${BUILD_ENV[@]}" "$PY" setup.py build_ext --inplace \
            >"$OUTDIR/build.log" 2>&1 || rc=$?
        grep -E "kalman_kernels setup:|kalman_kernels: .*FAILED" "$OUTDIR/build.log" | sort -u
        ((rc == 0)) || tail -n 30 "$OUTDIR/build.log"
        fallback_note="in-place build after the failed install (exit $rc); "
        t=$(part_timeout 60 0)
        ((t == 0)) && t=$MIN_PART_S
    fi
    rc=0
    run_limited "$t" "$PY" - <<'PYEOF' || rc=$?
import sys
import torch
try:
    import kalman_kernels as kk
except Exception as exc:
    print(f"BUILD: import kalman_kernels failed: {type(exc).__name__}: {exc}")
    sys.exit(3)
from kalman_kernels.backends import _load
import kalman_kernels.reference as ref
try:
    from kalman_kernels import _build_info
    print(f"setup.py recorded: CPP_BUILD={_build_info.CPP_BUILD!r}; CUDA_BUILD={_build_info.CUDA_BUILD!r}")
except ImportError:
    print("setup.py recorded nothing (kalman_kernels/_build_info.py is missing)")
print(f"kalman_kernels from {kk.__file__}; backends {kk.backends()}")
problems = []
for name, why in kk.backend_errors().items():
    if name in ("triton", "cuda"):
        problems.append(f"{name} unavailable: {why}")
major, minor = torch.cuda.get_device_capability()
cuda_module, _ = _load("cuda")
if cuda_module is not None:
    archs = [a.strip() for a in cuda_module.compiled_archs().split(",") if a.strip()]
    print(f"the CUDA extension is compiled for {archs}; the GPU is sm_{major}{minor}")
    if f"{major}{minor}0" not in archs:
        problems.append(f"the CUDA extension has no sm_{major}{minor} code ({archs}): set "
                        f"TORCH_CUDA_ARCH_LIST={major}.{minor} and reinstall")
grads = [torch.randn(100_003, device="cuda"), torch.randn(37, device="cuda")]
covs = [torch.rand_like(g) + 0.05 for g in grads]
want = float(ref.loss_quad_form([g.double().cpu() for g in grads],
                                [c.double().cpu() for c in covs], 0.9, 0.01))
for name in ("triton", "cuda"):
    module, _ = _load(name)
    if module is None:
        continue
    try:
        got = float(module.loss_quad_form(grads, covs, 0.9, 0.01))
    except Exception as exc:
        problems.append(f"{name}: a kernel failed on the GPU: {type(exc).__name__}: {exc}")
        continue
    err = abs(got - want) / abs(want)
    print(f"{name}: loss_quad_form on the GPU, relative error {err:.1e} vs the float64 reference")
    if not err <= 1e-5:
        problems.append(f"{name}: loss_quad_form is off by {err:.1e} (tolerance 1e-5)")
for p in problems:
    print(f"BUILD: {p}")
sys.exit(1 if problems else 0)
PYEOF
    if ((rc == 3)); then
        record build FAIL $((SECONDS - t0)) "${fallback_note}kalman_kernels cannot be imported (see above)"
    elif timed_out "$rc"; then
        PACKAGE_OK=1
        record build FAIL $((SECONDS - t0)) "${fallback_note}the check timed out after ${t} s"
    elif ((rc != 0)); then
        PACKAGE_OK=1
        record build FAIL $((SECONDS - t0)) "${fallback_note}a GPU backend is missing or wrong (BUILD: lines above)"
    else
        PACKAGE_OK=1
        record build PASS $((SECONDS - t0)) "${fallback_note}triton and cuda load; extension compiled for sm_${PF_GPU_CAPABILITY/./}"
    fi
fi

# --------------------------------------------------------------------------------------
# 4. test groups
# --------------------------------------------------------------------------------------
junit_counts() {    # junit.xml -> "passed failed errors skipped" (empty when unreadable)
    "$PY" - "$1" <<'PYEOF' 2>/dev/null
import sys
import xml.etree.ElementTree as ET
root = ET.parse(sys.argv[1]).getroot()
suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
tests = failures = errors = skipped = 0
for s in suites:
    tests += int(s.get("tests", 0)); failures += int(s.get("failures", 0))
    errors += int(s.get("errors", 0)); skipped += int(s.get("skipped", 0))
print(tests - failures - errors - skipped, failures, errors, skipped)
PYEOF
}

run_group() {
    local g=$1 part="test:$1"
    banner "$part: ${G_WHAT[$g]}"
    if [[ -z $PF_PYTEST ]]; then
        record "$part" SKIP 0 "pytest is not installed in $PY"
        return
    fi
    if ((!PACKAGE_OK)); then
        record "$part" SKIP 0 "kalman_kernels is not importable (see install / build)"
        return
    fi
    local t
    t=$(part_timeout "${G_MAX[$g]}" "$BENCH_RESERVE_S")
    if ((t == 0)); then
        skip_for_time "$part"
        return
    fi
    local junit="$WORK/junit-${g//[^a-z]/_}.xml"
    local args=(-m pytest -q -p no:cacheprovider --tb=short -rfEs --junitxml="$junit" -k "${G_K[$g]}")
    local workers=${G_WORKERS[$g]}
    if ((workers > 1)) && [[ -n $PF_XDIST ]]; then
        args+=(-n "$workers")
    fi
    [[ -n $PF_PYTEST_TIMEOUT ]] && args+=(--timeout="$TEST_TIMEOUT_S")
    # shellcheck disable=SC2206  # the file lists are globs, split on purpose
    args+=(${G_FILES[$g]})
    echo "+ KALMAN_KERNELS_REQUIRE_CUDA_BUILD=1 $(printf '%q ' "$PY" "${args[@]}")"
    local t0=$SECONDS rc=0
    # a missing CUDA extension must fail the cuda tests here, not skip them
    run_limited "$t" env KALMAN_KERNELS_REQUIRE_CUDA_BUILD=1 "$PY" "${args[@]}" || rc=$?
    local secs=$((SECONDS - t0)) passed failed errors skipped
    read -r passed failed errors skipped <<<"$(junit_counts "$junit")"
    local counts="${passed:-?} passed, ${failed:-?} failed, ${errors:-?} errors, ${skipped:-?} skipped"
    if timed_out "$rc"; then
        record "$part" FAIL "$secs" "timed out after ${t} s (ceiling ${G_MAX[$g]} s or the budget)"
    elif ((rc == 5)); then
        record "$part" FAIL "$secs" "no test selected: its -k expression or files in benchmarks/gpu_check.sh are out of date"
    elif ((rc == 0)) && [[ ${passed:-0} == 0 ]]; then
        record "$part" FAIL "$secs" "every selected test was skipped ($counts): on a GPU they must run (reasons above)"
    elif ((rc == 0)); then
        record "$part" PASS "$secs" "$counts"
    else
        record "$part" FAIL "$secs" "$counts (pytest exit $rc)"
    fi
}

for g in "${TEST_GROUPS[@]}"; do
    run_group "$g"
done

# --------------------------------------------------------------------------------------
# 5. benchmark
# --------------------------------------------------------------------------------------
banner "benchmark: $PY ${BENCH_ARGS[*]}"
t0=$SECONDS
if ((!PACKAGE_OK)); then
    record benchmark SKIP 0 "kalman_kernels is not importable (see install / build)"
else
    t=$(part_timeout "$BENCH_MAX_S" 0)
    if ((t == 0)); then
        skip_for_time benchmark
    else
        rc=0
        run_limited "$t" "$PY" "${BENCH_ARGS[@]}" || rc=$?
        secs=$((SECONDS - t0))
        rows=$("$PY" - "$OUTDIR/gpu_bench.json" 2>/dev/null <<'PYEOF'
import json, sys
with open(sys.argv[1]) as fh:
    d = json.load(fh)
rows = d.get("rows") or []
bad = sum(1 for r in rows if str(r.get("note", "")).startswith("failed"))
checks = d.get("checks") or []
ok = sum(1 for c in checks if c.get("passed"))
print(f"{len(rows)} rows ({bad} failed to run), {ok}/{len(checks)} reference checks passed")
PYEOF
)
        if timed_out "$rc"; then
            record benchmark FAIL "$secs" "timed out after ${t} s; no numbers written (rerun with more --budget)"
        elif ((rc != 0)); then
            record benchmark FAIL "$secs" "exit $rc: a check against the float64 reference failed or no GPU backend loaded${rows:+; $rows}"
        elif [[ -z $rows ]]; then
            record benchmark FAIL "$secs" "exit 0 but no readable $OUTDIR/gpu_bench.json"
        else
            record benchmark PASS "$secs" "$rows"
        fi
    fi
fi

if ((FAILED || INCOMPLETE)); then
    summary_and_exit "$EXIT_FAILED" failed
fi
summary_and_exit "$EXIT_OK" passed

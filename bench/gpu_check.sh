#!/usr/bin/env bash
# ONE prepared check of moemesh on one NVIDIA GPU (issue 13), for a machine with a CUDA build of torch, Triton and no
# network: every step of bench/gpu_check.py as its own process under a time cap, all within GPU_CHECK_BUDGET seconds
# (default 450: the whole check ends in under 8 minutes), one line per step on stdout
#     NAME  PASS|FAIL|SKIP  SECONDS  KEY FIGURE (and the step's rule)
# then a summary line, and the JSON report REPORT (default OUT_DIR/gpu_check.json; schema in bench/README.md).
#
#   bench/gpu_check.sh [OUT_DIR]                         every step; default OUT_DIR: REPO/out/gpu_check (git-ignored)
#   bench/gpu_check.sh --only STEP[,STEP...] [OUT_DIR]   some steps (repeatable), in the order of --list
#   bench/gpu_check.sh --list                            the steps, their caps in seconds, what each checks
#
# Exit status: 0 when no step failed (SKIPs included), 1 when one did, 2 for a usage error or no moemesh to run.
# Environment (defaults in brackets): PYTHON [python3] GPU_CHECK_BUDGET [450 s, all steps together]
# REPORT [OUT_DIR/gpu_check.json] GPU_CHECK_WORK [a temporary folder, removed: set it to keep the steps' logs]
# V3_LAYER_DIR [unset: step v3-layer-decode skips] GPU_CHECK_DEVICE [cuda; cpu runs the steps' logic on the CPU,
# as tests/processes/bench/test_gpu_check_script.py does]
#
# Packages beyond torch and Triton, to bring as wheels (the GPU machine has no network):
#   - the project's own dependencies (pyproject.toml; torch excluded: the machine's CUDA build stays), and
#   - pytest, pytest-timeout and cryptography for step fake-device-tests-for-real (tests/conftest.py imports
#     cryptography; pyproject's pytest settings name pytest-timeout's option);
#   - deep_gemm only if step deepgemm should run (built from source for that machine; without it the step skips).
# On a machine with network, the same Python version and platform:
#   pip download -d WHEELS setuptools wheel "${REQUIRED_PACKAGES[@]}"      (the list below)
# then on the GPU machine, from the repository root:
#   pip install --no-index --find-links WHEELS -e . pytest pytest-timeout cryptography
REQUIRED_PACKAGES=(
    "safetensors>=0.4" "tokenizers>=0.19" "jinja2>=3.1" "numpy>=1.26"
    "grpcio>=1.85.1,<2" "grpcio-health-checking>=1.85.1,<2" "grpcio-reflection>=1.85.1,<2" "protobuf>=7.35.1,<8"
    "opentelemetry-api>=1.45,<2" "opentelemetry-sdk>=1.45,<2" "opentelemetry-exporter-otlp-proto-grpc>=1.45,<2"
    "structlog>=24.1" "prometheus-client>=0.20" "fastapi>=0.115" "uvicorn>=0.30" "httpx>=0.27" "tqdm>=4.66"
    "pytest>=8,<9.2" "pytest-timeout>=2.3,<3" "cryptography>=42"
)
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
BUDGET="${GPU_CHECK_BUDGET:-450}"
DEVICE="${GPU_CHECK_DEVICE:-cuda}"
KILL_AFTER=5   # seconds between a step's SIGTERM at its cap and its SIGKILL
MIN_STEP=10    # a step is not started with fewer seconds of budget left

log() { echo "gpu_check: $*" >&2; }
usage() { awk 'NR > 1 && /^# Packages beyond/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "${BASH_SOURCE[0]}" >&2; }
check() { (cd "$ROOT" && "$PYTHON" -m moemesh.bench.gpu_check "$@"); }

ONLY=()
OUT_ARG=""
while (($# > 0)); do
    case "$1" in
        --list) check --list; exit $? ;;
        --only) [[ $# -ge 2 ]] || { usage; exit 2; }; IFS=, read -r -a more <<<"$2"; ONLY+=("${more[@]}"); shift 2 ;;
        --only=*) IFS=, read -r -a more <<<"${1#--only=}"; ONLY+=("${more[@]}"); shift ;;
        -h|--help) usage; exit 0 ;;
        -*) log "unknown option $1"; usage; exit 2 ;;
        *) [[ -z "$OUT_ARG" ]] || { log "one OUT_DIR only"; exit 2; }; OUT_ARG="$1"; shift ;;
    esac
done

if ! (cd "$ROOT" && "$PYTHON" -c 'import moemesh.bench.gpu_check' 2>/dev/null); then
    log "cannot import moemesh with $PYTHON: install it first (see the top of $0):"
    log "  pip install --no-index --find-links WHEELS -e . pytest pytest-timeout cryptography"
    exit 2
fi

# The steps and their caps, from the one list in bench/gpu_check.py.
declare -A CAP=()
ORDER=()
while read -r name cap _; do
    CAP[$name]="$cap"
    ORDER+=("$name")
done < <(check --list)
if ((${#ONLY[@]} > 0)); then
    for step in "${ONLY[@]}"; do
        [[ -n "${CAP[$step]:-}" ]] || { log "unknown step '$step' (--list shows them)"; exit 2; }
    done
    SELECTED=()
    for step in "${ORDER[@]}"; do
        [[ " ${ONLY[*]} " == *" $step "* ]] && SELECTED+=("$step")
    done
else
    SELECTED=("${ORDER[@]}")
fi

OUT="$(mkdir -p "${OUT_ARG:-$ROOT/out/gpu_check}" && cd "${OUT_ARG:-$ROOT/out/gpu_check}" && pwd)" || exit 2
REPORT="${REPORT:-$OUT/gpu_check.json}"
if [[ -n "${GPU_CHECK_WORK:-}" ]]; then
    WORK="$(mkdir -p "$GPU_CHECK_WORK" && cd "$GPU_CHECK_WORK" && pwd)" || exit 2
    KEEP_WORK=1
else
    WORK="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")" || exit 2
    KEEP_WORK=0
fi
PIDS="$WORK/pids"      # process groups a step started (the mesh); stopped here if the step could not
RESULTS="$WORK/results"
mkdir -p "$PIDS" "$RESULTS"
rm -f "$RESULTS"/*.json

# No network on the GPU machine: anything that would try one fails at once instead of waiting.
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
unset OTEL_EXPORTER_OTLP_ENDPOINT

missing="$(cd "$ROOT" && "$PYTHON" - "${REQUIRED_PACKAGES[@]}" <<'PY'
import importlib.metadata, re, sys
names = [re.split(r"[<>=!~;\[ ]", spec, maxsplit=1)[0] for spec in sys.argv[1:]]
missing = []
for name in names:
    try:
        importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        missing.append(name)
print(" ".join(missing))
PY
)"
[[ -z "$missing" ]] || log "missing packages (steps that need them will fail, saying so): $missing"

stop_groups() {  # every process group a step left behind: SIGTERM, at most 10 s, then SIGKILL
    local f pgid
    for f in "$PIDS"/*.pgid; do
        [[ -e "$f" ]] || continue
        pgid="$(cat "$f")"
        if [[ "$pgid" =~ ^[0-9]+$ ]] && kill -0 -- "-$pgid" 2>/dev/null; then
            log "stopping process group $pgid left by a step"
            kill -TERM -- "-$pgid" 2>/dev/null
            for _ in $(seq 1 20); do
                kill -0 -- "-$pgid" 2>/dev/null || break
                sleep 0.5
            done
            kill -KILL -- "-$pgid" 2>/dev/null
        fi
        rm -f "$f"
    done
}

STEP_PID=""
cleanup() {
    if [[ -n "$STEP_PID" ]] && kill -0 "$STEP_PID" 2>/dev/null; then
        # `timeout` passes SIGTERM on to the step (whose own handler stops its children), then SIGKILLs it.
        kill -TERM "$STEP_PID" 2>/dev/null
        for _ in $(seq 1 $((2 * (KILL_AFTER + 5)))); do
            kill -0 "$STEP_PID" 2>/dev/null || break
            sleep 0.5
        done
        kill -KILL "$STEP_PID" 2>/dev/null
    fi
    stop_groups
    ((KEEP_WORK)) || rm -rf "$WORK"
}
trap cleanup EXIT
trap 'log "interrupted"; exit 130' INT TERM

# One step under `timeout`, in the background so that an interrupt reaches this script and cleanup stops it.
run_step() {  # STEP LIMIT RESULT
    local step="$1" limit="$2" result="$3"
    timeout --kill-after="$KILL_AFTER" "$limit" \
        "$PYTHON" -m moemesh.bench.gpu_check "$step" --device "$DEVICE" --json "$result" --time-limit "$limit" \
        --work-dir "$WORK/logs" --pid-dir "$PIDS" &
    STEP_PID=$!
    wait "$STEP_PID"
    local rc=$?
    STEP_PID=""
    return "$rc"
}

cd "$ROOT" || exit 2
deadline=$((SECONDS + BUDGET))
REPORTS=()
for step in "${SELECTED[@]}"; do
    result="$RESULTS/$step.json"
    left=$((deadline - SECONDS))
    limit="${CAP[$step]}"
    ((left < limit)) && limit="$left"
    if ((limit < MIN_STEP)); then
        check "$step" --no-result -1 --json "$result" \
            --reason "not run: the check's $BUDGET s budget (GPU_CHECK_BUDGET) was spent by the steps before it"
    else
        start=$SECONDS
        run_step "$step" "$limit" "$result"
        rc=$?
        if [[ ! -s "$result" ]]; then  # killed at its cap, or crashed before writing: still one entry
            check "$step" --no-result "$rc" --seconds $((SECONDS - start)) --time-limit "$limit" --json "$result"
        fi
    fi
    REPORTS+=("$result")
    stop_groups
done

check --merge "${REPORTS[@]}" --json "$REPORT"

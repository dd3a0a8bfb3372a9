#!/usr/bin/env bash
# moemesh against vLLM (CPU) on this machine, one after the other, same model files, same client,
# same tokenizer, same prompts, on each checkpoint shape of SHAPES:
#   1. write the shape's DeepSeek-V3 checkpoint (bf16) to OUT/SHAPE/ckpt with `moemesh make-tiny --preset SHAPE`
#      (or use MODEL=DIR with one shape);
#   2. `moemesh up --http-port` on it with its defaults, `moemesh bench serve` against its REST facade, stop it;
#   3. vLLM's OpenAI server (from scripts/vllm_cpu_env.sh's venv) at its defaults on the same folder, the same
#      `moemesh bench serve`, stop it;
#   4. `moemesh bench plot` both results into OUT/SHAPE/moemesh_vs_vllm.png and print them side by side
#      with ratios (moemesh / vLLM).
# Every wait is bounded; every server is stopped on exit, however the script ends.
#
#   scripts/bench_vs_vllm.sh [OUT_DIR]          # default OUT_DIR: REPO/out/bench_vs_vllm (git-ignored)
#
# The shapes and their workloads (docs/benchmarks.md):
#   small    hidden 384, 6 heads, 24 experts top-4:                     16 prompts x 128 in / 64 out, concurrency 4
#   compute  hidden 1024, 16 heads (V3's head dims), 64 experts top-6:  32 prompts x 256 in / 64 out, concurrency 16
# Environment (defaults in brackets): SHAPES ["small compute"]; INPUT_LEN, OUTPUT_LEN, NUM_PROMPTS, CONCURRENCY
# [the shape's] WARMUP [2] REQUEST_RATE [inf] DTYPE [auto: both servers run the checkpoint's bf16]
# MODEL [OUT/SHAPE/ckpt] RUN_MOEMESH [1] RUN_VLLM [1]
# MOEMESH_HTTP_PORT [18000] MOEMESH_GRPC_PORT [15051] VLLM_PORT [18001]
# VLLM_VENV [REPO/.venv-vllm] VLLM_CPU_KVCACHE_SPACE [2, GiB] VLLM_CPU_OMP_THREADS_BIND [auto]
# VLLM_PRELOAD [0; 1: LD_PRELOAD tcmalloc + libiomp5 as vLLM's CPU guide advises]
# VLLM_EXTRA_ARGS [] MOEMESH_UP_ARGS [e.g. --prefill 0] READY_TIMEOUT [600 s per server] BENCH_TIMEOUT [1800 s per run]
# PYTHON [python3: the environment moemesh is installed in]
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TOP="$(mkdir -p "${1:-$ROOT/out/bench_vs_vllm}" && cd "${1:-$ROOT/out/bench_vs_vllm}" && pwd)"
PYTHON="${PYTHON:-python3}"
VLLM_VENV="${VLLM_VENV:-$ROOT/.venv-vllm}"
SHAPES="${SHAPES:-small compute}"
WARMUP="${WARMUP:-2}"
REQUEST_RATE="${REQUEST_RATE:-inf}"
DTYPE="${DTYPE:-auto}"
RUN_MOEMESH="${RUN_MOEMESH:-1}"
RUN_VLLM="${RUN_VLLM:-1}"
MOEMESH_HTTP_PORT="${MOEMESH_HTTP_PORT:-18000}"
MOEMESH_GRPC_PORT="${MOEMESH_GRPC_PORT:-15051}"
VLLM_PORT="${VLLM_PORT:-18001}"
READY_TIMEOUT="${READY_TIMEOUT:-600}"
BENCH_TIMEOUT="${BENCH_TIMEOUT:-1800}"

log() { echo "bench_vs_vllm: $*" >&2; }
moemesh() { (cd "$ROOT" && "$PYTHON" -m moemesh.services.cli.main "$@"); }

SERVER_PID=""
stop_server() {
    # The server runs in its own session (setsid): signal the whole process group, then make sure.
    local pid="$SERVER_PID"
    [[ -z "$pid" ]] && return 0
    SERVER_PID=""
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null
    for _ in $(seq 1 40); do
        kill -0 -- "-$pid" 2>/dev/null || break
        sleep 0.5
    done
    if kill -0 -- "-$pid" 2>/dev/null; then
        log "process group $pid still alive after 20 s: SIGKILL"
        kill -KILL -- "-$pid" 2>/dev/null
    fi
    wait "$pid" 2>/dev/null
    return 0
}
trap 'stop_server' EXIT
trap 'log "interrupted"; exit 130' INT TERM

wait_ready() {  # URL PID NAME [LOG LINE]: until GET URL/health is 200 (and LINE is in LOG), while PID lives
    local url="$1" pid="$2" name="$3" logfile="${4:-}" line="${5:-}" deadline=$((SECONDS + READY_TIMEOUT))
    while ((SECONDS < deadline)); do
        if ! kill -0 "$pid" 2>/dev/null; then
            log "$name exited before it was ready (see its log)"
            return 1
        fi
        if { [[ -z "$line" ]] || grep -qF "$line" "$logfile"; } && "$PYTHON" - "$url/health" <<'PY' 2>/dev/null; then
import sys, urllib.request
with urllib.request.urlopen(sys.argv[1], timeout=5) as r:
    sys.exit(0 if r.status == 200 else 1)
PY
            return 0
        fi
        sleep 2
    done
    log "$name not ready within $READY_TIMEOUT s"
    return 1
}

bench() {  # URL LABEL: the same benchmark for every server
    local url="$1" label="$2"
    log "benchmarking $label at $url: $INPUT_LEN in / $OUTPUT_LEN out, $NUM_PROMPTS prompts, concurrency $CONCURRENCY"
    timeout --kill-after=10 "$BENCH_TIMEOUT" "$PYTHON" -m moemesh.services.cli.main bench serve --url "$url" \
        --tokenizer "$MODEL" --dataset random --input-len "$INPUT_LEN" --output-len "$OUTPUT_LEN" \
        --num-prompts "$NUM_PROMPTS" --max-concurrency "$CONCURRENCY" --request-rate "$REQUEST_RATE" \
        --warmup "$WARMUP" --ignore-eos --seed 0 --request-timeout 600 --timeout "$BENCH_TIMEOUT" \
        --wait 120 --label "$label" --result-json "$OUT/$label.json" --disable-tqdm
}

run_shape() {  # SHAPE: both servers on one checkpoint shape, results under OUT=TOP/SHAPE
local shape="$1" RESULTS=()
OUT="$TOP/$shape"
mkdir -p "$OUT"
case "$shape" in
    small) defaults=(128 64 16 4) ;;
    compute) defaults=(256 64 32 16) ;;
    *) log "unknown shape $shape (small, compute)"; return 1 ;;
esac
INPUT_LEN="${INPUT_LEN_SET:-${defaults[0]}}" OUTPUT_LEN="${OUTPUT_LEN_SET:-${defaults[1]}}"
NUM_PROMPTS="${NUM_PROMPTS_SET:-${defaults[2]}}" CONCURRENCY="${CONCURRENCY_SET:-${defaults[3]}}"
MODEL="${MODEL_SET:-$OUT/ckpt}"
if [[ ! -f "$MODEL/config.json" ]]; then
    log "writing the $shape checkpoint (bf16) to $MODEL"
    moemesh make-tiny "$MODEL" --preset "$shape" --dtype bfloat16 || return 1
fi

if [[ "$RUN_MOEMESH" == 1 ]]; then
    log "starting moemesh up (REST on 127.0.0.1:$MOEMESH_HTTP_PORT), log: $OUT/moemesh.log"
    # shellcheck disable=SC2086
    (cd "$ROOT" && exec setsid "$PYTHON" -m moemesh.services.cli.main up --model "$MODEL" \
        --grpc-port "$MOEMESH_GRPC_PORT" --http-port "$MOEMESH_HTTP_PORT" ${MOEMESH_UP_ARGS:-} \
        -- --dtype "$DTYPE") > "$OUT/moemesh.log" 2>&1 &
    SERVER_PID=$!
    # Ready: every worker started (`moemesh up` prints its table) and a decode worker registered (/health).
    if wait_ready "http://127.0.0.1:$MOEMESH_HTTP_PORT" "$SERVER_PID" "moemesh" "$OUT/moemesh.log" "moemesh is up"; then
        if bench "http://127.0.0.1:$MOEMESH_HTTP_PORT" moemesh; then RESULTS+=("$OUT/moemesh.json")
        else STATUS=1; [[ -f "$OUT/moemesh.json" ]] && RESULTS+=("$OUT/moemesh.json"); fi
    else
        STATUS=1
        tail -20 "$OUT/moemesh.log" >&2
    fi
    stop_server
fi

if [[ "$RUN_VLLM" == 1 ]]; then
    if [[ ! -x "$VLLM_VENV/bin/python" ]]; then
        log "no vLLM venv at $VLLM_VENV: run scripts/vllm_cpu_env.sh first"
        STATUS=1
    else
        PRELOAD="${LD_PRELOAD:-}"
        if [[ "${VLLM_PRELOAD:-0}" == 1 ]]; then
            # vLLM's CPU guide: tcmalloc (Debian's libtcmalloc-minimal4) and Intel's OpenMP (the venv has it).
            for lib in /usr/lib/"$(uname -m)"-linux-gnu/libtcmalloc_minimal.so.4 "$VLLM_VENV/lib/libiomp5.so"; do
                if [[ -f "$lib" ]]; then PRELOAD="${PRELOAD:+$PRELOAD:}$lib"; else log "VLLM_PRELOAD: no $lib"; fi
            done
        fi
        log "starting vLLM (CPU) on 127.0.0.1:$VLLM_PORT${PRELOAD:+ with LD_PRELOAD=$PRELOAD}, log: $OUT/vllm.log"
        # shellcheck disable=SC2086
        env VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-2}" \
            VLLM_CPU_OMP_THREADS_BIND="${VLLM_CPU_OMP_THREADS_BIND:-auto}" \
            HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1 LD_PRELOAD="$PRELOAD" \
            setsid "$VLLM_VENV/bin/python" -m vllm.entrypoints.openai.api_server --model "$MODEL" \
            --host 127.0.0.1 --port "$VLLM_PORT" --dtype "$DTYPE" --max-model-len 4096 --seed 0 \
            ${VLLM_EXTRA_ARGS:-} > "$OUT/vllm.log" 2>&1 &
        SERVER_PID=$!
        if wait_ready "http://127.0.0.1:$VLLM_PORT" "$SERVER_PID" "vLLM"; then
            if bench "http://127.0.0.1:$VLLM_PORT" vllm; then RESULTS+=("$OUT/vllm.json")
            else STATUS=1; [[ -f "$OUT/vllm.json" ]] && RESULTS+=("$OUT/vllm.json"); fi
        else
            STATUS=1
            tail -20 "$OUT/vllm.log" >&2
        fi
        stop_server
    fi
fi

if ((${#RESULTS[@]} > 0)); then
    echo
    echo "== $shape: $INPUT_LEN in / $OUTPUT_LEN out, $NUM_PROMPTS prompts, concurrency $CONCURRENCY"
    moemesh bench plot "${RESULTS[@]}" --out "$OUT/moemesh_vs_vllm.png" \
        --title "moemesh vs vLLM (CPU): $shape DeepSeek-V3 shape, $INPUT_LEN in / $OUTPUT_LEN out, $NUM_PROMPTS prompts, concurrency $CONCURRENCY" \
        || STATUS=1
fi
}

INPUT_LEN_SET="${INPUT_LEN:-}" OUTPUT_LEN_SET="${OUTPUT_LEN:-}" NUM_PROMPTS_SET="${NUM_PROMPTS:-}"
CONCURRENCY_SET="${CONCURRENCY:-}" MODEL_SET="${MODEL:-}"
STATUS=0
for shape in $SHAPES; do
    run_shape "$shape" || STATUS=1
done
log "results in $TOP (exit $STATUS)"
exit "$STATUS"

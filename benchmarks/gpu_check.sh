#!/usr/bin/env bash
# The prepared GPU check of issue 11, for one call on a lent device machine (about 8 minutes
# of its time, its start not counted). Here, first: `make gpu-wheels` (benchmarks/gpu_wheels.py:
# the project's dependencies that the device image lacks, and the peers, as wheels in .whl/).
# Then one device call: command `bash benchmarks/gpu_check.sh`, carry [".whl"], timeout_s 600.
#
# On the device it installs .whl/ beside the image's PyTorch (no network there), then writes
# into $OUT (./gpu_out when unset), each step with its own time limit so that one hang cannot
# take the others' output with it:
#   env.txt                     nvidia-smi, torch and CUDA versions, the device's name
#   cuda_tests.txt              tests/trainer/test_cuda.py (skipped everywhere else)
#   train_throughput_cuda.txt   samples/s and ratios to torchbnn on the GPU, capture included
#                               (target: learnable prior with per-element capture >= 1.0x)
#   capture_step_cuda.txt       capture's cost per step and per epoch on the GPU (per layer,
#                               per element, and per element with its mean sampled every 4th step)
set -u -o pipefail
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
WHEELS=${BNN_GPU_WHEELS:-.whl}
SITE=/tmp/bnn-gpu-site
if [ -d "$WHEELS" ]; then
    # --target, not a venv: the image's python3 is itself a venv, whose packages
    # (torch among them) a venv made from it would not see
    "$PY" -m pip install --quiet --no-index --no-deps --target "$SITE" "$WHEELS"/*.whl \
        > "$OUT/install.txt" 2>&1 || { echo "wheel install failed: see install.txt"; exit 1; }
fi
export PYTHONPATH="$PWD:$SITE"
export BNN_DATA_DIR=/tmp/bnn-gpu-data
{
    nvidia-smi
    "$PY" -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda,
        torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device")'
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
step() {  # step NAME LIMIT_S COMMAND...: run it, its output to $OUT/NAME.txt and here
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit} s)"
    timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.txt"
    echo "== $name: exit ${PIPESTATUS[0]}" | tee -a "$OUT/$name.txt"
}
step cuda_tests 150 "$PY" -m pytest -q -p no:cacheprovider tests/trainer/test_cuda.py
step train_throughput_cuda 200 "$PY" benchmarks/train_throughput.py --device cuda --rounds 10
step capture_step_cuda 150 "$PY" benchmarks/capture_step.py --device cuda --pairs 100 --writes 3 \
    --element-every 4 --block 5

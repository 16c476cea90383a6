#!/usr/bin/env bash
# Everything recon checks on a GPU, in one run well under 10 minutes.
#
#     bash scripts/gpu_run.sh [OUT_DIR]        # OUT_DIR defaults to $OUT or ./gpu_out
#
# 1. the CUDA tests (the ones the CPU suite skips) and the CUDA paths of the API tests;
# 2. the 224-px benchmark on the GPU: torchvision VGG-16 and ResNet-50, random weights,
#    256 random images, LASSO 2x, uniform and auto: pruning time in forward passes per
#    phase, peak memory (the uniform runs again with float32 block products in the
#    statistics, --float32, TF32 off), and the latency of the pruned models (batch 1
#    and 32, round_to 1/8/16, contiguous and channels_last) -> OUT_DIR/benchmarks_gpu.md,
#    which goes into docs/benchmarks_gpu.md with the machine named on the page;
# 3. recon's default (obs + cross-validated re-fit) beside LASSO on the same models, on the
#    GPU (`bench.py methods`: the factored greedy removal and the re-fit in the span of
#    the samples run there too) -> a section of OUT_DIR/benchmarks_gpu.md.
# Each step is bounded by `timeout` (110 + 260 + 150 s together), so one slow step cannot
# eat the others' time and the whole run fits one 10-minute device call.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-gpu_out}}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
python() { command "${PYTHON:-python3}" "$@"; }
python - <<'EOF' || { echo "no CUDA device: nothing to do" >&2; exit 1; }
import torch
assert torch.cuda.is_available()
print("GPU:", torch.cuda.get_device_name(), "torch", torch.__version__)
EOF
status=0
timeout 110 "${PYTHON:-python3}" -m pytest -q -n 0 -p no:cacheprovider -k "cuda or device" tests/test_allocate.py tests/test_hostile.py tests/test_stats.py \
    tests/test_api.py tests/test_bench.py tests/test_finetune.py tests/test_obs.py tests/test_solve.py \
    tests/test_recover.py \
    2>&1 | tee "$out/cuda_tests.log" | tail -n 40 || status=1
timeout 260 "${PYTHON:-python3}" scripts/bench.py scale224 --device cuda --scale-images 256 --float32 \
    --json "$out/benchmarks_gpu.json" --out "$out/benchmarks_gpu.md" 2>&1 \
    | tee "$out/bench.log" || status=1
timeout 150 "${PYTHON:-python3}" scripts/bench.py methods --device cuda \
    --method-models torchvision:vgg16@224x256,torchvision:resnet50@224x256 \
    --json "$out/methods_gpu.json" --out "$out/benchmarks_gpu.md" 2>&1 \
    | tee "$out/methods.log" || status=1
exit $status

#!/usr/bin/env bash
# The GPU measurements of issue 13, in one script for a lent CUDA machine (no network needed):
#   1. the card, torch and CUDA versions;
#   2. benchmarks/bench_gpu.py: one LoRA DPO step on SD 1.5- and SDXL-shaped models (ms/step, peak memory);
#   3. benchmarks/gpu_check.py: every notebook's sd15 path on CUDA with its peak GPU memory.
# Never run yet (no session has been lent a GPU); the README's "unmeasured" cells come from here.
#   bash benchmarks/gpu_check.sh            # writes under $OUT (default ./gpu-check-out)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu-check-out}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"
} 2>&1 | tee "$OUT/device.txt"
timeout 600 python benchmarks/bench_gpu.py 2>&1 | tee "$OUT/bench_gpu.txt" || echo "bench_gpu.py failed or timed out" | tee -a "$OUT/bench_gpu.txt"
timeout 1500 python benchmarks/gpu_check.py --out "$OUT" 2>&1 | tee "$OUT/gpu_check.txt"

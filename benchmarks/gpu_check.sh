#!/usr/bin/env bash
# The GPU checks in one script for a lent CUDA machine (no network needed), done within BUDGET seconds:
#   device     the card, driver, torch and CUDA, the versions of the packages the checks import
#   build      an SD 1.5-shaped pipeline (random weights, UNet 860M) and a 512-px Pick-a-Pic-format parquet,
#              once, in $WORK; every later part reuses them
#   bench      bench_gpu.py on SD 1.5 (8 pairs, 512 px): ms/step, peak memory and MFU of the step in bf16 and fp16,
#              and of the variants that could raise it (no autocast, no peft input cast, cuDNN autotuning,
#              channels_last, attention backends, 16 pairs)
#   vs         bench_vs_diffusers.py --work sd15-gpu: the diffusers DPO script against `dpo-tutorial train --preset
#              sd15` (batch 8 pairs, grad-accum 1, no checkpointing), fp16 and bf16, median step by each one's own
#              step log, peak GPU memory, MFU
#   train      train_check.py: one bf16 full fine-tune and one fp16 LoRA run of the sd15 preset, 2 steps each
#              (pass/fail, losses finite, peak memory)
#   profile    profile_step.py --torch-profiler: where one step's time goes (bf16, the vs work's settings, images)
#   profile-cache  the same, reading a latent cache (the step bench's "cached" variants time)
#   notebooks  gpu_check.py: every notebook's sd15 path (not in the default PARTS: it takes longer than BUDGET
#              and needs nbclient, nbformat and ipykernel carried too)
# Each part runs under `timeout`, capped at its own budget and at what is left of BUDGET, so a slow part cannot
# take the others' time; a part that fails or runs out of time is reported and the next one runs.
#
#   bash benchmarks/gpu_check.sh                        # on the GPU machine; reports in $OUT (default gpu-check-out)
#   TINY=1 bash benchmarks/gpu_check.sh                 # the same parts on a CPU with tiny sizes (CUDA hidden)
#   PARTS="device build bench" bash benchmarks/gpu_check.sh
#
# Inputs: WHEELS (default .whl): *.whl files installed to /tmp/site first when present (diffusers, datasets and
# their missing requirements: benchmarks/README.md says which); DIFFUSERS_SCRIPT (default
# $WHEELS/train_diffusion_dpo.py): diffusers' examples/research_projects/diffusion_dpo/train_diffusion_dpo.py,
# fetched by you (the vs part is skipped without it); WORK (default /tmp/gpu-check-work): the pipeline, data and
# runs, kept out of $OUT. $OUT gets at most 8 files: summary.md, setup.txt (device and build), bench.txt, vs.txt,
# train.txt, profile.txt (both profiles), notebooks.txt, logs.tgz (every JSON result and run log).
set -uo pipefail
cd "$(dirname "$0")/.."
START=$(date +%s)
TINY="${TINY:-0}"
OUT="${OUT:-gpu-check-out}"
WORK="${WORK:-/tmp/gpu-check-work}"
WHEELS="${WHEELS:-.whl}"
DIFFUSERS_SCRIPT="${DIFFUSERS_SCRIPT:-$WHEELS/train_diffusion_dpo.py}"
PARTS="${PARTS:-device build bench vs train profile profile-cache}"
if [ "$TINY" = 1 ]; then BUDGET="${BUDGET:-900}"; else BUDGET="${BUDGET:-470}"; fi
RESERVE=15  # seconds kept for packing the logs
mkdir -p "$OUT" "$WORK"
OUT="$(cd "$OUT" && pwd)"; WORK="$(cd "$WORK" && pwd)"
export WORK
rm -f "$OUT"/{summary.md,setup.txt,bench.txt,vs.txt,train.txt,profile.txt,notebooks.txt,logs.tgz}
export PYTHONPATH="$PWD:$PWD/benchmarks${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 \
    HF_DATASETS_OFFLINE=1 WANDB_MODE=disabled HF_DATASETS_CACHE="$WORK/hf-datasets-cache"
if [ "$TINY" = 1 ]; then
    export CUDA_VISIBLE_DEVICES=""
    T=(--tiny); RES=64; PAIRS=2; STEPS=(--warmup-steps 2 --timed-steps 4)
    BENCH=(--tiny --iters 1 --warmup 1 --variants recipe cached-bf16 pure-bf16 cached-bf16+nopeftcast)
else
    T=(); RES=512; PAIRS=8; STEPS=(--warmup-steps 5 --timed-steps 25)
    BENCH=(--iters 10 --warmup 3 --variants recipe cached-bf16 cached-fp16 cached-bf16-fp32w pure-bf16
           cached-bf16+nopeftcast cached-bf16+cudnnbench pure-bf16+cudnnbench cached-bf16+cl cached-bf16+cudnn-attn
           cached-bf16+flash-attn cached-bf16+pairs16)
fi
SUMMARY="$OUT/summary.md"
echo "# gpu_check.sh $(date -u +%FT%TZ) TINY=$TINY BUDGET=${BUDGET}s PARTS='$PARTS'" > "$SUMMARY"

wanted() { [[ " $PARTS " == *" $1 "* ]]; }

run_part() {  # run_part NAME FILE CAP_SECONDS COMMAND...: output appended to $OUT/FILE.txt, a line in the summary
    local name=$1 file=$2 cap=$3; shift 3
    local left=$(( BUDGET - ($(date +%s) - START) - RESERVE - 5 ))
    local limit=$(( cap < left ? cap : left ))
    if [ "$limit" -lt 20 ]; then
        echo "| $name | skipped: ${left}s of the budget left |" | tee -a "$SUMMARY"; return
    fi
    echo "=== $name (at most ${limit}s) ===" | tee -a "$OUT/$file.txt"
    local began=$(date +%s)
    timeout -k 5 "$limit" "$@" 2>&1 | tee -a "$OUT/$file.txt"
    local rc=${PIPESTATUS[0]}
    local took=$(( $(date +%s) - began ))
    local verdict="ok"
    [ "$rc" -ne 0 ] && verdict="FAILED (exit $rc)"
    [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && verdict="TIMED OUT after ${limit}s"
    echo "| $name | $verdict, ${took}s |" | tee -a "$SUMMARY"
}

device_info() {
    if command -v nvidia-smi > /dev/null; then
        nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
    else
        echo "no nvidia-smi"
    fi
    python3 - <<'EOF'
import importlib, platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| cuda", torch.version.cuda,
      "| device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu")
for name in ("diffusers", "datasets", "transformers", "peft", "accelerate", "torchvision", "tensorboard", "huggingface_hub"):
    try:
        print(f"{name} {importlib.import_module(name).__version__}")
    except Exception as err:  # noqa: BLE001
        print(f"{name} MISSING ({type(err).__name__}: {err})")
EOF
    nproc; df -h "$WORK" | tail -1
}

if ls "$WHEELS"/*.whl > /dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        "$WHEELS"/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
echo "| part | result |" >> "$SUMMARY"; echo "|---|---|" >> "$SUMMARY"

export -f device_info
wanted device && run_part device setup 30 bash -c device_info
wanted build && run_part build setup 150 python3 benchmarks/bench_vs_diffusers.py --work sd15-gpu --build-only \
    --work-dir "$WORK/sd15" "${STEPS[@]}" "${T[@]}"
wanted bench && run_part bench bench 120 python3 benchmarks/bench_gpu.py --arch sd15 "${BENCH[@]}" \
    --json "$WORK/bench_gpu.json"
if wanted vs; then
    if [ -f "$DIFFUSERS_SCRIPT" ]; then
        run_part vs vs 220 python3 benchmarks/bench_vs_diffusers.py --script "$DIFFUSERS_SCRIPT" --work sd15-gpu \
            --work-dir "$WORK/sd15" --out "$WORK/vs" "${STEPS[@]}" "${T[@]}"
    else
        echo "| vs | skipped: no diffusers script at $DIFFUSERS_SCRIPT |" | tee -a "$SUMMARY"
    fi
fi
wanted train && run_part train train 120 python3 benchmarks/train_check.py --pipeline "$WORK/sd15/pipeline" \
    --dataset "$WORK/sd15/data" --out "$WORK/train" "${T[@]}"
PROFILE=(python3 benchmarks/profile_step.py --torch-profiler --preset sd15 --pretrained "$WORK/sd15/pipeline"
         --dataset "$WORK/sd15/data" --resolution "$RES" --batch-size "$PAIRS" --mixed-precision bf16 --random-flip
         --steps 3 --warmup 2 --top 30)
wanted profile && run_part profile profile 75 "${PROFILE[@]}" --source images
wanted profile-cache && run_part profile-cache profile 75 "${PROFILE[@]}" --source cache
wanted notebooks && run_part notebooks notebooks 1500 python3 benchmarks/gpu_check.py --out "$WORK/notebooks"

{
    echo; echo "## results"
    [ -f "$OUT/setup.txt" ] && { echo; echo '```'; sed -n '/=== device/,/=== build/p' "$OUT/setup.txt" | grep -v '^==='; echo '```'; }
    for part in bench vs train; do
        [ -f "$OUT/$part.txt" ] || continue
        echo; echo "### $part"; grep -E '^\||MFU|FLOP|^sd15|^device' "$OUT/$part.txt" | head -40
    done
    [ -f "$OUT/profile.txt" ] && { echo; echo "### profile"; sed -n '/^torch.profiler/,/^top /p' "$OUT/profile.txt"; }
    echo; echo "total $(( $(date +%s) - START ))s"
} >> "$SUMMARY"
(cd "$WORK" && find . \( -name '*.json' -o -name '*.jsonl' -o -name 'log.txt' -o -name '*.md' \) \
    -not -path './hf-datasets-cache/*' -not -path '*/pipeline/*' -size -4M -print0 \
    | tar czf "$OUT/logs.tgz" --null -T -) 2>/dev/null
cat "$SUMMARY"

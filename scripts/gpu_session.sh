#!/usr/bin/env bash
# Everything this project measures on a CUDA GPU, in stages that each fit one 10-minute device call:
#   bash scripts/gpu_session.sh tests      # the GPU tests (pytest -m gpu) and the versions in use
#   bash scripts/gpu_session.sh infer      # ViT-B/16 bf16 batch 256: dense vs 2:4 (ff; ff+qkv+proj), eager + compiled
#   bash scripts/gpu_session.sh bsr        # the same for BSR at 90 % with 32x32 and 64x64 tiles
#   bash scripts/gpu_session.sh layers     # the MLP linears alone, 2:4 and BSR tile 64
#   bash scripts/gpu_session.sh cnn        # ResNet-50 bf16 channels-last batch 256: dense vs 2:4 on every conv (the
#                                          # 1x1 convs run the 2:4 kernel), eager + compiled
#   bash scripts/gpu_session.sh kernels    # 2:4 with the CUTLASS kernel forced (sm8x only: torch builds it for 8.x)
#   bash scripts/gpu_session.sh train      # ViT-B/16 N:M mask step (eager vs compiled rank), then bf16 batch 128
#                                          # compiled training steps: dense vs srste/mdgf (SPARSITY_COMPILED_MASKS=1
#                                          # in front: the same steps with the compiled rank)
#   bash scripts/gpu_session.sh profile    # the same, fewer steps, with a torch.profiler table per variant
# Each stage leaves one archive, $OUT/<stage>.tar.gz (the device tool brings back at most 8 files), holding JSON/CSV
# per run and one log per run; the tables are printed too. $OUT defaults to ./gpu_out.
# Runs with the python3 that has torch and timm (the device image's own; no install step needed there).
set -uo pipefail
cd "$(dirname "$0")/.."
STAGE=${1:-}
case "$STAGE" in tests|infer|bsr|layers|cnn|kernels|train|profile) ;; *)
  echo "usage: bash scripts/gpu_session.sh tests|infer|bsr|layers|cnn|kernels|train|profile" >&2; exit 2;; esac
FINAL=${OUT:-gpu_out}
OUT=$(mktemp -d)/$STAGE
mkdir -p "$OUT" "$FINAL"
pack() { tar -C "$(dirname "$OUT")" -czf "$FINAL/$STAGE.tar.gz" "$STAGE"; }
trap pack EXIT  # also after every run: a stage killed at the time limit keeps the runs it finished
FAILED=0
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
# MODEL/MODEL_KWARGS/BATCH/STEPS/WARMUP override the issue's settings (a dry run on CPU: a tiny ViT, few steps)
MODEL=${MODEL:-vit_base_patch16_224}
read -r -a KW <<< "${MODEL_KWARGS:-}"
model=(--model "$MODEL" --num-classes 1000 ${KW[@]:+--model-kwargs "${KW[@]}"})
STEPS=${STEPS:-50}; WARMUP=${WARMUP:-10}
common=(--bench infer "${model[@]}" --dtype bfloat16 -b "${BATCH:-256}" --steps "$STEPS" --warmup "$WARMUP")

run() {  # name, then benchmark.py arguments; a failure is logged, the next run goes on, and the stage exits 1
  local name=$1; shift
  echo "=== $name: benchmark.py $*"
  if "$PY" benchmark.py "$@" --output "$OUT/$name" > "$OUT/$name.log" 2>&1; then
    grep -v '^  [a-z0-9]* batch [0-9]* [a-z]*:' "$OUT/$name.log"
  else
    tail -n 30 "$OUT/$name.log"; echo "!!! $name failed (whole log: $name.log)"; FAILED=1
  fi
  pack
}

case "$STAGE" in
  tests)
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
    "$PY" -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__, 'cc',
torch.cuda.get_device_capability(), 'cusparselt', torch.backends.cusparselt.is_available())"
    "$PY" -m pytest -q -rs -m gpu -p no:cacheprovider tests/ 2>&1 | tee "$OUT/tests_gpu.log" | tail -25
    ;;
  infer)
    run infer_24_ff "${common[@]}" --targets ff --nm 2:4 --torchcompile
    run infer_24_all "${common[@]}" --targets ff qkv proj --nm 2:4 --torchcompile
    ;;
  bsr)
    run infer_bsr32 "${common[@]}" --targets ff qkv proj --sparsity 0.9 --tile 32 --torchcompile
    run infer_bsr64 "${common[@]}" --targets ff qkv proj --sparsity 0.9 --tile 64 --torchcompile
    ;;
  layers)
    run layers_24 "${common[@]}" --targets ff --nm 2:4 --layers
    run layers_bsr64 "${common[@]}" --targets ff --sparsity 0.9 --tile 64 --layers
    ;;
  cnn)
    CNN=${CNN:-resnet50}
    run infer_cnn_24 --bench infer --model "$CNN" --num-classes 1000 --dtype bfloat16 -b "${BATCH:-256}" \
      --steps "$STEPS" --warmup "$WARMUP" --targets conv --nm 2:4 --channels-last --torchcompile
    ;;
  kernels)
    if ! "$PY" -c "import torch, sys; sys.exit(torch.cuda.get_device_capability()[0] != 8)"; then
      echo "kernels: torch's CUTLASS 2:4 GEMM runs on compute capability 8.x only; nothing to compare here"; exit 0
    fi
    run layers_24_cutlass "${common[@]}" --targets ff --nm 2:4 --layers --semi-kernel cutlass
    run infer_24_all_cutlass "${common[@]}" --targets ff qkv proj --nm 2:4 --torchcompile --semi-kernel cutlass
    ;;
  train)
    # the mask step alone first (seconds): the eager rank ops against the compiled rank kernel (opt-in)
    run masks_vitb --bench masks "${model[@]}" --device cuda --steps 20
    run train_vitb --bench train "${model[@]}" --methods srste mdgf --amp --torchcompile -b "${BATCH:-128}" \
      --img-size "${IMG:-224}" --steps "$STEPS" --warmup "$WARMUP"
    ;;
  profile)
    run profile_vitb --bench train "${model[@]}" --methods srste mdgf --amp --torchcompile -b "${BATCH:-128}" \
      --img-size "${IMG:-224}" --steps 10 --warmup "$WARMUP" --profile 5
    ;;
esac
exit "$FAILED"

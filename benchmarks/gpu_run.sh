#!/usr/bin/env bash
# The GPU measurements of the speed-and-memory issue, in one call (about 6-8 minutes on one H200):
#   1. training step of the full 12-block ViT-B/16 CLIP, batch 32, bf16 autocast, 100 class prompts,
#      every method (full fine-tuning, LoRA, reference rule at 77 tokens and at our padding,
#      peft-svd, evaluation of the base / adapted / merged / reference models);
#   2. the same with 1,000 class prompts (training methods only);
#   3. factorization of all 144 adapted matrices of the 12-block model on the GPU.
# Needs python with a CUDA build of torch, transformers and peft (no network is used). Writes
# <name>.json, <name>.txt (the printed tables) and <name>.err for each part, plus environment.txt,
# to $OUT when set (the device tool's output folder), else to benchmarks/results-gpu/.
#
# GPU_RUN_DRY=1 runs the same plumbing on the CPU with tiny models (a check of this script).
set -uo pipefail
cd "$(dirname "$0")/.."
out_dir="${OUT:-benchmarks/results-gpu}"
mkdir -p "$out_dir"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
py="${PYTHON:-python}"

if [[ "${GPU_RUN_DRY:-0}" == 1 ]]; then
  model=(--device cpu --blocks 1 --image-size 32 --batch 2 --vision-width 64 --text-width 32 --vocab-size 500)
  few=(5 20) steps=(--steps 2 --warmup 1) fact=(--device cpu --blocks 1 --vision-width 64 --text-width 32 --vocab-size 500)
else
  model=(--device cuda --blocks 12 --image-size 224 --batch 32 --precision bf16)
  few=(100 1000) steps=(--steps 10 --warmup 2) fact=(--device cuda --blocks 12)
fi

{
  date -u
  nvidia-smi 2>&1 || echo "no nvidia-smi"
  "$py" -c "import torch, transformers, peft; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available()); print('transformers', transformers.__version__, 'peft', peft.__version__)"
  git log --oneline -1 2>/dev/null || true
} > "$out_dir/environment.txt" 2>&1
cat "$out_dir/environment.txt"

run() {  # run NAME SECONDS SCRIPT ARGS...
  local name=$1 limit=$2
  shift 2
  local start=$SECONDS
  timeout "$limit" "$py" "$@" --json "$out_dir/$name.json" > "$out_dir/$name.txt" 2> "$out_dir/$name.err"
  local rc=$?
  echo "== $name: exit $rc after $((SECONDS - start)) s"
  grep -v '^$' "$out_dir/$name.txt" | tail -n 40
  [[ $rc == 0 ]] || tail -n 15 "$out_dir/$name.err"
}

train_methods=full,lora,reference_77,reference,svd
run "train_step_${few[0]}_prompts" 210 benchmarks/bench_train_step.py "${model[@]}" --prompts "${few[0]}" "${steps[@]}"
run "train_step_${few[1]}_prompts" 240 benchmarks/bench_train_step.py "${model[@]}" --prompts "${few[1]}" "${steps[@]}" \
  --methods "$train_methods" --no-overhead
run factorize 120 benchmarks/bench_factorize.py "${fact[@]}"

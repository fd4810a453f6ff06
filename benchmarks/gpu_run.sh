#!/usr/bin/env bash
# The GPU measurements of the speed-and-memory issue, in one call (about 6-8 minutes on one H200):
#   1. training step of the full 12-block ViT-B/16 CLIP, batch 32, bf16 autocast, 100 class prompts,
#      every method (full fine-tuning, LoRA, reference rule at 77 tokens and at our padding,
#      peft-svd, evaluation of the base / adapted / merged / reference models);
#   2. the same with 1,000 class prompts (training methods only);
#   3. factorization of all 144 adapted matrices of the 12-block model on the GPU;
#   4. benchmarks/paper.py (few-shot and domain generalisation) with a random-weight ViT-B/16 CLIP on a
#      small synthetic CoOp data root, 50 steps per run (about 3-4 more minutes, estimated).
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

# 4. benchmarks/paper.py at real model size: a random-weight CLIP with ViT-B/16 widths (no hub here)
#    on a small synthetic data root in the CoOp layout; few-shot (2 datasets, K 1 and 4) and domain
#    generalisation, 50 steps per run through `accelerate launch` on every GPU. Per-run training
#    times land in $out_dir/paper/train/*/*/results.json (training.wall_time_s); they replace the
#    estimates of the README's "Reproducing the paper".
paper_dir="$out_dir/paper"
mkdir -p "$paper_dir"
if [[ "${GPU_RUN_DRY:-0}" == 1 ]]; then paper_model=builtin paper_steps=2; else paper_model="$paper_dir/clip-b16-random" paper_steps=50; fi
start=$SECONDS
PAPER_MODEL="$paper_model" PAPER_DIR="$paper_dir" timeout 120 "$py" - > "$paper_dir/setup.txt" 2>&1 <<'PY'
import os, sys
sys.path.insert(0, "tests/fewshot")
from tiny_benchmark import write_benchmark_root
from peft_svd import builtin
write_benchmark_root(os.path.join(os.environ["PAPER_DIR"], "data"), keys=["eurosat", "dtd", "imagenet", *
    ["imagenetv2", "imagenet_sketch", "imagenet_a", "imagenet_r"]], train_per_class=8, test_per_class=8)
path = os.environ["PAPER_MODEL"]
if path != "builtin":
    from transformers import AutoTokenizer, CLIPConfig, CLIPImageProcessor, CLIPModel
    tokenizer = AutoTokenizer.from_pretrained(builtin.model_path())
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                         num_attention_heads=8, max_position_embeddings=77),
        vision_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                           image_size=224, patch_size=16),
        projection_dim=512)
    CLIPModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    CLIPImageProcessor().save_pretrained(path)
print("data root and model written")
PY
echo "== paper setup: exit $? after $((SECONDS - start)) s"; tail -n 3 "$paper_dir/setup.txt"
for protocol in "few-shot --datasets eurosat dtd --shots 1 4" "domain-generalization"; do
  start=$SECONDS
  # shellcheck disable=SC2086  # the protocol's flags are meant to split
  timeout 240 "$py" benchmarks/paper.py $protocol --data-root "$paper_dir/data" --model "$paper_model" --seeds 1 \
    --max-steps "$paper_steps" --output-dir "$paper_dir/runs" > "$paper_dir/${protocol%% *}.txt" 2>&1
  echo "== paper ${protocol%% *}: exit $? after $((SECONDS - start)) s"
  grep -E '^\|' "$paper_dir/${protocol%% *}.txt" | head -n 8
done
"$py" - "$paper_dir/runs" <<'PY' 2>&1 | tee "$paper_dir/run_times.txt"
import glob, json, os, sys
for path in sorted(glob.glob(os.path.join(sys.argv[1], "train", "*", "*", "results.json"))):
    r = json.load(open(path))
    t = r["training"]
    print(f"{r['dataset_name']:>10} {r['shots']:>2} shots: {t['steps']} steps in {t['wall_time_s']:.1f} s "
          f"({t['wall_time_s'] / max(1, t['steps']):.3f} s/step, {t['num_processes']} processes, {t['mixed_precision']})")
PY

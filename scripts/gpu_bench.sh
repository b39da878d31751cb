#!/usr/bin/env bash
# The GPU checks of issue 6 in one run: model-only and end-to-end throughput for VGG16 and
# ResNet18 at 224 px with --precision auto, and the study's Part 1 VGG16 first7 run (12 epochs,
# 12,000 train / 1,500 validation / 1,500 test images) timed by `tfcovid fit`.
#
#   scripts/gpu_bench.sh [RESULTS_DIR]      (default: bench-results/)
#
# Writes one JSON file per benchmark, fit.log and the run directory's metrics.json to
# RESULTS_DIR. The Part 1 images are 150 generated grayscale 1024x1024 JPEGs per class,
# hard-linked under 6,000 + 750 + 750 names per class: every name is read and decoded
# like a distinct file (the cache keys on the path), so the timing is that of 12,000 files,
# but accuracy on them means nothing. The model starts from random weights (--weights none),
# which trains at the same speed as ImageNet weights and needs no download.
#
# Environment: TFCOVID (command, default "tfcovid"), BATCH (bench model/fit, default 256),
# SPE (steps_per_execution, default 1), PRECISION (default auto), PROCS (the
# data.resample_processes values that bench fit and bench pipeline compare, default
# "0 auto": threads, then the default, which is N-1 worker processes on N >= 8 cores). For a quick dry run of the script itself on a CPU:
# SIZE (default 224), TRAIN_PER_CLASS (default 6000), EPOCHS (default 12), STEPS (default 20).
set -euo pipefail
results="${1:-bench-results}"
mkdir -p "$results"
tfcovid="${TFCOVID:-tfcovid}"
batch="${BATCH:-256}"
spe="${SPE:-1}"
size="${SIZE:-224}"
per_class="${TRAIN_PER_CLASS:-6000}"
epochs="${EPOCHS:-12}"
steps="${STEPS:-20}"
precision="${PRECISION:-auto}"
procs="${PROCS:-0 auto}"

for backbone in vgg16 resnet18; do
  echo "== bench model $backbone batch $batch"
  $tfcovid bench model --backbone "$backbone" --batch-size "$batch" --image-size "$size" \
    --precision "$precision" --steps "$steps" --repeats 3 --steps-per-execution "$spe" --json > "$results/model-$backbone-$batch.json"
  cat "$results/model-$backbone-$batch.json"
done

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
echo "== generating the Part 1 tree: 150 distinct 1024 px JPEGs per class, hard-linked to $per_class train names per class and 1/8 of that each for validation and test"
python3 - "$work/part1" "$per_class" <<'EOF'
import os, sys
from pathlib import Path
from tfcovid import bench
root = Path(sys.argv[1])
n = int(sys.argv[2])
counts = {"train": n, "validation": n // 8, "test": n // 8}
for k, cls in enumerate(("infected", "normal")):
    sources = bench.synthetic_xrays(root / "sources" / cls, 150, seed=k)
    for split, n in counts.items():
        d = root / split / cls
        d.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            os.link(sources[i % len(sources)], d / f"{cls}_{i:05d}.jpg")
EOF
mv "$work/part1/sources" "$work/sources"

echo "== tfcovid fit: Part 1, VGG16 first7, $epochs epochs, batch 60"
start=$(date +%s)
$tfcovid fit --data "$work/part1" --backbone vgg16 --freeze first7 --weights none \
  --epochs "$epochs" --batch-size 60 --image-size "$size" --precision "$precision" --out "$work/runs" --set data.cache_budget_mb=16384 2>&1 | tee "$results/fit.log"
echo "wall seconds: $(( $(date +%s) - start ))" | tee -a "$results/fit.log"
cp "$(ls -d "$work"/runs/*/ | head -1)metrics.json" "$results/part1-metrics.json" || true

for p in $procs; do
  echo "== bench pipeline, 300 of the generated files, resample processes $p"
  $tfcovid bench pipeline --data "$work/sources" --resample-processes "$p" \
    --json > "$results/pipeline-procs$p.json"
  cat "$results/pipeline-procs$p.json"
done

for backbone in resnet18 vgg16; do
  for p in $procs; do
    echo "== bench fit $backbone batch $batch, from the cache of the train split, resample processes $p"
    $tfcovid bench fit --data "$work/part1" --backbone "$backbone" --batch-size "$batch" --image-size "$size" \
      --precision "$precision" --steps "$steps" --repeats 3 --steps-per-execution "$spe" --cache memory --cache-budget-mb 16384 \
      --resample-processes "$p" --json > "$results/fit-$backbone-$batch-procs$p.json"
    cat "$results/fit-$backbone-$batch-procs$p.json"
  done
done

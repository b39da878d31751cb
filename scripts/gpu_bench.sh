#!/usr/bin/env bash
# The GPU checks of issue 26 in one run of at most ~9.5 minutes (BUDGET_S), results as JSON:
#   1. model alone: VGG16 and ResNet18 training steps, batch 256, 224 px, --precision auto;
#   2. end to end / model alone with the augmentation on the device (data.augment_on device):
#      bench fit ResNet18 and VGG16, batch 256 (goal: ratio >= 0.95);
#   3. the study's Part 1 VGG16 first7 run, 12 epochs at batch 60 on 12,000 / 1,500 / 1,500
#      files, timed by `tfcovid fit` (goal: <= 45 s of training, metrics.json's train_seconds);
#   4. side by side on the same files: the study's PyTorch loop (scripts/bench_reference.py
#      --train: torchvision VGG16 first7 and ResNet18, its DataLoader and transforms,
#      num_workers = cores, batch 60), images/s and the Part 1 wall time, as ratios;
#   5. what time is left: bench fit ResNet18 on today's CPU path (data.augment_on cpu, OpenCV
#      with resample processes auto), on the device path with every batch streamed
#      (data.device_cache_mb 0; steps 2 and 3 hold the images on the device, within its default
#      8192 MB) and bench pipeline with threads and processes.
#
#   scripts/gpu_bench.sh [RESULTS_DIR]      (default: bench-results/)
#
# The model runs on Keras's JAX backend (KERAS_BACKEND=jax, the default here): TensorFlow's GPU
# build cannot be installed on the project's H100 host, so tf.data runs on its CPU-only
# TensorFlow and the model, loss, precision policy and XLA compilation on JAX. Every JSON
# records keras_backend; summary.json collects the figures and ratios.
#
# The Part 1 images are 150 generated grayscale 1024x1024 JPEGs per class, hard-linked under
# 6,000 + 750 + 750 names per class: every name is read and decoded like a distinct file (the
# cache keys on the path; torchvision's loader opens each), so the timing is that of 12,000
# files, but accuracy on them means nothing. Random initial weights (--weights none) train at
# the same speed as ImageNet's and need no download.
#
# Environment: TFCOVID (command, default "python -m tfcovid.cli"), BATCH (bench model/fit,
# default 256), PRECISION (default auto), AUGMENT_ON (default device), BUDGET_S (default 570:
# later steps are skipped, and say so, when too little is left), REF_EPOCHS (the PyTorch
# VGG16 loop's epochs, default 2; its 12-epoch wall time is extrapolated and marked so), REF_AMP
# (none: float32 as the study; bf16). For a quick dry run of the script itself on a CPU:
# SIZE (default 224), TRAIN_PER_CLASS (default 6000), EPOCHS (default 12), STEPS (default 20).
set -uo pipefail
results="${1:-bench-results}"
mkdir -p "$results"
export KERAS_BACKEND="${KERAS_BACKEND:-jax}"
tfcovid="${TFCOVID:-python -m tfcovid.cli}"
batch="${BATCH:-256}"
size="${SIZE:-224}"
per_class="${TRAIN_PER_CLASS:-6000}"
epochs="${EPOCHS:-12}"
steps="${STEPS:-20}"
precision="${PRECISION:-auto}"
augment_on="${AUGMENT_ON:-device}"
budget="${BUDGET_S:-570}"
ref_epochs="${REF_EPOCHS:-2}"
ref_amp="${REF_AMP:-none}"
cores="$(nproc)"
SECONDS=0

# step NAME SECONDS_NEEDED COMMAND...: run COMMAND into RESULTS/NAME.json when the budget allows.
step() {
  local name="$1" need="$2"; shift 2
  if (( budget - SECONDS < need )); then
    echo "== SKIPPED $name: $(( budget - SECONDS )) s left of BUDGET_S=$budget, needs ~$need" | tee -a "$results/skipped.txt"
    return 0
  fi
  echo "== $name ($SECONDS s so far)"
  if "$@" > "$results/$name.json" 2> "$results/$name.err"; then
    cat "$results/$name.json"
  else
    echo "FAILED: $name (exit $?); the end of $results/$name.err:"; tail -n 15 "$results/$name.err"
  fi
}

for backbone in vgg16 resnet18; do
  step "model-$backbone-$batch" 60 $tfcovid bench model --backbone "$backbone" --batch-size "$batch" \
    --image-size "$size" --precision "$precision" --steps "$steps" --repeats 3 --json
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

for backbone in resnet18 vgg16; do
  step "fit-$backbone-$batch-$augment_on" 100 $tfcovid bench fit --data "$work/part1" --backbone "$backbone" \
    --batch-size "$batch" --image-size "$size" --precision "$precision" --steps "$steps" --repeats 3 \
    --cache memory --cache-budget-mb 16384 --augment-on "$augment_on" --json
done

part1() {  # tfcovid fit of the Part 1 run; metrics.json (train_seconds, augment_on) is the JSON
  local start=$SECONDS
  $tfcovid fit --data "$work/part1" --backbone vgg16 --freeze first7 --weights none --epochs "$epochs" \
    --batch-size 60 --image-size "$size" --precision "$precision" --out "$work/runs" \
    --set data.cache_budget_mb=16384 --set "data.augment_on=$augment_on" > "$results/part1-fit.log" 2>&1 || return 1
  python3 - "$(ls -d "$work"/runs/*/ | head -1)metrics.json" $(( SECONDS - start )) <<'EOF'
import json, sys
m = json.load(open(sys.argv[1]))
print(json.dumps({k: m[k] for k in ("epochs", "train_seconds", "total_seconds", "images", "precision", "augment_on")}
                 | {"wall_s_with_startup": int(sys.argv[2])}, indent=2))
EOF
}
step "part1-vgg16-first7-$augment_on" 170 part1

step "reference-vgg16-first7" $(( 40 * ref_epochs + 30 )) python3 scripts/bench_reference.py "$work/part1" \
  --train vgg16 --freeze 7 --epochs "$ref_epochs" --workers "$cores" --batch-size 60 --image-size "$size" --amp "$ref_amp" --json
step "reference-resnet18" 60 python3 scripts/bench_reference.py "$work/part1" \
  --train resnet18 --epochs 1 --workers "$cores" --batch-size 60 --image-size "$size" --amp "$ref_amp" --json

step "fit-resnet18-$batch-cpu" 100 $tfcovid bench fit --data "$work/part1" --backbone resnet18 \
  --batch-size "$batch" --image-size "$size" --precision "$precision" --steps "$steps" --repeats 3 \
  --cache memory --cache-budget-mb 16384 --augment-on cpu --resample-processes auto --json
step "fit-resnet18-$batch-device-streamed" 100 $tfcovid bench fit --data "$work/part1" --backbone resnet18 \
  --batch-size "$batch" --image-size "$size" --precision "$precision" --steps "$steps" --repeats 3 \
  --cache memory --cache-budget-mb 16384 --augment-on device --device-cache-mb 0 --json
for p in 0 auto; do
  step "pipeline-procs$p" 45 $tfcovid bench pipeline --data "$work/sources" --resample-processes "$p" --json
done

python3 - "$results" "$augment_on" <<'EOF'
import json, sys
from pathlib import Path
results, on = Path(sys.argv[1]), sys.argv[2]
def load(name):
    try:
        return json.loads((results / f"{name}.json").read_text())
    except (OSError, ValueError):
        return None
out = {"note": "model on Keras's JAX backend (tf.data on CPU-only TensorFlow); same model, loss, precision policy, XLA"}
for name in ("resnet18", "vgg16"):
    fit = load(f"fit-{name}-256-{on}")
    if fit:
        out[f"{name}_end_to_end_over_model_alone"] = fit["ratio_to_model_only"]
        out[f"{name}_end_to_end_images_per_s"] = fit["images_per_s"]
cpu = load("fit-resnet18-256-cpu")
if cpu:
    out["resnet18_cpu_path_ratio"] = cpu["ratio_to_model_only"]
streamed = load("fit-resnet18-256-device-streamed")
if streamed:
    out["resnet18_device_streamed_ratio"] = streamed["ratio_to_model_only"]
part1, ref = load(f"part1-vgg16-first7-{on}"), load("reference-vgg16-first7")
if part1:
    out["part1_train_seconds"] = part1["train_seconds"]
    out["part1_train_images_per_s"] = round(part1["images"]["train"] * part1["epochs"] / part1["train_seconds"], 1)
if ref:
    out["reference_vgg16_train_images_per_s"] = ref["train_images_per_s"]
    wall = ref.get("part1_wall_s", ref.get("part1_wall_s_extrapolated"))
    out["reference_part1_wall_s"] = wall
    out["reference_part1_wall_extrapolated"] = "part1_wall_s" not in ref
    if part1:
        out["images_per_s_ratio_tfcovid_over_reference"] = round(out["part1_train_images_per_s"] / ref["train_images_per_s"], 2)
        # Both: the epochs' training and per-epoch validation (tfcovid's train_seconds), no start-up.
        out["part1_training_time_ratio_reference_over_tfcovid"] = round(wall / part1["train_seconds"], 2)
        out["part1_total_seconds_tfcovid_fit"] = part1["total_seconds"]
r18 = load("reference-resnet18")
if r18:
    out["reference_resnet18_train_images_per_s"] = r18["train_images_per_s"]
(results / "summary.json").write_text(json.dumps(out, indent=2))
print(json.dumps(out, indent=2))
EOF
echo "== done in $SECONDS s"

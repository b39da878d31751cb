#!/usr/bin/env bash
# Reproduce the study's two results tables.
#
# Trains every config in configs/part1/ (binary infected/normal) on DATA1 and every config in
# configs/part2/ (three labels covid-19/normal/pneumonia) on DATA2, one `tfcovid fit` each, then
# writes both tables with `tfcovid report` to OUT/tables.md. A failed fit is reported and the
# others still run; the exit status is non-zero if any failed.
#
# Usage:
#   scripts/reproduce_tables.sh [--out DIR] [--only PATTERN] [--jobs N] DATA1 DATA2 [-- FIT FLAGS...]
#   scripts/reproduce_tables.sh --smoke [--out DIR] [--jobs N]
#
#   DATA1          ImageFolder tree with train/ validation/ test/ (classes infected, normal)
#   DATA2          tree with Train/ Validation/ [Test/] (classes covid-19, normal, pneumonia)
#   --out DIR      where runs, logs and tables.md go (default: runs/reproduce-<time>)
#   --only PATTERN run only configs whose name matches this shell glob, e.g. 'vgg16_*'
#   --jobs N       fits run at the same time (default 1; 2 with --smoke, where start-up
#                  dominates). Use more only with enough devices or memory for N fits.
#   --smoke        check the whole pipeline in minutes on a CPU: generated demo data at 32 px,
#                  1 epoch, random weights. Its numbers mean nothing.
#   -- FLAGS       passed to every `tfcovid fit`, e.g. -- --precision mixed_bfloat16
#
# Study settings (epochs, lr, batch 60, 224 px, ImageNet weights) come from the configs; a full
# run is many GPU hours (the study: about 15 h on a Colab T4).
set -euo pipefail

usage() { sed -n '2,23p' "$0" | sed 's/^# \{0,1\}//'; }
die() { echo "reproduce_tables: $*" >&2; exit 2; }

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SMOKE=0 OUT="" ONLY="*" JOBS=""
POSITIONAL=() EXTRA=()
while [ $# -gt 0 ]; do
  case "$1" in
    --smoke) SMOKE=1 ;;
    --out) [ $# -ge 2 ] || die "--out needs a folder"; OUT="$2"; shift ;;
    --only) [ $# -ge 2 ] || die "--only needs a pattern"; ONLY="$2"; shift ;;
    --jobs) [[ $# -ge 2 && "$2" =~ ^[1-9][0-9]*$ ]] || die "--jobs needs a number >= 1"; JOBS="$2"; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; EXTRA=("$@"); break ;;
    -*) die "unknown option $1 (see --help)" ;;
    *) POSITIONAL+=("$1") ;;
  esac
  shift
done

if [ "$SMOKE" = 1 ]; then
  [ ${#POSITIONAL[@]} -eq 0 ] || die "--smoke uses the generated demo data; give no DATA folders"
  DATA1=demo DATA2=demo
  # The study's recipe at a toy size: every config still runs end to end, only smaller.
  SIZE_FLAGS=(--weights none --epochs 1 --image-size 32 --batch-size 4 --set data.demo_per_class=2)
else
  [ ${#POSITIONAL[@]} -eq 2 ] || { usage >&2; die "give DATA1 and DATA2 (or --smoke)"; }
  DATA1="${POSITIONAL[0]}" DATA2="${POSITIONAL[1]}"
  for d in "$DATA1" "$DATA2"; do [ -d "$d" ] || die "data folder not found: $d"; done
  SIZE_FLAGS=()
fi

OUT="${OUT:-runs/reproduce-$(date +%Y%m%d-%H%M%S)}"
mkdir -p "$OUT/logs"
if [ "$SMOKE" = 1 ]; then
  # Keep the generated demo data with the smoke run unless the user chose a cache.
  export TFCOVID_HOME="${TFCOVID_HOME:-$OUT/demo-cache}"
fi
if command -v tfcovid >/dev/null 2>&1; then TFCOVID=(tfcovid); else TFCOVID=(python -m tfcovid.cli); fi

# One fit per config; its output goes to a log file, its exit status to <log>.rc.
fit_one() {
  local part="$1" name="$2" config="$3" data="$4" log="$OUT/logs/$1-$2.log" start=$SECONDS status=0
  "${TFCOVID[@]}" fit --config "$config" --data "$data" --out "$OUT/$part" \
    ${SIZE_FLAGS[@]+"${SIZE_FLAGS[@]}"} ${EXTRA[@]+"${EXTRA[@]}"} >"$log" 2>&1 || status=$?
  echo "$status" >"$log.rc"
  if [ "$status" = 0 ]; then
    echo "[$part] $name: done in $((SECONDS - start)) s"
  else
    echo "[$part] $name: FAILED (exit $status) after $((SECONDS - start)) s; last lines of $log:" >&2
    tail -n 5 "$log" | sed 's/^/    /' >&2
  fi
}

JOBS="${JOBS:-$([ "$SMOKE" = 1 ] && echo 2 || echo 1)}"
# Runs already in OUT (an earlier invocation): tables.md is this invocation's runs only.
declare -A earlier=()
for d in "$OUT"/part1/*/ "$OUT"/part2/*/; do [ -d "$d" ] && earlier["$d"]=1; done
logs=()
for part in part1 part2; do
  data="$DATA1"; [ "$part" = part2 ] && data="$DATA2"
  for config in "$ROOT/configs/$part"/*.yaml; do
    name="$(basename "$config" .yaml)"
    # shellcheck disable=SC2254  # ONLY is a glob on purpose
    case "$name" in $ONLY) ;; *) continue ;; esac
    while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do wait -n || true; done
    echo "[$part] $name: training (log: $OUT/logs/$part-$name.log)"
    logs+=("$OUT/logs/$part-$name.log")
    fit_one "$part" "$name" "$config" "$data" &
  done
done
wait
ran=${#logs[@]}
failed=()
for log in ${logs[@]+"${logs[@]}"}; do
  [ "$(cat "$log.rc" 2>/dev/null)" = 0 ] || failed+=("$(basename "$log" .log)")
done
[ "$ran" -gt 0 ] || die "no config matched --only '$ONLY'"

runs=()
for d in "$OUT"/part1/*/ "$OUT"/part2/*/; do
  [ -d "$d" ] && [ -z "${earlier[$d]+x}" ] && runs+=("${d%/}")
done
if [ ${#earlier[@]} -gt 0 ]; then
  echo "note: tables.md leaves out the ${#earlier[@]} earlier run(s) already in $OUT (its runs are this invocation's)"
fi
if [ ${#runs[@]} -gt 0 ]; then
  "${TFCOVID[@]}" report "${runs[@]}" --markdown "$OUT/tables.md" || failed+=("report")
fi
if [ ${#failed[@]} -gt 0 ]; then
  echo "reproduce_tables: ${#failed[@]} step(s) failed: ${failed[*]}" >&2
  exit 1
fi
echo "Tables: $OUT/tables.md"

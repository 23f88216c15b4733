#!/usr/bin/env bash
# make precision-curves: the same training run (same seed, same fortunes data) in fp32, bf16 and
# bf16 + FP8 (FP8 GEMMs, FP8 KV cache, FP8 dispatch), on tiny and cpu_d512, then the loss curves side
# by side and the relative gaps of the final smoothed LM loss (tools/bench/precision_report.py).
# With SAMPLES=2 each precision also runs with half the micro-batch (same data and seed, another
# summation order): the report prints how far that moves a run (the noise floor of the comparison).
# SEEDS="1234 1235 ..." repeats everything with each training.seed (other initial weights and data
# order); the report then also pairs the runs of one seed.
# PRECISIONS picks a subset; SETS="--set key=value ..." goes to every run (e.g. another learning rate).
# FP8_SETS="--set ..." goes to the FP8 runs only, for an ablation (for example
# FP8_SETS="--set training.fp8_passes=[dgrad,wgrad]": Fprop in bf16); it needs FP8_TAG=NAME, which the
# FP8 run directories carry (d512-fp8.NAME-seed1234), so that an ablation neither reuses nor replaces
# the plain FP8 runs while the bf16 and fp32 runs of the same output directory are shared.
# STOP=N trains only the first N steps of the STEPS-step schedule (dsv3-train --stop-after), as the
# early windows are where a precision's own effect shows; a finished run with at least N steps is
# reused, and the report compares steps 1 to N.
#   tools/bench/precision_curves.sh [BUILD_DIR] [OUT_DIR]
#   (CONFIGS="tiny d512", PRECISIONS="fp32 bf16 fp8", STEPS=300, STOP=STEPS, SAMPLES=1, SEEDS="", SETS="",
#    FP8_SETS="", FP8_TAG="", DATA=data/fortunes)
set -euo pipefail
cd "$(dirname "$0")/../.."
build=${1:-build}
out=${2:-$build/precision-curves}
configs=${CONFIGS:-"tiny d512"}
steps=${STEPS:-300}
stop=${STOP:-$steps}
fp8_sets=${FP8_SETS:-}
fp8_tag=${FP8_TAG:-}
case $stop in ''|*[!0-9]*) echo "STOP=$stop: expected a number of steps" >&2; exit 2 ;; esac
[ "$stop" -ge 1 ] && [ "$stop" -le "$steps" ] || { echo "STOP=$stop: expected 1 to STEPS=$steps" >&2; exit 2; }
stop_arg="" report_steps=()
if [ "$stop" -lt "$steps" ]; then stop_arg="--stop-after $stop" report_steps=(--steps "$stop"); fi
if [ -n "$fp8_sets" ] && [ -z "$fp8_tag" ]; then
  echo "FP8_SETS needs FP8_TAG=NAME, the suffix of its FP8 run directories" >&2; exit 2
fi
case $fp8_tag in *[!A-Za-z0-9_-]*) echo "FP8_TAG=$fp8_tag: letters, digits, - and _ only" >&2; exit 2 ;; esac
samples=${SAMPLES:-1}
seeds=${SEEDS:-default}
precisions=${PRECISIONS:-"fp32 bf16 fp8"}
common=${SETS:-}
data=${DATA:-data/fortunes}
[ -f "${data}_train.idx" ] || "$build/bin/dsv3-data" --input /usr/share/games/fortunes --format fortunes \
  --output-prefix "$data" --valid-fraction 0.02
export OPENBLAS_NUM_THREADS=${OPENBLAS_NUM_THREADS:-1}
set -f  # SETS and FP8_SETS are split into words below, never matched against file names
declare -A sets=(
  [fp32]="--set training.precision=fp32"
  [bf16]="--set training.precision=bf16"
  [fp8]="--set training.precision=bf16 --set training.use_fp8=true --set model.mla.use_fp8_kv=true --set model.moe.deep_ep_fp8=true")
runs=()
for c in $configs; do
  case $c in
    tiny) cfg=configs/deepseek_v3_tiny.yaml ;;
    d512) cfg=tools/bench/cpu_d512.yaml ;;
    *) echo "unknown config $c" >&2; exit 2 ;;
  esac
  micro=$(sed -n 's/^ *micro_batch_size: *\([0-9]*\).*/\1/p' "$cfg" | head -1)
  for p in $precisions; do
    [ -n "${sets[$p]:-}" ] || { echo "unknown precision $p (fp32, bf16 or fp8)" >&2; exit 2; }
   for seed in $seeds; do
   for k in $(seq 1 "$samples"); do
    dir=$out/$c-$p
    extra=""
    if [ "$p" = fp8 ] && [ -n "$fp8_tag" ]; then dir=$dir.$fp8_tag; extra="$fp8_sets"; fi
    if [ "$seed" != default ]; then dir=$dir-seed$seed; extra="$extra --set training.seed=$seed"; fi
    if [ "$k" = 2 ]; then dir=$dir-s2; extra="$extra --set training.micro_batch_size=$(( micro > 1 ? micro / 2 : 1 ))"; fi
    # A run of another schedule is never reused nor replaced: its steps are not this study's.
    had=$(sed -n 's/^ *train_steps: *\([0-9]*\).*/\1/p' "$dir/config.yaml" 2>/dev/null | head -1 || true)
    if [ -n "$had" ] && [ "$had" != "$steps" ]; then
      echo "$dir: a run of a $had-step schedule, not STEPS=$steps; give another OUT_DIR" >&2; exit 2
    fi
    if [ ! -f "$dir/metrics.jsonl" ] || [ "$(grep -c '"lm_loss"' "$dir/metrics.jsonl" || true)" -lt "$stop" ]; then
      rm -rf "$dir"; mkdir -p "$out"
      # shellcheck disable=SC2086
      "$build/bin/dsv3-train" --config "$cfg" --data "$data" --run-dir "$dir" --resume none \
        --set training.train_steps="$steps" --set training.eval_interval=0 --set training.log_interval=50 \
        --set checkpoint.interval=100000 ${sets[$p]} $common $extra $stop_arg > "$dir.log" 2>&1 ||
        { echo "run $c $p failed: $dir.log" >&2; exit 1; }
    fi
    label=$p
    if [ "$k" = 2 ]; then label="$p#2"; fi
    runs+=("$c:$label:$dir/metrics.jsonl")
   done
   done
  done
done
if [ -n "$fp8_tag" ]; then echo "fp8 below: the runs tagged $fp8_tag, with${fp8_sets:+ $fp8_sets} on top of the FP8 settings"; fi
python3 tools/bench/precision_report.py "${report_steps[@]}" "${runs[@]}"

#!/usr/bin/env bash
# tools/bench/precision_curves.sh end to end on a few steps of tiny: every run of every precision,
# seed and sample is trained and handed to the report, which pairs them by seed and prints the noise
# floor; a second call reuses the finished runs; an unknown precision exits 2 naming it.
set -u
bin=$(cd "$1" && pwd)
root=$(cd "$(dirname "$0")/../.." && pwd)
source "$root/tests/cli/training_setup.sh"
curves() {
  DATA="$work/c" CONFIGS=tiny PRECISIONS="fp32 bf16" SEEDS="11 12" SAMPLES=2 STEPS=3 \
    SETS="--set training.seq_length=32 --set training.schedule.warmup_steps=1" \
    bash "$root/tools/bench/precision_curves.sh" "$(dirname "$bin")" "$work/out"
}
out=$(curves 2>&1); rc=$?
echo "$out"
# 0 or 1 is the report's verdict on three steps; anything else is the script failing.
[ $rc -le 1 ] || fail "precision_curves.sh exited $rc"
for p in fp32 bf16; do
  for s in 11 12; do
    for d in "tiny-$p-seed$s" "tiny-$p-seed$s-s2"; do
      n=$(grep -c '"step"' "$work/out/$d/metrics.jsonl" 2>/dev/null)
      [ "${n:-0}" -ge 3 ] || fail "run $d did not train 3 steps"
    done
  done
done
grep -q "bf16 vs fp32: .*over 2 seeds" <<<"$out" || fail "no gap of the means over 2 seeds"
grep -q "paired by seed: " <<<"$out" || fail "no paired gaps"
grep -q "noise floor, fp32 with half the micro-batch" <<<"$out" || fail "no fp32 noise floor"
grep -q "noise floor, bf16 with half the micro-batch" <<<"$out" || fail "no bf16 noise floor"
grep -q "90% interval of the mean gap" <<<"$out" || fail "no interval"
before=$(stat -c %Y "$work/out/tiny-bf16-seed12/metrics.jsonl")
sleep 1
again=$(curves 2>&1); rc2=$?
[ $rc2 -eq $rc ] || fail "second call exited $rc2, the first $rc"
[ "$(stat -c %Y "$work/out/tiny-bf16-seed12/metrics.jsonl")" = "$before" ] || fail "a finished run was trained again"
# An FP8 ablation on the same output directory: the FP8 runs carry the tag and the extra settings and
# stop after STOP steps of the STEPS-step schedule; the bf16 runs of the first call are reused, and
# the report compares the steps every run has.
ablate() {
  DATA="$work/c" CONFIGS=tiny PRECISIONS="bf16 fp8" SEEDS="11 12" STEPS=3 STOP=2 \
    SETS="--set training.seq_length=32 --set training.schedule.warmup_steps=1" "$@" \
    bash "$root/tools/bench/precision_curves.sh" "$(dirname "$bin")" "$work/out"
}
out=$(ablate env FP8_SETS="--set training.fp8_passes=[dgrad,wgrad]" 2>&1); rc=$?
[ $rc -eq 2 ] || fail "FP8_SETS without FP8_TAG: exit $rc"
grep -q "FP8_SETS needs FP8_TAG" <<<"$out" || fail "FP8_SETS without FP8_TAG: $out"
out=$(ablate env FP8_SETS="--set training.fp8_passes=[dgrad,wgrad]" FP8_TAG=nofprop 2>&1); rc=$?
echo "$out"
[ $rc -le 1 ] || fail "ablation: precision_curves.sh exited $rc"
[ "$(stat -c %Y "$work/out/tiny-bf16-seed12/metrics.jsonl")" = "$before" ] || fail "ablation: a bf16 run was trained again"
for s in 11 12; do
  d=$work/out/tiny-fp8.nofprop-seed$s
  n=$(grep -c '"lm_loss"' "$d/metrics.jsonl" 2>/dev/null)
  [ "${n:-0}" -eq 2 ] || fail "ablation: $d trained ${n:-0} steps, expected STOP=2"
  grep -q " 3 steps, lr" "$d.log" || fail "ablation: $d.log does not train a 3-step schedule"
  grep -q "bf16 + fp8 gemms (dgrad, wgrad only) + fp8 kv cache + fp8 dispatch" "$d.log" ||
    fail "ablation: $d.log does not train with the FP8_SETS settings"
done
grep -q "tagged nofprop, with --set training.fp8_passes=\[dgrad,wgrad\]" <<<"$out" || fail "ablation: the tag is not named"
grep -q "LM loss by step (2 steps" <<<"$out" || fail "ablation: the report does not compare the first 2 steps"
grep -q "fp8 vs bf16: .*over 2 seeds" <<<"$out" || fail "ablation: no fp8 vs bf16 gap over 2 seeds"
# STOP on runs that went on longer: the report compares their first STOP steps.
out=$(ablate env PRECISIONS="fp32 bf16" 2>&1)
grep -q "LM loss by step (2 steps" <<<"$out" || fail "STOP=2 on 3-step runs: the report does not stop at step 2: $out"
# Finished runs of another schedule (STEPS=3) are refused, not reused or replaced.
out=$(ablate env STEPS=4 2>&1); rc=$?
[ $rc -eq 2 ] && grep -q "tiny-bf16-seed11: a run of a 3-step schedule, not STEPS=4" <<<"$out" ||
  fail "STEPS=4 on 3-step runs: exit $rc: $out"
[ "$(stat -c %Y "$work/out/tiny-bf16-seed12/metrics.jsonl")" = "$before" ] || fail "STEPS=4: a finished run was replaced"
out=$(ablate env STOP=4 2>&1); rc=$?
[ $rc -eq 2 ] && grep -q "STOP=4: expected 1 to STEPS=3" <<<"$out" || fail "STOP beyond STEPS: exit $rc: $out"
out=$(DATA="$work/c" CONFIGS=tiny PRECISIONS="fp16" bash "$root/tools/bench/precision_curves.sh" "$(dirname "$bin")" "$work/bad" 2>&1); rc=$?
[ $rc -eq 2 ] || fail "unknown precision: exit $rc"
grep -q "unknown precision fp16" <<<"$out" || fail "unknown precision: $out"
echo "precision_curves_cli: all checks passed"

#!/usr/bin/env bash
# A checkpoint written on one TP x PP x EP x DP layout resumes on another: 20 steps, the step-10
# checkpoint of the writing run is resumed (--resume <file>) on a different layout in its own run
# dir, and the losses of steps 11-20 match the uninterrupted single-rank run within 1e-5 relative.
# Sharded ZeRO-1/2 optimizer states are written by cases 1-3 and read back on other shardings.
# The resumed run says "resumed from" the step-10 file, and the file records its layout (h5dump -A).
# usage: reshard_training.sh <bin-dir> <mpiexec>
set -u
bin=$(cd "$1" && pwd) || exit 1
mpiexec=$2
source "$(dirname "${BASH_SOURCE[0]}")/training_setup.sh"
ckpt10=step_0000010.h5

# train <np> <run-dir> <args...>: one rank runs without mpiexec.
train() {
  local np=$1 dir=$2; shift 2
  mkdir -p "$(dirname "$dir")"
  local cmd=("$bin/dsv3-train" "${common[@]}" --run-dir "$dir" "$@")
  [ "$np" = 1 ] || cmd=("$mpiexec" --oversubscribe --allow-run-as-root -np "$np" "${cmd[@]}")
  "${cmd[@]}" >"$dir.log" 2>&1 || { cat "$dir.log"; fail "$np ranks, run dir $dir: $*"; }
}

# layout_of <checkpoint>: the root attribute "layout" as h5dump -A prints it.
layout_of() {
  local out
  out=$(h5dump -A "$1") || fail "h5dump -A $1"
  grep -q 'ATTRIBUTE "layout"' <<<"$out" || fail "h5dump -A $1: no root attribute layout"
  awk '/ATTRIBUTE "layout"/ { f = 1 } f && /\(0\):/ { sub(/^[^"]*"/, ""); sub(/"[^"]*$/, ""); print; exit }' <<<"$out"
}

# case <n> <label> <write-np> <write-args> -- <read-np> <read-args> -- <layout words of the write side>
run_case() {
  local n=$1 label=$2 wnp=$3; shift 3
  local wargs=() rargs=() words=() rnp
  while [ "$1" != -- ]; do wargs+=("$1"); shift; done; shift
  rnp=$1; shift
  while [ "$1" != -- ]; do rargs+=("$1"); shift; done; shift
  words=("$@")
  train "$wnp" "case$n/write" "${wargs[@]}" --stop-after 10
  [ -f "case$n/write/$ckpt10" ] || { cat "case$n/write.log"; fail "case $n: no $ckpt10 in case$n/write"; }
  local lay
  lay=$(layout_of "case$n/write/$ckpt10")
  for w in "${words[@]}"; do
    grep -qw -- "$w" <<<"$lay" || fail "case $n: layout attribute '$lay' does not name $w"
  done
  echo "case $n: step-10 checkpoint layout: $lay"
  train "$rnp" "case$n/read" "${rargs[@]}" --resume "case$n/write/$ckpt10"
  grep -q "resumed from case$n/write/$ckpt10 at step 10" "case$n/read.log" ||
    { cat "case$n/read.log"; fail "case $n: the resumed run does not say it resumed from the step-10 checkpoint"; }
  echo "$n|$label" >>cases
}

# The uninterrupted reference: one rank, 20 steps, no resume.
train 1 ref
grep -q "resumed from" ref.log && fail "the reference run resumed from a checkpoint"

run_case 1 "tp2+ep2 zero1 (4 ranks) -> pp2+dp2 zero0 (4 ranks)" \
  4 --set parallel.tp=2 --set parallel.ep=2 --set parallel.zero_stage=1 -- \
  4 --set parallel.pp=2 --set parallel.zero_stage=0 -- \
  tp=2 pp=1 ep=2 dp=2 zero_stage=1 world=4
run_case 2 "tp2+ep2 zero2 (4 ranks) -> 1 rank" \
  4 --set parallel.tp=2 --set parallel.ep=2 --set parallel.zero_stage=2 -- \
  1 -- \
  tp=2 pp=1 ep=2 dp=2 zero_stage=2 world=4
run_case 3 "pp2+ep2+dp2 zero2 (4 ranks) -> tp2+pp2+dp2 zero1 (8 ranks)" \
  4 --set parallel.pp=2 --set parallel.ep=2 --set parallel.zero_stage=2 -- \
  8 --set parallel.tp=2 --set parallel.pp=2 --set parallel.zero_stage=1 -- \
  tp=1 pp=2 ep=2 dp=2 zero_stage=2 world=4
run_case 4 "1 rank -> tp2+ep2+pp2+dp2 zero1 (8 ranks)" \
  1 -- \
  8 --set parallel.tp=2 --set parallel.ep=2 --set parallel.pp=2 --set parallel.zero_stage=1 -- \
  tp=1 pp=1 ep=1 dp=1 world=1

/usr/bin/python3 - <<'PY' || exit 1
import json, sys
def losses(d):
    return {r["step"]: r["loss"] for r in (json.loads(l) for l in open(d + "/metrics.jsonl") if '"lm_loss"' in l)}
ref = losses("ref")
if sorted(ref) != list(range(1, 21)):
    print("FAIL: the reference run logged steps %s, expected 1-20" % sorted(ref)); sys.exit(1)
ok = True
for line in open("cases"):
    n, label = line.rstrip("\n").split("|", 1)
    w, r = losses("case%s/write" % n), losses("case%s/read" % n)
    if sorted(w) != list(range(1, 11)) or sorted(r) != list(range(11, 21)):
        print("FAIL: case %s: the writing run logged steps %s and the resumed run %s, expected 1-10 and 11-20"
              % (n, sorted(w), sorted(r))); ok = False; continue
    relw = [abs(w[s] - ref[s]) / abs(ref[s]) for s in range(1, 11)]
    rel = [abs(r[s] - ref[s]) / abs(ref[s]) for s in range(11, 21)]
    print("case %s: %s: first resumed step rel %.1e, max over steps 11-20 %.1e (writing run, steps 1-10: max %.1e)"
          % (n, label, rel[0], max(rel), max(relw)))
    if max(rel) > 1e-5:
        ok = False
        print("FAIL: case %s: the resumed losses differ from the single-rank run by more than 1e-5 relative" % n)
        for s in range(11, 21):
            print("  step %2d: reference %.10f resumed %.10f rel %.2e" % (s, ref[s], r[s], rel[s - 11]))
sys.exit(0 if ok else 1)
PY
echo "reshard_training: ok"
